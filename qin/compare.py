"""`qin compare`: the paper's two tables as runs on your data, QIN against DIN and the ablations.

Every variant trains with the same loop, on the same data, with the same seeds; the table gives
valid AUC (mean and spread over seeds), logloss, parameters and training samples/s, with the
paper's published figure beside it in its own column (the paper's, on MicroLens_1M_x1, not ours).
"""
from __future__ import annotations

import csv
import os
import shutil
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

from qin.commands_common import BUILTIN_SETTINGS, UsageError, file_in_the_way, load_data, override_key
from qin.config import ConfigError, RunConfig, load_config


@dataclass(frozen=True)
class Variant:
    name: str
    description: str
    overrides: tuple[str, ...]
    paper_auc: float | None  # SPEC.md, Table 3 and the DIN baseline


VARIANTS = {v.name: v for v in [
    Variant("qin", "QIN", (), 0.9701),
    Variant("asta_dropout", "ASTA with Dropout", ("model.asta_dropout=0.1",), 0.9681),
    Variant("qnn_relu", "QNN with ReLU instead of PReLU", ("model.qnn_activation=relu",), 0.9584),
    Variant("asta_softmax", "ASTA with SoftMax instead of ReLU", ("model.asta_activation=softmax",), 0.9490),
    Variant("no_asta", "QIN without ASTA", ("model.use_asta=false",), 0.9321),
    Variant("no_qnn", "QIN without QNN (an MLP instead)", ("model.interaction=mlp",), 0.7396),
    # DIN is trained as the challenge's baseline was (qin/din.py): Adam lr 1e-3, early-stop patience
    # 3, and FuxiCTR's rate cut (x0.1) and the challenge's embedding L2 (1e-6) where QIN has its own.
    Variant("din", "DIN (official baseline)", ("model.architecture=din", "train.lr=1e-3", "train.patience=3",
                                               "train.lr_decay=0.1", "train.embedding_l2=1e-6"), 0.8655),
]}


@dataclass
class Result:
    variant: Variant
    seed: int
    auc: float
    logloss: float
    parameters: int
    samples_per_s: float | None  # None: no step counted (each epoch was the compiling step)
    epochs: int  # trained; fewer than asked where early stopping ended the run


