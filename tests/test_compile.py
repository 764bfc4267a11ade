"""torch.compile of QIN's training step: one graph (fullgraph=True fails on any graph break), with
item de-duplication on, equal to eager; with the fused ops too (the interpreter runs them on the CPU)."""
import pytest
import torch

from qin.config import QINConfig
from qin.model import QIN, compile_model
from qin.train import loss_fn


def tiny_model(**overrides) -> QIN:
    cfg = QINConfig(num_items=60, num_tags=20, embed_dim=8, attention_dim=16, qnn_layers=2, **overrides)
    torch.manual_seed(0)
    model = QIN(cfg)
    g = torch.Generator().manual_seed(1)
    model.load_item_info(torch.randint(0, 20, (60, 5), generator=g), torch.randn(60, 128, generator=g))
    return model.train()


def tiny_batch(rows: int = 24, max_len: int = 7) -> dict:
    g = torch.Generator().manual_seed(2)
    seq = torch.randint(1, 60, (rows, max_len), generator=g)
    seq[torch.arange(max_len)[None, :] < torch.randint(0, max_len + 1, (rows, 1), generator=g)] = 0  # left padding
    return {"item_id": torch.randint(1, 60, (rows,), generator=g), "item_seq": seq,
            "likes_level": torch.randint(0, 11, (rows,), generator=g),
            "views_level": torch.randint(0, 11, (rows,), generator=g),
            "label": (torch.rand(rows, generator=g) < 0.3).float()}


def step(forward, model, batch):
    loss = loss_fn(forward, batch, 2e-4)
    return loss.detach(), torch.autograd.grad(loss, list(model.parameters()))


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_training_step_compiles_to_one_graph_and_equals_eager(backend):
    torch._dynamo.reset()
    model = tiny_model(dropout=0.0, asta_kernel=backend, qnn_kernel=backend)
    batch = tiny_batch()
    eager_loss, eager_grads = step(model, model, batch)
    compiled_loss, compiled_grads = step(compile_model(model, fullgraph=True), model, batch)
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for (name, _), got, want in zip(model.named_parameters(), compiled_grads, eager_grads):
        # fp32 tolerance relative to each gradient's own scale (the compiler reorders sums).
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5 * want.abs().max().item() + 1e-12, msg=name)


def test_fused_dropout_compiles_to_one_graph():
    """QNN dropout through the Triton op: the seed is a tensor drawn inside the graph, no .item()."""
    torch._dynamo.reset()
    model = tiny_model(dropout=0.1, asta_kernel="triton", qnn_kernel="triton")
    compiled = compile_model(model, fullgraph=True)
    losses = [step(compiled, model, tiny_batch())[0] for _ in range(2)]
    assert all(torch.isfinite(loss) for loss in losses)
    assert losses[0] != losses[1]  # a fresh seed each step, not one baked into the graph


def test_qin_train_with_compile_logs_the_compile_time_once(tmp_path, capsys):
    from qin.cli import main
    from qin.synth import make_dataset

    torch._dynamo.reset()
    data = make_dataset(tmp_path / "ds", rows=600, items=60, seed=3, valid_rows=200, test_rows=50)
    args = ["train", "--data", str(data), "--out", str(tmp_path / "run"), "model.embed_dim=8", "model.attention_dim=16",
            "train.batch_size=128", "train.epochs=1", "train.device=cpu", "train.compile=true"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("torch.compile: the first step took") == 1, out
    assert out.count("the compiled step ran slower than eager") == 1, out  # a CPU user is told
    assert (tmp_path / "run" / "best.pt").exists()


def test_bf16_step_with_the_attention_op_in_fp32_compiles_to_one_graph():
    """Under autocast bf16 the default model runs ASTA's op with autocast switched off
    (model.asta_precision=fp32): the compiler keeps that region in one graph, and the loss
    matches eager's to bf16 precision (the compiler rounds intermediate results differently)."""
    torch._dynamo.reset()
    model = tiny_model(dropout=0.0)
    batch = tiny_batch()
    eager = loss_fn(model, batch, 2e-4, precision="bf16")
    compiled = loss_fn(compile_model(model, fullgraph=True), batch, 2e-4, precision="bf16")
    torch.testing.assert_close(compiled, eager, rtol=2.0**-6, atol=0.0)


def test_compile_caches_are_keyed_by_the_kernels_source():
    """A graph cached by another version of kernels/ (another backward, other op arguments) is
    not replayed: the kernels' source hash joins torch.compile's cache key, beside the user's tag."""
    from kernels.choice import source_hash
    from qin.model import tag_compile_caches

    if not hasattr(getattr(torch.compiler, "config", None), "cache_key_tag"):  # an older torch
        tag_compile_caches()  # has no such key: nothing to add, and no error
        return
    with torch.compiler.config.patch(cache_key_tag="users-own"):  # restored on leaving
        compile_model(torch.nn.Linear(2, 2))
        tag_compile_caches()  # again: the tag is not repeated
        assert torch.compiler.config.cache_key_tag == f"users-own|qin-kernels-{source_hash()}"



def test_compile_caches_go_to_a_private_folder_not_a_shared_temp_name(tmp_path):
    """torch's default cache folder, /tmp/torchinductor_<user>, is a name another user can take
    first. torch fixes the folder while the kernels are imported, so the check runs in a fresh
    process: QIN's cache folder, owner-only (also where it existed with other rights), unless the
    user named one."""
    import os
    import stat
    import subprocess
    import sys

    show = ("import os, kernels, qin.train, torch; from torch._inductor.runtime.cache_dir_utils import cache_dir; "
            "print(cache_dir())")
    env = {k: v for k, v in os.environ.items() if k != "TORCHINDUCTOR_CACHE_DIR"}
    folder = tmp_path / "cache" / "inductor"
    folder.mkdir(parents=True, mode=0o777)
    folder.chmod(0o777)
    out = subprocess.run([sys.executable, "-c", show], env={**env, "QIN_CACHE": str(tmp_path / "cache")},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == str(folder)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    users_own = str(tmp_path / "users-own")
    out = subprocess.run([sys.executable, "-c", show], env={**env, "TORCHINDUCTOR_CACHE_DIR": users_own},
                         capture_output=True, text=True, check=True).stdout.strip()
    assert out == users_own
