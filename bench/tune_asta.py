"""Launch configurations of the ASTA kernels, timed on a GPU: which BLOCK_L, num_warps and
thread layout (VEC) to launch, per dtype, at the paper's shape (B=8192, L=64, D=384, every
position live).

Why: on an H200 (bench/results/gpu-h200-2026-12-04) the fp32 forward read the history at 1.09x
the copy ceiling, the bf16 and fp16 forwards at 0.30x, slower in absolute time on half the bytes.
In Triton's own layout for 16-bit values (VEC=0: 8 values a thread) the (8, 512) tile of 4 warps
spreads its 8 rows over 2 warps, and the sum over L crosses warps (shared memory and a barrier
each trip), where the fp32 tile keeps its 8 rows in each thread. _config now launches every dtype
with 4 values a thread (VEC=4, fp32's layout), chosen from the generated code, not yet timed.
The candidates below keep a row block within one warp or not, in either layout for 16-bit values
(in fp32 VEC=0 and VEC=4 are the same code); the timings decide. A candidate launches with ptxas's
own register allocation; "_config's" line with _config's cap on the 16-bit forwards (maxnreg 72),
which a winner would need checked again. num_stages is not a candidate:
the L loop has no tl.dot, and 1 or 3 stages give the same PTX (Triton 3.9, sm_90).

Each candidate runs the plain op and the gathered op (the model's), forward and fwd+bwd, inside
kernels.sparse_target_attention.forced_config; the reference eager and "_config's" lines are the
yardsticks of the same run. Printed last: per dtype, form and mode, the fastest configuration and
its speed-up over _config's. A candidate that fails to compile or run is skipped with its error.
A winner by more than the spread of two runs goes into _config (by dtype where the dtypes differ),
and tests/test_codegen.py then checks it for spills on sm_89 and sm_90; the next
bench/gpu_run.sh says whether the op now beats the torch lines, for MEASURED_FASTER.

    python -m bench.tune_asta --device cuda [--quick] [--csv out.csv]
"""
from __future__ import annotations

import contextlib

import torch

import kernels
from bench.bench_asta import DIM, HIST_LEN, make_block, make_gathered
from bench.common import STOPPED, keep, kernel_bench_main, make_row, print_table, short_dtype, time_ms
from kernels.utils import INTERPRETING
from kernels.sparse_target_attention import forced_config

# (BLOCK_L, num_warps): with BLOCK_D = 512 each keeps at most 64 values of the tile a thread.
CANDIDATES = [(2, 1), (4, 1), (4, 2), (8, 2), (8, 4), (16, 4), (16, 8), (32, 8)]
# Values of a row a thread (VEC): 4 (fp32's layout), 0 (Triton's own: 8 for 16-bit values).
LAYOUTS = (4, 0)
DEFAULT = "_config's"


def _name(block_l: int, num_warps: int, vec: int) -> str:
    return f"BLOCK_L={block_l} warps={num_warps} VEC={vec}"


def _forms(batch: int, dtype: torch.dtype, device: torch.device) -> dict:
    """form -> (op(backend), inputs differentiated, grad_out): the plain op and the gathered op."""
    _, x, mask, _, grad_out = make_block(batch, HIST_LEN, dtype, device, full_mask=True)
    query = (torch.randn(batch, DIM, device=device, dtype=dtype) / DIM**0.5).requires_grad_()
    reps, index, g_query, g_mask, g_grad = make_gathered(batch, HIST_LEN, dtype, device, full_mask=True)
    return {
        "plain": (lambda backend: kernels.sparse_target_attention(x, query, mask, backend=backend), (x, query),
                  grad_out),
        "gathered": (lambda backend: kernels.gathered_sparse_target_attention(reps, index, g_query, g_mask,
                                                                            backend=backend),
                     (reps, g_query), g_grad),
    }


def _time_modes(call, inputs, grad_out, device) -> dict:
    def fwd():
        with torch.no_grad():
            call()

    def fwd_bwd():
        torch.autograd.grad(call(), inputs, grad_out)

    return {mode: time_ms(fn, device) for mode, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd))}  # its warm-up compiles


def _rows(dtype: torch.dtype, device: torch.device, batch: int, layouts: tuple[int, ...]):
    for form, (op, inputs, grad_out) in _forms(batch, dtype, device).items():
        lines = [("reference eager", None, "torch"), (DEFAULT, None, "triton")]
        lines += [(_name(bl, nw, vec), dict(BLOCK_L=bl, num_warps=nw, VEC=vec), "triton")
                  for bl, nw in CANDIDATES for vec in layouts]
        for provider, cfg, backend in lines:
            if STOPPED.is_set():
                return
            try:
                with forced_config(**cfg) if cfg else contextlib.nullcontext():
                    times = _time_modes(lambda: op(backend), inputs, grad_out, device)
            except Exception as exc:  # a configuration past the registers or shared memory
                print(f"skipping {form} {short_dtype(dtype)} {provider}: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            for mode, t in times.items():
                yield make_row(f"asta_config_{form}", provider, mode, "time", "ms", "batch", batch, t,
                               device=device, dtype=dtype)


def summary(rows: list[dict]) -> list[str]:
    """Per (kernel, dtype, mode): the fastest configuration and its ratio to _config's."""
    best, default = {}, {}
    for r in rows:
        if r["metric"] != "time" or r["provider"] == "reference eager":
            continue
        key = (r["kernel"], r["dtype"], r["mode"])
        if r["provider"] == DEFAULT:
            default[key] = r["p50"]
        elif key not in best or r["p50"] < best[key][1]:
            best[key] = (r["provider"], r["p50"])
    lines = []
    for key, (provider, ms) in sorted(best.items()):
        ratio = f"{default[key] / ms:.2f}x _config's {default[key]:.3g} ms" if key in default else "no _config's line"
        lines.append(f"{key[0]} {key[1]} {key[2]}: {provider} {ms:.3g} ms ({ratio})")
    return lines


def run(device: torch.device, quick: bool = False, csv: str | None = None) -> list[dict]:
    device = torch.device(device)
    if device.type != "cuda" and not INTERPRETING:
        raise SystemExit("tune_asta times the Triton kernels: it needs a CUDA device (or, to check the "
                         "script alone, TRITON_INTERPRET=1 set before the run)")
    if device.type == "cuda":
        dtypes, batch = [torch.bfloat16, torch.float32, torch.float16], 8192
    else:  # the CPU checks the script under Triton's interpreter, at a toy size
        dtypes, batch = [torch.float32], 4
    if quick:
        dtypes = dtypes[:2]
    rows: list[dict] = []
    for dtype in dtypes:
        if STOPPED.is_set():
            break
        layouts = LAYOUTS[:1] if dtype == torch.float32 else LAYOUTS  # fp32: one code for both
        keep(rows, _rows(dtype, device, batch, layouts), csv)
    if STOPPED.is_set():
        print("out of time: the cases after the last table line were not run")
    print_table(rows, f"ASTA launch configurations (B={batch}, L={HIST_LEN}, D={DIM}, every position live)")
    for line in summary(rows):
        print(line)
    return rows


def main(argv=None) -> None:
    kernel_bench_main(run, __doc__, "bf16 and fp32 only", argv)


if __name__ == "__main__":
    main()
