"""Our QIN held to an independent transcription of the authors' model.

The other model tests compare our QIN with itself (hoisted vs literal ASTA, fused vs reference
ops, float32 vs float64): a change that alters the function everywhere at once (ASTA without its
1/sqrt(d_a), QNN without its residual, LayerNorm for BatchNorm, PReLU before BatchNorm) passes
them. Here the same weights go into a second, plain-PyTorch account of what the authors' code
computes, written from these sources (line numbers refer to them):

  QIN    salmon1802/QIN, src/QIN_variety_v9.py at 678115c8 (the repository's HEAD: W_o without bias)
  FuxiCTR reczoo/FuxiCTR v2.3.7 (the embedding layers QIN builds on):
         fuxictr/pytorch/layers/embeddings/feature_embedding.py   (FE)
         fuxictr/pytorch/layers/pooling.py                         (pooling)
         fuxictr/preprocess/feature_processor.py                   (padding_idx 0 for every id feature)
         fuxictr/pytorch/models/rank_model.py                      (embedding regulariser)
  data   the authors' config/qin_config/dataset_config.yaml (feature order) and
         src/mmctr_dataloader.py BatchCollator (history window, mask, target appended last)

The transcription is functions over a dict of tensors keyed by the names the authors' model
gives its state_dict entries; ours_to_authors() maps our names to those. It shares no code with
qin/. Everything runs in float64 with dropout 0, so both models are deterministic and should
agree to rounding. The authors' forward ends in a sigmoid and their loss is BCE on
probabilities; both sides here compare logits and take BCE with logits, so the gradient
comparison is not blurred by that reformulation (up to about 1e-7 relative).
"""
import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from qin import QIN, QINConfig

# ---------------------------------------------------------------------------------------------
# The authors' model, transcribed
# ---------------------------------------------------------------------------------------------

# FuxiCTR's FeatureEmbedding holds a FeatureEmbeddingDict (FE 40) whose tables live in
# `embedding_layers` and whose per-feature encoders (the projection P) in `feature_encoders`.
EMB = "embedding_layer.embedding_layer."
TABLE = EMB + "embedding_layers.{}.weight"
CONTEXT = ("likes_level", "views_level")  # dataset_config.yaml: the non-meta, non-item features, in order
PROJECTION = EMB + "feature_encoders.item_emb_d128.weight"


def authors_shapes(num_items, num_tags, num_levels, embedding_dim, mm_dim, num_layers, num_row):
    """{state_dict name: shape} of the authors' model (its parameters and BatchNorm buffers)."""
    item_info_dim = 2 * embedding_dim + mm_dim  # QIN 34-37: item_id, item_tags + item_emb_d128's own width
    attention_dim = 2 * item_info_dim  # QIN 40-41
    # QIN 42: feature_map.sum_emb_out_dim() (FuxiCTR features.py 92-103: every non-meta feature)
    # plus item_info_dim once more for the pooled history.
    qnn_dim = 2 * embedding_dim + item_info_dim + item_info_dim
    shapes = {TABLE.format(f): (num_levels, embedding_dim) for f in CONTEXT}
    shapes[TABLE.format("item_id")] = (num_items, embedding_dim)
    shapes[TABLE.format("item_tags")] = (num_tags, embedding_dim)
    # FE 82-84: an embedding feature gets Linear(pretrain_dim, feat_dim, bias=False), both its own
    # embedding_dim (128) unless pretrain_dim is given; FE 114-115: its table is an Identity.
    shapes[PROJECTION] = (mm_dim, mm_dim)
    for w in "qkv":  # QIN 139-141
        shapes[f"attention_layers.W_{w}.weight"] = (attention_dim, item_info_dim)
    shapes["attention_layers.W_o.weight"] = (item_info_dim, attention_dim)  # QIN 142, bias=False
    for i in range(num_layers):  # QIN 196-202
        shapes[f"qnn.layer.{i}.linear.0.weight"] = (num_row * qnn_dim, qnn_dim)  # QIN 222
        shapes[f"qnn.layer.{i}.linear.0.bias"] = (num_row * qnn_dim,)
        for name in ("weight", "bias", "running_mean", "running_var"):
            shapes[f"qnn.norm.{i}.{name}"] = (qnn_dim,)  # QIN 199: BatchNorm1d
        shapes[f"qnn.norm.{i}.num_batches_tracked"] = ()
        shapes[f"qnn.activation.{i}.weight"] = (1,)  # QIN 202: nn.PReLU(), one slope
    shapes["qnn.fc.weight"], shapes["qnn.fc.bias"] = (1, qnn_dim), (1,)  # QIN 203
    return shapes


