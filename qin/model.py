"""The Quadratic Interest Network, section by section as SPEC.md describes it.

    item representation  e(i) = [E_item[i], mean(E_tag[tags(i)]), P item_emb_d128[i]]   (384)
                         (any schema: the parts of the item features, qin.features)
    ASTA                 out = Wo sum_l ReLU(m_l q.k_l / sqrt(d_a)) v_l + t
    QNN                  x <- x + Dropout(PReLU(BN(x * sum_r Dropout(W_r x + b_r))))      (x4)
    output               p = sigmoid(w . x + b)
"""
from __future__ import annotations

import contextlib
import math
from collections.abc import Mapping
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from kernels.choice import source_hash
from kernels.dropout import Dropout, dropout
from kernels.utils import autocast_dtype, transforms_active
from qin.config import QINConfig
from qin.features import Feature, context_features, item_features, model_features
from qin.recompute import recomputed_in_backward


# MicroLens features keep the module names they had before features could be declared, so the
# state_dict keys (and older checkpoints) stay as they were.
MODULE_NAMES = {"item_id": "item_embedding", "item_tags": "tag_embedding", "item_emb_d128": "mm_projection",
                "likes_level": "likes_embedding", "views_level": "views_embedding"}


def feature_module(feature: Feature, dim: int, project_to_dim: bool) -> nn.Module:
    """The trainable part of one feature (FuxiCTR's FeatureEmbedding): a table, a numeric weight
    vector, or the projection P of a frozen embedding: to the model's `dim` (QIN), or, without
    `project_to_dim` (DIN, as FuxiCTR's feature encoder of an `embedding` feature), to its own
    width."""
    if feature.has_ids:
        return nn.Embedding(feature.vocab_size, feature.embedding_dim or dim, padding_idx=feature.padding_idx)
    if feature.type == "numeric":
        return nn.Linear(1, feature.embedding_dim or dim, bias=False)
    return nn.Linear(feature.embedding_dim, dim if project_to_dim else feature.embedding_dim, bias=False)


def embed_feature(feature: Feature, module: nn.Module, values: torch.Tensor,
                  graph_safe: bool = False) -> torch.Tensor:
    """(N, width) for N values of one feature; graph_safe: see FeatureModules.graph_safe."""
    if feature.type == "categorical":
        return module(values)
    if feature.type == "sequence":
        if graph_safe:
            return masked_mean_embedding(values, module.weight)
        # mode="mean" with padding_idx leaves id 0 out of the mean; an all-padding bag gives zeros.
        return F.embedding_bag(values, module.weight, mode="mean", padding_idx=0)
    if feature.type == "numeric":
        return module(values.to(module.weight.dtype).unsqueeze(-1))
    return module(values)


