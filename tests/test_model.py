import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from qin import QIN, QINConfig
from qin.model import count_parameters, sum_of_squares

SMALL = dict(num_items=40, num_tags=15, embed_dim=8, mm_dim=6, attention_dim=16, dropout=0.0)


def small_model(seed=0, **overrides) -> QIN:
    torch.manual_seed(seed)
    model = QIN(QINConfig(**{**SMALL, **overrides}))
    generator = torch.Generator().manual_seed(seed + 1)
    tags = torch.randint(0, 15, (40, 5), generator=generator)
    tags[:, :2] = 0  # left padding
    tags[0] = 0
    tags[7] = 0  # an item without tags
    mm = torch.randn(40, 6, generator=generator)
    mm[0] = 0
    model.load_item_info(tags, mm)
    return model


def random_batch(batch=5, length=9, num_items=40, seed=0):
    g = torch.Generator().manual_seed(seed)
    seq = torch.randint(1, num_items, (batch, length), generator=g)
    lengths = torch.randint(0, length + 1, (batch,), generator=g)
    lengths[0] = 0  # an empty history
    lengths[1] = length
    positions = torch.arange(length).expand(batch, length)
    seq = torch.where(positions >= length - lengths[:, None], seq, 0)  # left-padded
    return {
        "item_id": torch.randint(1, num_items, (batch,), generator=g),
        "item_seq": seq,
        "likes_level": torch.randint(0, 11, (batch,), generator=g),
        "views_level": torch.randint(0, 11, (batch,), generator=g),
        "label": torch.randint(0, 2, (batch,), generator=g).float(),
    }


def test_paper_config_has_the_published_parameter_count():
    assert count_parameters(QIN(QINConfig())) == 31_244_293


def test_forward_shape_and_finite():
    model = small_model()
    logits = model(random_batch())
    assert logits.shape == (5,)
    assert torch.isfinite(logits).all()


def test_item_representation_follows_spec():
    model = small_model()
    enc = model.items
    ids = torch.tensor([0, 7, 3])
    rep = enc(ids)
    assert rep.shape == (3, 24)
    assert torch.all(rep[0] == 0), "the padding item must encode to zeros"
    assert torch.all(rep[1, 8:16] == 0), "an item whose tags are all padding has a zero tag mean"
    tags = enc.info_item_tags[3]
    real = tags[tags > 0]
    expected_tag_mean = enc.tag_embedding.weight[real].mean(0)
    torch.testing.assert_close(rep[2, 8:16], expected_tag_mean)
    torch.testing.assert_close(rep[2, :8], enc.item_embedding.weight[3])
    torch.testing.assert_close(rep[2, 16:], enc.mm_projection.weight @ enc.info_item_emb_d128[3])


def test_initialisation_follows_spec():
    model = QIN(QINConfig(**SMALL))
    emb = model.items.item_embedding.weight
    assert torch.all(emb[0] == 0) and torch.all(model.items.tag_embedding.weight[0] == 0)
    assert 0.5e-4 < emb[1:].std().item() < 2e-4
    for layer in model.qnn.quadratic:
        assert torch.all(layer.linear.bias == 0)
    assert all(a.weight.item() == 0.25 for a in model.qnn.activations)


def test_embedding_l2_covers_the_tables_and_P():
    model = small_model()
    names = {id(p): n for n, p in model.named_parameters()}
    covered = sorted(names[id(t)] for t in model.embedding_tables())
    assert covered == sorted([
        "items.item_embedding.weight", "items.tag_embedding.weight", "items.mm_projection.weight",
        "likes_embedding.weight", "views_embedding.weight",
    ])


@settings(max_examples=20, deadline=None)
@given(shapes=st.lists(st.lists(st.integers(0, 40), min_size=0, max_size=3), min_size=1, max_size=3),
       scale=st.sampled_from([1e-4, 1.0]), seed=st.integers(0, 2**16))
def test_sum_of_squares_is_the_l2_of_its_tensors(shapes, scale, seed):
    """The L2 term's value is pow(2).sum()'s within fp32 summation error, and its gradient is
    autograd's bitwise, added to what the tables already hold, for tensors of any rank (a scalar,
    a bias, an empty table)."""
    g = torch.Generator().manual_seed(seed)
    tables = [(torch.randn(shape, generator=g) * scale).requires_grad_() for shape in shapes]
    for t in tables:
        t.grad = torch.randn(t.shape, generator=g)
    before = [t.grad.clone() for t in tables]
    exact = sum((t.detach().double() ** 2).sum() for t in tables)
    (3.0 * sum_of_squares(tables)).backward()
    value = sum_of_squares(tables).detach()
    assert value.dtype == torch.float32
    assert abs(value.double() - exact) <= 1e-6 * exact
    for t, b in zip(tables, before):
        literal = t.detach().clone().requires_grad_()
        (3.0 * literal.pow(2).sum()).backward()
        assert torch.equal(t.grad, b + literal.grad)


