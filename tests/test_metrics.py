import itertools

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from qin.metrics import log_loss, roc_auc


def brute_force_auc(labels, scores) -> float:
    """Count every (positive, negative) pair: 1 if the positive scores higher, 1/2 on a tie."""
    pos = [s for y, s in zip(labels, scores) if y == 1]
    neg = [s for y, s in zip(labels, scores) if y == 0]
    wins = sum(1.0 if p > n else 0.5 if p == n else 0.0 for p, n in itertools.product(pos, neg))
    return wins / (len(pos) * len(neg))


@given(
    st.lists(st.tuples(st.integers(0, 1), st.integers(0, 6)), min_size=2, max_size=60).filter(
        lambda rows: 0 < sum(y for y, _ in rows) < len(rows)
    )
)
def test_auc_matches_pairwise_count_with_ties(rows):
    # Scores drawn from a few integer values so that ties are frequent.
    labels = [y for y, _ in rows]
    scores = [s / 7.0 for _, s in rows]
    assert roc_auc(labels, scores) == pytest.approx(brute_force_auc(labels, scores), abs=1e-12)


def test_auc_known_values():
    assert roc_auc([0, 0, 1, 1], [0.1, 0.2, 0.3, 0.4]) == 1.0
    assert roc_auc([1, 1, 0, 0], [0.1, 0.2, 0.3, 0.4]) == 0.0
    assert roc_auc([0, 1, 0, 1], [0.5, 0.5, 0.5, 0.5]) == 0.5
    assert roc_auc([0, 1, 1], [0.2, 0.2, 0.9]) == 0.75


def test_auc_refuses_one_class_and_bad_labels():
    with pytest.raises(ValueError, match="one class"):
        roc_auc([1, 1], [0.1, 0.2])
    with pytest.raises(ValueError, match="0 or 1"):
        roc_auc([0, 2], [0.1, 0.2])
    with pytest.raises(ValueError, match="NaN"):
        roc_auc([0, 1], [0.1, float("nan")])


def test_log_loss_is_finite_at_certain_wrong_predictions():
    value = log_loss([1, 0], [0.0, 1.0])
    assert np.isfinite(value)
    assert value == pytest.approx(-np.log(1e-7), rel=1e-6)


def test_log_loss_matches_formula():
    labels = np.array([1, 0, 1, 0])
    probs = np.array([0.9, 0.2, 0.6, 0.4])
    expected = -np.mean(labels * np.log(probs) + (1 - labels) * np.log(1 - probs))
    assert log_loss(labels, probs) == pytest.approx(expected)


def test_labels_and_scores_of_unequal_length_are_refused():
    # numpy would broadcast one label against every score and report a figure.
    with pytest.raises(ValueError, match="labels and scores differ in length: 1 vs 3"):
        roc_auc([1], [0.1, 0.5, 0.9])
    with pytest.raises(ValueError, match="labels and probs differ in length: 1 vs 3"):
        log_loss([1], [0.1, 0.5, 0.9])
