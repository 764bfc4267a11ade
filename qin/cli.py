"""The `qin` command: make-data, train, evaluate, predict, export, compare, plot, bench, parity, backends.

Every user error (bad data, bad config, a refused overwrite) ends with one line naming what is
wrong and exit status 2, before anything is trained or written.
"""
from __future__ import annotations

import argparse
import dataclasses
import logging
import os
import signal
import sys
import time
from pathlib import Path

import numpy as np

from qin.commands_common import BUILTIN_SETTINGS, UsageError, file_in_the_way, load_data, override_key
from qin.config import ConfigError, QINConfig, load_config, read_fuxictr_dataset, settings_help


def other_schema_yaml() -> str:
    """The data block `qin make-data --schema other` writes beside its files."""
    import yaml

    from qin.synth import OTHER_DATA_SECTION

    return yaml.safe_dump({"data": OTHER_DATA_SECTION}, sort_keys=False)


def cmd_make_data(args) -> int:
    from qin.synth import make_dataset, staging_folder

    # Two train rows at least: BatchNorm trains on no fewer.
    for name, value, least in (("--rows", args.rows, 2), ("--items", args.items, 1), ("--seed", args.seed, 0)):
        if value < least:
            raise UsageError(f"{name} must be at least {least}, got {value}")
    out = Path(args.dir)
    blocker = file_in_the_way(out)
    if blocker is not None:
        raise UsageError(f"{blocker} is a file, not a folder")
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} exists and is not empty; pass --force to write into it")
    made = not out.exists()
    out.mkdir(parents=True, exist_ok=True)
    # Generated in a hidden folder inside `out` (the same filesystem, even where `out` is a mount or
    # a link), then moved in file by file: a failure, Ctrl-C or SIGTERM while generating leaves the
    # folder as it was (with --force, the earlier dataset whole).
    try:
        with staging_folder(out, ".make-data.") as staging:
            make_dataset(staging, rows=args.rows, items=args.items, seed=args.seed, schema=args.schema)
            if args.schema == "other":  # its columns are not the default layout's: the data block to train with
                (staging / "data.yaml").write_text(other_schema_yaml())
            new = sorted(p.name for p in staging.iterdir())
            in_the_way = [name for name in new if (out / name).exists() and not (out / name).is_file()]
            if in_the_way:  # checked before any file moves: an old and a new dataset must never mix
                raise UsageError(f"{out / in_the_way[0]} is in the way (not a file); nothing was written")
            for name in new:
                os.replace(staging / name, out / name)
            declared = out / "data.yaml"  # an earlier --schema other dataset's columns: not these
            try:
                ours = "data.yaml" not in new and declared.read_bytes() == other_schema_yaml().encode()
            except OSError:  # none there, or not one this user may read: not ours
                ours = False
            if ours:
                declared.unlink()
    except KeyboardInterrupt as exc:
        print(f"qin make-data: interrupted; {out} is as it was", file=sys.stderr)
        return 128 + int(getattr(exc, "signum", signal.SIGINT))
    except MemoryError:
        raise UsageError(f"{args.rows:,} rows of {args.items:,} items do not fit in this machine's memory; "
                         f"a smaller --rows or --items does") from None
    except OSError as exc:
        raise UsageError(f"cannot write the dataset to {out}: {exc.strerror or exc}") from None
    finally:
        if made and not any(out.iterdir()):
            out.rmdir()
    print(f"wrote a generated dataset ({args.schema} schema, {args.rows:,} train rows, {args.items:,} items) to {out}")
    if args.schema == "other":
        print(f"its columns are declared in {out / 'data.yaml'}: qin train --data {out} --config {out / 'data.yaml'}")
    return 0


def _dataset_block(args) -> dict | None:
    """The data section from --data-config/--dataset-id (a FuxiCTR dataset block), or None."""
    if bool(args.data_config) != bool(args.dataset_id):
        raise UsageError("--data-config and --dataset-id go together")
    if not args.data_config:
        return None
    block = read_fuxictr_dataset(args.data_config, args.dataset_id)
    if "dir" not in block and not (args.data or _data_dir_override(args.overrides)):
        # Without a folder the built-in generated data would be read in its place.
        raise UsageError(f"{args.data_config}: block '{args.dataset_id}' has no train_data, so no folder to read; "
                         f"pass --data DIR")
    return block