def authors_item_embedding(w, ids, item_tags, item_mm):
    """e(i) for flat ids: FE forward (173-199) over the item features, concatenated in feature-map
    order item_id, item_tags, item_emb_d128 (FE dict2tensor 155-171, flatten_emb=True)."""
    # Every id feature has padding_idx 0 (feature_processor 267, 325; FE 110-113).
    own = F.embedding(ids, w[TABLE.format("item_id")], padding_idx=0)
    tag_rows = F.embedding(item_tags[ids], w[TABLE.format("item_tags")], padding_idx=0)
    # item_tags is a sequence feature: MaskedAveragePooling (feature_processor 295, pooling 27-32).
    # A tag counts when its row is not all zeros; no tag at all gives 0 / 1e-12 = 0.
    counted = (tag_rows.sum(-1) != 0).to(tag_rows.dtype).sum(-1, keepdim=True)
    tags = tag_rows.sum(1) / (counted + 1e-12)
    mm = F.linear(item_mm[ids], w[PROJECTION])  # FE 191-197: Identity table, then the projection
    return torch.cat([own, tags, mm], dim=-1)


def authors_attention_scores(w, target, history, mask):
    """ScaledDotProductAttention's gated scores (QIN 151-152, 173-178): (B, L)."""
    query = F.linear(target, w["attention_layers.W_q.weight"])
    key = F.linear(history, w["attention_layers.W_k.weight"])
    scale = query.shape[-1] ** 0.5  # QIN 138: attention_dim ** 0.5, use_scale=True
    scores = torch.bmm(key, query.unsqueeze(-1)).squeeze(-1)
    return scores / scale * mask  # divided first (175), then the 0/1 mask multiplies (178)


def authors_attention(w, target, history, mask):
    """MultiHeadTargetAttention.forward (QIN 145-164): ReLU weights, no softmax, target residual."""
    weights = torch.relu(authors_attention_scores(w, target, history, mask))  # QIN 179
    value = F.linear(history, w["attention_layers.W_v.weight"])  # QIN 153
    pooled = (weights.unsqueeze(-1) * value).sum(1)  # QIN 180
    return F.linear(pooled, w["attention_layers.W_o.weight"]) + target  # QIN 163


def authors_qnn(w, x, num_layers, num_row, training):
    """QuadraticNeuralNetworks.forward (QIN 205-217) with net_dropout 0 (the Dropouts of 223, 214
    are identities): the logit, before QIN 67's sigmoid."""
    dim = x.shape[-1]
    for i in range(num_layers):
        residual = x  # QIN 207
        layer = f"qnn.layer.{i}.linear.0."
        # QuadraticLayer (QIN 227-230): h seen as (B, num_row, dim), row-major; x times the sum of its rows.
        h = F.linear(x, w[layer + "weight"], w[layer + "bias"]).view(-1, num_row, dim)
        x = x * h.sum(1)
        norm = f"qnn.norm.{i}."  # QIN 210: BatchNorm1d with its defaults (momentum 0.1, eps 1e-5)
        x = F.batch_norm(x, w[norm + "running_mean"], w[norm + "running_var"], w[norm + "weight"],
                         w[norm + "bias"], training=training, momentum=0.1, eps=1e-5)
        x = F.prelu(x, w[f"qnn.activation.{i}.weight"])  # QIN 212
        x = x + residual  # QIN 215
    return F.linear(x, w["qnn.fc.weight"], w["qnn.fc.bias"]).squeeze(-1)  # QIN 216


