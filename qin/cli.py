"""The `qin` command: make-data, train, evaluate, predict, compare, bench.

Every user error (bad data, bad config, a refused overwrite) ends with one line naming what is
wrong and exit status 2, before anything is trained or written.
"""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

import numpy as np

from qin import distributed
from qin.checkpoint import CheckpointError, atomic_write, load_checkpoint
from qin.config import ConfigError, load_config

# Settings of the no-argument run: the paper's model on the small built-in dataset, sized to train
# in about five minutes on a 2-core CPU. Everything else is the paper's.
BUILTIN_SETTINGS = {"train": {"batch_size": 512, "eval_batch_size": 2048, "epochs": 4, "out_dir": "runs/builtin"}}


class UsageError(Exception):
    pass


def _load_data(path: str | None, max_len: int):
    from qin.data import load_dataset
    from qin.synth import builtin_dataset

    root = Path(path) if path else builtin_dataset()
    return load_dataset(root, max_len=max_len)


def cmd_make_data(args) -> int:
    from qin.synth import make_dataset

    out = Path(args.dir)
    if out.exists() and any(out.iterdir()) and not args.force:
        raise UsageError(f"{out} exists and is not empty; pass --force to write into it")
    make_dataset(out, rows=args.rows, items=args.items, seed=args.seed)
    print(f"wrote a generated dataset ({args.rows:,} train rows, {args.items:,} items) to {out}")
    return 0


def cmd_train(args) -> int:
    from qin.train import Trainer, fill_vocab_from_data

    if args.resume:
        out_dir = Path(args.resume)
        if not (out_dir / "latest.pt").exists():
            raise UsageError(f"{out_dir}: no latest.pt to resume from")
        if args.config or args.data:
            raise UsageError("--resume takes the run's own config.yaml and data; drop --config/--data")
        cfg = load_config(out_dir / "config.yaml", args.overrides)
    else:
        base = None if (args.data or args.config) else BUILTIN_SETTINGS
        cfg = load_config(args.config, args.overrides, base=base)
        if args.data:
            cfg.data.dir = args.data
        out_dir = Path(args.out or cfg.train.out_dir)
        if (out_dir / "latest.pt").exists():
            raise UsageError(f"{out_dir} already holds a run; continue it with --resume {out_dir} "
                             f"or choose another --out")
    dataset = _load_data(cfg.data.dir, cfg.data.max_len)  # validated before anything is written
    cfg.data.dir = str(dataset.root.resolve())
    fill_vocab_from_data(cfg, dataset)
    trainer = Trainer(cfg, dataset, out_dir)
    try:
        state = trainer.fit(resume=bool(args.resume))
    finally:
        distributed.shutdown()
    if trainer.ctx.is_main:
        print(f"best valid AUC {state.best_auc:.4f} at epoch {state.best_epoch}; model in {out_dir / 'best.pt'}")
    return 0


def _model_from_checkpoint(path: str, data: str | None, device_name: str, precision: str):
    from qin.model import build_model
    from qin.train import resolve_device, resolve_precision

    payload = load_checkpoint(path)
    cfg = load_config(overrides=[], base=payload["config"])
    dataset = _load_data(data or cfg.data.dir, cfg.data.max_len)
    if dataset.item_info.num_items != cfg.model.num_items:
        raise CheckpointError(f"{path} was trained with {cfg.model.num_items:,} items, but "
                              f"{dataset.root / 'item_info.parquet'} has {dataset.item_info.num_items:,}")
    device = distributed.setup(distributed.context_from_env(), resolve_device(device_name))
    model = build_model(cfg.model)
    model.load_item_info(dataset.item_info.tags, dataset.item_info.mm)
    model.load_state_dict(payload["model"])
    # Weights are fp32 whatever the run trained in, so any precision can score them.
    return model.to(device).eval(), dataset, cfg, device, resolve_precision(precision, device)


