"""The paper's ablation switches and the DIN baseline: each builds, trains, and changes only what it claims."""
import pytest
import torch
import torch.nn as nn

from qin import QIN, QINConfig
from qin.config import ConfigError, load_config
from qin.din import DIN
from qin.model import MLPLayer, count_parameters
from qin.models import build_model

from test_model import SMALL, random_batch, small_model


def shapes(model: nn.Module) -> dict[str, tuple]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def same_weights(source: nn.Module, target: nn.Module) -> None:
    target.load_state_dict(source.state_dict())


def test_without_asta_only_the_attention_goes_and_the_qnn_narrows():
    base, ablated = shapes(small_model()), shapes(small_model(use_asta=False))
    assert not any(name.startswith("asta.") for name in ablated)
    assert {n for n in base if not n.startswith("asta.")} == set(ablated)
    item, width = 3 * SMALL["embed_dim"], 2 * SMALL["embed_dim"] + 3 * SMALL["embed_dim"]
    assert ablated["qnn.quadratic.0.linear.weight"] == (4 * width, width)
    assert ablated["output.weight"] == (1, width) and base["output.weight"] == (1, width + item)


def test_without_asta_the_history_is_never_read():
    model = small_model(use_asta=False).eval()
    batch = random_batch()
    other = dict(batch, item_seq=torch.randint(1, 40, batch["item_seq"].shape))
    assert torch.equal(model(batch), model(other))


def test_mlp_instead_of_qnn_has_the_same_size_and_everything_else_unchanged():
    base, ablated = small_model(), small_model(interaction="mlp")
    assert all(isinstance(layer, MLPLayer) for layer in ablated.qnn.quadratic)
    qnn_size = lambda m: sum(p.numel() for n, p in m.named_parameters() if n.startswith("qnn.quadratic"))
    assert abs(qnn_size(ablated) - qnn_size(base)) / qnn_size(base) < 0.01
    rest = lambda m: {n: s for n, s in shapes(m).items() if not n.startswith("qnn.quadratic")}
    assert rest(base) == rest(ablated)
    # At the paper's size too: within 1% of QIN's parameter count.
    full = count_parameters(QIN(QINConfig(interaction="mlp")))
    assert abs(full - 31_244_293) / 31_244_293 < 0.01, full


def test_relu_instead_of_prelu_changes_only_the_activation():
    base, ablated = small_model(), small_model(qnn_activation="relu")
    assert all(isinstance(a, nn.ReLU) for a in ablated.qnn.activations)
    assert {n: s for n, s in shapes(base).items() if ".activations." not in n} == shapes(ablated)