def authors_logits(w, batch, item_tags, item_mm, num_layers, num_row, training, max_len=64):
    """QIN_variety_v9.forward (QIN 52-68) on what the authors' BatchCollator hands it."""
    # BatchCollator: the last max_len history items, mask = seq > 0, and per row the history
    # followed by the target, flattened, looked up in item_info.
    seqs = batch["item_seq"][:, -max_len:]
    mask = (seqs > 0).to(item_mm.dtype)
    ids = torch.cat([seqs, batch["item_id"][:, None]], dim=1)
    items = authors_item_embedding(w, ids.reshape(-1), item_tags, item_mm).view(*ids.shape, -1)  # QIN 58-60
    target, history = items[:, -1], items[:, :-1]  # QIN 61-62
    context = [F.embedding(batch[f], w[TABLE.format(f)], padding_idx=0) for f in CONTEXT]  # QIN 55-57
    x = torch.cat([*context, target, authors_attention(w, target, history, mask)], dim=-1)  # QIN 63-65
    return authors_qnn(w, x, num_layers, num_row, training)  # QIN 66


def authors_embedding_l2(w, lam):
    """rank_model 68-86 with embedding_regularizer = lam: (lam / 2) ||p||_2^2 for every parameter
    of the FeatureEmbeddingDict (the four tables and the projection)."""
    return sum(lam / 2 * torch.norm(p, 2) ** 2 for name, p in w.items() if name.startswith(EMB))


# ---------------------------------------------------------------------------------------------
# Our names for the authors' tensors
# ---------------------------------------------------------------------------------------------

def ours_to_authors(num_layers):
    names = {
        "items.item_embedding.weight": TABLE.format("item_id"),
        "items.tag_embedding.weight": TABLE.format("item_tags"),
        "items.mm_projection.weight": PROJECTION,
        "likes_embedding.weight": TABLE.format("likes_level"),
        "views_embedding.weight": TABLE.format("views_level"),
        "output.weight": "qnn.fc.weight",
        "output.bias": "qnn.fc.bias",
    }
    for w in "qkvo":
        names[f"asta.W_{w}.weight"] = f"attention_layers.W_{w}.weight"
    for i in range(num_layers):
        names[f"qnn.quadratic.{i}.linear.weight"] = f"qnn.layer.{i}.linear.0.weight"
        names[f"qnn.quadratic.{i}.linear.bias"] = f"qnn.layer.{i}.linear.0.bias"
        for name in ("weight", "bias", "running_mean", "running_var", "num_batches_tracked"):
            names[f"qnn.norms.{i}.{name}"] = f"qnn.norm.{i}.{name}"
        names[f"qnn.activations.{i}.weight"] = f"qnn.activation.{i}.weight"
    return names


# ---------------------------------------------------------------------------------------------
# A small model with every weight random, its item info, a batch
# ---------------------------------------------------------------------------------------------

NUM_ITEMS, NUM_TAGS, EMBED_DIM, LAYERS = 30, 12, 6, 3
# mm_dim = embed_dim: the authors' projection is square (FE 82-84). attention_dim is left to our
# default, which must give the authors' 2 x item width (QIN 41).
SMALL = dict(num_items=NUM_ITEMS, num_tags=NUM_TAGS, embed_dim=EMBED_DIM, mm_dim=EMBED_DIM,
             qnn_layers=LAYERS, qnn_rows=4, dropout=0.0,
             asta_kernel="torch", qnn_kernel="torch")
CASES = {"default": {}, "literal": {"asta_form": "literal"}, "no_dedup": {"dedup_items": False}}
EMBEDDING_L2 = 2e-4  # the authors' embedding_regularizer (config/qin_config/model_config.yaml)


