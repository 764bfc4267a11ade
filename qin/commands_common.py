"""What several `qin` commands share: the error a user's mistake raises, the settings of the
no-argument run, and the dataset loader that falls back to the built-in dataset.

cli.py and compare.py import this module; it imports neither of them.
"""
from __future__ import annotations

from pathlib import Path

# Settings of the no-argument run: the paper's model on the small built-in dataset, sized to train
# in about five minutes on a 2-core CPU. Everything else is the paper's.
BUILTIN_SETTINGS = {"train": {"batch_size": 512, "eval_batch_size": 2048, "epochs": 4, "out_dir": "runs/builtin"}}


def override_key(text: str) -> str:
    """'section.key' of a `section.key=value` override."""
    return text.partition("=")[0].strip()


def file_in_the_way(folder: Path) -> Path | None:
    """The nearest of `folder` and its parents that exists, where it is a file (nothing could be
    written under it), else None: checked before the work whose output would go there."""
    existing = next((p for p in (folder, *folder.parents) if p.exists()), None)
    return existing if existing is not None and not existing.is_dir() else None


class UsageError(Exception):
    """A command was asked for something it refuses (exit status 2, one line naming why)."""


def load_data(path: str | None, data_cfg, splits=("train", "valid", "test"), required=None,
              labelled=("train", "valid")):
    """The dataset in `path`, or the built-in generated one (made on first use) when it is None,
    read as the config's data block declares it (features, label and history columns, max_len):
    the named splits, of which `required` must exist (default: qin.data's train and valid), with
    strictly read labels in `labelled`."""
    from qin.data import REQUIRED_SPLITS, DataError, load_dataset
    from qin.synth import builtin_dataset

    if path and not Path(path).is_dir():
        raise UsageError(f"{path}: no such data folder" if not Path(path).exists() else
                         f"{path} is a file; the data is a folder of parquet files")
    root = Path(path) if path else builtin_dataset()
    try:
        return load_dataset(root, max_len=data_cfg.max_len, features=data_cfg.features, label=data_cfg.label,
                            history=data_cfg.history, splits=splits,
                            required=REQUIRED_SPLITS if required is None else required, labelled=labelled)
    except DataError as error:
        if path:
            raise
        # The user named no folder: say which data this is (a config declaring other columns, --data forgotten).
        error.args = (f"the built-in dataset ({root}, the MicroLens layout), read because no data folder is "
                      f"named (--data DIR or data.dir): {error}",)
        raise
