"""The Quadratic Interest Network, section by section as SPEC.md describes it.

    item representation  e(i) = [E_item[i], mean(E_tag[tags(i)]), P item_emb_d128[i]]   (384)
    ASTA                 out = Wo sum_l ReLU(m_l q.k_l / sqrt(d_a)) v_l + t
    QNN                  x <- x + Dropout(PReLU(BN(x * sum_r Dropout(W_r x + b_r))))      (x4)
    output               p = sigmoid(w . x + b)
"""
from __future__ import annotations

import logging
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

import kernels
from qin.config import QINConfig

logger = logging.getLogger("qin.model")


def autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype autocast computes matrix products in on `device`, or None when it is off."""
    if torch.is_autocast_enabled(device.type):
        return torch.get_autocast_dtype(device.type)
    return None


class ItemEncoder(nn.Module):
    """e(i) = concat(E_item[i], masked_mean(E_tag[tags(i)]), P @ item_emb_d128[i]).

    The item side information (tags and the frozen multimodal embedding) is data, not
    parameters: it lives in non-persistent buffers filled by `load_item_info`. Without
    `project_mm` (the DIN baseline) the frozen embedding enters as it is.
    """

    def __init__(self, cfg: QINConfig, embed_dim: int | None = None, project_mm: bool = True):
        super().__init__()
        embed_dim = embed_dim or cfg.embed_dim
        self.item_embedding = nn.Embedding(cfg.num_items, embed_dim, padding_idx=0)
        self.tag_embedding = nn.Embedding(cfg.num_tags, embed_dim, padding_idx=0)
        self.mm_projection = nn.Linear(cfg.mm_dim, embed_dim, bias=False) if project_mm else None  # P
        self.dedup = cfg.dedup_items
        self.register_buffer("item_tags", torch.zeros(cfg.num_items, cfg.tags_per_item, dtype=torch.long), persistent=False)
        self.register_buffer("item_mm", torch.zeros(cfg.num_items, cfg.mm_dim), persistent=False)

    @property
    def tables(self) -> list[torch.Tensor]:
        """The item-side tensors under the embedding L2 penalty: E_item, E_tag and P."""
        tables = [self.item_embedding.weight, self.tag_embedding.weight]
        return tables + ([self.mm_projection.weight] if self.mm_projection is not None else [])

    def load_item_info(self, tags: torch.Tensor, mm: torch.Tensor) -> None:
        if tags.shape != self.item_tags.shape or mm.shape != self.item_mm.shape:
            raise ValueError(
                f"item_info does not fit the model: tags {tuple(tags.shape)} and embeddings {tuple(mm.shape)}, "
                f"expected {tuple(self.item_tags.shape)} and {tuple(self.item_mm.shape)}"
            )
        self.item_tags.copy_(tags)
        self.item_mm.copy_(mm)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        flat = ids.reshape(-1)
        # mode="mean" with padding_idx leaves tag 0 out of the mean; an all-padding bag gives zeros.
        tag_mean = F.embedding_bag(self.item_tags[flat], self.tag_embedding.weight, mode="mean", padding_idx=0)
        mm = self.item_mm[flat]
        rep = torch.cat([self.item_embedding(flat), tag_mean, self.mm_projection(mm) if self.mm_projection else mm], dim=-1)
        return rep.view(*ids.shape, rep.shape[-1])

    def encode(self, target_ids: torch.Tensor, history_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(e(targets), e(history)); with dedup, each distinct item of the batch is encoded once."""
        if not self.dedup:
            return self(target_ids), self(history_ids)
        # A batch names far fewer distinct items than positions: encode each once, then gather.
        ids = torch.cat([target_ids, history_ids.reshape(-1)])
        unique_ids, inverse = torch.unique(ids, return_inverse=True)
        # A gather through F.embedding, not reps[inverse]: on the CPU the backward of advanced
        # indexing accumulates in a thread-dependent order, which would make runs unrepeatable.
        reps = F.embedding(inverse, self(unique_ids))
        batch = target_ids.shape[0]
        return reps[:batch], reps[batch:].view(*history_ids.shape, reps.shape[-1])


