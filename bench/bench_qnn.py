"""QNN quadratic projection: eager reference vs the torch backend vs torch.compile vs the fused Triton op.

Training mode with dropout 0.1, as the model runs it. Per provider, dtype and batch: forward and
forward+backward time, achieved TFLOP/s (forward 2*B*D*M*D FLOPs, forward+backward 3x) against
the measured matmul rate of the same device and dtype, peak memory, and speed-up over eager in
the same run. "qnn_backward" (CUDA, bf16 and fp32-tf32): backward alone, eager's, the torch backend's
and the Triton op's, and each part of the Triton backward timed apart, at the paper's batch.
"fp32_gemm" (CUDA, fp32 with TF32 off, where kernels/fp32_gemm.py applies): each of the three
products alone, cuBLAS against 3xTF32, with each one's error against float64. Plus the 4-layer QNN stack (quadratic + BatchNorm + PReLU + dropout + residual)
forward+backward time and peak memory, eager vs torch.compile vs Triton. On a GPU fp32 runs twice,
with TF32 off ("fp32") and on ("fp32-tf32"): every path's products follow torch's switch, and
auto must not lose under either; the matmul ceiling is measured under the same setting. bf16 runs
twice too: bf16 tensors ("bf16"), and fp32 ones under autocast bf16 ("bf16-autocast"), as
train.precision=bf16 calls the op.

Order, so that a time box (bench/gpu_run.sh) cuts the least valuable rows: the op at the paper's
batch in every precision first (bf16, bf16-autocast, fp32, then fp32-tf32: what the targets and
MEASURED_FASTER rest on), bf16's and fp32-tf32's each followed by its backward's parts, then the
batch sweep and the stack. Each row is kept (and appended to
--csv) as it is measured.

    python -m bench.bench_qnn --device cuda [--quick] [--csv out.csv]
"""
from __future__ import annotations

import contextlib
import importlib

import torch

import kernels
from bench.common import (STOPPED, device_kernels, diagnosed, host_ms, host_rows, keep, kernel_bench_main, make_row,
                          measure_matmul_tflops, peak_memory_mb, print_table, time_ms)
from kernels import reference, tolerances

DIM, ROWS, DROPOUT = 1024, 4, 0.1  # the paper's QNN width and num_row
# The precisions whose backward is timed part by part: bf16, where the Triton op lost most to eager
# on an H200, and fp32 with TF32, whose products are as fast but whose tensors are twice as wide.
PARTS_LABELS = ("bf16", "fp32-tf32")


def _make(batch, dim, dtype, device):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, dim, generator=g).to(device, dtype).requires_grad_()
    weight = (torch.randn(ROWS * dim, dim, generator=g) / dim**0.5).to(device, dtype).requires_grad_()
    bias = torch.zeros(ROWS * dim, device=device, dtype=dtype, requires_grad=True)
    gy = torch.randn(batch, dim, generator=g).to(device, dtype)
    return x, weight, bias, gy


def _providers(device):
    """name -> op(x, weight, bias). "eager": autograd through the plain reference, the baseline;
    "torch backend": what backend="torch" (and "auto" until Triton measures faster) trains with,
    reference.training_quadratic_projection (on an H200 auto's own timing gave it 1.16 ms fwd+bwd
    under autocast bf16 where this table's eager line took 0.69: the two had never been timed side
    by side). Triton needs CUDA; compile is tried everywhere and dropped if it fails. Triton before
    compile: a time box that cuts the stage in a cold compile keeps its line."""
    eager = lambda x, w, b: reference.quadratic_projection(x, w, b, ROWS, DROPOUT, True)
    out = {"eager": eager,
           "torch backend": lambda x, w, b: kernels.quadratic_projection(x, w, b, ROWS, dropout_p=DROPOUT,
                                                                          training=True, backend="torch")}
    if device.type == "cuda":
        out["triton"] = lambda x, w, b: kernels.quadratic_projection(
            x, w, b, ROWS, dropout_p=DROPOUT, training=True, backend="triton")
    out["compile"] = torch.compile(eager)
    return out