def cmd_evaluate(args) -> int:
    from qin.train import evaluate

    model, dataset, cfg, device, precision = _model_from_checkpoint(args.checkpoint, args.data, args.device,
                                                                    args.precision)
    if args.split not in dataset.splits:
        raise UsageError(f"split '{args.split}' not found in {dataset.root}")
    if dataset.splits[args.split].label is None:
        raise UsageError(f"{dataset.root / (args.split + '.parquet')} has no label column: it cannot be evaluated")
    # Under torchrun each rank scores a share of the split; the AUC is computed once, on all of it.
    ctx = distributed.context_from_env()
    try:
        metrics = evaluate(model, dataset.splits[args.split], args.batch_size or cfg.train.eval_batch_size, device, ctx,
                           precision)
    finally:
        distributed.shutdown()
    if ctx.is_main:
        print(f"{args.split}: AUC {metrics['auc']:.6f}, logloss {metrics['logloss']:.6f}")
    return 0


def cmd_predict(args) -> int:
    from qin.train import predict

    output = Path(args.output)
    if output.exists() and not args.force:
        raise UsageError(f"{output} exists; pass --force to overwrite it")
    model, dataset, cfg, device, precision = _model_from_checkpoint(args.checkpoint, args.data, args.device,
                                                                    args.precision)
    if "test" not in dataset.splits:
        raise UsageError(f"{dataset.root}: no test.parquet to predict")
    probs = predict(model, dataset.splits["test"], args.batch_size or cfg.train.eval_batch_size, device,
                    precision=precision)
    lines = ["ID,Task2"] + [f"{i},{p:.6f}" for i, p in enumerate(np.asarray(probs, dtype=np.float64))]
    atomic_write(output, lambda fh: fh.write(("\n".join(lines) + "\n").encode()))
    print(f"wrote {len(probs):,} predictions to {output}")
    return 0


def cmd_compare(args) -> int:
    from qin.compare import parse_variants, run_compare

    run_compare(args.data, parse_variants(args.variants), args.epochs, args.seeds, Path(args.out),
                args.overrides, args.force)
    print(f"wrote {Path(args.out) / 'compare.md'}, compare.csv and compare.png")
    return 0


def cmd_bench(args) -> int:
    from bench.report import BenchError, run_command

    try:
        return run_command(args)
    except BenchError as exc:
        raise UsageError(str(exc)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="qin", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("make-data", help="write a generated dataset in the MicroLens_1M_x1 layout")
    p.add_argument("dir")
    p.add_argument("--rows", type=int, default=200_000, help="train rows (valid and test are about 10%% each)")
    p.add_argument("--items", type=int, default=5_000)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="write into a non-empty folder")
    p.set_defaults(func=cmd_make_data)

    p = sub.add_parser("train", help="train QIN (no arguments: the built-in dataset on this machine)")
    p.add_argument("--data", help="dataset folder (default: the built-in generated dataset)")
    p.add_argument("--config", help="YAML file with data/model/train blocks")
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
        p.add_argument("--batch-size", type=int)
        p.add_argument("--precision", default="fp32", choices=("fp32", "bf16", "fp16", "auto"),
                       help="autocast dtype of the forward (default fp32, as training validates; "
                            "any precision reads any run's fp32 weights)")
        if name == "evaluate":
            p.add_argument("--split", default="valid")
        else:
            p.add_argument("--output", default="prediction.csv")
            p.add_argument("--force", action="store_true", help="overwrite an existing output file")
        p.set_defaults(func=func)

    p = sub.add_parser("compare", help="train QIN, its ablations and DIN on the same data; write a table")
    p.add_argument("--data", help="dataset folder (default: the built-in generated dataset)")
    p.add_argument("--variants", help="comma-separated: qin,asta_dropout,qnn_relu,asta_softmax,no_asta,no_qnn,din (default: all)")
    p.add_argument("--epochs", type=int, default=2)
    p.add_argument("--seeds", type=int, default=1, help="runs per variant, seeds train.seed + 0..N-1")
    p.add_argument("--out", default="runs/compare", help="folder for compare.md, compare.csv, compare.png")
    p.add_argument("--force", action="store_true", help="overwrite an earlier table in --out")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="applied to every variant")
    p.set_defaults(func=cmd_compare)

    from bench.report import build_parser as bench_parser

    p = sub.add_parser("bench", help="run the benchmarks; write report.md, results.csv and plots")
    bench_parser(p)
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    from qin.data import DataError
    from qin.train import TrainingError, TrainingInterrupted

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except (DataError, ConfigError, CheckpointError, UsageError) as exc:
        print(f"qin {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except TrainingInterrupted as exc:
        print(f"qin {args.command}: {exc}", file=sys.stderr)
        return 130
    except TrainingError as exc:
        print(f"qin {args.command}: error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