def _data_dir_override(overrides: list[str]) -> str | None:
    """The folder a data.dir=DIR override names (the last one), or None: it stands for --data DIR."""
    given = [o.partition("=")[2] for o in overrides if override_key(o) == "data.dir"]
    return given[-1] if given else None


# Sized from the data by `qin train` (fill_vocab_from_data): an override would be recorded in
# config.yaml but change nothing. They size QINConfig() in Python, without data.
DATA_SIZED_KEYS = ("model.num_items", "model.num_tags", "model.num_levels", "model.tags_per_item", "model.mm_dim",
                   "model.features")


def _refuse_data_sized(overrides: list[str]) -> None:
    for text in overrides:
        if override_key(text) in DATA_SIZED_KEYS:
            raise UsageError(f"{text}: qin train sizes {override_key(text)} from the data "
                             f"(declare vocab_size and embedding_dim in data.features)")


def data_sized_in_file(path: str, cfg) -> list[str]:
    """The same keys in a --config file, said in a warning each: num_items and features are replaced
    by the data's (and recorded so); the others do nothing. Not refused: a run's own config.yaml,
    reused as one, holds them (runs before 49a1a7a recorded them from their data)."""
    default = QINConfig()
    return [f"{path}: model.{key}: {getattr(cfg.model, key)} is ignored: qin train sizes the model from the data "
            f"(declare vocab_size and embedding_dim in data.features)"
            for key in ("num_tags", "num_levels", "tags_per_item", "mm_dim")
            if getattr(cfg.model, key) != getattr(default, key)]


def _add_dataset_block_args(p) -> None:
    p.add_argument("--data-config", help="a FuxiCTR dataset_config.yaml; its block --dataset-id sets the data section")
    p.add_argument("--dataset-id", help="the dataset block to read from --data-config")


def cmd_train(args) -> int:
    from qin import distributed
    from qin.host_memory import keep_freed_memory
    from qin.train import Trainer, fill_vocab_from_data, resolve_device

    _refuse_data_sized(args.overrides)
    if args.resume:
        out_dir = Path(args.resume)
        if not (out_dir / "latest.pt").exists():
            raise UsageError(f"{out_dir}: no latest.pt to resume from")
        _refuse_if_in_use(out_dir)
        if args.config or args.data or args.data_config:
            raise UsageError("--resume takes the run's own config.yaml and data; drop --config/--data/--data-config")
        if args.out or any(override_key(o) == "train.out_dir" for o in args.overrides):
            raise UsageError(f"--resume continues in {out_dir}; drop --out/train.out_dir (copy the folder to "
                             f"continue elsewhere)")
        data_keys = [override_key(o) for o in args.overrides if override_key(o).startswith("data.")]
        if [k for k in data_keys if k != "data.dir"]:
            raise UsageError(f"{data_keys[0]}: --resume continues on the run's own data; start a new run (--out) "
                             f"to change it")
        cfg = load_config(out_dir / "config.yaml", args.overrides)
    else:
        dataset_block = _dataset_block(args)
        # data.dir=DIR is --data DIR: the paper's settings, not the built-in run's.
        base = None if (args.data or _data_dir_override(args.overrides) or args.config or dataset_block) \
            else BUILTIN_SETTINGS
        cfg = load_config(args.config, args.overrides, base=base, dataset=dataset_block)
        for line in data_sized_in_file(args.config, cfg) if args.config else []:
            logging.getLogger("qin").warning(line)
        if args.data:
            cfg.data.dir = args.data
        out_dir = Path(args.out or cfg.train.out_dir)
        blocking = file_in_the_way(out_dir)
        if blocking:  # found now, not after the data has loaded
            raise UsageError(f"--out {out_dir}: {blocking} is a file, not a folder")
        _refuse_if_in_use(out_dir)
        if (out_dir / "latest.pt").exists():
            raise UsageError(f"{out_dir} already holds a run; continue it with --resume {out_dir} "
                             f"or choose another --out")
        # latest.pt deleted to save space (it is three times best.pt): the trained model and its
        # record would still be overwritten by the new run.
        results = [name for name in ("best.pt", "metrics.jsonl") if (out_dir / name).is_file()]
        if results:
            raise UsageError(f"{out_dir} already holds an earlier run's {' and '.join(results)} (without the "
                             f"latest.pt that --resume needs); choose another --out, or move them away")
    cfg.train.out_dir = str(out_dir)  # the run's config.yaml names the folder it is in
    _kernels_that_run_here(cfg, args.overrides, resume=bool(args.resume))
    if resolve_device(cfg.train.device).type == "cpu":
        keep_freed_memory()  # before the data's tensors: torch reads the huge-page switch once
    # Validated before anything is written; a resumed run reads it with its trained vocabularies.
    dataset = load_data(cfg.data.dir, _trained_data(cfg) if args.resume else cfg.data)
    cfg.data.dir = str(dataset.root.resolve())
    if args.resume and any(o.startswith("data.dir=") for o in args.overrides):
        saved = load_config(out_dir / "config.yaml").data.dir
        if saved != cfg.data.dir:
            logging.getLogger("qin").warning(
                "data.dir: the run trained on %s and continues on %s: it must be the same data, moved", saved,
                cfg.data.dir)
    fill_vocab_from_data(cfg, dataset)
    with distributed.leaving_group_at_end():  # Trainer joins the process group under torchrun
        trainer = Trainer(cfg, dataset, out_dir, lr_given=any(o.startswith("train.lr=") for o in args.overrides))
        state = trainer.fit(resume=bool(args.resume))
    if trainer.ctx.is_main:
        print(f"best valid AUC {state.best_auc:.4f} at epoch {state.best_epoch}; model in {out_dir / 'best.pt'}")
    return 0


