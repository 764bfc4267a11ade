"""The columns of a dataset and what the model makes of each, in FuxiCTR's `feature_cols` vocabulary.

    categorical  an integer id -> a row of its own table (embedding_dim wide, default the model's)
    sequence     a list of ids, left-padded with 0 -> the mean of their rows, padding left out
    embedding    a fixed-width float vector (frozen data) -> P @ vector, P trainable (embed_dim wide)
    numeric      a number x -> x * w, w trainable (embed_dim wide)
    meta         a column the model never reads (user_id, the history column in FuxiCTR's blocks)

A feature with `source: item` is an attribute of the item, read from item_info.parquet (row i =
item i); the first one is the item id itself. Together they make the item representation, used
for the target and for every history item. The other features describe the row (context).

Padding: as in FuxiCTR's feature map, every categorical and sequence feature has padding_idx 0 by
default, so id 0 maps to an all-zero row that never trains (an unknown or absent value).
`padding_idx: null` on a categorical feature makes row 0 an ordinary, trained row.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from qin.errors import ConfigError

FEATURE_TYPES = ("categorical", "sequence", "embedding", "numeric", "meta")
FEATURE_KEYS = {"name", "type", "source", "vocab_size", "embedding_dim", "max_len", "padding_idx"}
BOOKKEEPING_KEYS = {"active", "dtype"}  # FuxiCTR's; the parquet type says what dtype says
# Batch keys the loader gives the target ids, the history and the label, whatever their columns.
RESERVED_NAMES = ("item_id", "item_seq", "label")

# The MicroLens_1M_x1 layout of SPEC.md: the model of the paper when no features are declared.
MICROLENS_FEATURES = [
    {"name": "user_id", "type": "meta"},
    {"name": "likes_level", "type": "categorical", "vocab_size": 11},
    {"name": "views_level", "type": "categorical", "vocab_size": 11},
    {"name": "item_id", "type": "categorical", "source": "item"},
    {"name": "item_tags", "type": "sequence", "source": "item", "max_len": 5},
    {"name": "item_emb_d128", "type": "embedding", "source": "item", "embedding_dim": 128},
]


@dataclass
class Feature:
    name: str
    type: str
    source: str = ""  # "item": an item attribute, from item_info.parquet
    vocab_size: int | None = None  # None: max id in the data + 1
    embedding_dim: int | None = None  # table width; for an embedding feature, the vector's width
    max_len: int | None = None  # sequence features: the most ids a row may hold (a longer list is refused)
    padding_idx: int | None = 0

    @property
    def is_item(self) -> bool:
        return self.source == "item"

    @property
    def has_ids(self) -> bool:
        return self.type in ("categorical", "sequence")

    def width(self, embed_dim: int, project_to_dim: bool = True) -> int:
        """Width of this feature's part of the model input (a frozen embedding's: embed_dim where
        its P projects to the model's width, else its own)."""
        if self.type == "embedding":
            return embed_dim if project_to_dim else self.embedding_dim
        return self.embedding_dim or embed_dim


