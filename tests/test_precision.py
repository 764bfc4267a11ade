"""Mixed precision (train.precision): QIN under CPU autocast against the fp32 model, and training
runs in bf16 and fp16 that learn, skip overflowing fp16 steps and resume exactly."""
import json
import statistics

import pytest
import torch

import kernels
import qin.train
from qin.checkpoint import load_checkpoint
from qin.cli import main
from qin.config import ConfigError, QINConfig, load_config
from qin.data import load_dataset
from qin.model import QIN
from qin.parity import ActivationBranch
from qin.synth import make_dataset
from qin.train import fill_vocab_from_data, loss_fn
from test_train import assert_same_weights, final_weights, make_trainer, small_config

# Unit roundoffs (8 and 11 significant bits): one rounding errs by at most this.
UNIT_ROUNDOFF = {"bf16": 2.0 ** -8, "fp16": 2.0 ** -11}


def small_qin(**overrides) -> QIN:
    """Dropout off, so that fp32 and bf16 compute the same function; embeddings big enough
    (std 0.1, not 1e-4) that every part of the item representation counts."""
    torch.manual_seed(0)
    cfg = QINConfig(**{**dict(num_items=60, num_tags=12, embed_dim=8, attention_dim=16, mm_dim=16, dropout=0.0,
                              embedding_init_std=0.1), **overrides})
    model = QIN(cfg)
    g = torch.Generator().manual_seed(1)
    tags = torch.randint(0, 12, (60, 5), generator=g)
    mm = torch.randn(60, 16, generator=g)
    tags[0], mm[0] = 0, 0
    model.load_item_info(tags, mm)
    return model.train()  # BatchNorm on batch statistics, as in a training step


def random_batch(batch=16, length=8, seed=0) -> dict:
    g = torch.Generator().manual_seed(seed)
    lengths = torch.randint(0, length + 1, (batch,), generator=g)
    seq = torch.randint(1, 60, (batch, length), generator=g)
    seq = torch.where(torch.arange(length) >= length - lengths[:, None], seq, 0)  # left-padded
    return {"item_id": torch.randint(1, 60, (batch,), generator=g), "item_seq": seq,
            "likes_level": torch.randint(0, 11, (batch,), generator=g),
            "views_level": torch.randint(0, 11, (batch,), generator=g),
            "label": torch.randint(0, 2, (batch,), generator=g).float()}


def logits_and_grads(model, batch, precision, gates=None):
    """(logits, gradients, the forward's qin.parity.ActivationBranch: the PReLU gates it took, or
    with `gates` those, and the running error bound of each PReLU slope's gradient)."""
    model.zero_grad(set_to_none=True)
    with ActivationBranch(model, gates) as branch:
        with qin.train.autocast(torch.device("cpu"), precision):
            logits = model(batch)
        loss_fn(model, batch, 2e-4, precision=precision).backward()
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    return logits.detach().float(), grads, branch


def relative_error(a, b) -> float:
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


def tensor_error(got, want, bound=None) -> float:
    """relative_error, or relative to `bound` (a running error bound) where one is given."""
    return relative_error(got, want) if bound is None else ((got.double() - want.double()).norm() / bound).item()


def flat(grads) -> torch.Tensor:
    return torch.cat([g.reshape(-1) for g in grads.values()])


PLAIN = dict(asta_form="literal", asta_kernel="torch", qnn_kernel="torch")