def test_sum_of_squares_is_accurate_over_a_large_table_of_small_numbers():
    """MicroLens's item table at init: 11.7M numbers of std 1e-4 (a flat fp32 dot of them is
    1e-4 off; pow + sum and the row-wise sum are within 1e-6)."""
    table = torch.randn(91_718, 128, generator=torch.Generator().manual_seed(0)) * 1e-4
    exact = (table.double() ** 2).sum()
    assert abs(sum_of_squares([table]).double() - exact) <= 1e-6 * exact


def test_sum_of_squares_stays_fp32_under_autocast():
    """Called inside an autocast region (the trainer calls it outside), it still sums in fp32:
    under bf16 the sum would be 1e-3 off."""
    table = torch.randn(5_000, 128, generator=torch.Generator().manual_seed(0)) * 1e-2
    exact = (table.double() ** 2).sum()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        value = sum_of_squares([table])
    assert value.dtype == torch.float32
    assert abs(value.double() - exact) <= 1e-6 * exact


def _outputs_and_grads(model, batch):
    model.zero_grad()
    logits = model(batch)
    torch.nn.functional.binary_cross_entropy_with_logits(logits, batch["label"]).backward()
    return logits.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("variant", [dict(asta_form="literal"), dict(dedup_items=False)])
def test_exact_reformulations_agree(variant):
    """Hoisted ASTA and per-batch item dedup compute the same function and gradients."""
    reference = small_model(asta_form="hoisted", asta_kernel="torch").double()
    other = small_model(**{"asta_form": "hoisted", "asta_kernel": "torch", **variant}).double()
    other.load_state_dict(reference.state_dict())
    # The variant is built as such (a setting changed on a copy may never reach its module).
    assert (other.asta.form, other.items.dedup) == (variant.get("asta_form", "hoisted"),
                                                    variant.get("dedup_items", True))
    assert (reference.asta.form, reference.items.dedup) == ("hoisted", True)
    batch = random_batch()
    batch["label"] = batch["label"].double()
    out_a, grads_a = _outputs_and_grads(reference.train(), batch)
    out_b, grads_b = _outputs_and_grads(other.train(), batch)
    torch.testing.assert_close(out_a, out_b, rtol=1e-10, atol=1e-12)
    assert grads_a.keys() == grads_b.keys()
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], rtol=1e-9, atol=1e-12, msg=name)


def test_history_changes_the_prediction_and_padding_does_not():
    model = small_model().eval()
    # Unlike real data, the padding item gets a nonzero frozen embedding: with a zero one a padded
    # position scores 0 whether it is masked or not, and a model ignoring the mask would pass.
    with torch.no_grad():
        model.items.info_item_emb_d128[0].normal_(generator=torch.Generator().manual_seed(3))
    batch = random_batch()
    base = model(batch)
    longer = dict(batch, item_seq=torch.cat([torch.zeros(5, 3, dtype=torch.long), batch["item_seq"]], 1))
    torch.testing.assert_close(model(longer), base)  # extra left padding is invisible
    other = dict(batch, item_seq=batch["item_seq"].flip(0))
    assert not torch.allclose(model(other), base)


def test_dropout_is_active_in_training_only():
    model = small_model(dropout=0.5)
    batch = random_batch()
    model.train()
    assert not torch.equal(model(batch), model(batch))
    model.eval()
    assert torch.equal(model(batch), model(batch))


@pytest.mark.parametrize("asta_form", ["hoisted", "literal"])
def test_a_frozen_item_encoder_trains_the_rest(asta_form):
    """Fixed item representations (the encoder frozen, as with pretrained embeddings): backward
    runs on the CPU default path and reaches every other parameter, none of the encoder's."""
    model = small_model(asta_form=asta_form).train()
    model.items.requires_grad_(False)
    batch = random_batch()
    loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
    loss.backward()
    frozen = {f"items.{name}" for name, _ in model.items.named_parameters()}
    assert frozen
    for name, p in model.named_parameters():
        assert (p.grad is None) == (name in frozen), name


def test_item_info_must_be_loaded_before_the_first_forward():
    """The tags and the frozen embedding are data, not weights: a state_dict does not hold them. A
    model loaded from one (strictly, 'All keys matched') used to run on all-zero item data, a
    different model, silently; now it asks for load_item_info."""
    trained = small_model()
    fresh = QIN(QINConfig(**SMALL))
    fresh.load_state_dict(trained.state_dict())
    with pytest.raises(RuntimeError, match=r"were never loaded: call model.load_item_info"):
        fresh(random_batch())
    fresh.load_item_info(trained.items.info_item_tags, trained.items.info_item_emb_d128)
    torch.testing.assert_close(fresh.eval()(random_batch()), trained.eval()(random_batch()), rtol=0, atol=0)


