"""Launch configurations of the 3xTF32 fp32 GEMM (kernels/fp32_gemm.py), timed on a GPU: which
tile, slice depth, warps and stages to launch for the Triton QNN's three fp32 products at the
paper's shape (B=8192, D=1024, M=4), in their layouts (x @ W.T + b, G @ W + gy * s, G.T @ x).

Why: _config's 128 x 128 x 16 tiles (8 warps, 4 stages) were chosen from the generated code alone
(no spills for sm_80 and sm_90), never timed. The candidates below are those that compile for sm_90
without spilling in all three layouts (Triton 3.9; 32-deep slices with 128-wide tiles, and
256-wide tiles but 256 x 64, spilled). cuBLAS's SGEMM (TF32 off: what the QNN ran before) and
_config's line are the yardsticks of the same run. Printed last: per product, the fastest line and
its speed-up over _config's and over cuBLAS. _config's also runs with its operands split in
memory first (fp32_gemm.PRESPLIT), the split's pass timed with it. A candidate that fails to compile or run is skipped
with its error. A winner by more than the spread of two runs goes into _config, and
tests/test_codegen.py then checks it for spills.

    python -m bench.tune_fp32_gemm --device cuda [--quick] [--csv out.csv]
"""
from __future__ import annotations

import contextlib
import importlib

import torch

from bench.bench_qnn import DIM, fp32_products, tf32, vendor_product
from bench.common import STOPPED, keep, kernel_bench_main, make_row, print_table, time_ms
from kernels.utils import INTERPRETING

# (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
CANDIDATES = [(128, 128, 16, 8, 3), (128, 128, 16, 8, 5), (128, 128, 8, 8, 6), (128, 64, 16, 4, 4),
              (64, 64, 32, 4, 4), (256, 64, 16, 8, 4)]
DEFAULT, VENDOR, PRESPLIT = "_config's", "cuBLAS", "_config's, split first"


def _name(block_m: int, block_n: int, block_k: int, num_warps: int, num_stages: int) -> str:
    return f"{block_m}x{block_n}x{block_k} warps={num_warps} stages={num_stages}"


def _rows(device: torch.device, batch: int, dim: int):
    fp32_gemm = importlib.import_module("kernels.fp32_gemm")  # Triton's: imported only where it runs
    for mode, (a, b, bias, addend) in fp32_products(device, batch, dim).items():
        flops = 2 * a.shape[0] * a.shape[1] * b.shape[1]
        # (provider, forced configuration, operands split in memory first); the candidates split in the kernel
        lines = [(VENDOR, None, False), (DEFAULT, {}, False), (PRESPLIT, {}, True)]
        lines += [(_name(*c), dict(zip(("BLOCK_M", "BLOCK_N", "BLOCK_K", "num_warps", "num_stages"), c)), False)
                  for c in CANDIDATES]
        for provider, cfg, presplit in lines:
            if STOPPED.is_set():
                return
            if cfg is None:
                fn = lambda: vendor_product(a, b, bias, addend)  # noqa: E731
            else:
                fn = lambda presplit=presplit: fp32_gemm.matmul(a, b, bias=bias, addend=addend,  # noqa: E731
                                                                presplit=presplit)
            try:
                with fp32_gemm.forced_config(**cfg) if cfg else contextlib.nullcontext():
                    times = time_ms(fn, device)  # its warm-up compiles
            except Exception as exc:  # a configuration past the registers or shared memory
                print(f"skipping {mode} {provider}: {type(exc).__name__}: {str(exc)[:160]}")
                continue
            kw = dict(device=device, dtype=torch.float32)
            yield make_row("fp32_gemm_config", provider, mode, "time", "ms", "batch", batch, times, **kw)
            yield make_row("fp32_gemm_config", provider, mode, "tflops", "TFLOP/s", "batch", batch,
                           flops / (times[0] * 1e-3) / 1e12, **kw)


def summary(rows: list[dict]) -> list[str]:
    """Per product: the fastest Triton line and its ratio to _config's and to cuBLAS's."""
    best, yardsticks = {}, {}
    for r in rows:
        if r["metric"] != "time":
            continue
        if r["provider"] in (DEFAULT, VENDOR):
            yardsticks[r["mode"], r["provider"]] = r["p50"]
        if r["provider"] != VENDOR and (r["mode"] not in best or r["p50"] < best[r["mode"]][1]):
            best[r["mode"]] = (r["provider"], r["p50"])
    lines = []
    for mode, (provider, ms) in best.items():
        ratios = [f"{yardsticks[mode, y] / ms:.2f}x {y} {yardsticks[mode, y]:.3g} ms"
                  for y in (DEFAULT, VENDOR) if (mode, y) in yardsticks]
        lines.append(f"{mode}: {provider} {ms:.3g} ms ({'; '.join(ratios) or 'no yardstick'})")
    return lines


def run(device: torch.device, quick: bool = False, csv: str | None = None) -> list[dict]:
    device = torch.device(device)
    if device.type != "cuda" and not INTERPRETING:
        raise SystemExit("tune_fp32_gemm times a Triton kernel: it needs a CUDA device (or, to check the "
                         "script alone, TRITON_INTERPRET=1 set before the run)")
    batch, dim = (8192, DIM) if device.type == "cuda" else (8, 16)  # the CPU: the script alone, a toy size
    rows: list[dict] = []
    with tf32(False):  # cuBLAS's line as the QNN ran it: fp32 on the CUDA cores
        keep(rows, _rows(device, batch, dim), csv)
    if STOPPED.is_set():
        print("out of time: the cases after the last table line were not run")
    print_table(rows, f"3xTF32 fp32 GEMM launch configurations (B={batch}, D={dim}, M=4)")
    for line in summary(rows):
        print(line)
    return rows


def main(argv=None) -> None:
    kernel_bench_main(run, __doc__, "the same (one shape)", argv)


if __name__ == "__main__":
    main()