def errors_under_autocast(precision, backend, asta_precision, seed) -> dict[str, float]:
    """Our hoisted model under autocast against the fp32 model, on one batch, each error divided
    by the error of plain PyTorch under the same autocast (the literal model, where every product
    rounds its inputs to 16 bits and nothing else changes): the error that the format itself
    costs. Checks on the way that the plain error is the format's size and what reached the op."""
    batch = random_batch(seed=seed)
    reference_logits, _, _ = logits_and_grads(small_qin(**PLAIN), batch, "fp32")
    plain_logits, plain_grads, plain_branch = logits_and_grads(small_qin(**PLAIN), batch, precision)
    # Each 16-bit model's gradients against fp32's on the branch it took at the PReLUs: a 16-bit
    # model rounds some BatchNorm outputs across zero, and one such element can move a weight's
    # gradient by more than its size (qin.parity.ActivationBranch). Unpinned, the check failed at
    # some batches: the torch backend with the op in bf16 at batch seeds 2 and 3, and an op
    # computed in float64 and rounded once at seed 0 (0.31 against 0.17).
    _, plain_reference_grads, plain_reference_branch = logits_and_grads(small_qin(**PLAIN), batch, "fp32",
                                                                         plain_branch.gates)
    seen = []

    def recorder(original):
        def record(history, *args, **kwargs):  # what reaches the fused op (plain or gathered form)
            query, mask = args[-2:]
            seen.append((history.dtype, query.dtype, mask.dtype, torch.is_autocast_enabled("cpu")))
            return original(history, *args, **kwargs)
        return record

    model = small_qin(asta_form="hoisted", asta_kernel=backend, qnn_kernel=backend, asta_precision=asta_precision)
    with pytest.MonkeyPatch.context() as patch:
        for name in ("sparse_target_attention", "gathered_sparse_target_attention"):
            patch.setattr(kernels, name, recorder(getattr(kernels, name)))
        logits, grads, branch = logits_and_grads(model, batch, precision)
    _, reference_grads, reference_branch = logits_and_grads(small_qin(**PLAIN), batch, "fp32", branch.gates)
    # The op got one dtype (the history cast once, before it): fp32 with autocast off, or 16 bits.
    low = qin.train.AUTOCAST_DTYPES[precision]
    want = (torch.float32,) * 3 + (False,) if asta_precision == "fp32" else (low,) * 3 + (True,)
    assert seen and all(got == want for got in seen), seen

    plain_error = relative_error(plain_logits, reference_logits)
    # 16 bits ran (not zero), and to first order the error is at most one u per 16-bit rounding on
    # the longest path: 3 per product (both inputs, the output) for P, W_q, W_k, the pooling, W_v,
    # W_o, four QNN layers and the output layer (12 products), plus the history's cast: 37.
    assert 0 < plain_error < 37 * UNIT_ROUNDOFF[precision], (seed, plain_error)
    ratios = {"logits": relative_error(logits, reference_logits) / plain_error}
    # Gradients: over all parameters at once, and each tensor against the worst tensor of the
    # plain model (tensor by tensor a factor would be noise); a PReLU slope's gradient is a sum
    # that cancels, so its error is relative to its running error bound, sum |x dy|.
    assert grads.keys() == reference_grads.keys()
    ratios["all gradients"] = (relative_error(flat(grads), flat(reference_grads))
                               / relative_error(flat(plain_grads), flat(plain_reference_grads)))
    worst_plain = max(tensor_error(plain_grads[n], g, plain_reference_branch.bounds.get(n))
                      for n, g in plain_reference_grads.items())
    for name, g in reference_grads.items():
        ratios[name] = tensor_error(grads[name], g, reference_branch.bounds.get(name)) / worst_plain
    return ratios


# Batches the model-level check runs on. One batch is not enough: over batch seeds 0-11, our
# model's worst error ratio passed 2 at one seed in bf16 (3.16, torch backend, op in bf16) and one
# in fp16 (2.16), while over seeds 0-6 no median passed 1.22 (AMX Xeon). So the check asks it of
# the median. It still fails: a random error of 4 u on the attention's output alone (in bf16 or
# fp16) puts the median at 2.1-2.6 in every configuration.
AUTOCAST_SEEDS = range(7)


@pytest.mark.parametrize("asta_precision", ["fp32", "autocast"])
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_qin_under_autocast_is_as_close_to_fp32_as_plain_pytorch(precision, backend, asta_precision):
    """The tolerance is derived, not chosen: plain PyTorch under the same autocast sets the error
    that the format costs, and our hoisted and fused model may err at most twice as much
    (FlashAttention's criterion for its bf16 kernels), on the median batch of AUTOCAST_SEEDS. The
    attention op reads what model.asta_precision says: fp32 outside autocast, or 16 bits."""
    per_seed = [errors_under_autocast(precision, backend, asta_precision, seed) for seed in AUTOCAST_SEEDS]
    for key in per_seed[0]:
        ratios = [r[key] for r in per_seed]
        assert statistics.median(ratios) <= 2, (key, [round(r, 2) for r in ratios])


