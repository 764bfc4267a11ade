"""Synthetic click data in the exact MicroLens_1M_x1 layout of SPEC.md, with a planted signal.

The generative story, every step vectorised with numpy:
  items   each item belongs to one of TOPICS clusters; its latent vector is the cluster centre plus
          noise. item_emb_d128 is a noisy linear view of the latent, item_tags mostly the topic's tags.
  users   each user has a primary and a secondary topic of interest.
  rows    a user, a history of items drawn mostly around the user's interests (length 3..100, a
          clipped lognormal with median 6), a target item (half the time from the interests) and
          likes/views levels around the target item's own levels.
  click   logit = MATCH_WEIGHT * (1 - exp(-2 * sum_l ReLU(cos(target, history_l) - MATCH_THRESHOLD)))
                + CROSS_WEIGHT * likes' * views' + item quality + bias,
          where likes' and views' are the levels centred and scaled to [-1, 1]. The match term is
          the ReLU-gated sum of similarities that QIN's attention computes; the cross term is a pure
          pairwise interaction. The bias is solved for POSITIVE_RATE.
Everything the signal depends on is visible to the model (item ids, tags, embeddings, levels);
user_id only groups rows and carries no signal of its own.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import signal
import tempfile
import threading
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from qin.errors import StoppedBySignal

logger = logging.getLogger(__name__)

# The built-in dataset of the CLI: sized to train for about 5 minutes on 2 CPU cores.
BUILTIN_VERSION = "builtin-v1"
BUILTIN_ROWS = 60_000
BUILTIN_ITEMS = 5_000
BUILTIN_SEED = 0

# Layout (SPEC.md).
TAGS_PER_ITEM = 5
EMBEDDING_DIM = 128
NUM_LEVELS = 11  # likes_level / views_level take 0..10
MIN_HISTORY, MAX_HISTORY = 3, 100
HISTORY_WIDTH = MAX_HISTORY  # item_seq is stored left-padded to this many entries

# The generative model.
TOPICS = 24
LATENT_DIM = 32
TOPIC_SPREAD = 0.5  # item latent = normalise(centre + TOPIC_SPREAD * noise): same-topic cos ~0.8
EMBEDDING_NOISE = 0.7  # per-dimension noise of item_emb_d128 around the projected latent
EMBEDDING_NORM = 1.0  # typical norm of an item_emb_d128 row, about that of a PCA-reduced embedding
OWN_TOPIC_TAG_RATE = 0.8  # the rest of an item's tags are random
MEDIAN_HISTORY, HISTORY_SIGMA = 6.0, 1.0  # lognormal history length, clipped to 3..100
INTEREST_RATE = 0.85  # history items drawn from the user's topics; the rest from all items
PRIMARY_TOPIC_RATE = 0.7  # of the interest draws, the share from the primary topic
TARGET_INTEREST_RATE = 0.5  # targets drawn from the user's topics; the rest from all items
MATCH_THRESHOLD = 0.5  # ReLU gate on the cosine similarity of target and history item
MATCH_WEIGHT = 6.0
CROSS_WEIGHT = 1.5
QUALITY_STD = 0.5
POSITIVE_RATE = 0.25
WRITE_CHUNK_ROWS = 500_000  # rows per parquet row group: bounds memory when padding histories


@dataclass
class SyntheticData:
    """Everything generated, before it is written; the test of the signal reads the truth from here."""

    item_tags: np.ndarray  # (items + 1, 5) int64, left-padded, row 0 zeros
    item_emb: np.ndarray  # (items + 1, 128) float32, row 0 zeros
    item_latent: np.ndarray  # (items + 1, LATENT_DIM) float32, row 0 zeros
    item_topic: np.ndarray  # (items + 1,) int64, the cluster of each item (row 0: 0)
    item_quality: np.ndarray  # (items + 1,) float64, each item's own term of the logit
    user_id: np.ndarray  # (rows,) int64
    history_offsets: np.ndarray  # (rows + 1,) int64, row r's history is history_items[o[r]:o[r+1]]
    history_items: np.ndarray  # (sum of lengths,) int64, oldest first
    item_id: np.ndarray  # (rows,) int64
    likes_level: np.ndarray  # (rows,) int64
    views_level: np.ndarray  # (rows,) int64
    match: np.ndarray  # (rows,) float64, the history term of the logit before its weight
    logit_without_history: np.ndarray  # (rows,) float64, every other term of the logit, bias included
    click_probability: np.ndarray  # (rows,) float64
    label: np.ndarray  # (rows,) float32, 0/1


def _popularity_sampler(weights: np.ndarray, groups: np.ndarray, num_groups: int):
    """Draw members of a given group with probability proportional to weight, vectorised.

    Members sorted by group get the cumulative key group + (cumulative weight share within the
    group), so one searchsorted of group + u (u uniform in [0, 1)) lands inside that group.
    """
    order = np.argsort(groups, kind="stable")
    sorted_groups, sorted_weights = groups[order], weights[order]
    totals = np.bincount(sorted_groups, weights=sorted_weights, minlength=num_groups)
    cumulative = np.cumsum(sorted_weights)
    group_start = np.concatenate(([0.0], np.cumsum(totals)[:-1]))
    keys = sorted_groups + (cumulative - group_start[sorted_groups]) / totals[sorted_groups]
    last_member = np.cumsum(np.bincount(sorted_groups, minlength=num_groups)) - 1

    def draw(group: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        position = np.searchsorted(keys, group + rng.random(group.shape), side="right")
        return order[np.minimum(position, last_member[group])]  # rounding may overshoot a group's end

    return draw


def _history_match(latent: np.ndarray, targets: np.ndarray, offsets: np.ndarray, items: np.ndarray) -> np.ndarray:
    """sum_l ReLU(cos(target, history_l) - MATCH_THRESHOLD) per row, in chunks of rows to bound memory."""
    rows = len(targets)
    gated = np.empty(len(items))
    lengths = np.diff(offsets)
    chunk = 200_000
    for start in range(0, rows, chunk):
        stop = min(start + chunk, rows)
        lo, hi = offsets[start], offsets[stop]
        row_targets = np.repeat(targets[start:stop], lengths[start:stop])
        cos = np.einsum("nd,nd->n", latent[items[lo:hi]], latent[row_targets])
        gated[lo:hi] = np.maximum(cos - MATCH_THRESHOLD, 0.0)
    # Every history has at least MIN_HISTORY items, so no reduceat segment is empty.
    return np.add.reduceat(gated, offsets[:-1]) if rows else np.zeros(0)


def _solve_bias(logit: np.ndarray, rate: float) -> float:
    """The b with mean(sigmoid(logit + b)) = rate, by bisection (the mean is monotone in b)."""
    lo, hi = -30.0, 30.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.mean(1.0 / (1.0 + np.exp(-(logit + mid)))) < rate:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


def generate(rows: int, items: int, *, seed: int = 0, tags: int | None = None,
             embedding_dim: int = EMBEDDING_DIM) -> SyntheticData:
    """Draw `rows` rows over `items` items (ids 1..items) and their click labels."""
    topics = min(TOPICS, items)  # every topic must own at least one item
    tags = tags if tags is not None else max(2 * topics, items // 8)
    if rows < 1 or items < 1 or tags < topics:
        raise ValueError(f"need rows >= 1, items >= 1 and tags >= {topics}, got {rows}, {items}, {tags}")
    rng = np.random.default_rng(seed)

    # Items (row 0 is padding everywhere).
    centres = rng.standard_normal((topics, LATENT_DIM))
    centres /= np.linalg.norm(centres, axis=1, keepdims=True)
    topic = np.concatenate(([0], rng.permutation(np.arange(items) % topics)))
    latent = centres[topic] + TOPIC_SPREAD * rng.standard_normal((items + 1, LATENT_DIM)) / np.sqrt(LATENT_DIM)
    latent /= np.linalg.norm(latent, axis=1, keepdims=True)
    latent[0] = 0.0
    projection = rng.standard_normal((LATENT_DIM, embedding_dim))
    item_emb = latent @ projection + EMBEDDING_NOISE * rng.standard_normal((items + 1, embedding_dim))
    item_emb = (EMBEDDING_NORM * item_emb / np.sqrt(embedding_dim * (1 + EMBEDDING_NOISE**2))).astype(np.float32)
    item_emb[0] = 0.0

    # Tags 1..tags are dealt out to topics round-robin; an item has 1..5, mostly its topic's.
    tag_topic = np.arange(1, tags + 1) % topics
    draw_topic_tag = _popularity_sampler(np.ones(tags), tag_topic, topics)
    own = draw_topic_tag(np.repeat(topic[:, None], TAGS_PER_ITEM, axis=1), rng) + 1
    random_tag = rng.integers(1, tags + 1, size=own.shape)
    item_tags = np.where(rng.random(own.shape) < OWN_TOPIC_TAG_RATE, own, random_tag)
    tag_count = rng.integers(1, TAGS_PER_ITEM + 1, size=items + 1)
    item_tags[np.arange(TAGS_PER_ITEM)[None, :] < (TAGS_PER_ITEM - tag_count)[:, None]] = 0  # left-pad
    item_tags[0] = 0
    item_tags = item_tags.astype(np.int64)

    # Popularity (Zipf-like, in a random item order) and each item's own quality and levels.
    popularity = 1.0 / (1.0 + rng.permutation(items + 1)) ** 0.8
    popularity[0] = 0.0
    draw_from_topic = _popularity_sampler(popularity, topic, topics)
    draw_any = _popularity_sampler(popularity, np.zeros(items + 1, dtype=np.int64), 1)
    quality = QUALITY_STD * rng.standard_normal(items + 1)
    popularity_rank = np.argsort(np.argsort(-popularity)) / (items + 1)
    item_views = np.clip(np.round(10 * (1 - popularity_rank) + rng.normal(0, 1.5, items + 1)), 0, 10)
    item_likes = np.clip(np.round(rng.uniform(0, 10, items + 1)), 0, 10)

    # Users and rows.
    users = max(1, rows // 4)
    primary = rng.integers(0, topics, size=users)
    secondary = rng.integers(0, topics, size=users)
    user_id = rng.integers(0, users, size=rows)
    lengths = np.exp(rng.normal(np.log(MEDIAN_HISTORY), HISTORY_SIGMA, size=rows))
    lengths = np.clip(np.round(lengths), MIN_HISTORY, MAX_HISTORY).astype(np.int64)
    offsets = np.concatenate(([0], np.cumsum(lengths)))

    def draw_for(row_users: np.ndarray, interest_rate: float) -> np.ndarray:
        interest_topic = np.where(rng.random(row_users.shape) < PRIMARY_TOPIC_RATE,
                                  primary[row_users], secondary[row_users])
        return np.where(rng.random(row_users.shape) < interest_rate,
                        draw_from_topic(interest_topic, rng), draw_any(np.zeros_like(row_users), rng))

    history_items = draw_for(np.repeat(user_id, lengths), INTEREST_RATE)
    item_id = draw_for(user_id, TARGET_INTEREST_RATE)
    likes_level = np.clip(item_likes[item_id] + rng.integers(-1, 2, size=rows), 0, NUM_LEVELS - 1).astype(np.int64)
    views_level = np.clip(item_views[item_id] + rng.integers(-1, 2, size=rows), 0, NUM_LEVELS - 1).astype(np.int64)

    # Clicks.
    match = 1.0 - np.exp(-2.0 * _history_match(latent, item_id, offsets, history_items))
    centred_likes, centred_views = (likes_level - 5) / 5.0, (views_level - 5) / 5.0
    other = CROSS_WEIGHT * centred_likes * centred_views + quality[item_id]
    logit = MATCH_WEIGHT * match + other
    bias = _solve_bias(logit, POSITIVE_RATE)
    probability = 1.0 / (1.0 + np.exp(-(logit + bias)))
    label = (rng.random(rows) < probability).astype(np.float32)

    return SyntheticData(
        item_tags=item_tags, item_emb=item_emb, item_latent=latent.astype(np.float32),
        item_topic=np.where(np.arange(items + 1) > 0, topic, 0).astype(np.int64), item_quality=quality,
        user_id=user_id.astype(np.int64), history_offsets=offsets, history_items=history_items.astype(np.int64),
        item_id=item_id.astype(np.int64), likes_level=likes_level, views_level=views_level,
        match=match, logit_without_history=other + bias, click_probability=probability, label=label,
    )


def _left_padded(offsets: np.ndarray, values: np.ndarray, width: int) -> np.ndarray:
    """(rows, width) array of each row's list, right-aligned after zeros (lists are at most width long)."""
    lengths = np.diff(offsets)
    out = np.zeros((len(lengths), width), dtype=values.dtype)
    # Flat destination of value j of row r: r * width + (width - length_r) + (j - offset_r).
    destination = np.arange(offsets[-1] - offsets[0]) + np.repeat(
        np.arange(len(lengths)) * width + width - lengths - (offsets[:-1] - offsets[0]), lengths)
    out.reshape(-1)[destination] = values[offsets[0]:offsets[-1]]
    return out


