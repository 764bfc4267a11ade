"""Datasets other than MicroLens: features declared in the config, FuxiCTR's dataset blocks, validation
of any schema, QIN and DIN trained end to end on a second schema, and level-0 padding (issue 17)."""
import csv
import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
import yaml

from qin import QIN, QINConfig
from qin.cli import main
from qin.config import ConfigError, load_config, read_fuxictr_dataset
from qin.data import DataError, load_dataset
from qin.din import DIN
from qin.features import parse_features, to_dicts
from qin.model import count_parameters
from qin.synth import OTHER_DATA_SECTION, OTHER_FEATURES, make_dataset
from qin.train import Trainer, fill_vocab_from_data

# The authors' block, as it stands in salmon1802/QIN config/qin_config/dataset_config.yaml.
AUTHORS_BLOCK = """
MicroLens_1M_x1:
    data_root: ./data/
    data_format: parquet
    train_data: ./data/MicroLens_1M_x1/train.parquet
    valid_data: ./data/MicroLens_1M_x1/valid.parquet
    test_data: ./data/MicroLens_1M_x1/test.parquet
    item_info: ./data/MicroLens_1M_x1/item_info.parquet
    rebuild_dataset: False
    feature_cols:
        - {name: user_id, active: True, dtype: int, type: meta}
        - {name: item_seq, active: True, dtype: int, type: meta}
        - {name: likes_level, active: True, dtype: int, type: categorical, vocab_size: 11}
        - {name: views_level, active: True, dtype: int, type: categorical, vocab_size: 11}
        - {name: item_id, active: True, dtype: int, type: categorical, vocab_size: 91718, source: item}
        - {name: item_tags, active: True, dtype: int, type: sequence, max_len: 5, vocab_size: 11740, source: item}
        - {name: item_emb_d128, active: True, dtype: float, type: embedding, source: item, embedding_dim: 128}
    label_col: {name: label, dtype: float}
"""
TINY = ["model.embed_dim=8", "model.attention_dim=16", "train.batch_size=256", "train.eval_batch_size=2048",
        "train.device=cpu"]


@pytest.fixture(scope="module")
def other_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("other") / "ds", rows=6000, items=300, seed=2,
                        valid_rows=1500, test_rows=200, schema="other")


def load_other(root):
    return load_dataset(root, **OTHER_DATA_SECTION)


def test_the_authors_microlens_block_gives_todays_model(tmp_path):
    path = tmp_path / "dataset_config.yaml"
    path.write_text(AUTHORS_BLOCK)
    data = read_fuxictr_dataset(path, "MicroLens_1M_x1")
    assert data["dir"] == "data/MicroLens_1M_x1" and data["label"] == "label"
    cfg = load_config(dataset=data)
    cfg.model.features = to_dicts(parse_features(cfg.data.features))
    declared, default = QIN(cfg.model), QIN(QINConfig())
    assert count_parameters(declared) == 31_244_293
    assert [(k, v.shape) for k, v in declared.state_dict().items()] == \
        [(k, v.shape) for k, v in default.state_dict().items()]
    # The same weights give the same function: the layout matches, not only the sizes.
    declared.load_state_dict(default.state_dict())
    g = torch.Generator().manual_seed(0)
    tags, mm = torch.randint(0, 11_740, (91_718, 5), generator=g), torch.randn(91_718, 128, generator=g)
    declared.load_item_info(tags, mm)
    default.load_item_info(tags, mm)
    batch = {"item_id": torch.randint(1, 91_718, (4,), generator=g),
             "item_seq": torch.randint(0, 91_718, (4, 7), generator=g),
             "likes_level": torch.randint(0, 11, (4,), generator=g),
             "views_level": torch.randint(0, 11, (4,), generator=g)}
    torch.testing.assert_close(declared.eval()(batch), default.eval()(batch), rtol=0, atol=0)


