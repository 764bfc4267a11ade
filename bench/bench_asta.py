"""ASTA block (sparse target attention with its projections): literal vs hoisted, eager vs fused.

The block, with target t (B, D), history X (B, L, D), mask (B, L), Wq, Wk, Wv (d_a, D) and
Wo (D, d_a) in nn.Linear layout, D = 384, d_a = 768:
    literal eager    K = X Wk^T, V = X Wv^T, a = relu(mask * (t Wq^T) K^T / sqrt(d_a)),
                     out = (a V) Wo^T + t                       (B x L x d_a tensors K and V)
    hoisted eager    q~ = (t Wq^T) Wk / sqrt(d_a), z = reference op on (X, q~, mask),
                     out = (z Wv^T) Wo^T + t                    (nothing wider than B x L x D)
    hoisted compile  torch.compile of the hoisted block
    hoisted triton   the hoisted block with the fused Triton op (CUDA only)
The bare op ("asta_op", every position live) and its gathered form ("asta_gathered_op": history
rows read through a (B, L) index into the (U, D) distinct items' representations, U drawn like a
deduplicated batch) each against the reference, eager and under torch.compile, at B=8192, L=64,
in bf16, fp32 and fp16; the gathered form with every position live and with real masks, and
against the torch backend that "auto" trains with. "asta_tile_skip" (CUDA): the Triton gathered
op on real masks, skipping tiles of padding alone (as it runs) against reading every tile.
"asta_layout_plain" / "asta_layout_gathered" (CUDA, bf16 and fp16): the Triton ops with every
position live, in fp32's thread layout (as they run) against Triton's own layout for 16-bit values.
"asta_register_cap_plain" / "asta_register_cap_gathered" (CUDA, bf16): the same ops, every
position live, with the 16-bit forwards' register cap as they run (72) against a cap of 64.
"asta_reps_gradient": the torch backend's gradient into the representations, as the sparse
product it trains with and as the index_add_ it uses under CUDA graph capture.
Forward and forward+backward (gradients of X, t and the four weights), over batch (L=64) and
history length (B=8192 on CUDA). Histories are left-padded with a median of 6 items out of 64,
like the real data.

Order, so that a time box (bench/gpu_run.sh) cuts the least valuable rows: the bare ops (what the
targets and MEASURED_FASTER rest on) in every dtype first, bf16 then fp32 then fp16; the tile
skip in every dtype; the 16-bit layouts; the register cap; then, dtype by dtype, the representations' gradient and the block sweeps.
Each row is kept (and appended to --csv) as it is measured.

Figures per case: time; "bandwidth" = bytes of history the op must cover (B*L*D elements read
in the forward; read again plus its gradient written in the backward) / time, and its fraction
of the measured copy bandwidth; peak memory; speed-up over literal eager in the same run. The
fused kernel never loads padded positions, so with realistic masks its effective bandwidth can
exceed the copy ceiling; the "full mask" modes (every position live, the op alone) measure the
kernel's real bandwidth.

    python -m bench.bench_asta --device cuda [--quick] [--csv out.csv]
"""
from __future__ import annotations

import contextlib
import math

import torch

import kernels
from bench.common import (STOPPED, keep, kernel_bench_main, make_row, measure_copy_bandwidth_gbs, peak_memory_mb,
                          print_table, time_ms)
from kernels import reference
from kernels.sparse_target_attention import forced_config

DIM, ATTN_DIM, HIST_LEN = 384, 768, 64  # the paper's item width, d_a and history length
MEDIAN_LEN = 6  # median number of real items per history in the data


def realistic_mask(batch: int, seq_len: int, device, g: torch.Generator) -> torch.Tensor:
    """Left-padded (B, L) bool mask, lengths log-normal with median 6, clipped to [1, L]."""
    lengths = torch.exp(math.log(MEDIAN_LEN) + torch.randn(batch, generator=g)).round().clamp(1, seq_len)
    return (torch.arange(seq_len)[None, :] >= (seq_len - lengths)[:, None]).to(device)


def make_block(batch, seq_len, dtype, device, full_mask=False, seed=0):
    g = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        return (torch.randn(*shape, generator=g) * scale).to(device, dtype).requires_grad_()

    t, x = rand(batch, DIM), rand(batch, seq_len, DIM)
    weights = [rand(ATTN_DIM, DIM, scale=DIM**-0.5) for _ in range(3)] + [rand(DIM, ATTN_DIM, scale=ATTN_DIM**-0.5)]
    mask = (torch.ones(batch, seq_len, dtype=torch.bool, device=device) if full_mask
            else realistic_mask(batch, seq_len, device, g))
    grad_out = torch.randn(batch, DIM, generator=g).to(device, dtype)
    return t, x, mask, weights, grad_out


