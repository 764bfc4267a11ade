"""Run configuration: one YAML file with `data`, `model` and `train` blocks, plus overrides.

Defaults are the paper's settings (SPEC.md). An override is `section.key=value` on the command
line; its value is parsed as YAML (so `train.lr=1e-3`, `model.asta_form=literal` work). An unknown
section or key is an error, never silently ignored.
"""
from __future__ import annotations

import dataclasses
import math
import numbers
import re
import textwrap
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from qin.errors import ConfigError  # noqa: F401  - re-exported: qin.config.ConfigError




PRECISIONS = ("auto", "fp32", "bf16", "fp16")


@dataclass
class QINConfig:
    """Sizes and switches of the QIN model; defaults are the paper's on MicroLens_1M_x1."""

    num_items: int = 91_718  # item vocabulary, row 0 = padding
    num_tags: int = 11_740  # tag vocabulary, id 0 = padding
    num_levels: int = 11  # likes_level / views_level take 0..10
    tags_per_item: int = 5
    embed_dim: int = 128  # width of each embedding table (on MicroLens an item is 3 of them)
    mm_dim: int = 128  # width of the frozen multimodal embedding item_emb_d128
    # d_a of ASTA; null: twice the item width, as the authors size it (768 on MicroLens).
    attention_dim: int | None = None
    qnn_layers: int = 4  # quadratic layers in the QNN
    qnn_rows: int = 4  # M, the num_row of the quadratic layer
    dropout: float = 0.1  # training only: each quadratic layer's projection and its residual branch; DIN's MLP
    embedding_init_std: float = 1e-4  # embedding tables start as normal(0, this); padding rows 0
    # ASTA computed literally (K and V projected per history item) or through the exact
    # hoisted algebra of SPEC.md (never forms K or V).
    asta_form: str = "hoisted"
    # Encode each distinct item of a batch once and gather (exact); false encodes every
    # position separately, as the authors' code does.
    dedup_items: bool = True
    asta_kernel: str = "auto"  # backend of the hoisted ASTA op: auto | torch | triton
    # What the hoisted ReLU attention op reads under train.precision=bf16/fp16: fp32 (the item
    # representations unrounded, the op outside autocast: +0.003 valid AUC in bf16 on the built-in
    # data, README "Mixed precision") or autocast (the autocast dtype: half the bytes it reads).
    asta_precision: str = "fp32"
    qnn_kernel: str = "auto"  # backend of the QNN quadratic projection: auto | torch | triton
    # Which model: QIN, or the challenge's official DIN baseline (SPEC.md; sizes below).
    architecture: str = "qin"  # qin | din
    # The paper's ablations (Table 3), each a switch; the defaults are QIN itself.
    use_asta: bool = True  # false: no interest vector, the QNN sees likes, views and the target only
    asta_activation: str = "relu"  # relu | softmax (over the unmasked history positions)
    asta_dropout: float = 0.0  # dropout on ASTA's attention weights
    interaction: str = "qnn"  # qnn | mlp (QNN replaced by residual MLP blocks of the same size)
    qnn_activation: str = "prelu"  # prelu | relu
    # DIN baseline sizes (used only when architecture is din).
    din_embed_dim: int = 64  # (DIN only)
    din_attention_units: list = field(default_factory=lambda: [512, 256])  # (DIN only)
    din_dnn_units: list = field(default_factory=lambda: [1024, 512, 256])  # (DIN only)
    # The dataset's features (qin.features), vocabularies resolved; null: the MicroLens layout
    # sized by num_items, num_tags, num_levels, tags_per_item and mm_dim above.
    features: list | None = None

    @property
    def item_dim(self) -> int:
        """Width of e(i): the item attributes' parts side by side (3 x 128 on MicroLens)."""
        from qin.features import item_features, model_features

        return sum(f.width(self.embed_dim) for f in item_features(model_features(self)))

    @property
    def attention_width(self) -> int:
        """d_a: attention_dim, else 2 x item_dim (the authors' attention_dim=item_info_dim * 2)."""
        return self.attention_dim or 2 * self.item_dim

    @property
    def context_dim(self) -> int:
        from qin.features import context_features, model_features

        return sum(f.width(self.embed_dim) for f in context_features(model_features(self)))

    @property
    def qnn_dim(self) -> int:
        return self.context_dim + (2 if self.use_asta else 1) * self.item_dim

    def validate(self) -> None:
        if self.asta_form not in ("hoisted", "literal"):
            raise ConfigError(f"model.asta_form must be 'hoisted' or 'literal', got {self.asta_form!r}")
        for name in ("asta_kernel", "qnn_kernel"):
            if getattr(self, name) not in ("auto", "torch", "triton"):
                raise ConfigError(f"model.{name} must be auto, torch or triton, got {getattr(self, name)!r}")
        choices = {"architecture": ("qin", "din"), "asta_activation": ("relu", "softmax"),
                   "asta_precision": ("fp32", "autocast"),
                   "interaction": ("qnn", "mlp"), "qnn_activation": ("prelu", "relu")}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ConfigError(f"model.{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        for name in ("dropout", "asta_dropout", "embedding_init_std"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, numbers.Real):
                raise ConfigError(f"model.{name} must be a number, got {value!r}")
        for name in ("dedup_items", "use_asta"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"model.{name} must be true or false, got {getattr(self, name)!r}")
        if not (math.isfinite(self.embedding_init_std) and self.embedding_init_std >= 0):
            raise ConfigError(f"model.embedding_init_std must be a number >= 0, got {self.embedding_init_std}")
        for name in ("dropout", "asta_dropout"):
            if not 0.0 <= getattr(self, name) < 1.0:
                raise ConfigError(f"model.{name} must be in [0, 1), got {getattr(self, name)}")
        for name in ("din_attention_units", "din_dnn_units"):
            units = getattr(self, name)
            if not isinstance(units, list) or not units or not all(isinstance(u, int) and u > 0 for u in units):
                raise ConfigError(f"model.{name} must be a non-empty list of positive integers, got {units!r}")
        for name in ("num_items", "num_tags", "num_levels", "embed_dim", "mm_dim", "attention_dim",
                     "qnn_layers", "qnn_rows", "tags_per_item", "din_embed_dim"):
            value = getattr(self, name)
            if value is None and name == "attention_dim":
                continue
            if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
                raise ConfigError(f"model.{name} must be a positive integer, got {value!r}")
        from qin.features import model_features

        features = model_features(self)
        missing = [f.name for f in features if f.has_ids and f.vocab_size is None]
        if missing:
            raise ConfigError(f"model.features: no vocab_size for {', '.join(missing)} (fill it from the data)")
        padding_only = [f"{f.name} ({f.vocab_size})" for f in features
                        if f.has_ids and f.padding_idx == 0 and f.vocab_size < 2]
        if padding_only:
            raise ConfigError(f"vocabulary sizes that leave no id beside padding 0: {', '.join(padding_only)}")


@dataclass
class DataConfig:
    dir: str | None = None  # a dataset folder; null: the built-in generated dataset
    max_len: int = 64  # history items kept per row (the most recent)
    # The columns, in FuxiCTR's feature_cols vocabulary (qin.features); null: the MicroLens layout.
    features: list | None = None
    label: str = "label"  # the click column (0/1)
    history: str = "item_seq"  # the list of the user's earlier item ids, left-padded with 0


@dataclass
class TrainConfig:
    """The paper's training settings (SPEC.md, 'Training')."""

    lr: float = 2e-3  # Adam's learning rate at the start
    batch_size: int = 8192  # rows a training step (under torchrun, all processes' together)
    eval_batch_size: int = 8192  # validation, evaluate and predict batches
    epochs: int = 100  # at most: early stopping usually ends the run first
    embedding_l2: float = 2e-4  # loss += embedding_l2 / 2 * sum of squares of embedding tables and P
    grad_clip: float = 10.0  # the gradients' global norm is clipped to this
    lr_decay: float = 0.5  # lr *= lr_decay after an epoch without valid-AUC gain
    min_lr: float = 1e-6  # the rate decays no lower
    patience: int = 8  # epochs without gain before early stop
    seed: int = 20242025  # weights, shuffling and dropout
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # Autocast dtype of the training forward: fp32 | bf16 | fp16 | auto (bf16 on a CUDA device
    # that has it, fp32 elsewhere). Weights, optimizer state, BatchNorm statistics, the residual
    # stream and the loss stay fp32 whatever this says, and so does ASTA's attention op unless
    # model.asta_precision=autocast; fp16 adds a gradient scaler.
    precision: str = "auto"
    max_steps_per_epoch: int | None = None  # cap for quick runs; null: the whole split
    checkpoint_every_steps: int = 0  # also write latest.pt every N steps (0: at epoch ends only)
    compile: bool = False  # torch.compile the model for training (the first step also compiles)
    # Compiled with CUDA graphs (mode="reduce-overhead", the model made graph-safe:
    # qin.model.compile_model); implies compile. CUDA only, one process. On one H200, bf16, batch
    # 8192: 2.5x the eager step (bench/results/gpu-h200-2026-12-04); no full run trained with it yet.
    cuda_graphs: bool = False
    log_every_steps: int = 10  # one TensorBoard point of train loss, grad norm, lr, samples/s every N steps
    out_dir: str = "runs/qin"  # the run folder when --out is not given

    def validate(self) -> None:
        """Refuse values the loop would fail on late (a zero batch after an epoch) or not at all."""
        for name in ("batch_size", "eval_batch_size", "epochs", "patience", "log_every_steps"):
            if getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be a positive integer, got {getattr(self, name)}")
        if self.max_steps_per_epoch is not None and self.max_steps_per_epoch < 1:
            raise ConfigError(f"train.max_steps_per_epoch must be a positive integer or null (the whole split), "
                              f"got {self.max_steps_per_epoch}")
        if self.checkpoint_every_steps < 0:
            raise ConfigError(f"train.checkpoint_every_steps must be 0 (epoch ends only) or positive, "
                              f"got {self.checkpoint_every_steps}")
        for name in ("lr", "grad_clip"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) > 0):
                raise ConfigError(f"train.{name} must be a positive number, got {getattr(self, name)}")
        for name in ("min_lr", "embedding_l2"):
            if not (math.isfinite(getattr(self, name)) and getattr(self, name) >= 0):
                raise ConfigError(f"train.{name} must be a number >= 0, got {getattr(self, name)}")
        if self.min_lr > self.lr:  # the first epoch without a gain would raise the rate to min_lr
            raise ConfigError(f"train.min_lr={self.min_lr:g} is above train.lr={self.lr:g}; the rate only decays "
                              f"towards min_lr")
        if not 0 <= self.seed < 2**32:  # numpy's generators take seeds of 32 bits
            raise ConfigError(f"train.seed must be an integer in 0..{2**32 - 1}, got {self.seed}")
        if not 0 < self.lr_decay <= 1:
            raise ConfigError(f"train.lr_decay must be in (0, 1], got {self.lr_decay}")
        if self.precision not in PRECISIONS:
            raise ConfigError(f"train.precision must be one of {', '.join(PRECISIONS)}, got {self.precision!r}")
        if self.device != "auto":
            import torch

            try:
                known = torch.device(self.device).type in ("cpu", "cuda")
            except RuntimeError:
                known = False
            if not known:
                raise ConfigError(f"train.device must be auto, cpu, cuda or cuda:N, got {self.device!r}")


