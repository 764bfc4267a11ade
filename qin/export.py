"""`qin export`: a trained model as a torch.export program, in eval form.

The program takes the same batch dict as the model (item_id, item_seq, likes_level, views_level:
any batch size, the run's history length) and returns the same click logits. It holds the item
side data (tags, frozen embeddings) and, in eval form, the QNN's folded W_bar product. The fused
ops, where the model runs them, stay in the graph as registered qin:: ops: load it with
`import kernels` first, then torch.export.load(path).module()(batch).
"""
from __future__ import annotations

from pathlib import Path

import torch

BATCH_KEYS = ("item_id", "item_seq", "likes_level", "views_level")


def example_batch(batch_size: int, max_len: int, num_items: int, device: torch.device) -> dict[str, torch.Tensor]:
    """A batch of the right layout to trace with; its values never reach the exported graph."""
    g = torch.Generator().manual_seed(0)
    batch = {
        "item_id": torch.randint(1, num_items, (batch_size,), generator=g),
        "item_seq": torch.randint(0, num_items, (batch_size, max_len), generator=g),
        "likes_level": torch.randint(0, 11, (batch_size,), generator=g),
        "views_level": torch.randint(0, 11, (batch_size,), generator=g),
    }
    return {k: v.to(device) for k, v in batch.items()}


def export_model(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """torch.export of `model` in eval mode, with the batch dimension left dynamic."""
    model.eval()
    rows = torch.export.Dim("batch", min=1)
    dynamic = ({key: {0: rows} for key in BATCH_KEYS},)
    with torch.no_grad():
        return torch.export.export(model, ({key: batch[key] for key in BATCH_KEYS},), dynamic_shapes=dynamic)


def save(program: torch.export.ExportedProgram, file) -> None:
    """Write the program to a path or an open binary file."""
    torch.export.save(program, str(file) if isinstance(file, (str, Path)) else file)