def _list_array(matrix: np.ndarray, value_type: pa.DataType) -> pa.ListArray:
    rows, width = matrix.shape
    offsets = pa.array(np.arange(0, rows * width + 1, width, dtype=np.int64).astype(np.int32))
    return pa.ListArray.from_arrays(offsets, pa.array(matrix.reshape(-1), type=value_type))


SPLIT_SCHEMA = pa.schema([
    ("user_id", pa.int64()), ("item_seq", pa.list_(pa.int64())), ("item_id", pa.int64()),
    ("likes_level", pa.int64()), ("views_level", pa.int64()), ("label", pa.float32()),
])
ITEM_INFO_SCHEMA = pa.schema([
    ("item_id", pa.int64()), ("item_tags", pa.list_(pa.int64())), ("item_emb_d128", pa.list_(pa.float32())),
])


def _write_split(path: Path, data: SyntheticData, start: int, stop: int, with_label: bool) -> None:
    schema = SPLIT_SCHEMA if with_label else SPLIT_SCHEMA.remove(SPLIT_SCHEMA.get_field_index("label"))
    with pq.ParquetWriter(path, schema) as writer:
        for lo in range(start, stop, WRITE_CHUNK_ROWS):
            hi = min(lo + WRITE_CHUNK_ROWS, stop)
            history = _left_padded(data.history_offsets[lo:hi + 1], data.history_items, HISTORY_WIDTH)
            columns = {
                "user_id": pa.array(data.user_id[lo:hi]),
                "item_seq": _list_array(history, pa.int64()),
                "item_id": pa.array(data.item_id[lo:hi]),
                "likes_level": pa.array(data.likes_level[lo:hi]),
                "views_level": pa.array(data.views_level[lo:hi]),
            }
            if with_label:
                columns["label"] = pa.array(data.label[lo:hi])
            writer.write_table(pa.table(columns, schema=schema))