def test_fuxictr_blocks_that_this_loader_cannot_read_are_refused(tmp_path):
    path = tmp_path / "dataset_config.yaml"
    path.write_text(AUTHORS_BLOCK.replace("MicroLens_1M_x1/item_info.parquet", "MicroLens_1M_x1/item_info_v2.parquet"))
    with pytest.raises(ConfigError, match="item_info"):
        read_fuxictr_dataset(path, "MicroLens_1M_x1")
    with pytest.raises(ConfigError, match="no dataset block 'Other'"):
        read_fuxictr_dataset(path, "Other")
    with pytest.raises(ConfigError, match="unsupported key.*share_embedding"):
        parse_features([{"name": "a", "type": "categorical", "share_embedding": "b"}])
    with pytest.raises(ConfigError, match="categorical item id"):
        parse_features([{"name": "a", "type": "categorical"}])


def test_fuxictr_blocks_with_values_of_the_wrong_kind_are_refused_in_one_line(tmp_path):
    path = tmp_path / "dataset_config.yaml"
    path.write_text("2024: {feature_cols: [], label_col: {name: clicked}}\n"
                    "numbers: {feature_cols: [], train_data: 5}\n")
    assert read_fuxictr_dataset(path, "2024") == {"features": [], "label": "clicked"}  # a number as a block name
    with pytest.raises(ConfigError, match="block 'numbers': train_data must be a file path, got 5"):
        read_fuxictr_dataset(path, "numbers")
    # FuxiCTR's bookkeeping keys are kept in the run's config: a YAML alias there could expand without bound.
    with pytest.raises(ConfigError, match="feature 'a': dtype must be a single value, got a list"):
        parse_features([{"name": "a", "type": "categorical", "source": "item", "dtype": [[1] * 10] * 10}])
    parse_features([{"name": "a", "type": "categorical", "source": "item", "dtype": "int", "active": True}])


def test_the_model_sizes_follow_the_features(other_dir):
    dataset = load_other(other_dir)
    vocab = {f.name: f.vocab_size for f in dataset.features}
    assert vocab["item_id"] == 301 and vocab["item_topic"] == 25 and vocab["item_quality_bucket"] == 9
    cfg = QINConfig(embed_dim=8, attention_dim=16, features=to_dicts(dataset.features))
    # Items: id, topic, quality bucket (8 each) and the projected 64-wide embedding (8); context: 2 levels + hour.
    assert cfg.item_dim == 32 and cfg.qnn_dim == 3 * 8 + 2 * 32
    model = QIN(cfg)
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes["items.item_emb_d64_projection.weight"] == (8, 64)
    assert shapes["items.item_topic_embedding.weight"] == (25, 8)
    assert shapes["hour_embedding.weight"] == (8, 1)
    assert shapes["asta.W_q.weight"] == (16, 32) and shapes["output.weight"] == (1, 88)
    din = DIN(QINConfig(architecture="din", features=to_dicts(dataset.features)))
    shapes_of = lambda m: {k: tuple(v.shape) for k, v in m.state_dict().items()}  # noqa: E731
    # DIN: 64-wide tables, the frozen embedding through a P of its own width: item 3 * 64 + 64, context 3 * 64.
    assert shapes_of(din)["items.item_emb_d64_projection.weight"] == (64, 64)
    assert din.attention[0][0].in_features == 4 * 256 and din.dnn[0].in_features == 192 + 2 * 256


def test_qin_and_din_learn_the_other_schema_end_to_end(other_dir, tmp_path):
    dataset = load_other(other_dir)
    aucs = {}
    for architecture in ("qin", "din"):
        cfg = load_config(overrides=[*TINY, "train.epochs=2", "train.lr=1e-2", f"model.architecture={architecture}",
                                     "model.din_embed_dim=8", "model.din_attention_units=[16]",
                                     "model.din_dnn_units=[32]"])
        cfg.data.dir = str(other_dir)
        cfg.data.features, cfg.data.label, cfg.data.history = OTHER_FEATURES, "clicked", "clicked_items"
        fill_vocab_from_data(cfg, dataset)
        state = Trainer(cfg, dataset, tmp_path / architecture, log=lambda *_: None).fit()
        aucs[architecture] = state.best_auc
    # The planted signal (history match, level cross, item quality) is learnable through these features.
    # Chance on 1,500 valid rows is 0.5 +- 0.02. QIN's two epochs here land anywhere in 0.578-0.663
    # with the seed (8 seeds before and 8 after the CPU dropout draw changed on 2026-11-30: means
    # 0.634 and 0.620), DIN at 0.781: the bars sit below every measured seed, above chance.
    assert aucs["qin"] > 0.55 and aucs["din"] > 0.7, aucs