def literal(t, x, mask, wq, wk, wv, wo):
    q, k, v = t @ wq.T, x @ wk.T, x @ wv.T  # k, v: (B, L, d_a)
    scores = torch.einsum("bd,bld->bl", q, k) / math.sqrt(ATTN_DIM)
    pooled = torch.einsum("bl,bld->bd", torch.relu(scores * mask.to(x.dtype)), v)
    return pooled @ wo.T + t


def hoisted(op):
    """The hoisted block around an ASTA op (history, query, mask) -> (B, D)."""
    def block(t, x, mask, wq, wk, wv, wo):
        query = ((t @ wq.T) @ wk) / math.sqrt(ATTN_DIM)
        return (op(x, query, mask) @ wv.T) @ wo.T + t
    return block


def _providers(device) -> dict:
    """provider -> block function. The first is the baseline every ratio refers to. Triton before
    compile: a time box that cuts a stage in a cold compile keeps the Triton line."""
    out = {"literal eager": literal, "hoisted eager": hoisted(reference.sparse_target_attention)}
    if device.type == "cuda":
        out["hoisted triton"] = hoisted(lambda x, q, m: kernels.sparse_target_attention(x, q, m, backend="triton"))
        out["hoisted compile"] = torch.compile(hoisted(reference.sparse_target_attention))
    return out


def _op_providers(device) -> dict:
    """The bare op, for the full-mask bandwidth figures (CUDA only: that is where Triton runs).
    The first is the baseline; every line but "triton" is a torch-only alternative (Triton before
    compile, as in _providers)."""
    return {"reference eager": reference.sparse_target_attention,
            "triton": lambda x, q, m: kernels.sparse_target_attention(x, q, m, backend="triton"),
            "reference compile": torch.compile(reference.sparse_target_attention)}


def _gathered_providers(device) -> dict:
    """The gathered op (reps (U, D), index (B, L)): the reference gathers with F.embedding, so it
    materialises the (B, L, D) history and sums its gradient with the sort-based embedding backward.
    "torch backend" is what backend="torch" (and so "auto" until Triton measures faster) trains
    with: the history gathered again in backward instead of kept, its gradient into reps one
    sparse product (reference.regathered_sparse_target_attention; its forward is the reference's).
    Triton's evidence for MEASURED_FASTER is against the best of these torch-only lines."""
    out = {"reference eager": reference.gathered_sparse_target_attention,
           "torch backend": reference.regathered_sparse_target_attention}
    if device.type == "cuda":  # the CPU times the eager lines only: its numbers only smoke-test the code
        out["triton"] = lambda r, i, q, m: kernels.gathered_sparse_target_attention(r, i, q, m, backend="triton")
        out["reference compile"] = torch.compile(reference.gathered_sparse_target_attention)
    return out


def _measure(fn, device):
    fn()  # compile / warm up outside the timing
    return time_ms(fn, device), peak_memory_mb(fn, device)


def _case_rows(kernel, providers, args, grad_inputs, grad_out, history, x_name, x_value, dtype, device,
               copy_gbs, full_mask, speedup="speedup_vs_literal", contexts=None):
    """time, bandwidth, fraction of copy bandwidth, peak memory of each provider, and its speed-up
    over the first provider (the baseline) measured in the same call; yields each row as it is measured.
    contexts: provider -> a context its forward and backward run in (a forced kernel configuration)."""
    base, baseline = {}, next(iter(providers))
    hist_bytes = history.numel() * history.element_size()
    kw = dict(device=device, dtype=dtype)
    suffix = " full mask" if full_mask else ""
    for provider, block in providers.items():
        if STOPPED.is_set():
            break

        def fwd():
            with torch.no_grad():
                block(*args)

        def fwd_bwd():
            torch.autograd.grad(block(*args), grad_inputs, grad_out)

        for mode, fn, nbytes in (("fwd", fwd, hist_bytes), ("fwd+bwd", fwd_bwd, 3 * hist_bytes)):
            mode = mode + suffix
            try:
                with (contexts or {}).get(provider, contextlib.nullcontext)():
                    times, memory = _measure(fn, device)
            except Exception as exc:  # torch.compile may be unavailable, literal may run out of memory
                print(f"skipping {provider} {mode} {x_name}={x_value}: {type(exc).__name__}: {str(exc)[:120]}")
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            gbs = nbytes / (times[0] * 1e-3) / 1e9
            row = lambda metric, unit, value: make_row(kernel, provider, mode, metric, unit, x_name, x_value, value, **kw)
            yield from (row("time", "ms", times), row("bandwidth", "GB/s", gbs),
                        row("fraction_of_peak", "x", gbs / copy_gbs))
            if memory is not None:
                yield row("peak_memory", "MB", memory)
            # Against the first provider only: where it failed (literal eager out of memory), no
            # ratio, rather than one against whichever provider ran next under the same name.
            if provider == baseline:
                base[mode] = times[0]
            elif mode in base:
                yield row(speedup, "x", base[mode] / times[0])