def parse_variants(text: str | None) -> list[Variant]:
    if not text:
        return list(VARIANTS.values())
    names = [n.strip() for n in text.split(",") if n.strip()]
    unknown = [n for n in names if n not in VARIANTS]
    if unknown:
        raise ConfigError(f"--variants: unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
    if not names:
        raise ConfigError(f"--variants names no variant; known: {', '.join(VARIANTS)}")
    repeated = sorted({n for n in names if names.count(n) > 1})
    if repeated:  # its runs would count twice as many seeds, each twice
        raise ConfigError(f"--variants names {', '.join(repeated)} more than once")
    return [VARIANTS[n] for n in names]


# The settings that make the variants differ: an override of one would change every row it
# reaches (QIN's among them) while the table kept the variants' names.
VARIANT_KEYS = tuple(dict.fromkeys(override_key(o) for v in VARIANTS.values() for o in v.overrides
                                   if o.startswith("model.")))


def refused_overrides(overrides: list[str]) -> None:
    for text in overrides:
        key = override_key(text)
        if key in VARIANT_KEYS:
            raise UsageError(f"{text}: qin compare sets {key} per variant (--variants chooses them); "
                             f"train one setting with qin train")
        if key == "train.epochs":
            raise UsageError(f"{text}: qin compare trains every run --epochs epochs; pass --epochs")


def file_settings(config: str | None) -> dict[str, object]:
    """{section.key: value} of a --config file (load_config has checked it)."""
    tree = yaml.safe_load(Path(config).read_text()) if config else None
    return {f"{section}.{name}": value for section, values in (tree or {}).items() for name, value in (values or {}).items()}


def _yaml_value(value) -> str:
    return yaml.safe_dump(value, default_flow_style=True).removesuffix("\n...\n").strip()


def refused_in_config(config: str | None, dataset_block: dict | None = None) -> tuple[list[str], list[str]]:
    """The variants' keys in the --config file (a run's config.yaml holds them all) are refused,
    all named at once, where they differ from QIN's defaults (they would relabel every row), as
    load_config reads them (0e0 is 0.0); train.epochs there is ignored for --epochs.
    Returns the lines that say what is ignored, and the file's train settings (as overrides are
    written, for shadowed) that differ from QIN's defaults: a variant may set them itself."""
    settings = file_settings(config)
    if not settings:
        return [], []
    loaded, defaults = load_config(config, dataset=dataset_block), RunConfig()

    def off_default(key: str) -> bool:
        section, name = key.split(".", 1)
        return getattr(getattr(loaded, section), name) != getattr(getattr(defaults, section), name)

    changed = [f"{key}={_yaml_value(value)}" for key, value in settings.items() if key in VARIANT_KEYS and off_default(key)]
    if changed:
        raise UsageError(f"{config}: {', '.join(changed)}: qin compare sets {'these' if len(changed) > 1 else 'it'} "
                         f"per variant (--variants chooses them); remove {'them' if len(changed) > 1 else 'it'} "
                         f"from the file")
    notes = [f"{config}: train.epochs={_yaml_value(settings['train.epochs'])} is ignored: every run trains --epochs "
             f"epochs"] if "train.epochs" in settings else []
    return notes, [f"{key}={_yaml_value(value)} ({config})" for key, value in settings.items()
                   if key.startswith("train.") and key != "train.epochs" and off_default(key)]


def shadowed(overrides: list[str], variants: list[Variant]) -> list[str]:
    """Lines for the user's overrides that a variant's own settings take over (DIN's lr, say)."""
    return [f"{text} does not apply to {v.name}, which sets {own}"
            for v in variants for own in v.overrides for text in overrides if override_key(text) == override_key(own)]


def variant_config(variant: Variant, seed: int, dataset, epochs: int, overrides: list[str], base: dict | None,
                   dataset_block: dict | None = None, config: str | None = None):
    """One run's settings: the user's, then the variant's own, on the dataset's vocabularies."""
    from qin.train import fill_vocab_from_data

    cfg = load_config(config, overrides=[*overrides, *variant.overrides, f"train.epochs={epochs}"], base=base,
                      dataset=dataset_block)
    cfg.data.dir = str(dataset.root)
    cfg.train.seed += seed
    fill_vocab_from_data(cfg, dataset)
    return cfg


def train_variant(variant: Variant, seed: int, cfg, dataset, run_dir: Path, log) -> Result:
    from qin.model import count_parameters
    from qin.train import Trainer

    # The run folder is scratch, deleted when compare ends: a stop keeps only the finished runs' table.
    trainer = Trainer(cfg, dataset, run_dir, log=lambda *_: None,
                      on_stop="stopping after this step; the finished runs' table is kept")
    state = trainer.fit()
    best = next(r for r in state.history if r["epoch"] == state.best_epoch)
    speed = _mean_or_none([r["samples_per_s"] for r in state.history])  # None: no epoch had a step that counted
    result = Result(variant, seed, state.best_auc, best["valid_logloss"], count_parameters(trainer.model), speed,
                    len(state.history))
    log(f"{variant.name} seed {seed}: valid AUC {result.auc:.4f}, logloss {result.logloss:.4f}, "
        f"{result.parameters:,} parameters, "
        + (f"{speed:,.0f} samples/s" if speed is not None else "samples/s not measured"))
    return result


def _mean_or_none(values: list) -> float | None:
    measured = [v for v in values if v is not None]
    return statistics.mean(measured) if measured else None


def summarise(results: list[Result]) -> list[dict]:
    rows = []
    for name in dict.fromkeys(r.variant.name for r in results):
        mine = [r for r in results if r.variant.name == name]
        aucs = [r.auc for r in mine]
        rows.append({
            "variant": name, "description": mine[0].variant.description, "seeds": len(mine),
            # One seed has no spread: None (an empty cell), not a zero that reads as "no variance".
            "auc_mean": statistics.mean(aucs), "auc_std": statistics.stdev(aucs) if len(aucs) > 1 else None,
            "logloss_mean": statistics.mean(r.logloss for r in mine), "parameters": mine[0].parameters,
            "samples_per_s": _mean_or_none([r.samples_per_s for r in mine]),
            "epochs_min": min(r.epochs for r in mine), "epochs_max": max(r.epochs for r in mine),
            "paper_auc_microlens": mine[0].variant.paper_auc,
        })
    return rows


def markdown(rows: list[dict], data_label: str, epochs: int, seconds: float, stopped: str = "") -> str:
    """The table; `stopped` says why it holds fewer runs than asked for."""
    seeds = sorted({r["seeds"] for r in rows})
    auc = "valid AUC (mean ± std over seeds)" if seeds[-1] > 1 else "valid AUC (one seed: no spread)"
    lines = [f"Data: {data_label}; {_epochs_per_run(rows, epochs)}; {'-'.join(map(str, seeds))} seed(s) per variant; "
             f"{seconds / 60:.1f} minutes in all.", "",
             f"| variant | {auc} | logloss | parameters | train samples/s "
             "| paper's valid AUC on MicroLens_1M_x1 |", "|---|---|---|---|---|---|"]
    if stopped:
        lines[1:1] = ["", f"**Incomplete:** {stopped}"]
    for r in rows:
        paper = f"{r['paper_auc_microlens']:.4f}" if r["paper_auc_microlens"] is not None else "-"
        spread = f" ± {r['auc_std']:.4f}" if r["auc_std"] is not None else ""
        speed = f"{r['samples_per_s']:,.0f}" if r["samples_per_s"] is not None else "-"
        lines.append(f"| {r['description']} (`{r['variant']}`) | {r['auc_mean']:.4f}{spread} | "
                     f"{r['logloss_mean']:.4f} | {r['parameters']:,} | {speed} | {paper} |")
    lines += ["", "The last column is the paper's published figure on the real MicroLens_1M_x1 data, "
              "not a result of this run."]
    return "\n".join(lines) + "\n"


def _epochs_per_run(rows: list[dict], epochs: int) -> str:
    """"5 epoch(s) per run", or, where early stopping ended runs sooner, how many epochs those had."""
    sooner = [f"{r['variant']} {r['epochs_min']}" + (f"-{r['epochs_max']}" if r["epochs_max"] != r["epochs_min"] else "")
              for r in rows if r["epochs_min"] < epochs]
    if not sooner:
        return f"{epochs} epoch(s) per run"
    return f"up to {epochs} epoch(s) per run (early stopping ended some sooner: {', '.join(sooner)})"


def bar_chart(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 3.8))
    names = [r["variant"] for r in rows]
    x = range(len(rows))
    ax.bar([i - 0.2 for i in x], [r["auc_mean"] for r in rows], width=0.4, yerr=[r["auc_std"] or 0.0 for r in rows],
           label="this run (valid AUC)")
    ax.bar([i + 0.2 for i in x], [r["paper_auc_microlens"] or 0 for r in rows], width=0.4,
           label="paper, MicroLens_1M_x1", alpha=0.5)
    ax.set_xticks(list(x), names, rotation=20, fontsize=8)
    low = min(min(r["auc_mean"] for r in rows), min(r["paper_auc_microlens"] or 1 for r in rows))
    ax.set_ylim(max(0.0, low - 0.05), 1.0)
    ax.set_ylabel("valid AUC")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