def test_cli_trains_and_evaluates_from_a_fuxictr_block(other_dir, tmp_path, capsys):
    block = {"Other_x1": {"train_data": str(other_dir / "train.parquet"), "valid_data": str(other_dir / "valid.parquet"),
                          "item_info": str(other_dir / "item_info.parquet"),
                          "feature_cols": OTHER_FEATURES, "label_col": {"name": "clicked", "dtype": "float"}}}
    path = tmp_path / "dataset_config.yaml"
    path.write_text(yaml.safe_dump(block))
    out = tmp_path / "run"
    assert main(["train", "--data-config", str(path), "--dataset-id", "Other_x1", "--out", str(out),
                 *TINY, "train.epochs=1", "train.max_steps_per_epoch=3", "data.history=clicked_items"]) == 0
    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert [f["name"] for f in saved["model"]["features"]] == [f["name"] for f in OTHER_FEATURES]
    assert saved["train"]["out_dir"] == str(out)  # the folder the run is in, not the default
    assert main(["evaluate", str(out)]) == 0
    assert "valid: AUC" in capsys.readouterr().out
    assert json.loads((out / "metrics.jsonl").read_text().splitlines()[0])["epoch"] == 1


def test_compare_reads_a_fuxictr_block(other_dir, tmp_path, capsys):
    block = {"Other_x1": {"train_data": str(other_dir / "train.parquet"), "feature_cols": OTHER_FEATURES,
                          "label_col": {"name": "clicked", "dtype": "float"}}}
    path = tmp_path / "dataset_config.yaml"
    path.write_text(yaml.safe_dump(block))
    out = tmp_path / "compare"
    assert main(["compare", "--data-config", str(path), "--dataset-id", "Other_x1", "--variants", "qin,din",
                 "--epochs", "1", "--out", str(out), *TINY, "train.max_steps_per_epoch=3",
                 "data.history=clicked_items"]) == 0
    table = (out / "compare.md").read_text()
    assert str(other_dir) in table and "built-in" not in table
    assert {"qin", "din"} <= {row["variant"] for row in csv.DictReader(open(out / "compare.csv"))}
    assert main(["compare", "--data-config", str(path), "--out", str(tmp_path / "x")]) == 2
    assert "--dataset-id" in capsys.readouterr().err


def test_a_fuxictr_block_without_its_files_needs_data(other_dir, tmp_path, capsys):
    # No train_data: without --data the built-in generated dataset was read in its place, silently.
    block = {"Other_x1": {"data_root": "somewhere", "feature_cols": OTHER_FEATURES,
                          "label_col": {"name": "clicked", "dtype": "float"}}}
    path = tmp_path / "dataset_config.yaml"
    path.write_text(yaml.safe_dump(block))
    for command in ("train", "compare"):
        assert main([command, "--data-config", str(path), "--dataset-id", "Other_x1", "--out",
                     str(tmp_path / command), *TINY]) == 2
        assert "block 'Other_x1' has no train_data, so no folder to read; pass --data DIR" in capsys.readouterr().err
    assert not (tmp_path / "train").exists() and not (tmp_path / "compare").exists()


def test_a_feature_source_other_than_item_is_refused():
    with pytest.raises(ConfigError, match="feature 'item_tags': source must be 'item'"):
        parse_features([{"name": "item_tags", "type": "sequence", "source": "Item", "max_len": 5}])


def _other_tables(root):
    return {name: pq.read_table(root / f"{name}.parquet") for name in ("train", "valid", "item_info")}


def _set_cell(table, column, row, value):
    values = table.column(column).to_pylist()
    values[row] = value
    index = table.schema.get_field_index(column)
    return table.set_column(index, table.schema.field(column), pa.array(values, table.schema.field(column).type))