def masked_mean_embedding(values: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """F.embedding_bag(values, weight, mode="mean", padding_idx=0) for values (N, T), from a gather
    and a masked mean. Its backward is a scatter-add, where embedding_bag's sorts the ids and sizes
    its output on the host: a CUDA graph cannot hold that (PyTorch issue 93807). Compiled, the
    gather, mask and mean are one kernel: the (N, T, width) rows are never stored. A multiply and
    a sum, not a product (einsum): autocast would round a product to 16 bits, as it does not
    round embedding_bag."""
    named = (values != 0).to(weight.dtype)
    total = (F.embedding(values, weight) * named.unsqueeze(-1)).sum(1)
    return total / named.sum(1, keepdim=True).clamp_min(1.0)


class FeatureModules(nn.Module):
    """Holds one module per feature, under MODULE_NAMES or `<name>_embedding` / `<name>_projection`.

    graph_safe (set by make_graph_safe, for CUDA graphs): every op of the embeddings, and of the
    item dedup, keeps its output size fixed by the input shapes and never waits for the device.
    It computes the same function."""

    graph_safe = False

    def embed(self, feature: Feature, values: torch.Tensor) -> torch.Tensor:
        return embed_feature(feature, self.module_of(feature), values, self.graph_safe)

    def add_feature_modules(self, features: list[Feature], dim: int, project_to_dim: bool) -> None:
        self._feature_modules = getattr(self, "_feature_modules", {})
        for feature in features:
            name = MODULE_NAMES.get(feature.name) or (
                f"{feature.name}_projection" if feature.type == "embedding" else f"{feature.name}_embedding")
            self.add_module(name, feature_module(feature, dim, project_to_dim))
            self._feature_modules[feature.name] = name

    def module_of(self, feature: Feature) -> nn.Module:
        return getattr(self, self._feature_modules[feature.name])

    def feature_tables(self, features: list[Feature]) -> list[torch.Tensor]:
        """The weights of these features' modules: the tensors under the embedding L2 penalty."""
        return [self.module_of(f).weight for f in features]


def check_ids(what: str, values: torch.Tensor, vocab_size: int, read_values: bool = True) -> None:
    """Ids must be integers, and (where read_values: it reads them) rows of their feature's table."""
    if values.is_floating_point() or values.is_complex() or values.dtype == torch.bool:
        raise ValueError(f"{what} holds ids, which must be integers, got {values.dtype}")
    if read_values and values.numel() and (int(values.min()) < 0 or int(values.max()) >= vocab_size):
        raise ValueError(f"{what} holds ids {int(values.min())}..{int(values.max())}, outside its table's "
                         f"0..{vocab_size - 1}")


def _item_info_buffer(feature: Feature, num_items: int) -> torch.Tensor:
    if feature.type == "sequence":
        return torch.zeros(num_items, feature.max_len, dtype=torch.long)
    if feature.type == "categorical":
        return torch.zeros(num_items, dtype=torch.long)
    if feature.type == "embedding":
        return torch.zeros(num_items, feature.embedding_dim)
    return torch.zeros(num_items)


def static_unique(ids: torch.Tensor, num_ids: int) -> tuple[torch.Tensor, torch.Tensor]:
    """torch.unique(ids, return_inverse=True) in a tensor whose size the shapes fix, for CUDA graphs.

    For ids (N,) in [0, num_ids): (slots, inverse) with slots of size min(N, num_ids) holding the
    distinct ids in ascending order first, as torch.unique returns them, then ids no position
    names (encoded, never read), and slots[inverse] == ids. torch.unique's output size depends
    on the data, so the host must wait for the device to learn it, which no CUDA graph can hold.
    Here no size depends on the data, and nothing waits for the device.
    """
    n = ids.shape[0]
    if num_ids <= n:
        # A catalogue no larger than the batch (MicroLens: 91,718 items, 532,480 positions at
        # batch 8192): mark the ids named, then order the catalogue named-first.
        named = torch.zeros(num_ids, dtype=torch.bool, device=ids.device).index_fill_(0, ids, True)
        rank = named.cumsum(0) - 1  # among the named ids, for each named id
        unnamed_before = torch.arange(num_ids, device=ids.device) - rank - 1  # for each unnamed id
        slot = torch.where(named, rank, rank[-1] + 1 + unnamed_before)  # a permutation of the catalogue
        slots = torch.empty_like(slot).scatter_(0, slot, torch.arange(num_ids, device=ids.device))
        return slots, rank[ids]
    # Fewer positions than items: sort them; each run of equal ids takes the next slot.
    ordered, order = ids.sort()
    first = torch.ones_like(ordered, dtype=torch.bool)
    first[1:] = ordered[1:] != ordered[:-1]
    rank = first.cumsum(0) - 1
    inverse = torch.empty_like(rank).scatter_(0, order, rank)
    # Every position of a run writes the same id to its slot; the slots after the last run keep
    # id 0, the padding item.
    slots = torch.zeros_like(ordered).scatter_(0, rank, ordered)
    return slots, inverse


class ItemEncoder(FeatureModules):
    """e(i) = concat over the item features of their parts; on MicroLens
    concat(E_item[i], masked_mean(E_tag[tags(i)]), P @ item_emb_d128[i]).

    The item attributes other than the id (tags, the frozen embedding) are data, not parameters:
    they live in non-persistent buffers `info_<name>` filled by `load_item_info`, which a
    state_dict does not hold; the encoder refuses to run before they are loaded (all zeros, they
    would give another model than the one trained, silently). Without `project_to_dim` (the DIN
    baseline) P keeps the frozen embedding's width.
    """

    # Whether load_item_info has run (set per instance). The class's True serves an encoder pickled
    # whole (torch.save(model)) before the flag existed: it ran then, and runs as it did.
    info_loaded = True

    def __init__(self, cfg: QINConfig, embed_dim: int | None = None, project_to_dim: bool = True):
        super().__init__()
        self.features = item_features(model_features(cfg))
        self.key = self.features[0]
        self.add_feature_modules(self.features, embed_dim or cfg.embed_dim, project_to_dim)
        for feature in self.features[1:]:
            self.register_buffer(f"info_{feature.name}", _item_info_buffer(feature, self.key.vocab_size),
                                 persistent=False)
        self.info_loaded = len(self.features) == 1  # nothing to load where the id is the only item feature
        self.dedup = cfg.dedup_items

    @property
    def tables(self) -> list[torch.Tensor]:
        """The item-side tensors under the embedding L2 penalty: E_item, E_tag and P on MicroLens."""
        return self.feature_tables(self.features)

    def load_item_info(self, columns, mm: torch.Tensor | None = None) -> None:
        """Fill the item attributes from {name: tensor or array with row = item id}; (tags, mm) on
        MicroLens. Ids must be integers within their feature's vocabulary.

        A declared item vocabulary may hold more rows than the data: those items stay all zeros."""
        names = [feature.name for feature in self.features[1:]]
        if mm is not None:
            columns = {"item_tags": columns, "item_emb_d128": mm}
        if not isinstance(columns, Mapping):
            raise TypeError(f"load_item_info takes {{name: tensor}} for the item features {names} "
                            f"(or (tags, mm) on MicroLens), got {type(columns).__name__}")
        missing = [name for name in names if name not in columns]
        if missing:
            raise ValueError(f"item_info lacks the item features {missing} (given: {sorted(columns)})")
        for feature in self.features[1:]:
            buffer, given = getattr(self, f"info_{feature.name}"), torch.as_tensor(columns[feature.name])
            if given.shape[1:] != buffer.shape[1:] or given.shape[0] > buffer.shape[0]:
                raise ValueError(f"item_info does not fit the model: {feature.name} {tuple(given.shape)}, "
                                 f"expected {tuple(buffer.shape)}")
            if feature.has_ids:
                check_ids(f"item_info {feature.name}", given, feature.vocab_size)
            buffer.zero_()
            buffer[: given.shape[0]].copy_(given)
        self.info_loaded = True

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if not self.info_loaded:
            raise RuntimeError(f"the item features {[f.name for f in self.features[1:]]} were never loaded: call "
                               f"model.load_item_info(...) first (item data, not weights: a state_dict does not "
                               f"hold them)")
        flat = ids.reshape(-1)
        parts = [self.embed(f, flat if f is self.key else getattr(self, f"info_{f.name}")[flat]) for f in self.features]
        rep = torch.cat(parts, dim=-1)
        return rep.view(*ids.shape, rep.shape[-1])

    def unique_ids(self, target_ids: torch.Tensor, history_ids: torch.Tensor
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(the distinct item ids of the batch (U,), target index (B,), history index (B, L) into them).

        A batch names far fewer distinct items than positions: each is encoded once."""
        ids = torch.cat([target_ids, history_ids.reshape(-1)])
        if self.graph_safe:
            unique_ids, inverse = static_unique(ids, self.key.vocab_size)
        else:
            unique_ids, inverse = torch.unique(ids, return_inverse=True)
            # The count of distinct ids is data-dependent; telling torch.compile it is at least one
            # lets the gathers' backward be compiled (a batch always names one item, the target).
            torch._check(unique_ids.shape[0] >= 1)
        batch = target_ids.shape[0]
        return unique_ids, inverse[:batch], inverse[batch:].view(history_ids.shape)

    def unique_representations(self, target_ids: torch.Tensor, history_ids: torch.Tensor
                               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(reps (U, D) of the distinct item ids of the batch, target index (B,), history index (B, L))."""
        unique_ids, target_index, history_index = self.unique_ids(target_ids, history_ids)
        return self(unique_ids), target_index, history_index

    def encoding_again(self, ids: torch.Tensor) -> Callable[[], torch.Tensor] | None:
        """A function that computes self(ids) again, with the weights and under the autocast state in
        force now: the same values as self(ids) now. The weights are those of this call (under
        torch.func.functional_call, the ones it put in; they are gone again when backward runs), and
        a weight changed in place before backward (a step on a graph kept with retain_graph) is an
        error, as autograd's own saved tensors make it. Autograd records the function as the
        caller's grad mode says (in backward: only under create_graph=True).

        None (autograd keeps the representations) where a run again could differ or act twice: a
        forward hook (embedding noise, activation capture) or a parametrization (spectral norm's
        power iteration) on the encoder or any module in it, or a global module hook."""
        if self._runs_more_than_its_weights():
            return None
        device_type = ids.device.type
        enabled, dtype = torch.is_autocast_enabled(device_type), torch.get_autocast_dtype(device_type)
        weights = {**dict(self.named_parameters()), **dict(self.named_buffers())}
        versions = {name: t._version for name, t in weights.items()}

        def again() -> torch.Tensor:
            changed = [name for name, t in weights.items() if t._version != versions[name]]
            if changed:
                raise RuntimeError(
                    f"the item encoder's {', '.join(changed)} was modified in place after the forward pass "
                    "whose backward needs it (ASTA's item representations are computed again in backward, "
                    "from these weights): run backward before changing them")
            with torch.autocast(device_type, dtype=dtype, enabled=enabled):
                return torch.func.functional_call(self, weights, (ids,))
        return again

    def _runs_more_than_its_weights(self) -> bool:
        """Whether self(ids) runs code besides its own forward: hooks, or parametrized weights."""
        from torch.nn.modules import module as nn_module
        from torch.nn.utils import parametrize

        if nn_module._global_forward_hooks or nn_module._global_forward_pre_hooks:
            return True
        return any(m._forward_hooks or m._forward_pre_hooks or parametrize.is_parametrized(m)
                   for m in self.modules())

    def encode(self, target_ids: torch.Tensor, history_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e(targets), e(history)); with dedup, each distinct item of the batch is encoded once."""
        if not self.dedup:
            return self(target_ids), self(history_ids)
        reps, target_index, history_index = self.unique_representations(target_ids, history_ids)
        # A gather through F.embedding, not reps[index]: on the CPU the backward of advanced
        # indexing accumulates in a thread-dependent order, which would make runs unrepeatable.
        rows = F.embedding(torch.cat([target_index, history_index.reshape(-1)]), reps)
        batch = target_ids.shape[0]
        return rows[:batch], rows[batch:].view(*history_ids.shape, reps.shape[-1])


class SparseTargetAttention(nn.Module):
    """ASTA: ReLU-gated, mask-multiplied, unnormalised target attention with a residual.

    Ablations (SPEC.md, Table 3): `asta_activation="softmax"` normalises the scores over the
    unmasked positions instead; `asta_dropout` drops attention weights while training.
    Under autocast the ReLU op runs in fp32 unless `asta_precision="autocast"` (forward says how).
    """

    def __init__(self, cfg: QINConfig):
        super().__init__()
        d, d_a = cfg.item_dim, cfg.attention_width
        self.W_q = nn.Linear(d, d_a, bias=False)
        self.W_k = nn.Linear(d, d_a, bias=False)
        self.W_v = nn.Linear(d, d_a, bias=False)
        self.W_o = nn.Linear(d_a, d, bias=False)
        self.scale = 1.0 / math.sqrt(d_a)
        self.form = cfg.asta_form
        self.backend = cfg.asta_kernel
        self.precision = cfg.asta_precision
        self.softmax = cfg.asta_activation == "softmax"
        self.dropout = cfg.asta_dropout

    def _weights_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The mask as a float, with attention dropout folded in.

        ReLU(c * s) = c * ReLU(s) for c >= 0, so dropping weight l (times 1/(1-p) for the kept
        ones) is the same as scaling mask l: the fused kernel takes it unchanged.
        """
        mask = mask.to(dtype)
        if self.training and self.dropout > 0:
            mask = dropout(mask, self.dropout)
        return mask

    def _softmax_pool(self, scores: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Softmax over the unmasked positions; an all-padding row pools to zeros, not NaN."""
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        if self.training and self.dropout > 0:
            weights = dropout(weights, self.dropout)
        return torch.einsum("bl,bld->bd", weights, values)

    def forward(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor,
                history_index: torch.Tensor | None = None,
                recompute_history: Callable[[], torch.Tensor] | None = None) -> torch.Tensor:
        """target (B, D), mask (B, L); history (B, L, D), or with history_index (B, L) the (U, D)
        representations that index points into (the hoisted ReLU form then never gathers them).

        With `recompute_history` (a function returning `history` again) the hoisted ReLU op does
        not keep the history it reads for backward: backward computes it again (qin.recompute)."""
        # Under autocast the history (or the representations it is read from, the largest input)
        # is cast once here rather than by every product that reads it, and the fused op gets one
        # dtype throughout. The target stays fp32: it is the residual below. With asta_precision
        # fp32 the hoisted ReLU op instead reads the history unrounded and runs outside autocast,
        # in fp32; the projections around it (W_q, W_k, W_v, W_o) stay in the autocast dtype.
        low = autocast_dtype(history.device.type)
        op_in_fp32 = low is not None and self.precision == "fp32" and self.form == "hoisted" and not self.softmax
        if low is not None:
            dtype = torch.promote_types(history.dtype, torch.float32) if op_in_fp32 else low
            if recompute_history is not None and history.dtype != dtype:
                recompute_history = _cast_after(recompute_history, dtype)
            history = history.to(dtype)
        if history_index is not None and (self.form == "literal" or self.softmax):
            history, history_index = F.embedding(history_index, history), None
        if self.form == "literal":
            q, k, v = self.W_q(target), self.W_k(history), self.W_v(history)
            scores = torch.einsum("bd,bld->bl", q, k) * self.scale
            if self.softmax:
                pooled = self._softmax_pool(scores, mask, v)
            else:
                pooled = torch.einsum("bl,bld->bd", torch.relu(scores * self._weights_mask(mask, q.dtype)), v)
            return self.W_o(pooled) + target
        # Hoisted (SPEC.md, "Exact algebra"): q.k_l = x_l.(Wk^T q) and sum_l a_l Wv x_l = Wv sum_l a_l x_l.
        query = ((self.W_q(target) @ self.W_k.weight) * self.scale).to(history.dtype)
        if self.softmax:
            pooled = self._softmax_pool(torch.einsum("bld,bd->bl", history, query), mask, history)
        else:
            weights = self._weights_mask(mask, history.dtype)
            with (torch.autocast(history.device.type, enabled=False) if op_in_fp32 else contextlib.nullcontext(),
                  recomputed_in_backward(history, recompute_history)):
                if history_index is None:
                    pooled = kernels.sparse_target_attention(history, query, weights, backend=self.backend)
                else:
                    pooled = kernels.gathered_sparse_target_attention(history, history_index, query, weights,
                                                                      backend=self.backend)
        return self.W_o(self.W_v(pooled)) + target


def _cast_after(compute: Callable[[], torch.Tensor], dtype: torch.dtype) -> Callable[[], torch.Tensor]:
    return lambda: compute().to(dtype)


class QuadraticLayer(nn.Module):
    """y = x * sum_r Dropout(W_r x + b_r): the Khatri-Rao quadratic unit of QNN."""

    def __init__(self, dim: int, num_row: int, dropout: float, backend: str):
        super().__init__()
        self.linear = nn.Linear(dim, num_row * dim)
        self.num_row, self.dropout, self.backend = num_row, dropout, backend

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return kernels.quadratic_projection(
            x, self.linear.weight, self.linear.bias, self.num_row,
            dropout_p=self.dropout, training=self.training, backend=self.backend,
        )


class MLPLayer(nn.Module):
    """The ablation's stand-in for a quadratic layer: Linear(D, 2D) -> ReLU -> Linear(2D, D),
    4 D^2 weights like the quadratic layer's (M = 4), with no product with the input."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(dim, 2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class QNN(nn.Module):
    """x <- x + Dropout(PReLU(BatchNorm1d(quadratic_layer(x)))), repeated qnn_layers times."""

    def __init__(self, cfg: QINConfig):
        super().__init__()
        dim = cfg.qnn_dim
        if cfg.interaction == "mlp":
            layers = (MLPLayer(dim) for _ in range(cfg.qnn_layers))
        else:
            layers = (QuadraticLayer(dim, cfg.qnn_rows, cfg.dropout, cfg.qnn_kernel) for _ in range(cfg.qnn_layers))
        self.quadratic = nn.ModuleList(layers)
        self.norms = nn.ModuleList(nn.BatchNorm1d(dim) for _ in range(cfg.qnn_layers))
        make_activation = (lambda: nn.ReLU()) if cfg.qnn_activation == "relu" else (
            lambda: nn.PReLU(num_parameters=1, init=0.25))
        self.activations = nn.ModuleList(make_activation() for _ in range(cfg.qnn_layers))
        self.dropout = Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for quadratic, norm, activation in zip(self.quadratic, self.norms, self.activations):
            x = x + self.dropout(activation(norm(quadratic(x))))
        return x


class CTRModel(FeatureModules):
    """What QIN and DIN share: the item encoder `items`, one module per context feature, the
    item side data and the L2 term."""

    def add_context(self, cfg: QINConfig, dim: int, project_to_dim: bool) -> None:
        self.context = context_features(model_features(cfg))
        self.add_feature_modules(self.context, dim, project_to_dim)

    def check_batch(self, batch) -> None:
        """Refuse a batch this model cannot read, naming its key: a missing key, a value that is not a
        (B,) or (B, ...) tensor, ids that are not integers or lie outside their table (on the CPU
        only: on a GPU the check would wait for the device; and not under torch.func transforms,
        where a tensor has no value to read). Not while torch.compile traces."""
        if torch.compiler.is_compiling():
            return
        if not isinstance(batch, Mapping):
            raise TypeError(f"the batch must be a dict of tensors, got {type(batch).__name__}")
        key = self.items.key
        reads = [("item_id", key, 1), ("item_seq", key, 2)]
        reads += [(f.name, f, 2 if f.type in ("sequence", "embedding") else 1) for f in self.context]
        missing = [name for name, _, _ in reads if name not in batch]
        if missing:
            raise ValueError(f"the batch lacks {missing} (it has {sorted(batch)})")
        size = None
        for name, feature, ndim in reads:
            values = batch[name]
            if not isinstance(values, torch.Tensor):
                raise ValueError(f"batch[{name!r}] must be a tensor, got {type(values).__name__}")
            size = values.shape[0] if size is None and values.dim() else size
            if values.dim() != ndim or values.shape[0] != size:
                rows = "B" if size is None else size
                want = f"({rows},)" if ndim == 1 else f"({rows}, ...) with {ndim} dimensions"
                raise ValueError(f"batch[{name!r}] must have shape {want}, got {tuple(values.shape)}")
            if not feature.has_ids:
                continue
            check_ids(f"batch[{name!r}]", values, feature.vocab_size,
                      read_values=values.device.type == "cpu" and not transforms_active())
        if size == 0:
            raise ValueError("the batch is empty (B = 0)")

    def embed_context(self, batch: dict[str, torch.Tensor]) -> list[torch.Tensor]:
        return [self.embed(f, batch[f.name]) for f in self.context]

    def load_item_info(self, columns, mm: torch.Tensor | None = None) -> None:
        self.items.load_item_info(columns, mm)

    def embedding_tables(self) -> list[torch.Tensor]:
        """The tensors under the embedding L2 penalty: every embedding table and P."""
        return [*self.items.tables, *self.feature_tables(self.context)]

    def embedding_l2(self) -> torch.Tensor:
        """The sum of squares of every embedding table and P (the loss adds lambda / 2 of it)."""
        return sum_of_squares(self.embedding_tables())


class _SumOfSquares(torch.autograd.Function):
    """sum_k sum(w_k ** 2) over whole tensors, with gradient 2 g w_k, written as autograd would
    not: `w.pow(2).sum()` writes a w ** 2 as large as the table in forward, and its backward reads
    and writes the table three more times (pow(w, 1), * 2, * g). Over MicroLens's item table
    (11.7M fp32 numbers, every step: the L2 covers whole tables) that was 7% of a bf16 CPU step.
    Here forward takes each row's norm, then sums the squared norms: one read, and as accurate as
    pow + sum (a flat dot or linalg.vector_norm accumulates 11.7M squares of 1e-4 numbers 1e-4 to
    1e-3 off on the CPU; a row-wise einsum is as accurate but a 91,718-matrix bmm, 3x slower).
    It runs in the tables' own dtype even under autocast, which would take the sum to bf16.
    Backward is one multiply per tensor, bitwise autograd's gradient (2 g w: the factor 2 is exact).
    """

    @staticmethod
    def forward(ctx, *tensors):
        ctx.save_for_backward(*tensors)
        with torch.autocast(tensors[0].device.type, enabled=False):
            rows = (w.flatten(1) if w.dim() > 1 else w.reshape(-1, 1) for w in tensors)
            return torch.stack([torch.linalg.vector_norm(r, dim=1).square().sum() for r in rows]).sum()

    @staticmethod
    def backward(ctx, grad):
        return tuple(torch._foreach_mul(list(ctx.saved_tensors), 2 * grad))


def sum_of_squares(tensors: list[torch.Tensor]) -> torch.Tensor:
    """sum(w.pow(2).sum() for w in tensors), its value and gradients, in one read of each tensor
    forward and one multiply backward (see _SumOfSquares)."""
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(())
    return _SumOfSquares.apply(*tensors)


class QIN(CTRModel):
    """QIN built from the dataset's features (cfg.features, or the MicroLens layout of SPEC.md).

    Before its first forward, `load_item_info` fills the item attributes (tags and the frozen
    multimodal embedding on MicroLens): they are data, not weights, so a state_dict does not hold
    them, and a model loaded from one needs them loaded again.

    Padding, as in the authors' FuxiCTR feature map: every categorical and sequence feature has
    padding_idx 0, so likes_level = 0 and views_level = 0 map to an all-zero row that never trains,
    like item id 0 and tag 0. `padding_idx: null` on a feature makes its row 0 an ordinary one.
    """

    def __init__(self, cfg: QINConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or QINConfig()
        cfg.validate()
        if cfg.architecture != "qin":
            raise ValueError(f"QIN builds architecture 'qin'; this config names {cfg.architecture!r}: "
                             f"qin.models.build_model(cfg) builds the model a config names")
        self.items = ItemEncoder(cfg)
        self.add_context(cfg, cfg.embed_dim, project_to_dim=True)
        self.asta = SparseTargetAttention(cfg) if cfg.use_asta else None
        self.qnn = QNN(cfg)
        self.output = nn.Linear(cfg.qnn_dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg.embedding_init_std)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Click logits (B,) for a batch with item_id (B), item_seq (B, L) and the context features."""
        self.check_batch(batch)
        item_id, item_seq = batch["item_id"], batch["item_seq"]
        parts = list(self.embed_context(batch))
        if self.asta is None:  # the no-ASTA ablation never looks at the history
            parts.append(self.items(item_id))
        elif self.items.dedup:
            # ASTA reads the history through the index into the distinct items' representations.
            unique_ids, target_index, history_index = self.items.unique_ids(item_id, item_seq)
            reps = self.items(unique_ids)
            target = F.embedding(target_index, reps)
            parts += [target, self.asta(target, reps, item_seq > 0, history_index=history_index,
                                        recompute_history=self.items.encoding_again(unique_ids))]
        else:
            target, history = self.items.encode(item_id, item_seq)
            parts += [target, self.asta(target, history, item_seq > 0)]
        x = torch.cat(parts, dim=-1)
        return self.output(self.qnn(x)).squeeze(-1)


def compile_model(model: nn.Module, cuda_graphs: bool = False, **options) -> nn.Module:
    """torch.compile(model, **options) for a model whose item dedup calls torch.unique, whose
    output size depends on the data: dynamo is told to capture such ops (torch 2.7 breaks the graph
    there otherwise, and fullgraph=True fails; newer torch captures it either way).

    cuda_graphs=True compiles with mode="reduce-overhead": on a GPU each compiled graph replays as
    one CUDA graph, one launch for hundreds of kernels. A graph cannot hold an op whose output size
    the host must learn, or one that waits for the device, so the model is made graph-safe first
    (make_graph_safe: the same function)."""
    torch._dynamo.config.capture_dynamic_output_shape_ops = True
    tag_compile_caches()
    if cuda_graphs:
        make_graph_safe(model)
        options.setdefault("mode", "reduce-overhead")
    return torch.compile(model, **options)


def make_graph_safe(model: nn.Module) -> None:
    """From now on the model's embeddings and item dedup run graph-safe (FeatureModules.graph_safe):
    static_unique for torch.unique, masked_mean_embedding for embedding_bag."""
    for module in model.modules():
        if isinstance(module, FeatureModules):
            module.graph_safe = True


def tag_compile_caches() -> None:
    """Add the kernels' source hash to the key of torch.compile's disk caches.

    Those caches key a graph by what dynamo traced, not by the Python backward of our registered
    ops: after an upgrade of kernels/ a cached graph would call an op with its old arguments (a
    RuntimeError naming the op). torch.compiler.config.cache_key_tag joins every cache key; a tag
    the user set stays in it. Older torch without the setting is left as it is."""
    config = getattr(torch.compiler, "config", None)
    if config is None or not hasattr(config, "cache_key_tag"):
        return
    tag = f"qin-kernels-{source_hash()}"
    if tag not in config.cache_key_tag:
        config.cache_key_tag = f"{config.cache_key_tag}|{tag}" if config.cache_key_tag else tag


def init_weights(model: nn.Module, embedding_std: float) -> None:
    """Embeddings normal(std) with padding rows 0; Linear weights xavier_normal, biases 0."""
    for module in model.modules():
        if isinstance(module, nn.Embedding):
            nn.init.normal_(module.weight, std=embedding_std)
            if module.padding_idx is not None:
                with torch.no_grad():
                    module.weight[module.padding_idx].zero_()
        elif isinstance(module, nn.Linear):
            nn.init.xavier_normal_(module.weight)
            if module.bias is not None:
                nn.init.zeros_(module.bias)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