def _kernels_that_run_here(cfg, overrides: list[str], resume: bool = False) -> None:
    """model.*_kernel=triton where Triton cannot run on the training device: refused before anything
    is loaded or written, or on --resume, where the run's config.yaml says so (a run trained on a
    GPU, continued on a CPU), 'auto' from here on (logged: how, not what, it computes)."""
    from kernels.utils import triton_cannot_run
    from qin import distributed
    from qin.models import ops_not_in
    from qin.train import resolve_device

    why = triton_cannot_run(resolve_device(cfg.train.device))
    for key in ("asta_kernel", "qnn_kernel"):
        if getattr(cfg.model, key) != "triton" or not why or key in ops_not_in(cfg.model):
            continue
        if resume and not any(override_key(o) == f"model.{key}" for o in overrides):
            logging.getLogger("qin").warning(
                "model.%s: the run trained with 'triton', which cannot run here (%s); it continues with 'auto', "
                "and its config.yaml says so from now on (model.%s=triton on a resume puts it back)", key, why, key)
            setattr(cfg.model, key, "auto")
        else:  # every rank of a torchrun says the same: one copy
            raise distributed.shared(UsageError(f"model.{key}=triton: {why}; use auto (Triton only where it measured "
                                                f"faster) or torch"))


def _refuse_if_in_use(out_dir: Path) -> None:
    """Before the data loads, in one process (the run's lock decides again when training starts;
    under torchrun there, where every rank hears rank 0's answer: a rank that stopped before
    joining the others would leave those on other machines waiting)."""
    from qin import distributed
    from qin.checkpoint import training_there

    holder = training_there(out_dir) if not distributed.context_from_env().distributed else None
    if holder:
        raise UsageError(f"{out_dir} is in use: {holder} is training there (wait for it, or stop it)")


def _trained_data(cfg):
    """The data section that reads a dataset as the run's model was built: with the vocabulary
    sizes training resolved, so an id beyond a trained table is refused naming its file, column
    and row, rather than met by the embedding (or by a table resized to fit the new data)."""
    return dataclasses.replace(cfg.data, features=cfg.model.features or cfg.data.features)


