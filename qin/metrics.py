"""Evaluation metrics: exact ROC AUC (ties count half) and clipped log loss."""
from __future__ import annotations

import numpy as np

LOGLOSS_EPS = 1e-7


def roc_auc(labels, scores) -> float:
    """Exact AUC: the probability that a random positive outscores a random negative, ties counting half.

    Computed from average ranks (the Mann-Whitney U statistic) in O(n log n).
    """
    labels = np.asarray(labels, dtype=np.float64).ravel()
    scores = np.asarray(scores, dtype=np.float64).ravel()
    if labels.shape != scores.shape:
        raise ValueError(f"labels and scores differ in length: {labels.size} vs {scores.size}")
    if not np.all((labels == 0) | (labels == 1)):
        raise ValueError("labels must be 0 or 1")
    if np.isnan(scores).any():
        raise ValueError("scores contain NaN")
    num_pos = labels.sum()
    num_neg = labels.size - num_pos
    if num_pos == 0 or num_neg == 0:
        raise ValueError("AUC is undefined when only one class is present")
    # Average rank (1-based) of each distinct score value gives tied scores half credit.
    _, inverse, counts = np.unique(scores, return_inverse=True, return_counts=True)
    last_rank = np.cumsum(counts)
    average_rank = last_rank - (counts - 1) / 2.0
    positive_rank_sum = average_rank[inverse][labels == 1].sum()
    return float((positive_rank_sum - num_pos * (num_pos + 1) / 2.0) / (num_pos * num_neg))


def log_loss(labels, probs, eps: float = LOGLOSS_EPS) -> float:
    """Mean binary cross-entropy with probabilities clipped to [eps, 1 - eps] (never inf or NaN)."""
    labels = np.asarray(labels, dtype=np.float64).ravel()
    probs = np.clip(np.asarray(probs, dtype=np.float64).ravel(), eps, 1.0 - eps)
    if labels.shape != probs.shape:
        raise ValueError(f"labels and probs differ in length: {labels.size} vs {probs.size}")
    return float(-np.mean(labels * np.log(probs) + (1.0 - labels) * np.log1p(-probs)))
