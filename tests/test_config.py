import re

import pytest

from qin.config import ConfigError, QINConfig, load_config


def test_defaults_are_the_papers_settings():
    cfg = load_config()
    assert (cfg.train.lr, cfg.train.batch_size, cfg.train.grad_clip, cfg.train.seed) == (2e-3, 8192, 10.0, 20242025)
    assert (cfg.train.lr_decay, cfg.train.min_lr, cfg.train.patience, cfg.train.embedding_l2) == (0.5, 1e-6, 8, 2e-4)
    assert (cfg.model.qnn_layers, cfg.model.qnn_rows, cfg.model.attention_width, cfg.data.max_len) == (4, 4, 768, 64)
    assert cfg.model.item_dim == 384 and cfg.model.qnn_dim == 1024


def test_yaml_file_then_overrides(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("train:\n  lr: 1\n  batch_size: 256\nmodel:\n  asta_form: literal\n")
    cfg = load_config(path, ["train.batch_size=128", "model.dropout=0"])
    assert cfg.train.lr == 1.0 and isinstance(cfg.train.lr, float)
    assert cfg.train.batch_size == 128
    assert cfg.model.asta_form == "literal" and cfg.model.dropout == 0.0


@pytest.mark.parametrize(
    "override, message",
    [
        ("train.learning_rate=1", "unknown key 'train.learning_rate'"),
        ("optim.lr=1", "unknown section 'optim'"),
        ("lr=1", "section.key=value"),
        ("train.batch_size=1.5", "train.batch_size must be of type int"),
        ("train.lr=fast", "train.lr must be of type float"),
        ("model.asta_form=sparse", "asta_form"),
        ("model.qnn_kernel=cuda", "qnn_kernel"),
        ("model.dropout=1.0", "dropout"),
        ("model.embed_dim=0", "embed_dim"),
        # Values the loop would meet late (a zero eval batch after an epoch of training) or never.
        ("train.batch_size=0", "train.batch_size must be a positive integer"),
        ("train.eval_batch_size=0", "train.eval_batch_size must be a positive integer"),
        ("train.epochs=0", "train.epochs must be a positive integer"),
        ("train.patience=0", "train.patience must be a positive integer"),
        ("train.max_steps_per_epoch=-1", "train.max_steps_per_epoch must be a positive integer"),
        ("train.max_steps_per_epoch=2.5", "train.max_steps_per_epoch must be of type int or null"),
        ("train.checkpoint_every_steps=-5", "train.checkpoint_every_steps must be 0"),
        ("train.lr=-1", "train.lr must be a positive number"),
        ("train.lr=.nan", "train.lr must be a positive number"),
        ("train.lr=true", "train.lr must be of type float"),
        ("train.grad_clip=0", "train.grad_clip must be a positive number"),
        ("train.min_lr=-1e-6", "train.min_lr must be a number >= 0"),
        ("train.embedding_l2=-1", "train.embedding_l2 must be a number >= 0"),
        ("train.lr_decay=0", "train.lr_decay must be in (0, 1]"),
        ("train.lr_decay=1.5", "train.lr_decay must be in (0, 1]"),
        ("train.device=gpu", "train.device must be auto, cpu, cuda or cuda:N"),
        ("data.label=on", "data.label must be of type str"),
        ("train.out_dir=null", "train.out_dir must be of type str"),
        ("train.lr=[", "override 'train.lr=[': its value is not valid YAML"),
        # Values that failed late, in a traceback from numpy or torch.
        ("train.min_lr=1e-2", "train.min_lr=0.01 is above train.lr=0.002"),
        ("train.seed=-1", "train.seed must be an integer in 0..4294967295"),
        ("train.seed=9007199254740993", "train.seed must be an integer in 0..4294967295, got 9007199254740993"),
        ("train.batch_size=.inf", "train.batch_size must be of type int"),
        ("model.embedding_init_std=-1", "model.embedding_init_std must be a number >= 0"),
        ("model.embedding_init_std=.nan", "model.embedding_init_std must be a number >= 0"),
        ("data.dir=2024", "data.dir must be of type str or null (quote a name YAML reads as a number)"),
    ],
)
def test_bad_settings_are_refused_by_name(override, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        load_config(overrides=[override])


def test_unknown_key_in_yaml_names_the_file(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("model:\n  heads: 2\n")
    with pytest.raises(ConfigError, match=r"bad\.yaml.*model\.heads"):
        load_config(path)


def test_a_key_given_twice_in_a_yaml_file_is_refused(tmp_path):
    path = tmp_path / "twice.yaml"
    path.write_text("train:\n  lr: 1.0e-3\n  lr: 5.0e-3\n")  # PyYAML alone keeps the last, silently
    with pytest.raises(ConfigError, match=r"twice\.yaml: not valid YAML at line 3.*key 'lr' appears twice"):
        load_config(path)


def test_yaml_1_1_numbers_that_mean_another_value_are_refused(tmp_path):
    # YAML 1.1 (PyYAML) reads 010 as octal 8 and 1:20 as 80 (base 60), silently.
    for override, shown in (("train.epochs=010", "010 reads as 8"), ("train.seed=1:20", "1:20 reads as 80"),
                            ("train.epochs=-0_10", "-0_10 reads as -8")):
        with pytest.raises(ConfigError, match=re.escape(f"override {override!r}: {shown} in YAML 1.1")):
            load_config(overrides=[override])
    path = tmp_path / "octal.yaml"
    path.write_text("train:\n  epochs: 3\ndata:\n  max_len: 010\n")
    with pytest.raises(ConfigError, match=r"octal\.yaml at line 4, column 12: 010 reads as 8 .*quote it"):
        load_config(path)
    # What YAML 1.1 and a reader agree on still loads: 0, 00, 10, 1_000, a quoted "010".
    cfg = load_config(overrides=["train.seed=00", "train.epochs=1_0", "data.dir='010'"])
    assert (cfg.train.seed, cfg.train.epochs, cfg.data.dir) == (0, 10, "010")


def test_a_section_with_every_key_commented_out_is_empty(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("train:\n  # lr: 1.0e-3\nmodel:\n  dropout: 0.2\n")
    cfg = load_config(path)
    assert cfg.train == load_config().train and cfg.model.dropout == 0.2


def test_a_config_file_that_cannot_be_read_is_named(tmp_path):
    with pytest.raises(ConfigError, match=r"nowhere\.yaml: cannot be read"):
        load_config(tmp_path / "nowhere.yaml")
    path = tmp_path / "broken.yaml"
    path.write_text("train:\n  lr: [1\n")
    with pytest.raises(ConfigError, match=r"broken\.yaml: not valid YAML at line 3"):
        load_config(path)


def test_attention_width_follows_the_item_width_unless_set():
    # The authors size d_a as twice the item representation (attention_dim=item_info_dim * 2).
    assert QINConfig(embed_dim=32, mm_dim=32).attention_width == 2 * 96
    assert QINConfig(embed_dim=32, mm_dim=32, attention_dim=40).attention_width == 40
    assert load_config(overrides=["model.attention_dim=64"]).model.attention_width == 64
    with pytest.raises(ConfigError, match="model.attention_dim must be of type int or null"):
        load_config(overrides=["model.attention_dim=wide"])


def test_qin_config_validates():
    with pytest.raises(ConfigError):
        QINConfig(asta_form="x").validate()


@pytest.mark.parametrize("field, value, match", [
    ("embed_dim", 8.5, "model.embed_dim must be a positive integer, got 8.5"),
    ("qnn_layers", 2.0, "model.qnn_layers must be a positive integer, got 2.0"),
    ("mm_dim", "6", "model.mm_dim must be a positive integer, got '6'"),
    ("qnn_rows", True, "model.qnn_rows must be a positive integer, got True"),
    ("dropout", "0.1", "model.dropout must be a number, got '0.1'"),
    ("use_asta", 1, "model.use_asta must be true or false, got 1"),
    ("num_items", 1, r"no id beside padding 0: item_id \(1\)"),
    ("num_levels", 1, r"no id beside padding 0: likes_level \(1\), views_level \(1\)"),
])
def test_qin_config_from_python_names_a_bad_field(field, value, match):
    """A QINConfig built in Python (no YAML parser to type its fields) is refused naming the field,
    not by torch.empty's 'argument size must be tuple of ints' once the model is being built."""
    with pytest.raises(ConfigError, match=match):
        QINConfig(**{field: value}).validate()


def test_qin_config_takes_numpy_integers():
    import numpy as np

    QINConfig(num_items=np.int64(50), embed_dim=np.int32(8)).validate()