# -- training runs --------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return make_dataset(tmp_path_factory.mktemp("data") / "ds", rows=4000, items=300, seed=3,
                        valid_rows=1500, test_rows=300)


def test_precision_setting_is_checked():
    with pytest.raises(ConfigError, match="train.precision must be one of"):
        load_config(overrides=["train.precision=fp8"])
    with pytest.raises(ConfigError, match="model.asta_precision must be one of fp32, autocast"):
        load_config(overrides=["model.asta_precision=bf16"])
    assert qin.train.resolve_precision("auto", torch.device("cpu")) == "fp32"


@pytest.mark.parametrize("capability, auto", [((7, 5), "fp32"), ((7, 0), "fp32"), ((8, 0), "bf16"), ((9, 0), "bf16")])
def test_auto_takes_bf16_only_on_a_gpu_that_computes_in_it(monkeypatch, capability, auto):
    """torch.cuda.is_bf16_supported() says yes on a T4 or V100 too (emulated bf16, far slower than
    fp16); the compute capability of the run's own device decides. (Nothing here needs a GPU.)"""
    asked = []
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: asked.append(device) or capability)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "a GPU")
    device = torch.device("cuda", 1)
    assert qin.train.resolve_precision("auto", device) == auto
    assert asked == [device]
    if auto == "fp32":
        with pytest.raises(ConfigError, match="train.precision=bf16: a GPU has no bf16"):
            qin.train.resolve_precision("bf16", device)


def test_a_precision_autocast_cannot_run_is_refused_naming_the_setting(monkeypatch):
    # This torch runs fp16 autocast on the CPU (the runs below use it); an older one would not.
    assert qin.train.resolve_precision("fp16", torch.device("cpu")) == "fp16"
    monkeypatch.setattr(qin.train, "_autocast_works", lambda device, dtype: False)
    with pytest.raises(ConfigError, match=r"train.precision=fp16.*use train.precision=fp32"):
        qin.train.resolve_precision("fp16", torch.device("cpu"))


def test_evaluate_names_its_own_precision_option_before_loading_data(tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(qin.train, "_autocast_works", lambda device, dtype: False)
    # No run is needed: the precision is checked before the checkpoint's data is read.
    data = make_dataset(tmp_path / "ds", rows=600, items=50, seed=1, valid_rows=200, test_rows=20)
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "run"), "model.embed_dim=4",
                 "model.attention_dim=8", "train.batch_size=128", "train.epochs=1", "train.device=cpu"]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "run"), "--precision", "fp16", "--data", str(tmp_path / "nowhere")]) == 2
    err = capsys.readouterr().err
    assert "--precision=fp16: autocast" in err and "use --precision=fp32" in err and "train.precision" not in err


def test_a_bf16_run_learns_and_its_checkpoint_scores_in_any_precision(tmp_path):
    data = make_dataset(tmp_path / "ds", rows=16000, items=200, seed=3, valid_rows=1500, test_rows=300)
    state = make_trainer(data, tmp_path / "run", "train.epochs=3", "train.lr=1e-2", "train.precision=bf16",
                         dataset=load_dataset(data)).fit()
    # Chance is 0.5, and with 1,500 valid rows an AUC's standard error without signal is about
    # 0.015: 0.6 is six of them above chance. (These settings land anywhere in 0.62-0.74 by seed, in
    # fp32 as in bf16, so a bar near one seed's fp32 result would test luck.)
    assert state.best_auc > 0.6, f"valid AUC {state.best_auc:.3f} is not clearly above chance"
    assert state.history[-1]["train_loss"] < state.history[0]["train_loss"]
    assert load_config(tmp_path / "run" / "config.yaml").train.precision == "bf16"
    for precision in ("fp32", "bf16"):
        assert main(["evaluate", str(tmp_path / "run"), "--precision", precision]) == 0