BAD_OTHER = {
    # name: (file, edit, column, row, words)
    "missing context feature": ("valid", lambda t: t.drop(["hour"]), "hour", None, "missing"),
    "numeric as string": ("train", lambda t: t.set_column(t.schema.get_field_index("hour"), "hour",
                                                            t.column("hour").cast(pa.string())), "hour", None, "string"),
    "level outside the vocabulary": ("train", lambda t: _set_cell(t, "popularity_level", 21, 11),
                                     "popularity_level", 21, "outside the vocabulary 0..10"),
    "negative item attribute": ("item_info", lambda t: _set_cell(t, "item_topic", 5, -1), "item_topic", 5, "negative"),
    "bucket outside the vocabulary": ("item_info", lambda t: _set_cell(t, "item_quality_bucket", 7, 9),
                                      "item_quality_bucket", 7, "outside the vocabulary 0..8"),
    "ragged embedding": ("item_info", lambda t: _set_cell(t, "item_emb_d64", 4, [0.5] * 63), "item_emb_d64", 4,
                         "63 values, expected 64"),
    "NaN numeric": ("valid", lambda t: _set_cell(t, "hour", 3, float("nan")), "hour", 3, "non-finite"),
    "missing renamed label": ("train", lambda t: t.drop(["clicked"]), "clicked", None, "missing"),
    "history beyond the items": ("train", lambda t: _set_cell(t, "clicked_items", 9, [0, 301]), "clicked_items", 9,
                                 "beyond item_info"),
}


@pytest.mark.parametrize("case", list(BAD_OTHER))
def test_any_schema_is_validated_naming_file_column_and_row(other_dir, tmp_path, case):
    file, edit, column, row, words = BAD_OTHER[case]
    tables = _other_tables(other_dir)
    tables[file] = edit(tables[file])
    for name, table in tables.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
    with pytest.raises(DataError) as caught:
        load_other(tmp_path)
    message = str(caught.value)
    assert message.startswith(f"{file}.parquet, column '{column}'"), message
    assert words in message, message
    if row is not None:
        assert f"row {row}:" in message, message


def test_an_undeclared_column_is_ignored_and_named_once(other_dir, tmp_path, caplog):
    tables = _other_tables(other_dir)
    tables["train"] = tables["train"].append_column("device", pa.array(np.zeros(tables["train"].num_rows, np.int64)))
    for name, table in tables.items():
        pq.write_table(table, tmp_path / f"{name}.parquet")
    with caplog.at_level("INFO", logger="qin.data"):
        dataset = load_other(tmp_path)
    assert dataset.extra_columns == {"train.parquet": ["device"]}
    assert sum("device" in r.getMessage() for r in caplog.records) == 1
    assert "session_id" not in str(dataset.extra_columns)  # a declared meta column is not extra


def _level_batch(g, levels):
    return {"item_id": torch.randint(1, 40, (16,), generator=g), "item_seq": torch.randint(0, 40, (16, 5), generator=g),
            "likes_level": levels, "views_level": levels.flip(0), "label": torch.randint(0, 2, (16,), generator=g).float()}


@pytest.mark.parametrize("padding_idx", [0, None])
def test_level_zero_is_a_padding_row_by_default(padding_idx):
    """Issue 17: FuxiCTR gives every categorical feature padding_idx 0; `padding_idx: null` trains row 0."""
    features = to_dicts(_microlens_small())
    for feature in features:
        if feature["name"] in ("likes_level", "views_level") and padding_idx is None:
            feature["padding_idx"] = None
    torch.manual_seed(0)
    model = QIN(QINConfig(embed_dim=8, attention_dim=16, features=features))
    model.load_item_info(torch.randint(0, 15, (40, 5)), torch.randn(40, 6))
    tables = (model.likes_embedding.weight, model.views_embedding.weight)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(1)
    levels = torch.arange(16) % 11  # level 0 in every batch
    for _ in range(3):
        optimizer.zero_grad()
        batch = _level_batch(g, levels)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(model(batch), batch["label"]) + model.embedding_l2()
        loss.backward()
        optimizer.step()
        for table in tables:
            if padding_idx == 0:
                assert torch.all(table.grad[0] == 0) and torch.all(table[0] == 0)
            else:
                assert table.grad[0].abs().sum() > 0
    if padding_idx is None:
        assert all(table[0].abs().sum() > 0 for table in tables)
    assert count_parameters(model) == count_parameters(QIN(QINConfig(num_items=40, num_tags=15, embed_dim=8,
                                                                     mm_dim=6, attention_dim=16)))