def make_dataset(root, *, rows: int = 200_000, items: int = 5_000, seed: int = 0,
                 valid_rows: int | None = None, test_rows: int | None = None, tags: int | None = None,
                 schema: str = "microlens") -> Path:
    """Write train/valid/test/item_info.parquet into `root`; valid and test default to ~10% of rows each.

    schema "microlens" is SPEC.md's layout; "other" the one of OTHER_DATA_SECTION."""
    valid_rows = valid_rows if valid_rows is not None else max(1000, rows // 10)
    test_rows = test_rows if test_rows is not None else max(1000, rows // 10)
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    if schema == "other":
        data = generate(rows + valid_rows + test_rows, items, seed=seed, tags=tags, embedding_dim=OTHER_EMBEDDING_DIM)
        splits = {"train": (0, rows), "valid": (rows, rows + valid_rows),
                  "test": (rows + valid_rows, rows + valid_rows + test_rows)}
        _write_other_schema(root, data, splits, seed)
        return root
    if schema != "microlens":
        raise ValueError(f"schema must be 'microlens' or 'other', got {schema!r}")
    data = generate(rows + valid_rows + test_rows, items, seed=seed, tags=tags)

    num_items = items + 1
    item_info = pa.table({
        "item_id": pa.array(np.arange(num_items, dtype=np.int64)),
        "item_tags": _list_array(data.item_tags, pa.int64()),
        "item_emb_d128": _list_array(data.item_emb, pa.float32()),
    }, schema=ITEM_INFO_SCHEMA)
    pq.write_table(item_info, root / "item_info.parquet")
    _write_split(root / "train.parquet", data, 0, rows, with_label=True)
    _write_split(root / "valid.parquet", data, rows, rows + valid_rows, with_label=True)
    _write_split(root / "test.parquet", data, rows + valid_rows, rows + valid_rows + test_rows, with_label=False)
    return root


# The second schema of `qin make-data --schema other`, as a data section of our YAML: three context
# features (two levels and a numeric hour), two categorical item attributes beside the id, a 64-wide
# frozen embedding and no tags; the history and label columns have other names. The same planted
# signal: the history match (seen through ids, topic and embedding), the cross of the two levels
# and the item's quality (seen through its id and its quality bucket).
OTHER_EMBEDDING_DIM = 64
QUALITY_BUCKETS = 8
OTHER_FEATURES = [
    {"name": "session_id", "type": "meta"},
    {"name": "activity_level", "type": "categorical", "vocab_size": 11},
    {"name": "popularity_level", "type": "categorical", "vocab_size": 11},
    {"name": "hour", "type": "numeric"},
    {"name": "item_id", "type": "categorical", "source": "item"},
    {"name": "item_topic", "type": "categorical", "source": "item"},
    {"name": "item_quality_bucket", "type": "categorical", "source": "item", "vocab_size": QUALITY_BUCKETS + 1},
    {"name": "item_emb_d64", "type": "embedding", "source": "item", "embedding_dim": OTHER_EMBEDDING_DIM},
]
OTHER_DATA_SECTION = {"features": OTHER_FEATURES, "label": "clicked", "history": "clicked_items"}


def _write_other_schema(root: Path, data: SyntheticData, splits: dict[str, tuple[int, int]], seed: int) -> None:
    num_items = len(data.item_topic)
    quantiles = np.quantile(data.item_quality[1:], np.linspace(0, 1, QUALITY_BUCKETS + 1)[1:-1])
    bucket = np.where(np.arange(num_items) > 0, 1 + np.searchsorted(quantiles, data.item_quality), 0)
    pq.write_table(pa.table({
        "item_id": pa.array(np.arange(num_items, dtype=np.int64)),
        "item_topic": pa.array(np.where(np.arange(num_items) > 0, data.item_topic + 1, 0)),  # 0 = padding
        "item_quality_bucket": pa.array(bucket.astype(np.int64)),
        "item_emb_d64": _list_array(data.item_emb, pa.float32()),
    }), root / "item_info.parquet")
    hour = np.random.default_rng([seed, 1]).integers(0, 24, size=len(data.item_id))  # no signal
    for name, (lo, hi) in splits.items():
        history = _left_padded(data.history_offsets[lo:hi + 1], data.history_items, HISTORY_WIDTH)
        columns = {"session_id": pa.array(data.user_id[lo:hi]), "clicked_items": _list_array(history, pa.int64()),
                   "item_id": pa.array(data.item_id[lo:hi]), "activity_level": pa.array(data.likes_level[lo:hi]),
                   "popularity_level": pa.array(data.views_level[lo:hi]),
                   "hour": pa.array(hour[lo:hi].astype(np.float32) / 23)}
        if name != "test":
            columns["clicked"] = pa.array(data.label[lo:hi])
        pq.write_table(pa.table(columns), root / f"{name}.parquet")


# Written into the built-in dataset's folder: the generator that made it (generator_fingerprint).
FINGERPRINT_FILE = ".generator"


def generator_fingerprint() -> str:
    """What the generated data depends on besides its sizes and seed: this module's code and
    constants, and numpy's version (a release may change a distribution's random stream)."""
    constants = sorted((k, v) for k, v in globals().items() if k.isupper() and isinstance(v, (int, float, str)))
    digest = hashlib.sha256(Path(__file__).read_bytes())
    digest.update(repr(constants).encode())
    digest.update(np.__version__.encode())
    return digest.hexdigest()[:16]


def _fingerprint_of(path: Path) -> str | None:
    try:
        return (path / FINGERPRINT_FILE).read_text().strip()
    except OSError:
        return None


@contextmanager
def staging_folder(parent: Path, prefix: str):
    """A fresh hidden folder in `parent` (so on the same filesystem as what is moved out of it),
    removed when the block ends however it ends. SIGTERM (kill, a scheduler's time limit) then
    raises KeyboardInterrupt, as Ctrl-C does, where it would otherwise end the process with the
    folder left behind; a handler someone else installed (or an ignored SIGTERM) is kept."""
    handle = (threading.current_thread() is threading.main_thread()
              and signal.getsignal(signal.SIGTERM) == signal.SIG_DFL)
    if handle:
        def interrupt(signum, frame):
            raise StoppedBySignal("received SIGTERM", signum)

        signal.signal(signal.SIGTERM, interrupt)
    staging = Path(tempfile.mkdtemp(prefix=prefix, dir=parent))
    try:
        yield staging
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        if handle:
            signal.signal(signal.SIGTERM, signal.SIG_DFL)


def builtin_dataset(cache_dir=None) -> Path:
    """The built-in dataset, generated once into the cache and reused while the generator that
    made it is this one (else made again); written atomically."""
    from kernels.compile_cache import cache_root
    from qin.config import ConfigError

    try:
        cache = Path(cache_dir) if cache_dir is not None else cache_root()
    except OSError as exc:
        raise ConfigError(f"the built-in dataset: {exc}") from None
    path = cache / f"{BUILTIN_VERSION}-rows{BUILTIN_ROWS}-items{BUILTIN_ITEMS}-seed{BUILTIN_SEED}"
    fingerprint = generator_fingerprint()
    if _fingerprint_of(path) == fingerprint:
        return path
    blocker = next((p for p in (cache, *cache.parents) if p.exists()), None)
    if blocker is not None and not blocker.is_dir():
        raise ConfigError(f"the data cache {cache} cannot be made: {blocker} is a file (QIN_CACHE names the "
                          f"cache folder)")
    if path.is_dir():
        logger.info("%s was made by another version of qin.synth or numpy: generating it again", path)
    try:
        cache.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a read-only home, a container without one
        raise ConfigError(f"the data cache {cache} cannot be made ({exc.strerror or exc}); set QIN_CACHE to a "
                          f"folder this user can write") from None
    # Generated beside the final folder and renamed: a reader never sees a half-written dataset.
    with staging_folder(cache, f".{path.name}.") as staging:
        make_dataset(staging, rows=BUILTIN_ROWS, items=BUILTIN_ITEMS, seed=BUILTIN_SEED)
        (staging / FINGERPRINT_FILE).write_text(fingerprint + "\n")
        try:
            os.rename(staging, path)
        except OSError:
            if not path.is_dir():
                raise
            if _fingerprint_of(path) != fingerprint:  # an older generator's: moved aside, then removed
                with staging_folder(cache, f".{path.name}.stale.") as stale:
                    os.rename(path, stale / "old")
                    os.rename(staging, path)
            # else another process made the same dataset meanwhile
    return path