@contextlib.contextmanager
def tf32(enabled: bool):
    """torch's TF32 switch for matrix products (cuBLAS, and the Triton path's addmm), restored after."""
    before = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = enabled
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32 = before


def _projection_rows(device, dtype, batches, dim, rate, label):
    """Yields each row as it is measured."""
    for batch in batches:
        x, weight, bias, gy = _make(batch, dim, dtype, device)
        flops = 2 * batch * dim * ROWS * dim
        base = {}
        for provider, op in _providers(device).items():
            if STOPPED.is_set():
                break

            def fwd():
                with torch.no_grad():
                    op(x, weight, bias)

            def fwd_bwd():
                torch.autograd.grad(op(x, weight, bias), (x, weight, bias), gy)

            for mode, fn, mode_flops in (("fwd", fwd, flops), ("fwd+bwd", fwd_bwd, 3 * flops)):
                try:
                    fn()  # compile / warm up outside the timing
                    times = time_ms(fn, device)
                except Exception as exc:  # torch.compile may be unavailable (no compiler on the CPU)
                    print(f"skipping {provider} {mode} B={batch}: {type(exc).__name__}: {str(exc)[:120]}")
                    break
                tflops = mode_flops / (times[0] * 1e-3) / 1e12
                kw = dict(device=device, dtype=label)
                yield make_row("qnn", provider, mode, "time", "ms", "batch", batch, times, **kw)
                yield make_row("qnn", provider, mode, "tflops", "TFLOP/s", "batch", batch, tflops, **kw)
                yield make_row("qnn", provider, mode, "matmul_fraction", "x", "batch", batch, tflops / rate, **kw)
                if provider == "eager":
                    base[mode] = times[0]
                elif mode in base:
                    yield make_row("qnn", provider, mode, "speedup_vs_eager", "x", "batch", batch,
                                   base[mode] / times[0], **kw)
                memory = peak_memory_mb(fn, device)
                if memory is not None:
                    yield make_row("qnn", provider, mode, "peak_memory", "MB", "batch", batch, memory, **kw)
                if diagnosed(device) and mode == "fwd+bwd":  # bound by its launches? (at 3f11c2d the
                    # torch backend's fwd+bwd took 0.36 ms more than eager's in bf16, its fp32 no more)
                    yield from host_rows("qnn", provider, mode, "batch", batch, host_ms(fn, device), times[0], **kw)


def fp32_products(device, batch, dim) -> dict:
    """The Triton QNN's three fp32 products at (batch, dim, M=ROWS), mode -> (a, b, bias, addend),
    in the layouts kernels/quadratic_projection.py passes them (W.T and G.T as views)."""
    g = torch.Generator().manual_seed(0)
    hidden = ROWS * dim
    x = torch.randn(batch, dim, generator=g).to(device)
    weight = (torch.randn(hidden, dim, generator=g) / dim**0.5).to(device)
    bias, grad_hidden = torch.randn(hidden, generator=g).to(device), torch.randn(batch, hidden, generator=g).to(device)
    addend = torch.randn(batch, dim, generator=g).to(device)
    return {"forward x @ W.T + b": (x, weight.t(), bias, None),
            "grad_x G @ W + gy * s": (grad_hidden, weight, None, addend),
            "grad_W G.T @ x": (grad_hidden.t(), x, None, None)}


def vendor_product(a, b, bias=None, addend=None):
    """The same product as torch runs it (cuBLAS on a GPU): what the QNN ran before kernels/fp32_gemm.py."""
    if addend is not None:
        return torch.addmm(addend, a, b) if bias is None else torch.addmm(addend + bias, a, b)
    return torch.addmm(bias, a, b) if bias is not None else a @ b