OUTPUTS = ("compare.md", "compare.csv", "compare.png")


def run_compare(data: str | None, variants: list[Variant], epochs: int, seeds: int, out: Path,
                overrides: list[str], force: bool, log=print, dataset_block: dict | None = None,
                config: str | None = None) -> list[dict]:
    """Train each variant `seeds` times on one dataset: the folder `data`, or a FuxiCTR dataset
    block (read_fuxictr_dataset's data section, with its folder unless `data` names one), or the
    folder of the YAML file `config` (as `qin train --config` reads it), or the built-in generated
    data; write compare.md/.csv/.png into `out`."""
    from qin.train import StoppedAtOnce, TrainingError, TrainingInterrupted

    blocking = file_in_the_way(out)
    if blocking:
        raise UsageError(f"--out {out}: {blocking} is a file, not a folder")
    clashes = [out / name for name in OUTPUTS if (out / name).exists()]
    if clashes and not force:
        raise UsageError(f"{clashes[0]} exists; pass --force to overwrite it, or choose another --out")
    if epochs < 1 or seeds < 1:
        raise UsageError("--epochs and --seeds must be at least 1")
    refused_overrides(overrides)
    data_section = load_config(config, overrides=overrides, dataset=dataset_block).data  # bad overrides fail here
    notes, in_file = refused_in_config(config, dataset_block)
    for line in notes + shadowed(overrides + in_file, variants):
        log(line)
    data = data or (dataset_block or {}).get("dir") or data_section.dir
    dataset = load_data(data, data_section)
    base = None if data or config else BUILTIN_SETTINGS  # as qin train takes them
    # Every run's settings before the first trains: one a variant's own settings make invalid (DIN's
    # lr under a larger train.min_lr) would otherwise stop the compare hours in.
    configs = {(v.name, seed): variant_config(v, seed, dataset, epochs, overrides, base, dataset_block, config)
               for v in variants for seed in range(seeds)}
    label = (str(dataset.root.resolve()) if data else
             f"the built-in generated dataset ({dataset.root.name}): generated data, not MicroLens")
    start = time.perf_counter()
    out.mkdir(parents=True, exist_ok=True)
    runs = Path(tempfile.mkdtemp(prefix=".compare-runs.", dir=out))
    results: list[Result] = []
    total = len(variants) * seeds
    try:
        for v in variants:
            for seed in range(seeds):
                results.append(train_variant(v, seed, configs[v.name, seed], dataset, runs / f"{v.name}-seed{seed}",
                                             log))
    except (TrainingInterrupted, StoppedAtOnce, TrainingError, ConfigError) as exc:
        # The runs are scratch (deleted below): keep what finished, and say so, rather than point
        # at a checkpoint that is about to go.
        how = ("stopped at once" if isinstance(exc, StoppedAtOnce) else
               "stopped" if isinstance(exc, TrainingInterrupted) else "failed")
        stopped = how != "failed"
        why = f"{how} in {v.name} seed {seed}"
        kept = (f"the {len(results)} finished run(s) of {total} are in {out / 'compare.md'}" if results
                else "no run had finished; nothing written"
                + (f" ({clashes[0]} is an earlier compare's, left as it was)" if clashes else ""))
        if results:
            rows = summarise(results)
            _write_outputs(rows, out, markdown(rows, label, epochs, time.perf_counter() - start,
                                               f"{why} after {len(results)} of {total} runs"))
        if stopped:
            raise TrainingInterrupted(f"{why}; {kept}", exc.signum) from None
        # A setting's error stays one (exit 2, as qin train's), with what was kept.
        raise (ConfigError if isinstance(exc, ConfigError) else TrainingError)(f"{why}: {exc}; {kept}") from None
    finally:
        shutil.rmtree(runs, ignore_errors=True)
    rows = summarise(results)
    table = markdown(rows, label, epochs, time.perf_counter() - start)
    _write_outputs(rows, out, table)
    log(table)
    return rows


def _write_outputs(rows: list[dict], out: Path, table: str) -> None:
    """compare.md/.csv/.png, each renamed into place."""
    staging = Path(tempfile.mkdtemp(prefix=".compare.", dir=out))
    try:
        (staging / "compare.md").write_text(table)
        with open(staging / "compare.csv", "w", newline="") as fh:
            writer = csv.DictWriter(fh, fieldnames=list(rows[0]))
            writer.writeheader()
            writer.writerows(rows)
        bar_chart(rows, staging / "compare.png")
        for name in OUTPUTS:
            os.replace(staging / name, out / name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