def _microlens_small():
    from qin.features import model_features

    return model_features(QINConfig(num_items=40, num_tags=15, mm_dim=6))


def test_every_feature_type_on_either_side_builds_and_trains():
    features = [
        {"name": "item_id", "type": "categorical", "source": "item", "vocab_size": 30},
        {"name": "item_words", "type": "sequence", "source": "item", "max_len": 3, "vocab_size": 12},
        {"name": "item_price", "type": "numeric", "source": "item"},
        {"name": "user_topics", "type": "sequence", "max_len": 4, "vocab_size": 7, "embedding_dim": 5},
        {"name": "user_vector", "type": "embedding", "embedding_dim": 3},
        {"name": "age", "type": "numeric"},
    ]
    cfg = QINConfig(embed_dim=4, attention_dim=8, features=features)
    assert cfg.item_dim == 3 * 4 and cfg.context_dim == 5 + 4 + 4
    g = torch.Generator().manual_seed(0)
    words = torch.randint(0, 12, (30, 3), generator=g)
    words[0] = 0
    batch = {"item_id": torch.randint(1, 30, (6,), generator=g), "item_seq": torch.randint(0, 30, (6, 5), generator=g),
             "user_topics": torch.tensor([[0, 0, 0, 0]] + [[0, 1, 2, 3]] * 5), "user_vector": torch.randn(6, 3, generator=g),
             "age": torch.rand(6, generator=g)}
    for architecture in ("qin", "din"):
        model = (QIN if architecture == "qin" else DIN)(QINConfig(**{**cfg.__dict__, "architecture": architecture}))
        prices = torch.rand(30, generator=g)
        model.load_item_info({"item_words": words, "item_price": prices})
        logits = model(batch)
        logits.sum().backward()
        assert logits.shape == (6,) and torch.isfinite(logits).all()
        tables = dict(model.named_parameters())
        # Only the ids present reach their rows; padding 0 and the unused ids 4..6 get no gradient.
        grad = tables["user_topics_embedding.weight"].grad
        assert torch.all(grad[0] == 0) and torch.all(grad[4:] == 0)
        assert grad[1:4].abs().sum() > 0
        assert tables["items.item_price_embedding.weight"].grad.abs().sum() > 0
        # Every feature reaches the logits: changing any one input, context or item side, changes them.
        model.eval()
        with torch.no_grad():
            before = model(batch)
            for name in ("user_topics", "user_vector", "age"):
                changed = {**batch, name: batch[name].flip(0)}  # rows swap values (row 0 has no topics)
                assert not torch.allclose(model(changed), before), f"{architecture}: {name} changes nothing"
            for name, column in (("item_words", torch.cat([words[:1], words[1:].roll(1, 0)])), ("item_price", torch.rand(30, generator=g))):
                model.load_item_info({"item_words": words, "item_price": prices, name: column})
                assert not torch.allclose(model(batch), before), f"{architecture}: {name} changes nothing"


def test_an_inactive_feature_is_left_out_and_its_column_reported_extra(tmp_path, caplog):
    """FuxiCTR's `active: False` turns a feature off: not in the model, its column an extra one."""
    path = tmp_path / "dataset_config.yaml"
    path.write_text(AUTHORS_BLOCK.replace("{name: views_level, active: True", "{name: views_level, active: False"))
    data = read_fuxictr_dataset(path, "MicroLens_1M_x1")
    assert [f.name for f in parse_features(data["features"])] == \
        ["user_id", "item_seq", "likes_level", "item_id", "item_tags", "item_emb_d128"]
    root = make_dataset(tmp_path / "ds", rows=200, items=30, seed=1, valid_rows=50, test_rows=10)
    with caplog.at_level("INFO", logger="qin.data"):
        dataset = load_dataset(root, features=data["features"])
    assert "views_level" not in [f.name for f in dataset.features]
    assert "train.parquet: ignoring extra columns views_level" in caplog.text
    cfg = QINConfig(features=to_dicts(dataset.features))
    assert cfg.context_dim == cfg.embed_dim == QINConfig().context_dim / 2  # likes_level alone