def randomise(model: nn.Module, generator: torch.Generator) -> None:
    """Every parameter and BatchNorm buffer away from its initial value (padding rows stay 0, as
    neither model ever moves them), so no term can hide behind a zero bias, an identity BatchNorm,
    a 0.25 slope or 1e-4 embeddings."""
    before = {k: v.clone() for k, v in model.state_dict().items() if v.is_floating_point()}

    def normal(t, std, mean=0.0):
        t.copy_(mean + std * torch.randn(t.shape, generator=generator, dtype=t.dtype))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Embedding):
                normal(module.weight, 0.5)
                module.weight[module.padding_idx].zero_()
            elif isinstance(module, nn.Linear):
                normal(module.weight, 1.0 / math.sqrt(module.in_features))
                if module.bias is not None:
                    normal(module.bias, 0.5)
            elif isinstance(module, nn.BatchNorm1d):
                normal(module.weight, 0.3, mean=1.0)
                normal(module.bias, 0.5)
                normal(module.running_mean, 0.5)
                module.running_var.copy_(0.5 + 1.5 * torch.rand(module.running_var.shape, generator=generator,
                                                                dtype=module.running_var.dtype))
            elif isinstance(module, nn.PReLU):
                module.weight.uniform_(0.05, 0.6, generator=generator)
    unchanged = [k for k, v in model.state_dict().items() if k in before and torch.equal(v, before[k])]
    assert not unchanged, f"not randomised: {unchanged}"


def item_info(generator):
    """Item tags (left-padded, some items without any, a repeated tag) and frozen embeddings
    (float32 values, as the authors' FE 192 casts them).

    Row 0, the padding item, has no tags but, unlike real data, a nonzero frozen embedding: with
    e(0) = 0 a padded position scores 0 whether masked or not, and a model that ignored the mask
    would pass."""
    tags = torch.randint(1, NUM_TAGS, (NUM_ITEMS, 5), generator=generator)
    lengths = torch.randint(0, 6, (NUM_ITEMS,), generator=generator)
    tags = torch.where(torch.arange(5) >= 5 - lengths[:, None], tags, 0)
    tags[0] = 0
    tags[3] = torch.tensor([0, 0, 4, 4, 9])  # a tag named twice counts twice
    tags[5] = torch.tensor([2, 3, 5, 7, 11])  # all five slots used
    tags[7] = 0  # an item without tags: a zero tag mean
    mm = torch.randn(NUM_ITEMS, EMBED_DIM, generator=generator).double()
    return tags, mm


def make_batch(generator, batch=8, length=10):
    """Eight rows: left-padded histories (two empty), repeated items, padding levels."""
    seq = torch.randint(1, NUM_ITEMS, (batch, length), generator=generator)
    lengths = torch.tensor([0, length, 3, 1, 7, 0, 5, length])  # two histories all padding
    seq = torch.where(torch.arange(length) >= length - lengths[:, None], seq, 0)  # left-padded
    item_id = torch.randint(1, NUM_ITEMS, (batch,), generator=generator)
    seq[1, 2] = seq[1, 6] = seq[1, 9]  # an item three times in one history
    seq[2, -1] = item_id[2]  # the target among its own history
    item_id[4] = item_id[3]  # two rows with the same target
    seq[6, -3:] = torch.tensor([3, 7, 5])  # items with a repeated tag, no tags, five tags
    levels = torch.randint(0, 11, (2, batch), generator=generator)
    levels[:, 0] = 0  # level 0: the padding row
    return {"item_id": item_id, "item_seq": seq, "likes_level": levels[0], "views_level": levels[1],
            "label": torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0, 1.0, 0.0], dtype=torch.float64)}


def build(case):
    """(our model, the authors' tensors holding its weights, tags, mm, batch)."""
    torch.manual_seed(0)
    ours = QIN(QINConfig(**SMALL, **CASES[case])).double()
    generator = torch.Generator().manual_seed(20242025)
    randomise(ours, generator)
    tags, mm = item_info(generator)
    ours.load_item_info({"item_tags": tags, "item_emb_d128": mm})
    names = ours_to_authors(LAYERS)
    state = ours.state_dict()
    assert set(state) == set(names), f"state_dict keys without an authors' counterpart: {set(state) ^ set(names)}"
    trainable = {name for name, _ in ours.named_parameters()}
    authors = {names[k]: v.detach().clone().requires_grad_(k in trainable) for k, v in state.items()}
    return ours, authors, tags, mm, make_batch(generator)


def their_logits(authors, batch, tags, mm, training):
    return authors_logits(authors, batch, tags, mm, LAYERS, SMALL["qnn_rows"], training)


