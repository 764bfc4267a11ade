"""`qin export`: the trained model as a torch.export program whose probabilities equal `qin predict`'s."""
import numpy as np
import pytest
import torch

from qin.cli import main
from qin.data import iterate_batches, load_dataset
from qin.synth import make_dataset

SMALL_RUN = ["model.embed_dim=8", "model.attention_dim=16", "train.batch_size=256",
             "train.eval_batch_size=1024", "train.epochs=1", "train.device=cpu", "data.max_len=16"]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    root = tmp_path_factory.mktemp("export")
    data = make_dataset(root / "ds", rows=1500, items=120, seed=9, valid_rows=300, test_rows=257)
    assert main(["train", "--data", str(data), "--out", str(root / "run"), *SMALL_RUN]) == 0
    return root, data


def test_exported_program_gives_the_predictions_of_qin_predict(run):
    root, data = run
    assert main(["export", str(root / "run"), "--output", str(root / "model.pt2")]) == 0
    assert main(["predict", str(root / "run"), "--output", str(root / "prediction.csv")]) == 0
    want = np.loadtxt(root / "prediction.csv", delimiter=",", skiprows=1)[:, 1]

    import kernels  # noqa: F401  - registers the qin:: ops a program may hold

    module = torch.export.load(str(root / "model.pt2")).module()
    test = load_dataset(data, max_len=16).splits["test"]
    got, start = [], 0
    for size in (1, 100, 156):  # any batch size, including 1
        batch = next(iterate_batches(test.rows(start, start + size), size, shuffle=False))
        batch.pop("label", None)
        with torch.no_grad():
            got.append(torch.sigmoid(module(batch)).numpy())
        start += size
    got = np.concatenate(got)
    assert got.shape == want.shape == (257,)
    assert np.abs(got - want).max() <= 5e-7  # predict writes 6 decimals


def test_export_refuses_to_overwrite(run, capsys):
    root, _ = run
    out = root / "taken.pt2"
    out.write_bytes(b"keep")
    assert main(["export", str(root / "run"), "--output", str(out)]) == 2
    assert "--force" in capsys.readouterr().err and out.read_bytes() == b"keep"


def test_a_program_traced_on_one_row_still_takes_any_batch(run):
    # torch.export specialises a dimension of size 1, so a 1-row valid split must not fix the
    # traced batch size to 1.
    from qin import export
    from qin.cli import _model_from_checkpoint

    root, data = run
    model, dataset, *_ = _model_from_checkpoint(str(root / "run"), str(data), "cpu")
    program = export.export_model(model, export.example_batch(dataset.splits["valid"].rows(0, 1)))
    batch = next(iterate_batches(dataset.splits["valid"].rows(0, 5), 5, shuffle=False))
    batch.pop("label")
    with torch.no_grad():
        torch.testing.assert_close(program.module()(batch), model(batch), rtol=1e-6, atol=1e-6)


def test_export_traces_on_whatever_split_the_data_folder_holds(run, tmp_path):
    # The folder that `qin predict --data` scores may hold only item_info and test.parquet.
    # Its item table is baked into the program: here a refreshed one (other tags and frozen
    # embeddings, the same items), which the program must hold rather than the run's own.
    root, data = run
    fresh = tmp_path / "fresh"
    fresh.mkdir()
    (fresh / "test.parquet").write_bytes((data / "test.parquet").read_bytes())
    refreshed = make_dataset(tmp_path / "refreshed", rows=200, items=120, seed=10, valid_rows=50, test_rows=20)
    (fresh / "item_info.parquet").write_bytes((refreshed / "item_info.parquet").read_bytes())
    assert main(["export", str(root / "run"), "--data", str(fresh), "--output", str(tmp_path / "fresh.pt2")]) == 0
    assert main(["export", str(root / "run"), "--output", str(tmp_path / "own.pt2")]) == 0

    import kernels  # noqa: F401  - registers the qin:: ops a program may hold

    batch = next(iterate_batches(load_dataset(data, max_len=16).splits["test"].rows(0, 50), 50, shuffle=False))
    batch.pop("label", None)
    with torch.no_grad():
        own, refreshed = (torch.export.load(str(tmp_path / f"{name}.pt2")).module()(batch) for name in ("own", "fresh"))
    assert (own - refreshed).abs().max() > 1e-3


def test_an_export_named_as_a_checkpoint_is_told_apart(run, tmp_path, capsys):
    root, _ = run
    assert main(["export", str(root / "run"), "--output", str(tmp_path / "m.pt2")]) == 0
    assert main(["evaluate", str(tmp_path / "m.pt2")]) == 2
    assert "a torch.export program (qin export's output), not a checkpoint" in capsys.readouterr().err