@dataclass
class RunConfig:
    data: DataConfig = field(default_factory=DataConfig)
    model: QINConfig = field(default_factory=QINConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


def settings_help(data_sized: tuple = ()) -> str:
    """Every `section.key` with its default and the comment it carries in this file (the one place
    they are explained), for `qin train --help`. Keys in `data_sized` are marked as sized from the data."""
    try:
        module = Path(__file__).read_text(encoding="utf-8")
    except OSError:  # no source shipped: the keys and defaults alone
        module = ""
    lines = []
    for section, cls in (("data", DataConfig), ("model", QINConfig), ("train", TrainConfig)):
        body = re.search(rf"^class {cls.__name__}\b.*?\n(.*?)(?=^\S|\Z)", module, re.M | re.S)
        source = body.group(1).splitlines() if body else []
        notes, above = {}, []
        for line in source:  # the class body's own lines (4 spaces in), not its methods'
            text = line.strip()
            field_line = re.match(r" {4}(\w+): [^=]+=[^#]*(?:#\s*(.*))?$", line)
            if line.startswith("    #"):
                above.append(text.lstrip("# "))
            elif field_line:
                notes[field_line.group(1)] = field_line.group(2) or " ".join(above)
                above = []
            else:
                above = []
        for f in dataclasses.fields(cls):
            key = f"{section}.{f.name}"
            note = "sized from the data by qin train" if key in data_sized else notes.get(f.name, "")
            try:
                default = yaml.safe_dump(getattr(cls(), f.name), default_flow_style=True).strip().removesuffix("...")
            except yaml.YAMLError:  # a value YAML cannot write (a tuple): as Python writes it
                default = repr(getattr(cls(), f.name))
            head = f"  {key}={default.strip()}"
            wrapped = textwrap.wrap(note, 100 - 34)  # the comment in a column of its own, 2 spaces at least
            lines.append(head if not wrapped else f"{head:<34}{wrapped[0]}" if len(head) <= 32
                         else f"{head}\n{'':34}{wrapped[0]}")
            lines.extend(f"{'':34}{more}" for more in wrapped[1:])
    return "\n".join(lines)


def _apply(section_obj, section: str, values: dict, source: str) -> None:
    known = {f.name: f for f in dataclasses.fields(section_obj)}
    for key, value in values.items():
        if key not in known:
            raise ConfigError(f"{source}: unknown key '{section}.{key}'; known keys: {', '.join(sorted(known))}")
        setattr(section_obj, key, value)


NULLABLE_INTS = ("max_steps_per_epoch", "attention_dim")  # an int, or None for "derived"
NULLABLE_STRS = ("dir",)  # data.dir: a folder, or None for the built-in dataset


def _coerce_types(cfg: RunConfig) -> None:
    """YAML gives ints where floats are meant (lr: 1) and strings for 1e-3; make types exact."""
    for section in ("data", "model", "train"):
        obj = getattr(cfg, section)
        defaults = type(obj)()
        for f in dataclasses.fields(obj):
            value, default = getattr(obj, f.name), getattr(defaults, f.name)
            try:
                if isinstance(default, bool):
                    if not isinstance(value, bool):
                        raise TypeError
                elif isinstance(default, float):
                    if isinstance(value, bool):  # YAML's true is no number
                        raise TypeError
                    value = float(value)
                elif isinstance(default, int) or (f.name in NULLABLE_INTS and value is not None):
                    # an int as it is (past 2^53 a float would round it), a float only if integral
                    if isinstance(value, bool) or not (isinstance(value, int) or float(value) == int(value)):
                        raise TypeError
                    value = int(value)
                elif isinstance(default, str) and not isinstance(value, str):  # data.label=on is True
                    raise TypeError
                elif f.name in NULLABLE_STRS and value is not None and not isinstance(value, str):
                    raise TypeError  # data.dir=2024 is a number to YAML: quote it
            except (TypeError, ValueError, OverflowError):
                wanted = ("int or null" if f.name in NULLABLE_INTS else
                          "str or null (quote a name YAML reads as a number)" if f.name in NULLABLE_STRS else
                          type(default).__name__)
                raise ConfigError(f"{section}.{f.name} must be of type {wanted}, got {value!r}") from None
            setattr(obj, f.name, value)


class _UnclearNumber(yaml.constructor.ConstructorError):
    """A YAML 1.1 number that most readers would take for another value."""


class _UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses a key given twice in one mapping (PyYAML keeps the last silently),
    and the YAML 1.1 integers that do not mean what they look like: 010 is octal 8, 1:20 is 80."""

    def construct_yaml_int(self, node):
        value = super().construct_yaml_int(node)
        text = self.construct_scalar(node).replace("_", "").lstrip("+-")
        if ":" in text or (len(text) > 1 and text[0] == "0" and text.isdigit() and value != 0):
            reason = "base 60" if ":" in text else "a leading zero means octal"
            raise _UnclearNumber(None, None, f"{node.value} reads as {value} in YAML 1.1 ({reason}); "
                                 f"write the number you mean, or quote it if it is a name", node.start_mark)
        return value

    def construct_mapping(self, node, deep=False):
        seen = set()
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=deep)
            if not isinstance(key, (str, int, float, bool)):
                continue  # an unhashable key: the constructor's own error names it
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} appears twice in one block", key_node.start_mark)
            seen.add(key)
        return super().construct_mapping(node, deep=deep)


_UniqueKeyLoader.add_constructor("tag:yaml.org,2002:int", _UniqueKeyLoader.construct_yaml_int)


def _read_yaml(path: str | Path):
    try:
        with open(path, encoding="utf-8") as fh:
            return yaml.load(fh, Loader=_UniqueKeyLoader)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot be read ({exc.strerror or exc})") from None
    except yaml.YAMLError as exc:
        where = getattr(exc, "problem_mark", None)
        at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
        if isinstance(exc, _UnclearNumber):
            raise ConfigError(f"{path}{at}: {exc.problem}") from None
        raise ConfigError(f"{path}: not valid YAML{at} ({getattr(exc, 'problem', None) or exc})") from None


def read_fuxictr_dataset(path: str | Path, dataset_id: str) -> dict:
    """The `data` section for one dataset block of a FuxiCTR dataset_config.yaml, read as it is.

    feature_cols become data.features and label_col data.label; the folder is the one holding
    train_data (relative paths resolved from the working directory, as FuxiCTR does), whose
    splits and item table must be train/valid/test/item_info.parquet.
    """
    blocks = _read_yaml(path) or {}
    if isinstance(blocks, dict):  # a block named 2024 is read as a number; --dataset-id gives text
        blocks = {str(key): block for key, block in blocks.items()}
    if not isinstance(blocks, dict) or dataset_id not in blocks:
        known = ", ".join(blocks) if isinstance(blocks, dict) else "none"
        raise ConfigError(f"{path}: no dataset block '{dataset_id}' (blocks: {known})")
    block = blocks[dataset_id]
    if not isinstance(block, dict) or "feature_cols" not in block:
        raise ConfigError(f"{path}: block '{dataset_id}' has no feature_cols")
    data: dict = {"features": block["feature_cols"]}
    label = block.get("label_col")
    if label is not None:
        if not isinstance(label, dict) or not isinstance(label.get("name"), str):
            raise ConfigError(f"{path}: block '{dataset_id}': label_col must be a mapping with a name")
        data["label"] = label["name"]
    if block.get("train_data"):
        for key in ("train_data", "valid_data", "test_data", "item_info"):
            if block.get(key) is not None and not isinstance(block[key], str):
                raise ConfigError(f"{path}: block '{dataset_id}': {key} must be a file path, got {block[key]!r}")
        folder = Path(block["train_data"]).parent
        for key, name in (("valid_data", "valid.parquet"), ("test_data", "test.parquet"),
                          ("item_info", "item_info.parquet"), ("train_data", "train.parquet")):
            if block.get(key) and Path(block[key]) != folder / name:
                raise ConfigError(f"{path}: block '{dataset_id}': {key} is {block[key]}; this loader reads "
                                  f"{folder / name} (the four files of a dataset share one folder)")
        data["dir"] = str(folder)
    return data


def load_config(path: str | Path | None = None, overrides: list[str] | tuple = (), base: dict | None = None,
                dataset: dict | None = None, base_name: str = "built-in settings") -> RunConfig:
    """Defaults <- `base` dict <- YAML file <- `dataset` (a data section) <- overrides; validated.
    An error in `base` names it as `base_name` (a checkpoint's config: the checkpoint's path)."""
    cfg = RunConfig()
    layers: list[tuple[str, dict]] = []
    if base:
        layers.append((base_name, base))
    if path is not None:
        loaded = _read_yaml(path) or {}
        if not isinstance(loaded, dict):
            raise ConfigError(f"{path}: expected a mapping with data/model/train blocks")
        layers.append((str(path), loaded))
    if dataset:
        layers.append(("the dataset block", {"data": dataset}))
    for text in overrides:
        key, sep, raw = text.partition("=")
        if not sep or "." not in key:
            raise ConfigError(f"override {text!r} must look like section.key=value (e.g. train.lr=1e-3)")
        section, _, name = key.partition(".")
        try:
            value = yaml.load(raw, Loader=_UniqueKeyLoader)
        except _UnclearNumber as exc:
            raise ConfigError(f"override {text!r}: {exc.problem}") from None
        except yaml.YAMLError as exc:
            raise ConfigError(f"override {text!r}: its value is not valid YAML ({exc.problem})") from None
        layers.append((f"override {text!r}", {section: {name: value}}))
    for source, tree in layers:
        for section, values in tree.items():
            if section not in ("data", "model", "train"):
                raise ConfigError(f"{source}: unknown section '{section}'; expected data, model or train")
            if values is None:
                continue  # `train:` with every key commented out: an empty section
            if not isinstance(values, dict):
                raise ConfigError(f"{source}: section '{section}' must be a mapping")
            _apply(getattr(cfg, section), section, values, source)
    _coerce_types(cfg)
    cfg.model.validate()
    cfg.train.validate()
    if cfg.data.features is not None:
        from qin.features import parse_features

        parse_features(cfg.data.features)
    if cfg.data.max_len < 1:
        raise ConfigError(f"data.max_len must be a positive integer, got {cfg.data.max_len}")
    return cfg