@pytest.mark.parametrize("columns, mm, error, match", [
    (torch.zeros(40, 5, dtype=torch.long), None, TypeError, r"takes \{name: tensor\}"),
    ({"item_tags": torch.zeros(40, 5, dtype=torch.long)}, None, ValueError, r"lacks the item features \['item_emb_d128'\]"),
    (torch.full((40, 5), 1.7), torch.zeros(40, 6), ValueError, "item_tags holds ids, which must be integers"),
    (torch.full((40, 5), 15), torch.zeros(40, 6), ValueError, r"item_tags holds ids 15..15, outside its table's 0..14"),
    (torch.zeros(40, 4, dtype=torch.long), torch.zeros(40, 6), ValueError, r"item_tags \(40, 4\), expected \(40, 5\)"),
])
def test_load_item_info_names_what_does_not_fit(columns, mm, error, match):
    model = QIN(QINConfig(**SMALL))
    with pytest.raises(error, match=match):
        model.load_item_info(columns, mm)


def test_a_model_pickled_before_the_item_info_flag_still_runs():
    """torch.save(model) of an earlier version holds no info_loaded: it ran then and runs now."""
    import pickle

    model = small_model().eval()
    del model.items.__dict__["info_loaded"]  # what unpickling an earlier version's model gives
    again = pickle.loads(pickle.dumps(model))
    torch.testing.assert_close(again(random_batch()), small_model().eval()(random_batch()), rtol=0, atol=0)


def test_load_item_info_takes_numpy_arrays():
    model = small_model()
    other = QIN(QINConfig(**SMALL))
    other.load_state_dict(model.state_dict())
    other.load_item_info(model.items.info_item_tags.numpy(), model.items.info_item_emb_d128.numpy())
    torch.testing.assert_close(other.eval()(random_batch()), model.eval()(random_batch()), rtol=0, atol=0)


def test_a_din_config_is_not_built_as_qin():
    with pytest.raises(ValueError, match="build_model"):
        QIN(QINConfig(**SMALL, architecture="din"))


def _batch_with(**changes):
    batch = random_batch()
    for key, value in changes.items():
        if value is None:
            del batch[key]
        else:
            batch[key] = value(batch[key]) if callable(value) else value
    return batch


@pytest.mark.parametrize("changes, match", [
    (dict(likes_level=None), r"the batch lacks \['likes_level'\]"),
    (dict(item_id=lambda t: t[:, None]), r"batch\['item_id'\] must have shape \(5,\), got \(5, 1\)"),
    (dict(item_seq=lambda t: t[:4]), r"batch\['item_seq'\] must have shape \(5, \.\.\.\)"),
    (dict(item_seq=lambda t: t.float()), r"batch\['item_seq'\] holds ids, which must be integers"),
    (dict(item_seq=lambda t: t - 1), r"batch\['item_seq'\] holds ids -1\.\.\d+, outside its table's 0\.\.39"),
    (dict(views_level=lambda t: t + 11), r"batch\['views_level'\] holds ids 1[1-9]\.\.2[01], outside its table's 0\.\.10"),
    (dict(likes_level=[1, 2, 3, 4, 5]), r"batch\['likes_level'\] must be a tensor, got list"),
    (dict(item_id=lambda t: t[:0], item_seq=lambda t: t[:0], likes_level=lambda t: t[:0],
          views_level=lambda t: t[:0], label=lambda t: t[:0]), r"the batch is empty"),
])
@pytest.mark.parametrize("architecture", ["qin", "din"])
def test_a_batch_the_model_cannot_read_is_named(changes, match, architecture):
    """Not an IndexError from an embedding, a cat's dimension error or a failed torch._check."""
    from qin.models import build_model

    torch.manual_seed(0)
    model = build_model(QINConfig(**SMALL, architecture=architecture))
    model.load_item_info(torch.zeros(40, 5, dtype=torch.long), torch.zeros(40, 6))
    with pytest.raises(ValueError, match=match):
        model(_batch_with(**changes))


@pytest.mark.parametrize("kernel", ["torch", "triton"])
def test_first_order_gradients_do_not_change_under_create_graph(kernel):
    """backward(create_graph=True) (a gradient penalty, a meta-learning step) gives QIN the same
    gradients as plain backward: with dedup the attention query is computed from the representations
    the op reads, a path the ops' higher-order recomputation must not count twice (it did: items.*
    18% off)."""
    model = small_model(asta_kernel=kernel, qnn_kernel=kernel).double().train()
    batch = random_batch()
    batch["label"] = batch["label"].double()
    params = [p for p in model.parameters()]

    def grads(create_graph):
        torch.manual_seed(0)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"])
        return torch.autograd.grad(loss, params, create_graph=create_graph, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), grads(False), grads(True)):
        if a is None:
            assert b is None, name
            continue
        torch.testing.assert_close(b, a, rtol=1e-9, atol=1e-12, msg=name)


def test_vmap_over_a_model_in_eval():
    """torch.func.vmap over batches: the batch check reads no values under a transform."""
    model = small_model(dedup_items=False).eval()
    batch = {k: v for k, v in random_batch().items() if k != "label"}
    stacked = {k: torch.stack([v, v]) for k, v in batch.items()}
    out = torch.func.vmap(lambda b: model(b))(stacked)
    torch.testing.assert_close(out, torch.stack([model(batch)] * 2))