def _model_from_checkpoint(path: str, data: str | None, device_name: str, precision: str = "fp32",
                           splits: tuple[str, ...] = ("valid",), first_present: bool = False,
                           labelled: tuple[str, ...] = ("train", "valid")):
    """The checkpoint's model in eval mode, and the dataset with the splits it will read (with
    `first_present`, only the first of them the folder holds; labels read strictly in `labelled`)."""
    from kernels import utils as kernels_utils
    from qin import distributed
    from qin.checkpoint import CheckpointError, checkpoint_file, load_checkpoint, load_weights
    from qin.data import warn_if_another_item_table
    from qin.models import build_model
    from qin.train import resolve_device, resolve_precision

    payload = load_checkpoint(path)
    cfg = load_config(overrides=[], base=payload["config"], base_name=f"{path}'s config")
    # The device and precision first: a precision this device cannot run is refused before the data loads.
    device = distributed.setup(distributed.context_from_env(), resolve_device(device_name, "--device"))
    precision = resolve_precision(precision, device, "--precision")
    folder = data or cfg.data.dir
    if not data and folder and not Path(folder).is_dir():
        raise UsageError(f"{path} trained on {folder}, which is no longer there: name the data with --data DIR")
    if first_present:
        splits = ([s for s in splits if folder and (Path(folder) / f"{s}.parquet").exists()] or list(splits))[:1]
    dataset = load_data(folder, _trained_data(cfg), splits=tuple(splits), required=tuple(splits), labelled=labelled)
    if dataset.item_info.num_items != cfg.model.num_items:
        raise CheckpointError(f"{path} was trained with {cfg.model.num_items:,} items, but "
                              f"{dataset.root / 'item_info.parquet'} has {dataset.item_info.num_items:,}")
    for key in ("asta_kernel", "qnn_kernel"):  # how it computes, not what (checkpoint.EXECUTION_KEYS)
        if getattr(cfg.model, key) == "triton" and kernels_utils.triton_cannot_run(device):
            logging.getLogger("qin").info("model.%s: the run trained with 'triton', which cannot run here (%s); "
                                          "scoring with 'auto'", key, kernels_utils.triton_cannot_run(device))
            setattr(cfg.model, key, "auto")
    model = build_model(cfg.model)
    model.load_item_info(dataset.item_info.columns)
    load_weights(model, payload, checkpoint_file(path))
    warn_if_another_item_table(payload.get("item_info"), dataset, path)
    # Weights are fp32 whatever the run trained in, so any precision can score them.
    return model.to(device).eval(), dataset, cfg, device, precision


def cmd_evaluate(args) -> int:
    from qin import distributed
    from qin.data import require_both_classes
    from qin.train import evaluate

    ctx = distributed.context_from_env()
    with distributed.leaving_group_at_end():  # joined under torchrun by _model_from_checkpoint
        model, dataset, cfg, device, precision = _model_from_checkpoint(args.checkpoint, args.data, args.device,
                                                                        args.precision, (args.split,),
                                                                        labelled=(args.split,))
        if dataset.splits[args.split].label is None:
            raise UsageError(f"{dataset.root / (args.split + '.parquet')} has no label column: it cannot be "
                             f"evaluated")
        require_both_classes(dataset.splits[args.split], f"{args.split}.parquet", cfg.data.label)
        # Under torchrun each rank scores a share of the split; the AUC is computed once, on all of it.
        metrics = evaluate(model, dataset.splits[args.split], args.batch_size or cfg.train.eval_batch_size, device, ctx,
                           precision)
    if ctx.is_main:
        print(f"{args.split}: AUC {metrics['auc']:.6f}, logloss {metrics['logloss']:.6f}")
    return 0


def cmd_predict(args) -> int:
    from qin import distributed
    from qin.checkpoint import atomic_write
    from qin.train import predict

    output = _output_file(args.output, args.force)
    ctx = distributed.context_from_env()
    with distributed.leaving_group_at_end():  # joined under torchrun by _model_from_checkpoint
        model, dataset, cfg, device, precision = _model_from_checkpoint(args.checkpoint, args.data, args.device,
                                                                        args.precision, ("test",))
        # Under torchrun each rank scores a share of the rows; rank 0 writes them all, once.
        probs = predict(model, dataset.splits["test"], args.batch_size or cfg.train.eval_batch_size, device, ctx,
                        precision)
    if ctx.is_main:
        lines = ["ID,Task2"] + [f"{i},{p:.6f}" for i, p in enumerate(np.asarray(probs, dtype=np.float64))]
        atomic_write(output, lambda fh: fh.write(("\n".join(lines) + "\n").encode()))
        print(f"wrote {len(probs):,} predictions to {output}")
    return 0


