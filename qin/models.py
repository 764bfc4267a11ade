"""The model a config names: QIN, or the challenge's DIN baseline.

This choice lives in a module of its own because it must see both models while din.py builds on
model.py: the imports run one way, models -> din -> model.
"""
from __future__ import annotations

import torch.nn as nn

from qin.config import QINConfig
from qin.din import DIN
from qin.model import QIN


def build_model(cfg: QINConfig) -> nn.Module:
    """QIN, or the DIN baseline when cfg.architecture is 'din'."""
    if cfg.architecture == "din":
        return DIN(cfg)
    return QIN(cfg)