def parse_feature(entry, where: str) -> Feature:
    if not isinstance(entry, dict) or not isinstance(entry.get("name"), str) or not entry["name"]:
        raise ConfigError(f"{where}: each feature needs a name, got {entry!r}")
    name = entry["name"]
    unknown = set(entry) - FEATURE_KEYS - BOOKKEEPING_KEYS
    if unknown:
        raise ConfigError(f"{where}: feature '{name}': unsupported key(s) {', '.join(sorted(unknown))}; "
                          f"known: {', '.join(sorted(FEATURE_KEYS))}")
    if not name.isidentifier():
        raise ConfigError(f"{where}: feature name {name!r} must be a Python identifier (letters, digits, _)")
    if entry.get("type") not in FEATURE_TYPES:
        raise ConfigError(f"{where}: feature '{name}': type must be one of {', '.join(FEATURE_TYPES)}, "
                          f"got {entry.get('type')!r}")
    for key in sorted(BOOKKEEPING_KEYS & set(entry)):  # not read, but kept in the run's config
        if not isinstance(entry[key], (str, int, float, type(None))):
            raise ConfigError(f"{where}: feature '{name}': {key} must be a single value, got a "
                              f"{type(entry[key]).__name__}")
    values = {key: entry[key] for key in FEATURE_KEYS if key in entry}
    values["source"] = values.get("source") or ""
    if values["source"] not in ("", "item"):  # a typo would make an item attribute a context column
        raise ConfigError(f"{where}: feature '{name}': source must be 'item' (an attribute from item_info.parquet) "
                          f"or absent, got {values['source']!r}")
    feature = Feature(**values)
    for key in ("vocab_size", "embedding_dim", "max_len"):
        value = getattr(feature, key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
            raise ConfigError(f"{where}: feature '{name}': {key} must be a positive integer, got {value!r}")
    if feature.padding_idx not in (0, None):
        raise ConfigError(f"{where}: feature '{name}': padding_idx must be 0 or null, got {feature.padding_idx!r}")
    if feature.type == "sequence" and (feature.max_len is None or feature.padding_idx != 0):
        raise ConfigError(f"{where}: sequence feature '{name}' needs max_len and pads with id 0 (padding_idx 0)")
    if feature.type == "embedding" and feature.embedding_dim is None:
        raise ConfigError(f"{where}: embedding feature '{name}' needs embedding_dim (the width of its vectors)")
    if feature.vocab_size is not None and feature.padding_idx == 0 and feature.vocab_size < 2 and feature.has_ids:
        raise ConfigError(f"{where}: feature '{name}': vocab_size {feature.vocab_size} leaves no id beside padding 0")
    return feature


def _one_name_each(entries: list) -> list:
    """FuxiCTR's shorthand {name: [a, b], ...} for features a and b of the same spec, expanded."""
    out = []
    for entry in entries:
        names = entry.get("name") if isinstance(entry, dict) else None
        if isinstance(names, list) and names and all(isinstance(n, str) for n in names):
            out += [{**entry, "name": name} for name in names]
        else:
            out.append(entry)
    return out


def parse_features(entries, where: str = "data.features") -> list[Feature]:
    """Features from a FuxiCTR-style list; inactive ones dropped; the item key checked."""
    if not isinstance(entries, list) or not entries:
        raise ConfigError(f"{where} must be a non-empty list of features, got {entries!r}")
    features = [parse_feature(entry, where) for entry in _one_name_each(entries)
                if not (isinstance(entry, dict) and entry.get("active", True) is False)]
    names = [f.name for f in features]
    duplicate = next((n for n in names if names.count(n) > 1), None)
    if duplicate:
        raise ConfigError(f"{where}: feature '{duplicate}' is declared twice")
    items = [f for f in features if f.is_item]
    if not items or items[0].type != "categorical":
        raise ConfigError(f"{where}: the first feature with source: item must be the categorical item id")
    if items[0].padding_idx != 0:
        raise ConfigError(f"{where}: the item id '{items[0].name}' pads the history with 0 (padding_idx 0)")
    if any(f.type == "meta" for f in items):
        raise ConfigError(f"{where}: item attributes cannot be meta")
    for f in features:
        if not f.is_item and f.type != "meta" and f.name in RESERVED_NAMES:
            raise ConfigError(f"{where}: a context feature cannot be named '{f.name}' "
                              f"(reserved for the target, the history and the label)")
    return features


def item_key(features: list[Feature]) -> Feature:
    return next(f for f in features if f.is_item)


def item_features(features: list[Feature]) -> list[Feature]:
    return [f for f in features if f.is_item]


def context_features(features: list[Feature]) -> list[Feature]:
    return [f for f in features if not f.is_item and f.type != "meta"]


def to_dicts(features: list[Feature]) -> list[dict]:
    """The list as config entries (for config.yaml and checkpoints), defaults left out."""
    default = Feature("", "")
    return [{key: value for key, value in asdict(f).items()
             if key in ("name", "type") or value != getattr(default, key)} for f in features]


def model_features(cfg) -> list[Feature]:
    """The features a QINConfig builds: its own list, or the MicroLens layout sized by its fields."""
    if cfg.features is not None:
        return parse_features(cfg.features, "model.features")
    features = parse_features(MICROLENS_FEATURES)
    sizes = {"likes_level": cfg.num_levels, "views_level": cfg.num_levels, "item_id": cfg.num_items,
             "item_tags": cfg.num_tags}
    for f in features:
        f.vocab_size = sizes.get(f.name, f.vocab_size)
        if f.name == "item_tags":
            f.max_len = cfg.tags_per_item
        if f.name == "item_emb_d128":
            f.embedding_dim = cfg.mm_dim
    return features
