"""The model a config names: QIN, or the challenge's DIN baseline.

This choice lives in a module of its own because it must see both models while din.py builds on
model.py: the imports run one way, models -> din -> model.
"""
from __future__ import annotations

import logging

import torch.nn as nn

from qin.config import QINConfig
from qin.din import DIN
from qin.model import QIN


def build_model(cfg: QINConfig) -> nn.Module:
    """QIN, or the DIN baseline when cfg.architecture is 'din'."""
    for key, why in ops_not_in(cfg).items():
        if getattr(cfg, key) == "triton":  # kept (and recorded), but it changes nothing
            logging.getLogger("qin").info("model.%s=triton has no effect with %s: that model does not run the op",
                                          key, why)
    if cfg.architecture == "din":
        return DIN(cfg)
    return QIN(cfg)


def ops_not_in(cfg: QINConfig) -> dict[str, str]:
    """{kernel setting: the setting that leaves its op out of the model} for the fused ops the
    model that cfg describes never runs."""
    why = {"asta_kernel": ("model.architecture=din" if cfg.architecture == "din" else
                           "model.use_asta=false" if not cfg.use_asta else
                           "model.asta_form=literal" if cfg.asta_form == "literal" else
                           # the fused kernel computes ReLU weights only
                           "model.asta_activation=softmax" if cfg.asta_activation == "softmax" else None),
           "qnn_kernel": ("model.architecture=din" if cfg.architecture == "din" else
                          "model.interaction=mlp" if cfg.interaction == "mlp" else
                          # without dropout no Triton kernel runs: the op is torch products on any backend
                          "model.dropout=0" if cfg.dropout == 0 else None)}
    return {key: reason for key, reason in why.items() if reason}