def _block_rows(batch, seq_len, dtype, device, copy_gbs, x_name, x_value, full_mask=False):
    t, x, mask, weights, grad_out = make_block(batch, seq_len, dtype, device, full_mask)
    yield from _case_rows("asta_block", _providers(device), (t, x, mask, *weights), (x, t, *weights), grad_out, x,
                          x_name, x_value, dtype, device, copy_gbs, full_mask)
    del t, x, mask, weights, grad_out
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _op_rows(batch, seq_len, dtype, device, copy_gbs):
    """The bare op with every position live: the kernel's true memory bandwidth. Yields rows as measured."""
    _, x, mask, _, grad_out = make_block(batch, seq_len, dtype, device, full_mask=True)
    query = (torch.randn(batch, DIM, device=device, dtype=dtype) / DIM**0.5).requires_grad_()
    yield from _case_rows("asta_op", _op_providers(device), (x, query, mask), (x, query), grad_out, x,
                          "batch", batch, dtype, device, copy_gbs, full_mask=True, speedup="speedup_vs_reference")


def make_gathered(batch, seq_len, dtype, device, full_mask, seed=0):
    """(reps, index, query, mask, grad_out) drawn like a deduplicated batch: history ids skewed
    over a catalogue of B*L/4 items (popular items repeat, as in real data), padding positions on
    item 0, then torch.unique, so reps holds only the U distinct items the batch names."""
    g = torch.Generator().manual_seed(seed)
    catalogue = max(batch * seq_len // 4, 2)
    mask = (torch.ones(batch, seq_len, dtype=torch.bool) if full_mask
            else realistic_mask(batch, seq_len, "cpu", g))
    ids = (torch.rand(batch, seq_len, generator=g) ** 2 * (catalogue - 1)).long() + 1  # skewed to low ids
    ids = ids.where(mask, 0)
    unique, index = torch.unique(ids, return_inverse=True)
    reps = torch.randn(len(unique), DIM, generator=g).to(device, dtype).requires_grad_()
    query = (torch.randn(batch, DIM, generator=g) / DIM**0.5).to(device, dtype).requires_grad_()
    grad_out = torch.randn(batch, DIM, generator=g).to(device, dtype)
    return reps, index.to(device), query, mask.to(device), grad_out


def _gathered_rows(batch, seq_len, dtype, device, copy_gbs, full_mask):
    """The gathered op against F.embedding + reference and the torch backend. Bandwidth counts the
    bytes of the (B, L, D) history the plain op would read (never formed here), so the fractions
    compare with asta_op's. Yields each row as it is measured."""
    reps, index, query, mask, grad_out = make_gathered(batch, seq_len, dtype, device, full_mask)
    history = torch.empty(batch, seq_len, DIM, dtype=dtype, device="meta")  # only its size is used
    yield from _case_rows("asta_gathered_op", _gathered_providers(device), (reps, index, query, mask),
                          (reps, query), grad_out, history, "batch", batch, dtype, device, copy_gbs, full_mask,
                          speedup="speedup_vs_reference")
    yield make_row("asta_gathered_op", "data", "fwd" + (" full mask" if full_mask else ""), "distinct_items",
                   "U", "batch", batch, float(reps.shape[0]), device=device, dtype=dtype)


def _tile_skip_rows(batch, seq_len, dtype, device, copy_gbs):
    """The Triton gathered op as it runs (skipping tiles of padding alone, most of a left-padded
    history) against the same kernels reading every tile, on real masks; yields each row as it is
    measured. The skip stays only where this shows it pays."""
    reps, index, query, mask, grad_out = make_gathered(batch, seq_len, dtype, device, full_mask=False)
    history = torch.empty(batch, seq_len, DIM, dtype=dtype, device="meta")  # only its size is used
    triton = lambda r, i, q, m: kernels.gathered_sparse_target_attention(r, i, q, m, backend="triton")
    every_tile = "triton, reading every tile"
    yield from _case_rows("asta_tile_skip", {every_tile: triton, "triton, skipping padding tiles": triton},
                          (reps, index, query, mask), (reps, query), grad_out, history, "batch", batch, dtype, device,
                          copy_gbs, False, speedup="speedup_vs_every_tile",
                          contexts={every_tile: lambda: forced_config(SKIP_EMPTY_TILES=False)})


def _layout_rows(batch, seq_len, dtype, device, copy_gbs):
    """The Triton ops as they run (4 values of a row a thread: fp32's thread layout in every dtype)
    against the same kernels in Triton's own layout for the dtype (VEC=0: 16 bytes a thread, which
    for 16-bit values splits a tile's rows over warps), every position live: the plain op and the
    gathered one. The forced line is the kernels as they were before the layout changed (no
    register cap either: kernels.sparse_target_attention._register_cap). 16-bit dtypes only: in
    fp32 the two layouts are the same code. Yields each row as it is measured; the layout stays
    only where this shows it pays."""
    yield from _forced_against_as_run("asta_layout", "triton, Triton's own layout", "triton, fp32's layout",
                                      lambda: forced_config(VEC=0), "speedup_vs_triton_layout", batch, seq_len, dtype,
                                      device, copy_gbs)


def _forced_against_as_run(prefix, forced, as_run, context, speedup, batch, seq_len, dtype, device, copy_gbs):
    """The Triton plain op (table prefix_plain), then the gathered one (prefix_gathered), every
    position live, launched first within context() (provider `forced`), then as they run (`as_run`,
    with its speed-up over the forced line). Yields each row as it is measured."""
    _, x, mask, _, grad_out = make_block(batch, seq_len, dtype, device, full_mask=True)
    query = (torch.randn(batch, DIM, device=device, dtype=dtype) / DIM**0.5).requires_grad_()
    plain = lambda x, q, m: kernels.sparse_target_attention(x, q, m, backend="triton")
    yield from _case_rows(f"{prefix}_plain", {forced: plain, as_run: plain}, (x, query, mask), (x, query), grad_out,
                          x, "batch", batch, dtype, device, copy_gbs, True, speedup=speedup,
                          contexts={forced: context})
    del x, query, mask, grad_out
    reps, index, query, mask, grad_out = make_gathered(batch, seq_len, dtype, device, full_mask=True)
    history = torch.empty(batch, seq_len, DIM, dtype=dtype, device="meta")  # only its size is used
    gathered = lambda r, i, q, m: kernels.gathered_sparse_target_attention(r, i, q, m, backend="triton")
    yield from _case_rows(f"{prefix}_gathered", {forced: gathered, as_run: gathered}, (reps, index, query, mask),
                          (reps, query), grad_out, history, "batch", batch, dtype, device, copy_gbs, True,
                          speedup=speedup, contexts={forced: context})


# The register cap timed against the 16-bit forwards' own (FORWARD_MAX_REGISTERS_16_BIT, 72). From the
# code alone (bench.codegen on the CPU): for sm_90, ptxas fits both forwards in 64 registers without
# spilling (Triton 3.6 and 3.9), which is fp32's occupancy tier (0.50 against 0.44); for sm_89 a cap
# of 64 spills with Triton 3.6. Whether the tier pays is for these rows to say.
REGISTER_CAP_CANDIDATE = 64


def _register_cap_rows(batch, seq_len, dtype, device, copy_gbs):
    """The Triton ops as they run (16-bit forwards capped at FORWARD_MAX_REGISTERS_16_BIT registers
    a thread) against the same kernels with the forwards capped at REGISTER_CAP_CANDIDATE, every
    position live: the plain op and the gathered one. The backward is the same code in both (the
    cap is the forwards'); fwd+bwd says what the forward's change is worth in training. Yields each
    row as it is measured; the cap changes only where this shows it pays."""
    yield from _forced_against_as_run("asta_register_cap", f"triton, maxnreg {REGISTER_CAP_CANDIDATE}",
                                      "triton, maxnreg as run", lambda: forced_config(maxnreg=REGISTER_CAP_CANDIDATE),
                                      "speedup_vs_other_register_cap", batch, seq_len, dtype, device, copy_gbs)


def _reps_gradient_rows(batch, seq_len, dtype, device):
    """The torch backend's gradient into reps, formed both ways it can be on one deduplicated batch:
    the sparse product it trains with (its coalescing sorts 2*B*L entries and sizes the result on
    the host) and the blockwise index_add_ it uses under CUDA graph capture (no sort, no host sync;
    equal sums: tests/test_cuda_graphs.py). Which is faster on a GPU says which the torch path
    should use there. Yields each row as it is measured."""
    reps, index, _, mask, grad_z = make_gathered(batch, seq_len, dtype, device, full_mask=False)
    g = torch.Generator().manual_seed(1)
    live = mask.to(dtype)
    weights = torch.rand(batch, seq_len, generator=g).to(device, dtype) * live  # relu(s * m): >= 0
    grad_s = torch.randn(batch, seq_len, generator=g).to(device, dtype) * live
    query = torch.randn(batch, DIM, generator=g).to(device, dtype)
    ways = {"sparse product": reference._reps_gradient_by_sparse_product,
            "scatter": reference._reps_gradient_by_scatter}
    base = None
    for provider, way in ways.items():
        if STOPPED.is_set():
            break
        times = time_ms(lambda: way(index, weights, grad_s, grad_z, query, reps.shape[0]), device)
        row = lambda metric, unit, value: make_row("asta_reps_gradient", provider, "bwd", metric, unit, "batch",
                                                   batch, value, device=device, dtype=dtype)
        yield row("time", "ms", times)
        if base is None:
            base = times[0]
        else:
            yield row("speedup_vs_sparse_product", "x", base / times[0])


def run(device: torch.device, quick: bool = False, csv: str | None = None) -> list[dict]:
    device = torch.device(device)
    if device.type == "cuda":  # bf16 first: most targets are bf16's; fp16 last, no target rests on it alone
        dtypes = [torch.bfloat16, torch.float32, torch.float16]
        batches = [8192] if quick else [1024, 2048, 4096, 8192, 16384]
        lengths = [] if quick else [16, 32, 128, 256]  # L=64 is in the batch sweep
        length_batch = 8192
    else:  # the CPU runs the two eager forms only, at small sizes
        dtypes = [torch.float32]
        batches = [256] if quick else [256, 1024]
        lengths = [] if quick else [16, 128]
        length_batch = 256
    rows = []
    copy_gbs = measure_copy_bandwidth_gbs(device, 64 if quick or device.type == "cpu" else 512)
    keep(rows, [make_row("copy", "torch", "ceiling", "bandwidth", "GB/s", "", "", copy_gbs, device=device, dtype="fp32")],
         csv)
    paper = 8192 if device.type == "cuda" else batches[-1]

    def op_rows(dtype):  # the bare ops: the targets and MEASURED_FASTER rest on them
        if device.type == "cuda":
            yield from _op_rows(paper, HIST_LEN, dtype, device, copy_gbs)
        for full in (True, False):
            yield from _gathered_rows(paper, HIST_LEN, dtype, device, copy_gbs, full)

    def tile_skip_rows(dtype):  # whether the kernels' skip pays: after every dtype's op rows
        if device.type == "cuda":
            yield from _tile_skip_rows(paper, HIST_LEN, dtype, device, copy_gbs)

    def layout_rows(dtype):  # whether fp32's thread layout pays for 16-bit values: after the tile skip
        if device.type == "cuda" and dtype != torch.float32:
            yield from _layout_rows(paper, HIST_LEN, dtype, device, copy_gbs)

    def register_cap_rows(dtype):  # whether a cap of 64 pays for the 16-bit forwards: bf16 stands for both
        if device.type == "cuda" and dtype == torch.bfloat16:
            yield from _register_cap_rows(paper, HIST_LEN, dtype, device, copy_gbs)

    def sweep_rows(dtype):
        yield from _reps_gradient_rows(paper, HIST_LEN, dtype, device)
        if device.type == "cuda":  # every position live: the paper's shape at full density
            yield from _block_rows(paper, HIST_LEN, dtype, device, copy_gbs, "batch", paper, full_mask=True)
        for b in batches:
            yield from _block_rows(b, HIST_LEN, dtype, device, copy_gbs, "batch", b)
        for n in lengths:
            yield from _block_rows(length_batch, n, dtype, device, copy_gbs, "history_len", n)

    for rows_of in (op_rows, tile_skip_rows, layout_rows, register_cap_rows, sweep_rows):
        for dtype in dtypes:
            if STOPPED.is_set():
                break
            torch._dynamo.reset()  # a fresh compile cache per dtype: never past its recompile limit
            keep(rows, rows_of(dtype), csv)
    if STOPPED.is_set():
        print("out of time: the cases after the last table line were not run")
    print_table(rows, f"ASTA block (D={DIM}, d_a={ATTN_DIM}, L={HIST_LEN} unless swept; "
                      f"histories left-padded, median {MEDIAN_LEN} items)")
    return rows


def main(argv=None) -> None:
    kernel_bench_main(run, __doc__, "one batch size (CPU: B=256)", argv)


if __name__ == "__main__":
    main()
