"""DIN, the challenge's official baseline (SPEC.md, "DIN baseline"), on QIN's inputs.

    item      e(i) = [E_item[i] (64), mean E_tag[tags(i)] (64), P item_emb_d128[i] (128)]   (256)
    attention w_l = MLP_[512, 256](q, k_l, q - k_l, q * k_l) * m_l   (ReLU, dropout; no softmax)
              u   = sum_l w_l k_l
    DNN       [likes (64), views (64), q, u] -> [1024, 512, 256] (Linear, BatchNorm, ReLU, dropout) -> 1

P (128 x 128, no bias, under the embedding L2) is the projection FuxiCTR's FeatureEmbedding gives
every `embedding` feature, the challenge's DIN included: it keeps the frozen vector's width, where
QIN's P maps it to embed_dim. On another schema: the item and context features of qin.features,
64 wide, each frozen embedding through a P of its own width.

The paper trains it with Adam lr 1e-3 and early-stop patience 3; the challenge's baseline, on
FuxiCTR's defaults, also cuts the rate by 10x (not 2x) after an epoch without gain, and its
embedding L2 is 1e-6 (the first of the challenge's grid, not QIN's 2e-4): `qin compare` sets all four.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from qin.config import QINConfig
from qin.model import CTRModel, ItemEncoder, init_weights


def _mlp(widths: list[int], dropout: float, batch_norm: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for width_in, width_out in zip(widths[:-1], widths[1:]):
        layers.append(nn.Linear(width_in, width_out))
        if batch_norm:
            layers.append(nn.BatchNorm1d(width_out))
        layers += [nn.ReLU(), nn.Dropout(dropout)]
    return nn.Sequential(*layers)


class DIN(CTRModel):
    def __init__(self, cfg: QINConfig):
        super().__init__()
        self.cfg = cfg
        cfg.validate()
        dim = cfg.din_embed_dim
        self.items = ItemEncoder(cfg, embed_dim=dim, project_to_dim=False)
        self.add_context(cfg, dim, project_to_dim=False)
        item_dim = sum(f.width(dim, project_to_dim=False) for f in self.items.features)
        context_dim = sum(f.width(dim, project_to_dim=False) for f in self.context)
        units = cfg.din_attention_units
        self.attention = nn.Sequential(_mlp([4 * item_dim, *units], cfg.dropout, batch_norm=False),
                                       nn.Linear(units[-1], 1))
        self.dnn = _mlp([context_dim + 2 * item_dim, *cfg.din_dnn_units], cfg.dropout, batch_norm=True)
        self.output = nn.Linear(cfg.din_dnn_units[-1], 1)
        init_weights(self, cfg.embedding_init_std)
        self.register_load_state_dict_pre_hook(_identity_p_for_older_checkpoints)

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        self.check_batch(batch)
        target, history = self.items.encode(batch["item_id"], batch["item_seq"])
        query = target.unsqueeze(1).expand_as(history)
        features = torch.cat([query, history, query - history, query * history], dim=-1)
        # Unnormalised weights, zero at padding (the mask multiplies, as in SPEC.md's DIN).
        weights = self.attention(features).squeeze(-1) * (batch["item_seq"] > 0).to(history.dtype)
        interest = torch.einsum("bl,bld->bd", weights, history)
        x = torch.cat([*self.embed_context(batch), target, interest], dim=-1)
        return self.output(self.dnn(x)).squeeze(-1)


def _identity_p_for_older_checkpoints(model: DIN, state_dict: dict, prefix: str, *args) -> None:
    """A DIN checkpoint from before P (2026-12-03) let each frozen embedding in as it is: P = I
    computes that function, so such a checkpoint still evaluates, predicts and exports the same.
    Only a whole checkpoint but P: a load of some weights (strict=False) leaves P as it is, and
    torch passes strict=True to this hook whatever the caller asked for."""
    p_keys = {f"{prefix}{where}{owner._feature_modules[f.name]}.weight"
              for owner, where, features in ((model.items, "items.", model.items.features), (model, "", model.context))
              for f in features if f.type == "embedding"}
    missing = {f"{prefix}{key}" for key in model.state_dict()} - state_dict.keys()
    if missing and missing <= p_keys:
        for key in missing:
            state_dict[key] = torch.eye(model.get_parameter(key.removeprefix(prefix)).shape[0])