def _fp32_product_rows(device, batch, dim, label):
    """fp32 with TF32 off, where kernels/fp32_gemm.py applies (a GPU whose tensor cores pay: sm_80,
    sm_90): each of the Triton QNN's three products alone at its shape and layout, cuBLAS's SGEMM
    against the 3xTF32 kernel the Triton path runs there, with its operands split in the kernel
    (Triton's tf32x3) and split in memory first (PRESPLIT; the split's pass timed with the
    product). Time, TFLOP/s, each kernel's speed-up over cuBLAS, and
    each provider's largest error against float64 in units of the fp32 tolerance (kernels/tolerances.py:
    below 1 passes), so the split's accuracy is measured beside cuBLAS's own."""
    fp32_gemm = importlib.import_module("kernels.fp32_gemm")  # Triton's: imported only where it runs
    probe = torch.empty(0, device=device)
    if not fp32_gemm.applies(device, probe):
        print(f"fp32 products: not timed, kernels/fp32_gemm.py does not apply on {device}")
        return
    rtol = tolerances.OPS[torch.float32].rtol
    for mode, (a, b, c, add) in fp32_products(device, batch, dim).items():
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        vendor = lambda a=a, b=b, c=c, add=add: vendor_product(a, b, c, add)
        split = lambda a=a, b=b, c=c, add=add: fp32_gemm.matmul(a, b, bias=c, addend=add, presplit=False)
        presplit = lambda a=a, b=b, c=c, add=add: fp32_gemm.matmul(a, b, bias=c, addend=add, presplit=True)
        want = a.double() @ b.double()
        scale = a.double().abs() @ b.double().abs()
        for extra in (c, add):
            if extra is not None:
                want, scale = want + extra.double(), scale + extra.double().abs()
        scale += 1e-3 * scale.max()
        base = None
        for provider, fn in (("cuBLAS", vendor), ("3xTF32", split), ("3xTF32, split first", presplit)):
            if STOPPED.is_set():
                return
            error = ((fn().double() - want).abs() / scale).max().item() / rtol
            times = time_ms(fn, device)
            kw = dict(device=device, dtype=label)
            yield make_row("fp32_gemm", provider, mode, "time", "ms", "batch", batch, times, **kw)
            yield make_row("fp32_gemm", provider, mode, "tflops", "TFLOP/s", "batch", batch,
                           flops / (times[0] * 1e-3) / 1e12, **kw)
            yield make_row("fp32_gemm", provider, mode, "error_vs_float64", "x fp32 tolerance", "batch", batch, error, **kw)
            if base is None:
                base = times[0]
            else:
                yield make_row("fp32_gemm", provider, mode, "speedup_vs_cublas", "x", "batch", batch, base / times[0], **kw)
        del want, scale


