"""`qin export`: a trained model as a torch.export program, in eval form.

The program takes the same batch dict as the model (item_id, item_seq and the context features,
e.g. likes_level and views_level: any batch size from 1, the run's history length) and returns the same click logits. It holds the item
side data (tags, frozen embeddings) and, in eval form, the QNN's folded W_bar product. The fused
ops, where the model runs them, stay in the graph as registered qin:: ops: load it with
`import kernels` first, then torch.export.load(path).module()(batch).

The program checks shapes only: a history of another length than the run's data.max_len fails a
guard (`Guard failed: batch['item_seq'].size()[1] == 16`), and an id past a trained vocabulary
(item_id, likes_level, ...) raises a bare `IndexError: index out of range`; `qin predict` names
such ids by file, column and row, so check new data with it first.
"""
from __future__ import annotations

from pathlib import Path

import torch


def example_batch(split, rows: int = 4) -> dict[str, torch.Tensor]:
    """The first rows of a split, as the model takes them, to trace with; their values never reach
    the exported graph (the batch dimension is dynamic)."""
    from qin.data import iterate_batches

    batch = next(iterate_batches(split.rows(0, rows), rows, shuffle=False))
    batch.pop("label", None)
    if len(batch["item_id"]) < 2:  # torch.export specialises a dimension of size 1: trace on two
        batch = {key: value.repeat(2, *([1] * (value.dim() - 1))) for key, value in batch.items()}
    return batch


def export_model(model: torch.nn.Module, batch: dict[str, torch.Tensor]) -> torch.export.ExportedProgram:
    """torch.export of `model` in eval mode, with the batch dimension left dynamic."""
    model.eval()
    rows = getattr(torch.export.Dim, "DYNAMIC", None) or torch.export.Dim("batch", min=1)
    dynamic = ({key: {0: rows} for key in batch},)
    with torch.no_grad():
        return torch.export.export(model, (batch,), dynamic_shapes=dynamic)


def save(program: torch.export.ExportedProgram, file) -> None:
    """Write the program to a path or an open binary file."""
    torch.export.save(program, str(file) if isinstance(file, (str, Path)) else file)