def test_auto_on_a_cpu_with_bf16_instructions_keeps_fp32_and_says_bf16_would_pay(data_dir, tmp_path, monkeypatch):
    """'auto' resolves to fp32 on every CPU; where the CPU has bf16 instructions the run's log
    says once that train.precision=bf16 would train faster, and nowhere else."""
    dataset = load_dataset(data_dir)
    for has_bf16, requested in ((True, "auto"), (False, "auto"), (True, "fp32"), (True, "bf16")):
        monkeypatch.setattr(qin.train, "cpu_has_bf16", lambda: has_bf16)
        cfg = small_config(data_dir, f"train.precision={requested}")
        fill_vocab_from_data(cfg, dataset)
        lines = []
        trainer = qin.train.Trainer(cfg, dataset, tmp_path / f"run-{has_bf16}-{requested}", log=lines.append)
        assert trainer.cfg.train.precision == ("fp32" if requested == "auto" else requested)
        hints = [line for line in lines if "train.precision=bf16 should train faster" in line]
        assert len(hints) == (1 if has_bf16 and requested == "auto" else 0), lines
    assert qin.train.precision_hint("auto", torch.device("cuda")) is None  # there auto is bf16 already


def test_cpu_has_bf16_answers_no_where_torch_cannot_say(monkeypatch):
    assert isinstance(qin.train.cpu_has_bf16(), bool)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported", raising=False)
    assert qin.train.cpu_has_bf16() is False


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_a_16bit_matmul_that_is_slow_on_this_cpu_is_warned_about(data_dir, tmp_path, monkeypatch, precision):
    """Where torch has no fast kernels for the format (fp16 on most CPUs: 300x slower than fp32 on
    our test machine), the run says so up front; where it has them, it stays quiet."""
    probe = qin.train.matmul_slowdown(torch.device("cpu"), precision)
    assert probe is not None and probe > 0
    assert qin.train.matmul_slowdown(torch.device("cpu"), "fp32") is None
    cfg = small_config(data_dir, f"train.precision={precision}")
    dataset = load_dataset(data_dir)
    fill_vocab_from_data(cfg, dataset)
    for slowdown in (300.0, 0.5):
        monkeypatch.setattr(qin.train, "matmul_slowdown", lambda device, name: slowdown)
        lines = []
        qin.train.Trainer(cfg, dataset, tmp_path / f"run{slowdown}", log=lines.append)
        warnings = [line for line in lines if line.startswith("warning: train.precision")]
        if slowdown > qin.train.SLOW_MATMUL:
            assert len(warnings) == 1 and f"runs 300x slower in {precision} than in fp32" in warnings[0], lines
        else:
            assert not warnings, lines


def test_a_non_finite_loss_in_fp16_names_the_overflow_and_bf16(data_dir, tmp_path, monkeypatch):
    """The forward overflowing fp16 (the built-in run did by step 100, before QNN's product stayed
    fp32) is no scaler's business: the run stops, and says why and what to use instead."""
    trainer = make_trainer(data_dir, tmp_path / "run", "train.precision=fp16", "train.epochs=1")
    original = qin.train.loss_fn
    calls = {"n": 0}

    def overflow_on_step_three(*args):
        calls["n"] += 1
        loss = original(*args)
        return loss * float("inf") if calls["n"] == 3 else loss

    monkeypatch.setattr(qin.train, "loss_fn", overflow_on_step_three)
    with pytest.raises(qin.train.TrainingError, match=r"non-finite loss at epoch 1, step 3: .*fp16's largest "
                                                      r"value \(65,504\).*train.precision=bf16"):
        trainer.fit()


def test_a_gradient_that_overflows_at_every_scale_says_so(data_dir, tmp_path):
    trainer = make_trainer(data_dir, tmp_path / "run", "train.precision=fp16", "train.epochs=1",
                           "train.batch_size=128")  # 31 steps: room for 17 halvings of 2**16
    trainer.model.output.bias.register_hook(lambda grad: torch.full_like(grad, float("inf")))
    with pytest.raises(qin.train.TrainingError, match=r"non-finite gradient norm at epoch 1, step 18: .*the gradient "
                       r"scaler skipped 17 overflowing step\(s\) so far and lowered the loss scale below 1 "
                       r"\(now 0.5\): the gradient overflows at any scale"):
        trainer.fit()