def _output_file(text: str, force: bool) -> Path:
    """--output, checked before anything is computed."""
    output = Path(text)
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder; name a file")
    blocking = file_in_the_way(output.parent)
    if blocking:
        raise UsageError(f"--output {output}: {blocking} is a file, not a folder")
    if output.exists() and not force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")
    return output


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return int(text)


def cmd_export(args) -> int:
    from qin import export
    from qin.checkpoint import atomic_write

    output = _output_file(args.output, args.force)
    # Traced on a few rows of any split (their values never reach the program): --data may hold
    # only the item side data and the rows to score.
    model, dataset, cfg, device, _ = _model_from_checkpoint(args.checkpoint, args.data, args.device,
                                                            splits=("valid", "test", "train"), first_present=True)
    split = next(iter(dataset.splits.values()))
    batch = {k: v.to(device) for k, v in export.example_batch(split).items()}
    program = export.export_model(model, batch)
    atomic_write(output, lambda fh: export.save(program, fh))
    print(f"wrote {output}: load it with `import kernels; torch.export.load('{output}').module()(batch)`")
    return 0


def cmd_compare(args) -> int:
    from qin.compare import parse_variants, run_compare

    _refuse_data_sized(args.overrides)  # as qin train: the data sizes the model
    cfg = load_config(args.config, args.overrides, dataset=_dataset_block(args))
    for line in data_sized_in_file(args.config, cfg) if args.config else []:
        logging.getLogger("qin").warning(line)
    _kernels_that_run_here(cfg, args.overrides)

    run_compare(args.data or _data_dir_override(args.overrides), parse_variants(args.variants), args.epochs,
                args.seeds, Path(args.out),
                args.overrides, args.force, dataset_block=_dataset_block(args), config=args.config)
    print(f"wrote {Path(args.out) / 'compare.md'}, compare.csv and compare.png")
    return 0


def cmd_plot(args) -> int:
    from qin.curves import NoCurvesError, draw_runs

    output = Path(args.output)
    if output.suffix.lower() != ".png":  # it is a PNG whatever the name, and never a checkpoint
        raise UsageError(f"--output {output}: the picture is a PNG; give it a .png name")
    if output.is_dir():
        raise UsageError(f"--output {output} is a folder")
    try:
        drawn = draw_runs(args.runs, args.output, warn=lambda line: print(f"qin plot: {line}", file=sys.stderr))
    except NoCurvesError as exc:
        raise UsageError(str(exc)) from None
    print(f"wrote {args.output} ({drawn} run(s))")
    return 0


def cmd_bench(args) -> int:
    from bench.report import BenchError, run_command

    try:
        return run_command(args)
    except BenchError as exc:
        raise UsageError(str(exc)) from None


def cmd_parity(args) -> int:
    import torch

    import kernels

    if kernels.triton is None:
        raise UsageError("qin parity compares the Triton kernels with the torch path, and the triton package cannot "
                         "be imported here (PyPI has triton wheels for Linux x86_64 and aarch64 only)")
    from qin import parity

    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if args.device == "cuda" and not torch.cuda.is_available():
        raise UsageError("--device cuda but no CUDA device is available")
    if args.training and args.device != "cuda":
        raise UsageError("--training needs --device cuda: under the CPU's Triton interpreter one training run "
                         "takes minutes, and a run short enough to finish trains to chance AUC, which shows nothing")
    if args.training and args.seeds < 2:
        raise UsageError(f"--seeds must be at least 2 (a spread needs two runs), got {args.seeds}")
    out = Path(args.out)
    blocking = file_in_the_way(out)  # before minutes of checks, and before the rerun under the interpreter
    if blocking:
        raise UsageError(f"--out {out}: {blocking} is a file, not a folder")
    clashes = [out / name for name in parity.REPORT_FILES if (out / name).exists()]
    if clashes and not args.force:  # checked before minutes of checks, not after
        raise UsageError(f"{clashes[0]} exists; pass --force to overwrite it, or choose another --out")
    try:
        parity.only_prefixes(args.only)
        status = parity.rerun_if_interpreter_differs(args)  # TRITON_INTERPRET must fit the device
    except ValueError as exc:
        raise UsageError(str(exc)) from None
    return parity.run(args) if status is None else status