def assert_close(actual, expected, what, rtol=1e-10):
    """Elementwise within rtol, or within rtol of the tensor's largest entry (for near-zero entries)."""
    scale = expected.abs().max().item()
    torch.testing.assert_close(actual, expected, rtol=rtol, atol=rtol * scale, msg=lambda m: f"{what}: {m}")


# ---------------------------------------------------------------------------------------------
# Tests
# ---------------------------------------------------------------------------------------------

def test_weight_shapes_match_the_authors_at_the_papers_size():
    """Our state_dict, mapped to the authors' names, has their shapes: at the paper's sizes
    (built on the meta device: no memory) and at the small sizes the tests below use."""
    for cfg, sizes in [(QINConfig(), (91_718, 11_740, 11, 128, 128, 4, 4)),
                       (QINConfig(**SMALL), (NUM_ITEMS, NUM_TAGS, 11, EMBED_DIM, EMBED_DIM, LAYERS, 4))]:
        with torch.device("meta"):
            ours = QIN(cfg)
        names = ours_to_authors(cfg.qnn_layers)
        mapped = {names[k]: tuple(v.shape) for k, v in ours.state_dict().items()}
        assert mapped == authors_shapes(*sizes)
    paper = authors_shapes(91_718, 11_740, 11, 128, 128, 4, 4)
    trainable = sum(math.prod(s) for k, s in paper.items() if "running" not in k and "num_batches" not in k)
    assert trainable == 31_244_293


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_the_authors_model(case, mode):
    ours, authors, tags, mm, batch = build(case)
    training = mode == "train"
    ours.train(training)
    with torch.no_grad():
        expected = their_logits(authors, batch, tags, mm, training)
        got = ours(batch)
    assert got.dtype == torch.float64 and got.shape == (8,)
    # Not vacuous: the logits are O(1) and differ between rows, and the ReLU gate both passes
    # and stops scores of real history items.
    assert 0.1 < expected.abs().max() < 1e3 and expected.std() > 0.1
    history, target = (authors_item_embedding(authors, ids.reshape(-1), tags, mm).view(*ids.shape, -1)
                       for ids in (batch["item_seq"], batch["item_id"]))
    real = batch["item_seq"] > 0
    scores = authors_attention_scores(authors, target, history, real.double())[real]
    assert 0.2 < (scores > 0).double().mean() < 0.8
    assert_close(got, expected, f"logits ({case}, {mode})")
    if training:  # BatchNorm's running statistics moved the same way
        for i in range(LAYERS):
            for name in ("running_mean", "running_var"):
                assert_close(getattr(ours.qnn.norms[i], name), authors[f"qnn.norm.{i}.{name}"],
                             f"qnn.norms.{i}.{name} after a train-mode forward")


@pytest.mark.parametrize("mode", ["eval", "train"])
@pytest.mark.parametrize("case", list(CASES))
def test_loss_gradients_match_the_authors_model(case, mode):
    """The gradient of BCE-with-logits + the embedding L2 for every parameter: ours by our
    backward (fused ops, dedup, hoisted ASTA), theirs by autograd through the transcription."""
    ours, authors, tags, mm, batch = build(case)
    training = mode == "train"
    ours.train(training)
    loss = F.binary_cross_entropy_with_logits(ours(batch), batch["label"]) + EMBEDDING_L2 / 2 * ours.embedding_l2()
    loss.backward()
    their_loss = (F.binary_cross_entropy_with_logits(their_logits(authors, batch, tags, mm, training), batch["label"])
                  + authors_embedding_l2(authors, EMBEDDING_L2))
    their_loss.backward()
    names = ours_to_authors(LAYERS)
    for name, parameter in ours.named_parameters():
        expected = authors[names[name]].grad
        assert expected is not None and expected.abs().max() > 0, f"{name}: no gradient in the authors' model"
        assert parameter.grad is not None, f"{name}: no gradient in ours"
        assert_close(parameter.grad, expected, f"gradient of {name} ({case}, {mode})")
    assert_close(loss.detach(), their_loss.detach(), "loss")