@pytest.mark.parametrize("form", ["literal", "hoisted"])
def test_softmax_attention_weights_sum_to_one_over_the_history(form):
    model = small_model(asta_activation="softmax", asta_form=form).double().eval()
    assert shapes(model) == shapes(small_model())
    asta = model.asta
    target = torch.randn(3, 24, dtype=torch.float64)
    history = torch.randn(3, 5, 24, dtype=torch.float64)
    mask = torch.tensor([[0, 0, 0, 0, 1], [0, 0, 0, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = asta(target, history, mask)
    # One history item: weight 1 on it. No history: nothing pooled. Full: a convex combination.
    torch.testing.assert_close(out[0], asta.W_o(asta.W_v(history[0, 4])) + target[0])
    torch.testing.assert_close(out[1], target[1])
    same = asta(target, history.clone(), mask)
    torch.testing.assert_close(out, same)
    assert torch.isfinite(out).all()


def test_softmax_hoisted_equals_literal():
    literal = small_model(asta_activation="softmax", asta_form="literal").double().eval()
    hoisted = small_model(asta_activation="softmax", asta_form="hoisted").double().eval()
    same_weights(literal, hoisted)
    batch = random_batch()
    torch.testing.assert_close(literal(batch), hoisted(batch))


def test_asta_dropout_acts_only_in_training_and_is_the_same_in_both_forms():
    base = small_model().double().eval()
    ablated = small_model(asta_dropout=0.5).double().eval()
    assert shapes(base) == shapes(ablated)
    same_weights(base, ablated)
    batch = random_batch(batch=8, length=12)
    torch.testing.assert_close(base(batch), ablated(batch))  # evaluation: no dropout
    literal = small_model(asta_dropout=0.5, asta_form="literal").double()
    same_weights(ablated, literal)
    ablated.asta.train(), literal.asta.train()
    t, h, m = torch.randn(8, 24, dtype=torch.float64), torch.randn(8, 12, 24, dtype=torch.float64), batch["item_seq"] > 0
    torch.manual_seed(3)
    a = ablated.asta(t, h, m)
    torch.manual_seed(3)
    b = literal.asta(t, h, m)
    torch.testing.assert_close(a, b)
    torch.manual_seed(4)
    assert not torch.allclose(ablated.asta(t, h, m), a), "dropout drew the same weights for another seed"


def test_din_follows_the_spec_sizes():
    cfg = QINConfig(architecture="din", **SMALL)
    model = build_model(cfg)
    assert isinstance(model, DIN)
    p = shapes(model)
    item = 2 * 64 + SMALL["mm_dim"]
    assert p["items.item_embedding.weight"] == (40, 64)
    # P keeps the frozen embedding's width (FuxiCTR's feature encoder), and is under the embedding L2.
    assert p["items.mm_projection.weight"] == (SMALL["mm_dim"], SMALL["mm_dim"])
    assert any(t is model.items.mm_projection.weight for t in model.embedding_tables())
    assert p["attention.0.0.weight"] == (512, 4 * item)
    assert p["dnn.0.weight"] == (1024, 2 * 64 + 2 * item)
    assert p["output.weight"] == (1, 256)
    model.load_item_info(torch.randint(0, 15, (40, 5)), torch.randn(40, 6))
    logits = model(random_batch())
    assert logits.shape == (5,) and torch.isfinite(logits).all()


def test_a_din_checkpoint_from_before_p_loads_as_p_equal_to_the_identity():
    """Such a run let the frozen embedding in as it is: P = I is that function."""
    cfg = QINConfig(architecture="din", **SMALL)
    torch.manual_seed(0)
    old = build_model(cfg).eval()
    with torch.no_grad():
        old.items.mm_projection.weight.copy_(torch.eye(SMALL["mm_dim"]))
    state = {k: v for k, v in old.state_dict().items() if k != "items.mm_projection.weight"}
    torch.manual_seed(1)
    new = build_model(cfg).eval()
    new.load_state_dict(state)
    torch.testing.assert_close(new.items.mm_projection.weight, torch.eye(SMALL["mm_dim"]))
    info = (torch.randint(0, 15, (40, 5)), torch.randn(40, 6))
    old.load_item_info(*info)
    new.load_item_info(*info)
    batch = random_batch()
    torch.testing.assert_close(new(batch), old(batch), rtol=0, atol=0)


def test_a_partial_load_of_din_weights_leaves_p_as_it_is():
    model = build_model(QINConfig(architecture="din", **SMALL))
    before = model.items.mm_projection.weight.detach().clone()
    result = model.load_state_dict({"output.bias": torch.zeros(1)}, strict=False)
    assert "items.mm_projection.weight" in result.missing_keys
    torch.testing.assert_close(model.items.mm_projection.weight, before, rtol=0, atol=0)


def test_din_attention_ignores_padding():
    cfg = QINConfig(architecture="din", **SMALL, din_attention_units=[8], din_dnn_units=[16])
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    model.load_item_info(torch.randint(0, 15, (40, 5)), torch.randn(40, 6))
    batch = random_batch()
    # More left padding must not change anything: padded positions get zero weight.
    longer = dict(batch, item_seq=torch.cat([torch.zeros(5, 4, dtype=torch.long), batch["item_seq"]], dim=1))
    torch.testing.assert_close(model(batch), model(longer))
    # While a real item in the same slots does.
    filled = dict(batch, item_seq=torch.cat([torch.full((5, 4), 3), batch["item_seq"]], dim=1))
    assert not torch.allclose(model(batch), model(filled))


@pytest.mark.parametrize("override", [
    "model.use_asta=false", "model.interaction=mlp", "model.asta_activation=softmax",
    "model.qnn_activation=relu", "model.asta_dropout=0.1", "model.architecture=din",
])
def test_each_variant_trains_a_few_steps(override, tmp_path):
    from qin.data import load_dataset
    from qin.synth import make_dataset
    from qin.train import Trainer, fill_vocab_from_data

    data = make_dataset(tmp_path / "ds", rows=600, items=50, seed=1, valid_rows=200, test_rows=10)
    cfg = load_config(overrides=["model.embed_dim=8", "model.attention_dim=16", "model.din_embed_dim=8",
                                 "model.din_attention_units=[16]", "model.din_dnn_units=[32,16]",
                                 "train.batch_size=128", "train.epochs=1", "train.device=cpu",
                                 "train.max_steps_per_epoch=3", override])
    dataset = load_dataset(data)
    fill_vocab_from_data(cfg, dataset)
    trainer = Trainer(cfg, dataset, tmp_path / "run", log=lambda *_: None)
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    state = trainer.fit()
    assert state.step == 3 and 0.0 <= state.best_auc <= 1.0
    changed = [n for n, p in trainer.model.named_parameters() if not torch.equal(p, before[n])]
    assert len(changed) > len(before) // 2, changed


@pytest.mark.parametrize("override, named", [
    ("model.architecture=transformer", "model.architecture"),
    ("model.asta_activation=gelu", "model.asta_activation"),
    ("model.asta_dropout=1.5", "model.asta_dropout"),
    ("model.din_dnn_units=[]", "model.din_dnn_units"),
])
def test_bad_ablation_values_are_refused(override, named):
    with pytest.raises(ConfigError, match=named):
        load_config(overrides=[override])


@pytest.mark.parametrize("overrides, unused", [
    ({}, {}),
    (dict(architecture="din"), {"asta_kernel": "model.architecture=din", "qnn_kernel": "model.architecture=din"}),
    (dict(asta_form="literal", interaction="mlp"), {"asta_kernel": "model.asta_form=literal",
                                                    "qnn_kernel": "model.interaction=mlp"}),
    (dict(use_asta=False), {"asta_kernel": "model.use_asta=false"}),
    (dict(asta_activation="softmax"), {"asta_kernel": "model.asta_activation=softmax"}),
    (dict(dropout=0.0), {"qnn_kernel": "model.dropout=0"}),
])
def test_the_kernel_settings_a_model_has_no_op_for(overrides, unused):
    """What `qin train` logs as having no effect, and does not refuse where Triton cannot run."""
    from qin.models import ops_not_in

    assert ops_not_in(QINConfig(**overrides)) == unused