def cmd_backends(args) -> int:
    """What backend="auto" has timed and chose on this machine (kernels.choice's file)."""
    from kernels import choice

    try:
        path = choice.cache_file()
    except OSError as exc:
        raise UsageError(str(exc)) from None
    if args.forget:
        existed = path.exists()
        try:
            path.unlink(missing_ok=True)
        except OSError as exc:
            raise UsageError(f"cannot remove {path}: {exc.strerror or exc}") from None
        print(f"removed {path}; auto times again where it is next used" if existed else f"no {path} to remove")
        return 0
    mode = choice.mode()  # a bad QIN_AUTO_BACKEND was refused by main()
    records = choice.decisions()
    print(f"backend='auto' decisions in {path} (QIN_AUTO_BACKEND={mode}"
          f"{': timing off, kernels.utils.MEASURED_FASTER alone' if mode == 'table' else ''}):")
    if not records:
        print("none yet: auto times an op on a GPU the first time it meets a dtype and shape class")
        return 0
    print("\n".join(choice.table(records, with_device=True)))
    print("(each is kept for that GPU, torch and Triton versions and kernels' source; "
          "`qin backends --forget` times everything again)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-data", help="write a generated dataset in the MicroLens_1M_x1 layout")
    p.add_argument("dir")
    p.add_argument("--rows", type=int, default=200_000,
                   help="train rows (valid and test: 10%% of it each, at least 1,000)")
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--schema", choices=("microlens", "other"), default="microlens",
                   help="other: 3 context features, 2 categorical item attributes, a 64-wide embedding, no tags "
                        "(its data block, features included, is written beside it as data.yaml)")
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=cmd_make_data)

    builtin = ", ".join(f"train.{k}={v}" for k, v in BUILTIN_SETTINGS["train"].items())
    p = sub.add_parser(
        "train", help="train QIN (no arguments: the built-in dataset on this machine)",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="settings: section.key=value, or the same keys under the data:, model: and train: blocks of\n"
               "--config's YAML file. The defaults below are the paper's; the built-in run (none of --data,\n"
               f"data.dir=, --config, --data-config) takes\n{builtin} instead.\n\n"
               + settings_help(DATA_SIZED_KEYS))
    p.add_argument("--data", help="dataset folder (default: the built-in generated dataset)")
    p.add_argument("--config", help="YAML file with data/model/train blocks")
    _add_dataset_block_args(p)
    p.add_argument("--out", help="run folder (default: train.out_dir)")
    p.add_argument("--resume", metavar="DIR", help="continue the run in DIR from its latest.pt")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.lr=1e-3 model.asta_form=literal")
    p.set_defaults(func=cmd_train)

    for name, func, helptext in (("evaluate", cmd_evaluate, "score a checkpoint on a split"),
                                 ("predict", cmd_predict, "write prediction.csv (ID, Task2) for test.parquet")):
        p = sub.add_parser(name, help=helptext)
        p.add_argument("checkpoint", help="a checkpoint file, or a run folder (its best.pt)")
        p.add_argument("--data", help="dataset folder (default: the one the run trained on)")
        p.add_argument("--device", default="auto")
        p.add_argument("--batch-size", type=positive_int, help="rows per forward (default: train.eval_batch_size)")
        p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
                       help="autocast dtype of the forward (default fp32, as training validates; "
                            "any precision reads any run's fp32 weights)")
        if name == "evaluate":
            p.add_argument("--split", default="valid")
        else:
            p.add_argument("--output", default="prediction.csv")
            p.add_argument("--force", action="store_true", help="overwrite an existing output file")
        p.set_defaults(func=func)

    p = sub.add_parser("export", help="torch.export the trained model (eval form) to a .pt2 file")
    p.add_argument("checkpoint", help="a checkpoint file, or a run folder (its best.pt)")
    p.add_argument("--output", default="model.pt2")
    p.add_argument("--data", help="dataset folder (default: the one the run trained on): its item_info.parquet, "
                                  "and one split to trace with")
    p.add_argument("--device", default="cpu")
    p.add_argument("--force", action="store_true", help="overwrite an existing output file")
    p.set_defaults(func=cmd_export)

    p = sub.add_parser("compare", help="train QIN, its ablations and DIN on the same data; write a table")
    p.add_argument("--data", help="dataset folder (default: the built-in generated dataset)")
    p.add_argument("--config", help="YAML file with data/model/train blocks, as qin train takes it (e.g. the "
                                    "data.yaml that qin make-data --schema other writes)")
    _add_dataset_block_args(p)
    p.add_argument("--variants", help="comma-separated: qin,asta_dropout,qnn_relu,asta_softmax,no_asta,no_qnn,din (default: all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds train.seed + 0..N-1")
    p.add_argument("--out", default="runs/compare", help="folder for compare.md, compare.csv, compare.png")
    p.add_argument("--force", action="store_true", help="overwrite an earlier table in --out")
    p.add_argument("overrides", nargs="*", metavar="section.key=value",
                   help="applied to every run; the settings the variants differ in and train.epochs are refused "
                        "(pass --epochs), and DIN keeps its own train.lr, patience, lr_decay and embedding_l2 "
                        "(said where one of yours does not apply)")
    p.set_defaults(func=cmd_compare)

    p = sub.add_parser("plot", help="draw the curves of one or more runs on the same axes")
    p.add_argument("runs", nargs="+", metavar="RUN", help="run folders (labels are their names)")
    p.add_argument("--output", default="curves.png", help="the picture to write (replaced if it exists)")
    p.set_defaults(func=cmd_plot)

    from bench.arguments import build_parser as bench_parser

    p = sub.add_parser("bench", help="run the benchmarks; write report.md, results.csv and plots")
    bench_parser(p)
    p.set_defaults(func=cmd_bench)

    p = sub.add_parser("parity", help="check the fused kernels and the model against float64; write parity.md/.csv")
    p.add_argument("--device", choices=("cpu", "cuda"), help="default: cuda where a GPU is available, else cpu")
    p.add_argument("--quick", action="store_true", help="small shapes only (under a minute on a CPU)")
    p.add_argument("--out", default="runs/parity", help="folder for parity.md and parity.csv")
    p.add_argument("--force", action="store_true", help="overwrite an earlier report in --out")
    p.add_argument("--training", action="store_true", help="also train with each backend over --seeds seeds")
    p.add_argument("--seeds", type=int, default=3, help="seeds per backend for --training (default 3)")
    p.add_argument("--only", help="comma-separated checks to run, by name (that check alone) or name prefix (qnn: "
                                  "every QNN check): asta, gathered_asta, qnn_train, qnn_train_autocast, qnn_eval, "
                                  "qnn_dropout_mask, model")
    p.set_defaults(func=cmd_parity)

    p = sub.add_parser("backends", help="list what backend='auto' has timed and chose on this machine's GPUs")
    p.add_argument("--forget", action="store_true", help="remove the decisions, so that auto times again")
    p.set_defaults(func=cmd_backends)
    return parser


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """parse_args, with overrides taken wherever they stand: argparse alone fills the positional
    overrides from the first run of them and calls any after an option unrecognised
    (`qin train train.epochs=1 --out x train.lr=1e-3`)."""
    args, extra = parser.parse_known_args(argv)
    strays = [a for a in extra if a.startswith("-") or "=" not in a]
    if extra and (strays or not hasattr(args, "overrides")):
        parser.parse_args(argv)  # argparse's own message for what it does not know, and exit 2
    if extra:
        args.overrides = [*args.overrides, *extra]
    return args