def _write(tables, root):
    for name, table in tables.items():
        pq.write_table(table, root / f"{name}.parquet")


def _column(table, name, values, type=None):
    array = pa.array(values, type=type)
    if name in table.column_names:
        return table.set_column(table.schema.get_field_index(name), name, array)
    return table.append_column(name, array)


def test_a_feature_cannot_read_the_label_or_history_column(other_dir):
    for name, role in (("clicked", "data.label"), ("clicked_items", "data.history")):
        features = OTHER_FEATURES + [{"name": name, "type": "numeric"}]
        with pytest.raises(ConfigError, match=f"feature '{name}' is the column {role} names"):
            load_dataset(other_dir, **{**OTHER_DATA_SECTION, "features": features})


def test_ids_the_columns_cannot_hold_are_refused_never_wrapped(other_dir, tmp_path):
    """Undeclared vocabularies: a sequence id past int32 (sequences are held as int32), and a
    uint64 id past int64, are named as they are in the file."""
    tables = _other_tables(other_dir)
    n = tables["item_info"].num_rows
    tables["item_info"] = _column(tables["item_info"], "item_tags", [[0]] + [[2**32 + 8]] * (n - 1))
    _write(tables, tmp_path)
    features = OTHER_FEATURES + [{"name": "item_tags", "type": "sequence", "source": "item", "max_len": 2}]
    with pytest.raises(DataError, match=r"item_info.parquet, column 'item_tags', row 1: id 4294967304 is above "
                                        r"2147483647"):
        load_dataset(tmp_path, **{**OTHER_DATA_SECTION, "features": features})
    tables = _other_tables(other_dir)
    values = np.ones(tables["train"].num_rows, dtype=np.uint64)
    values[7] = 2**64 - 1
    tables["train"] = _column(tables["train"], "activity_level", values)
    _write(tables, tmp_path)
    with pytest.raises(DataError, match=r"train.parquet, column 'activity_level', row 7: id 18446744073709551615 is "
                                        r"too large"):
        load_other(tmp_path)


def test_an_inferred_vocabulary_of_padding_only_or_of_hashed_ids_is_refused_naming_the_column(other_dir, tmp_path):
    tables = _other_tables(other_dir)
    tables["item_info"] = _column(tables["item_info"], "item_topic", np.zeros(tables["item_info"].num_rows, np.int64))
    _write(tables, tmp_path)
    with pytest.raises(DataError, match="item_info.parquet, column 'item_topic': every value is 0, the padding id"):
        load_other(tmp_path)
    tables = _other_tables(other_dir)
    for split in ("train", "valid"):  # hashed levels: 11 distinct ids up to 1e8
        tables[split] = _column(tables[split], "activity_level",
                                tables[split].column("activity_level").to_numpy() * 10_000_019)
    _write(tables, tmp_path)
    features = [{k: v for k, v in f.items() if not (f["name"] == "activity_level" and k == "vocab_size")}
                for f in OTHER_FEATURES]
    with pytest.raises(DataError, match=r"train.parquet/valid.parquet(/test.parquet)?, column 'activity_level': ids "
                                        r"reach 100,000,190 but only 11 distinct ids appear"):
        load_dataset(tmp_path, **{**OTHER_DATA_SECTION, "features": features})


@pytest.mark.parametrize("top_id,above,ratio,refused", [(109, 50, 10, False), (110, 50, 10, True),
                                                       (110, 111, 10, False)])