def _backward_parts_rows(device, dtype, batch, dim, label):
    """Forward with its graph kept, then backward alone, eager's, the torch backend's and the Triton op's, then each
    part of the Triton backward on the tensors it gets: the masked-gradient pass, the products
    for grad_x and grad_W, grad_b's sum over the batch, and that sum as a product with a ones
    vector (the alternative). Why: on an H200 (b0662d3) the Triton op's bf16 forward took eager's
    time and its forward+backward 2.4x eager's, while in fp32 the two were level. Yields each row
    as it is measured."""
    qp = importlib.import_module("kernels.quadratic_projection")
    x, weight, bias, gy = _make(batch, dim, dtype, device)
    kw = dict(device=device, dtype=label)
    row = lambda provider, times, mode="bwd": make_row("qnn_backward", provider, mode, "time", "ms", "batch", batch,
                                                       times, **kw)
    providers = _providers(device)
    ops = {"eager": providers["eager"], "torch backend": providers["torch backend"],
           "triton": lambda x, w, b: kernels.quadratic_projection(x, w, b, ROWS, dropout_p=DROPOUT, training=True,
                                                                  backend="triton")}
    for provider, op in ops.items():
        if STOPPED.is_set():
            return
        # The forward as training runs it, grad on and its graph kept: the op table's "fwd" runs
        # under no_grad, where the torch backend takes the plain reference, not its autograd
        # Function (on the H200 at 3f11c2d its fwd+bwd exceeded its fwd plus its backward by 0.3 ms).
        yield row(f"{provider} forward, graph kept", time_ms(lambda: op(x, weight, bias), device), "fwd (grad on)")
        y = op(x, weight, bias)
        yield row(f"{provider} backward", time_ms(
            lambda: torch.autograd.grad(y, (x, weight, bias), gy, retain_graph=True), device))
        del y
        if diagnosed(device):  # the kernels of one fwd+bwd: against its time, how long the GPU sat idle
            try:
                total, listing = device_kernels(
                    lambda: torch.autograd.grad(op(x, weight, bias), (x, weight, bias), gy), device)
            except RuntimeError as exc:  # a profiler that cannot start here must not cost the rows after it
                print(f"no kernel listing for {provider}: {str(exc)[:200]}")
                continue
            yield make_row("qnn_backward", f"{provider} fwd+bwd, its kernels' time", "fwd+bwd", "kernel_time", "ms",
                           "batch", batch, total, **kw)
            print(f"{provider} fwd+bwd ({label}), its kernels a call: {total:.3f} ms")
            for name, count, ms in listing[:10]:
                print(f"  {ms:8.3f} ms  x{count:g}  {name[:110]}")
    # The operands as the op's backward has them: x and W in the products' dtype (autocast's under
    # autocast), s from the forward, gy in y's dtype, grad_x in x's own dtype.
    on = torch.is_autocast_enabled(device.type)
    wide = torch.get_autocast_dtype(device.type) if on else dtype
    with torch.no_grad(), torch.autocast(device.type, enabled=False):
        xw, ww, bw = x.detach().to(wide), weight.detach().to(wide), bias.detach().to(wide)
        seed = qp._seed_tensor(0, device)
        y, s = qp._forward(x.detach(), ww, bw, seed, ROWS, DROPOUT)
        gy = gy.to(y.dtype)
        g, gys = qp._masked_gradient(gy, xw, s, seed, ROWS, DROPOUT, x.dtype)
        ones = torch.ones(batch, device=device, dtype=wide)
        parts = {"masked-gradient pass": lambda: qp._masked_gradient(gy, xw, s, seed, ROWS, DROPOUT, x.dtype),
                 "grad_x product": lambda: torch.addmm(gys, g, ww) if x.dtype == wide else gys + g @ ww,
                 "grad_W product": lambda: g.t() @ xw,
                 "grad_b sum": lambda: g.sum(0, dtype=s.dtype),
                 "grad_b as a product with ones": lambda: ones @ g}
        for provider, part in parts.items():
            if STOPPED.is_set():
                return
            yield row(provider, time_ms(part, device))


def _stack_rows(device, dtype, batch, label):
    """Peak memory and time of the model's 4-layer QNN stack, forward+backward: eager, compiled, Triton.
    Yields each row as it is measured."""
    from qin.config import QINConfig
    from qin.model import QNN

    providers = [("eager", "torch", False)]
    if device.type == "cuda":
        providers += [("triton", "triton", False), ("compile", "torch", True)]  # Triton before a cold compile
    for provider, backend, compiled in providers:
        if STOPPED.is_set():
            return
        torch.manual_seed(0)
        cfg = QINConfig(qnn_kernel=backend)  # paper sizes: qnn_dim 1024, 4 rows, 4 layers, dropout 0.1
        model = QNN(cfg).to(device=device, dtype=dtype).train()
        forward = torch.compile(model) if compiled else model
        x = torch.randn(batch, cfg.qnn_dim, device=device, dtype=dtype)

        def step():
            model.zero_grad(set_to_none=True)
            forward(x).float().square().mean().backward()

        try:
            step()  # compile / warm up outside the timing
        except Exception as exc:  # torch.compile may be unavailable
            print(f"skipping qnn_stack {provider}: {type(exc).__name__}: {str(exc)[:120]}")
            continue
        kw = dict(device=device, dtype=label)
        yield make_row("qnn_stack", provider, "fwd+bwd", "time", "ms", "batch", batch, time_ms(step, device), **kw)
        memory = peak_memory_mb(step, device)
        if memory is not None:
            yield make_row("qnn_stack", provider, "fwd+bwd", "peak_memory", "MB", "batch", batch, memory, **kw)