# The commands that run under torchrun, each rank taking a share of the work.
SHARED_BY_RANKS = ("train", "evaluate", "predict")


def main(argv: list[str] | None = None) -> int:
    # The arguments first: --help and a mistyped command answer before torch is imported (seconds).
    args = _parse(build_parser(), argv)

    import torch

    from qin import distributed
    from qin.checkpoint import CheckpointError
    from qin.data import DataError
    from qin.train import TrainingError, TrainingInterrupted

    try:
        ctx = distributed.context_from_env()
    except ConfigError as exc:
        print(f"qin: error: {exc}", file=sys.stderr)
        return 2
    # Under torchrun the other ranks load the same data: only rank 0 logs, as only it writes.
    main_rank = ctx.is_main
    logging.basicConfig(level=logging.INFO if main_rank else logging.ERROR, format="%(message)s")
    if args.command not in ("make-data", "plot"):  # those run no model
        from kernels import choice

        try:  # read where backend="auto" first runs on a GPU, after the data has loaded: checked now
            choice.mode()
        except ValueError as exc:
            print(f"qin {args.command}: error: {exc}", file=sys.stderr)
            return 2
    if ctx.distributed and args.command not in SHARED_BY_RANKS:
        # Each rank would run the whole command and write the same files.
        if main_rank:
            print(f"qin {args.command}: error: runs in one process, not under torchrun ({ctx.world_size} "
                  f"processes here); {', '.join(SHARED_BY_RANKS)} share their work across processes",
                  file=sys.stderr)
        else:
            time.sleep(1)  # torchrun stops the group when a rank exits: rank 0 prints the verdict first
        return 2
    try:
        return args.func(args)
    except (DataError, ConfigError, CheckpointError, UsageError) as exc:
        if main_rank or not getattr(exc, "shared_by_ranks", False):  # one copy of the ranks' common verdict
            print(f"qin {args.command}: error: {exc}", file=sys.stderr)
        else:
            time.sleep(1)  # torchrun stops the group when a rank exits: rank 0 prints the verdict first
        return 2
    except TrainingInterrupted as exc:  # under torchrun the ranks agreed to stop at the same step
        if main_rank:  # which saved the checkpoint the message names
            print(f"qin {args.command}: {exc}", file=sys.stderr)
        return 128 + int(exc.signum)
    except KeyboardInterrupt as exc:  # Ctrl-C where nothing waits for a step, or a second one
        if main_rank and not getattr(exc, "reported", False):
            print(f"qin {args.command}: {str(exc) or 'interrupted'}", file=sys.stderr)
        exc.reported = True
        raise  # console_main leaves by the signal
    except TrainingError as exc:
        if main_rank or not getattr(exc, "shared_by_ranks", False):
            print(f"qin {args.command}: error: {exc}", file=sys.stderr)
        else:
            time.sleep(1)
        return 1
    except OSError as exc:
        if exc.filename is None:  # not about a file: a traceback says more
            raise
        print(f"qin {args.command}: error: {exc}", file=sys.stderr)  # a full disk, a read-only folder: one line
        return 1
    except torch.cuda.OutOfMemoryError as exc:
        print(f"qin {args.command}: error: the GPU ran out of memory ({str(exc).splitlines()[0]}); a smaller "
              f"train.batch_size (or train.eval_batch_size, when it happened in validation or scoring) needs "
              f"less", file=sys.stderr)
        return 1


def console_main(argv: list[str] | None = None) -> None:
    """The `qin` command and `python -m qin`: main's exit status. A Ctrl-C that main reported in
    one line leaves the process by SIGINT, after Python's own clean-up, as an uncaught Ctrl-C does,
    so that a shell script's loop around qin stops too (an exit status of 130 lets it go on); another
    stop signal exits 128 + the signal. (qin train's saved stop exits 128 + the signal, as documented.)"""
    try:
        code = main(argv)
    except KeyboardInterrupt as exc:
        signum = int(getattr(exc, "signum", signal.SIGINT))
        if signum != signal.SIGINT:
            sys.exit(128 + signum)
        sys.excepthook = _quiet_after_a_reported_interrupt
        raise KeyboardInterrupt from None  # CPython dies of SIGINT for this very type, not a subclass
    sys.exit(code)


def _quiet_after_a_reported_interrupt(kind, value, traceback) -> None:
    if not issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)


if __name__ == "__main__":
    console_main()