class SparseTargetAttention(nn.Module):
    """ASTA: ReLU-gated, mask-multiplied, unnormalised target attention with a residual.

    Ablations (SPEC.md, Table 3): `asta_activation="softmax"` normalises the scores over the
    unmasked positions instead; `asta_dropout` drops attention weights while training.
    """

    def __init__(self, cfg: QINConfig):
        super().__init__()
        d, d_a = cfg.item_dim, cfg.attention_dim
        self.W_q = nn.Linear(d, d_a, bias=False)
        self.W_k = nn.Linear(d, d_a, bias=False)
        self.W_v = nn.Linear(d, d_a, bias=False)
        self.W_o = nn.Linear(d_a, d, bias=False)
        self.scale = 1.0 / math.sqrt(d_a)
        self.form = cfg.asta_form
        self.backend = cfg.asta_kernel
        self.softmax = cfg.asta_activation == "softmax"
        self.dropout = cfg.asta_dropout
        if self.softmax and cfg.asta_kernel != "torch":
            logger.info("model.asta_activation=softmax: ASTA runs in eager PyTorch "
                        "(the fused kernel computes ReLU weights only)")

    def _weights_mask(self, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """The mask as a float, with attention dropout folded in.

        ReLU(c * s) = c * ReLU(s) for c >= 0, so dropping weight l (times 1/(1-p) for the kept
        ones) is the same as scaling mask l: the fused kernel takes it unchanged.
        """
        mask = mask.to(dtype)
        if self.training and self.dropout > 0:
            mask = F.dropout(mask, self.dropout, training=True)
        return mask

    def _softmax_pool(self, scores: torch.Tensor, mask: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
        """Softmax over the unmasked positions; an all-padding row pools to zeros, not NaN."""
        scores = scores.masked_fill(~mask, float("-inf"))
        weights = torch.softmax(scores, dim=-1).nan_to_num(0.0)
        if self.training and self.dropout > 0:
            weights = F.dropout(weights, self.dropout, training=True)
        return torch.einsum("bl,bld->bd", weights, values)

    def forward(self, target: torch.Tensor, history: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # Under autocast the history (B x L x 384, the largest tensor) is cast once here rather
        # than by every product that reads it, and the fused op gets one dtype throughout. The
        # target stays fp32: it is the residual below (the projections autocast it themselves).
        low = autocast_dtype(history.device)
        if low is not None:
            history = history.to(low)
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
            pooled = kernels.sparse_target_attention(history, query, self._weights_mask(mask, history.dtype),
                                                     backend=self.backend)
        return self.W_o(self.W_v(pooled)) + target


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
        self.dropout = nn.Dropout(cfg.dropout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for quadratic, norm, activation in zip(self.quadratic, self.norms, self.activations):
            x = x + self.dropout(activation(norm(quadratic(x))))
        return x


class CTRModel(nn.Module):
    """What the training loop needs of a model beside forward: item side data and the L2 term.

    A subclass has `items` (an ItemEncoder) and `likes_embedding` / `views_embedding`.
    """

    def load_item_info(self, tags: torch.Tensor, mm: torch.Tensor) -> None:
        self.items.load_item_info(tags, mm)

    def embedding_tables(self) -> list[torch.Tensor]:
        """The tensors under the embedding L2 penalty: every embedding table and P."""
        return [*self.items.tables, self.likes_embedding.weight, self.views_embedding.weight]

    def embedding_l2(self) -> torch.Tensor:
        return sum(w.pow(2).sum() for w in self.embedding_tables())


class QIN(CTRModel):
    def __init__(self, cfg: QINConfig | None = None):
        super().__init__()
        self.cfg = cfg = cfg or QINConfig()
        cfg.validate()
        self.items = ItemEncoder(cfg)
        self.likes_embedding = nn.Embedding(cfg.num_levels, cfg.embed_dim)
        self.views_embedding = nn.Embedding(cfg.num_levels, cfg.embed_dim)
        self.asta = SparseTargetAttention(cfg) if cfg.use_asta else None
        self.qnn = QNN(cfg)
        self.output = nn.Linear(cfg.qnn_dim, 1)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        init_weights(self, self.cfg.embedding_init_std)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        """Click logits (B,) for a batch with item_id (B), item_seq (B, L), likes_level, views_level (B)."""
        if self.asta is None:  # the no-ASTA ablation never looks at the history
            target, history = self.items(batch["item_id"]), None
        else:
            target, history = self.items.encode(batch["item_id"], batch["item_seq"])
        parts = [self.likes_embedding(batch["likes_level"]), self.views_embedding(batch["views_level"]), target]
        if self.asta is not None:
            parts.append(self.asta(target, history, batch["item_seq"] > 0))
        x = torch.cat(parts, dim=-1)
        return self.output(self.qnn(x)).squeeze(-1)


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


def build_model(cfg: QINConfig) -> nn.Module:
    """QIN, or the DIN baseline when cfg.architecture is 'din'."""
    if cfg.architecture == "din":
        from qin.din import DIN

        return DIN(cfg)
    return QIN(cfg)


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