def run(device: torch.device, quick: bool = False, csv: str | None = None) -> list[dict]:
    device = torch.device(device)
    # (label, the tensors' dtype, TF32 on, autocast's dtype). "bf16-autocast": fp32 x, W and b under
    # autocast, as train.precision=bf16 calls the op (the GEMMs cast W to bf16 on every call, the
    # product reads fp32 x): with "bf16", what a MEASURED_FASTER entry for bf16 rests on.
    if device.type == "cuda":  # bf16 first: most targets are bf16's
        precisions = [("bf16", torch.bfloat16, False, None), ("bf16-autocast", torch.float32, False, torch.bfloat16),
                      ("fp32", torch.float32, False, None), ("fp32-tf32", torch.float32, True, None)]
        batches = [8192] if quick else [8192, 1024, 2048, 4096, 16384]  # the paper's first
        dim, stack_batch = DIM, 8192
    else:  # the CPU only runs the reference (Triton needs CUDA), at a small size, in fp32: bf16
        # products on a CPU without bf16 units are emulated and take many minutes while saying nothing
        precisions = [("fp32", torch.float32, False, None)]
        batches = [256] if quick else [256, 1024]
        dim, stack_batch = (256, 256) if quick else (DIM, 1024)
    rows, rates = [], {}

    def op_rows(label, dtype, amp):  # the ceiling (of the dtype the products run in), then the op at the first batch
        with torch.autocast(device.type, enabled=False):  # its own tensors in that dtype: no casts timed
            rates[label] = measure_matmul_tflops(device, amp or dtype)
        n = 4096 if device.type == "cuda" else 1024  # the size measure_matmul_tflops uses
        yield make_row("matmul", "torch", "ceiling", "tflops", "TFLOP/s", "n", n, rates[label], device=device, dtype=label)
        yield from _projection_rows(device, dtype, batches[:1], dim, rates[label], label)
        if device.type == "cuda" and label in PARTS_LABELS:  # where the Triton backward's time goes
            yield from _backward_parts_rows(device, dtype, batches[0], dim, label)
        if device.type == "cuda" and label == "fp32":  # the 3xTF32 products against cuBLAS's, where they apply
            yield from _fp32_product_rows(device, batches[0], dim, label)

    def sweep_rows(label, dtype, amp):  # the other batches, then the 4-layer stack
        yield from _projection_rows(device, dtype, batches[1:], dim, rates[label], label)
        if not (quick and device.type == "cpu"):
            yield from _stack_rows(device, dtype, stack_batch, label)

    for rows_of in (op_rows, sweep_rows):
        for label, dtype, allow_tf32, amp in precisions:
            if STOPPED.is_set():
                break
            torch._dynamo.reset()  # a fresh compile cache per precision: never past its recompile limit
            with tf32(allow_tf32), torch.autocast(device.type, dtype=amp or torch.bfloat16, enabled=amp is not None):
                keep(rows, rows_of(label, dtype, amp), csv)
    if STOPPED.is_set():
        print("out of time: the cases after the last table line were not run")
    print_table(rows, f"QNN quadratic projection (D={dim}, M={ROWS}, dropout {DROPOUT}, training)")
    return rows


def main(argv=None) -> None:
    kernel_bench_main(run, __doc__, "one batch size (CPU: B=256, D=256)", argv)


if __name__ == "__main__":
    main()