def test_sparse_ids_are_refused_exactly_past_both_limits(other_dir, tmp_path, monkeypatch, top_id, above, ratio,
                                                         refused):
    """Ids 0..9 and `top_id`: 11 distinct, an inferred vocabulary of top_id + 1 rows. Refused when
    that is past SPARSE_IDS_ABOVE and past SPARSE_IDS_RATIO times the distinct ids, not at either."""
    import qin.data

    monkeypatch.setattr(qin.data, "SPARSE_IDS_ABOVE", above)
    monkeypatch.setattr(qin.data, "SPARSE_IDS_RATIO", ratio)
    tables = _other_tables(other_dir)
    for split in ("train", "valid"):
        levels = tables[split].column("activity_level").to_numpy().copy()
        levels[levels == levels.max()] = top_id
        tables[split] = _column(tables[split], "activity_level", levels)
    _write(tables, tmp_path)
    features = [{k: v for k, v in f.items() if not (f["name"] == "activity_level" and k == "vocab_size")}
                for f in OTHER_FEATURES]
    if refused:
        with pytest.raises(DataError, match=f"ids reach {top_id} but only 11 distinct ids appear"):
            load_dataset(tmp_path, **{**OTHER_DATA_SECTION, "features": features})
    else:
        dataset = load_dataset(tmp_path, **{**OTHER_DATA_SECTION, "features": features})
        assert {f.name: f.vocab_size for f in dataset.features}["activity_level"] == top_id + 1


def test_placeholder_test_labels_leave_the_test_split_unlabelled_with_a_warning(other_dir, tmp_path, caplog):
    tables = {**_other_tables(other_dir), "test": pq.read_table(other_dir / "test.parquet")}
    tables["test"] = _column(tables["test"], "clicked", np.full(tables["test"].num_rows, -1, np.int64))
    _write(tables, tmp_path)
    with caplog.at_level("WARNING", logger="qin.data"):
        dataset = load_other(tmp_path)
    assert dataset.splits["test"].label is None
    assert "test.parquet, column 'clicked', row 0: label -1 is not 0 or 1" in caplog.text
    tables["train"] = _column(tables["train"], "clicked", np.full(tables["train"].num_rows, -1, np.int64))
    _write(tables, tmp_path)
    with pytest.raises(DataError, match="train.parquet, column 'clicked', row 0: label -1 is not 0 or 1"):
        load_other(tmp_path)  # a training label is still checked


def test_histories_cut_to_max_len_are_counted_in_the_log(other_dir, caplog):
    with caplog.at_level("INFO", logger="qin.data"):
        load_dataset(other_dir, max_len=2, **OTHER_DATA_SECTION)
    assert "histories hold more than data.max_len=2 items; the model reads the last 2 of each" in caplog.text


def test_a_history_column_of_empty_lists_only_loads(other_dir, tmp_path):
    """pa.table infers list<null> when every list is empty (users without history yet)."""
    tables = _other_tables(other_dir)
    rows = tables["valid"].num_rows
    tables["valid"] = _column(tables["valid"], "clicked_items", [[] for _ in range(rows)])
    assert tables["valid"].schema.field("clicked_items").type == pa.list_(pa.null())
    _write(tables, tmp_path)
    valid = load_other(tmp_path).splits["valid"]
    assert valid.item_seq.shape[0] == rows and not valid.item_seq.any()
    tables["valid"] = tables["valid"].slice(0, 0)  # and a file with no rows says so, whatever its types
    _write(tables, tmp_path)
    with pytest.raises(DataError, match="valid.parquet: the file has no rows"):
        load_other(tmp_path)


def test_fuxictr_list_names_declare_one_feature_each():
    entries = [{"name": ["session_id", "device_id"], "type": "meta"},
               {"name": ["activity_level", "popularity_level"], "type": "categorical", "vocab_size": 11},
               {"name": "item_id", "type": "categorical", "source": "item"}]
    features = parse_features(entries)
    assert [(f.name, f.type, f.vocab_size) for f in features] == [
        ("session_id", "meta", None), ("device_id", "meta", None), ("activity_level", "categorical", 11),
        ("popularity_level", "categorical", 11), ("item_id", "categorical", None)]