def test_fp16_skips_an_overflowing_step_and_halves_the_scale(data_dir, tmp_path):
    steps = 24
    trainer = make_trainer(data_dir, tmp_path / "run", "train.precision=fp16", "train.epochs=1",
                           "train.batch_size=128", f"train.max_steps_per_epoch={steps}")  # 31 batches
    assert trainer.scaler.is_enabled()
    before = {n: p.detach().clone() for n, p in trainer.model.named_parameters()}
    calls, scales = {"n": 0}, []

    def overflow_on_the_last_step(grad):  # as a too-large loss scale makes a step overflow
        calls["n"] += 1
        return torch.full_like(grad, float("inf")) if calls["n"] == steps else grad

    trainer.model.output.bias.register_hook(overflow_on_the_last_step)
    update = trainer.scaler.update
    trainer.scaler.update = lambda *a: (update(*a), scales.append(trainer.scaler.get_scale()))
    state = trainer.fit()
    # The first steps overflow on their own (GradScaler starts high, at 2**16, and halves the
    # scale on each overflow: a dozen times at this initialisation, whose gradients reach the
    # hundreds); then it settles (24 steps leave room for that), and the poisoned last step halves
    # it again.
    assert state.step == steps and scales[-1] == scales[-2] / 2 and scales[-2] == scales[-3], scales
    halvings = sum(b == a / 2 for a, b in zip([2.0 ** 16, *scales], scales))
    assert state.skipped_steps == halvings and scales[-1] == 2.0 ** (16 - halvings)
    assert load_checkpoint(tmp_path / "run" / "latest.pt")["scaler"]["scale"] == scales[-1]
    # Adam was told of each overflow and left weights and its step count alone.
    taken = steps - state.skipped_steps
    assert {s["step"].item() for s in trainer.optimizer.state_dict()["state"].values()} == {float(taken)}
    assert all(torch.isfinite(p).all() for p in trainer.model.parameters())  # an inf step would show
    moved = max((p.detach() - before[n]).abs().max().item() for n, p in trainer.model.named_parameters())
    assert taken >= 1 and moved > 0


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_resume_continues_in_the_runs_precision_exactly(precision, data_dir, tmp_path):
    dataset = load_dataset(data_dir)
    run = (f"train.precision={precision}", "train.max_steps_per_epoch=8")

    make_trainer(data_dir, tmp_path / "straight", *run, dataset=dataset).fit()
    make_trainer(data_dir, tmp_path / "split", *run, "train.epochs=1", dataset=dataset).fit()
    # Resumed as `qin train --resume` does: the run's own config.yaml, which names the precision.
    cfg = load_config(tmp_path / "split" / "config.yaml")
    assert cfg.train.precision == precision
    resumed = qin.train.Trainer(cfg, dataset, tmp_path / "split", log=lambda *_: None)
    resumed.cfg.train.epochs = 2
    resumed.fit(resume=True)
    assert_same_weights(final_weights(tmp_path / "straight"), final_weights(tmp_path / "split"))
    straight = load_checkpoint(tmp_path / "straight" / "latest.pt")
    split = load_checkpoint(tmp_path / "split" / "latest.pt")
    assert straight["scaler"] == split["scaler"]
    assert [json.loads(line)["precision"] for line in (tmp_path / "split" / "metrics.jsonl").read_text().splitlines()] \
        == [precision, precision]
    if precision == "fp16":
        # Restored, not a fresh 2**16: every overflow of both epochs halved it (the first steps of
        # an fp16 run overflow on their own while the scale comes down from 2**16).
        skipped = split["trainer"]["skipped_steps"]
        assert skipped >= 1 and split["scaler"]["scale"] == 2.0 ** (16 - skipped)
    else:
        assert split["scaler"] == {}  # bf16 needs no scaler
