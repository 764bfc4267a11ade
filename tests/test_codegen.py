"""bench/codegen.py: the kernels' GPU code for sm_89 and sm_90, checked on a machine without a GPU.

The suite runs under TRITON_INTERPRET=1 (conftest), where Triton cannot compile, so everything is
compiled once per module in a subprocess without it (bench.codegen.compile_in_subprocess).
"""
from __future__ import annotations

import importlib
from pathlib import Path

import pytest

from bench import codegen

ARCHS = (89, 90)
DTYPES = ("fp32", "bf16", "fp16")
# The launches at the paper's shapes; any further case a module returns is added below.
EXPECTED = {
    "kernels.sparse_target_attention": ["asta_fwd", "asta_bwd", "asta_gather_fwd", "asta_gather_bwd"],
    "kernels.quadratic_projection": ["qnn_dropout_sum", "qnn_masked_grad"],
}
HISTORY_POINTER = "x_ptr"  # the ASTA kernels' name for the history (B, L, D) or representations (U, D)
# The QNN passes around the vendor GEMMs are memory-bound: the (B, M*D) hidden and the masked
# gradient must move in 16-byte accesses.
QNN_WIDE_POINTERS = {"qnn_dropout_sum": "h_ptr", "qnn_masked_grad": "gy_ptr"}
# ... and what they write: y and s, and the (B, M*D) masked gradient G the GEMMs read.
QNN_WIDE_STORES = {"qnn_dropout_sum": ("y_ptr", "s_ptr"), "qnn_masked_grad": ("g_ptr", "gys_ptr")}


def _case_names(module_name: str) -> list[str]:
    """Expected names plus whatever codegen_cases returns. Guarded: while a module has no
    codegen_cases (or fails to import) the expected names still make their tests, which fail."""
    names = list(EXPECTED[module_name])
    try:
        import torch

        module = importlib.import_module(module_name)
        names += [c["name"] for c in module.codegen_cases(torch.bfloat16) if c["name"] not in names]
    except Exception:  # noqa: BLE001 - reported by the tests themselves
        pass
    return names


ALL_KERNELS = [name for module in EXPECTED for name in _case_names(module)]
ASTA_KERNELS = [k for k in ALL_KERNELS if k.startswith("asta")]
QNN_KERNELS = [k for k in ALL_KERNELS if k.startswith("qnn")]


def _params(kernels, dtypes=DTYPES, archs=ARCHS):
    return [pytest.param(k, d, a, id=f"{k}-{d}-sm_{a}") for k in kernels for d in dtypes for a in archs]


def _need_tools():
    import triton

    bindir = Path(triton.__file__).parent / "backends" / "nvidia" / "bin"
    if not (bindir / "cuobjdump").exists() or not (bindir / "ptxas").exists():
        # The triton wheel ships them; without them the generated code cannot be checked at all,
        # which must show as a failure, not a silent skip.
        pytest.fail(f"no NVIDIA tools (ptxas, cuobjdump) in {bindir}: the triton wheel should ship them")


@pytest.fixture(scope="module")
def records() -> list[dict]:
    """Every case of both kernel modules, all dtypes, both archs (about 20 s on 2 cores)."""
    _need_tools()
    return codegen.compile_in_subprocess(DTYPES, ARCHS)


@pytest.fixture(scope="module")
def examples() -> dict:
    """The toy kernels of bench.codegen, keyed by (kernel, dtype, arch)."""
    _need_tools()
    return {(r["kernel"], r["dtype"], r["arch"]): r
            for r in codegen.compile_in_subprocess(("fp32", "bf16"), ARCHS, examples=True)}


def _record(records, kernel, dtype, arch) -> dict:
    """The record of one compile; fails naming the kernel when it is missing or did not compile."""
    errors = [f"{r['kernel']} {r['dtype']} {r['arch']}: {r['error'][-500:]}" for r in records if "error" in r]
    found = [r for r in records if (r["kernel"], r["dtype"], r["arch"]) == (kernel, dtype, f"sm_{arch}")]
    assert found, f"{kernel} ({dtype}, sm_{arch}) was not compiled; errors: {errors or 'none'}"
    rec = found[0]
    assert "error" not in rec, f"{kernel} ({dtype}, sm_{arch}) failed to compile: {rec['error'][-2000:]}"
    return rec


# ----------------------------------------------------------------------------------------------
# The real kernels
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("kernel,dtype,arch", _params(ALL_KERNELS))
def test_kernel_compiles(records, kernel, dtype, arch):
    rec = _record(records, kernel, dtype, arch)
    assert rec["sass_instructions"] > 0 and rec["registers"] > 0, f"{kernel}: empty cubin? {rec}"


@pytest.mark.parametrize("kernel,dtype,arch", _params(ALL_KERNELS))
def test_kernel_does_not_spill(records, kernel, dtype, arch):
    rec = _record(records, kernel, dtype, arch)
    assert rec["local_memory"] == 0, (
        f"{kernel} ({dtype}, sm_{arch}) uses {rec['local_memory']} bytes of local memory (register spills "
        f"or stack) at {rec['registers']} registers/thread, {rec['num_warps']} warps")


# How wide each thread's loads of the history are: 4 values a thread in every dtype (the VEC of
# kernels/sparse_target_attention.py's _config), 16 bytes of fp32, 8 of 16-bit values, so that
# 16-bit tiles get fp32's thread layout.
HISTORY_LOAD_BITS = {"fp32": "128", "bf16": "64", "fp16": "64"}


@pytest.mark.parametrize("kernel,dtype,arch", _params(ASTA_KERNELS))
def test_asta_reads_history_in_whole_vectors(records, kernel, dtype, arch):
    rec = _record(records, kernel, dtype, arch)
    want = HISTORY_LOAD_BITS[dtype]
    by_pointer = rec["ptx_loads_by_pointer"]
    # Attributed through the PTX to the history pointer itself: every load of it is 4 values wide.
    assert by_pointer.get(HISTORY_POINTER) == want, (
        f"{kernel} ({dtype}, sm_{arch}) loads {HISTORY_POINTER} with {by_pointer.get(HISTORY_POINTER)}-bit "
        f"loads, not {want} (all pointers: {by_pointer})")
    # And ptxas kept loads that wide in the machine code.
    assert want in rec["load_widths"].split(","), f"{kernel}: SASS global loads {rec['load_widths']}"
    if kernel == "asta_bwd":  # the plain form writes the history's gradient, as large as the history
        stores = rec["ptx_stores_by_pointer"]
        assert stores.get("dx_ptr") == want, f"{kernel} ({dtype}, sm_{arch}) stores dx_ptr: {stores}"


@pytest.mark.parametrize("kernel,dtype,arch", _params(ASTA_KERNELS, dtypes=("bf16", "fp16")))
def test_asta_16_bit_tiles_have_the_fp32_layout(records, kernel, dtype, arch):
    """In Triton's own layout (16 bytes of 16-bit values a thread) the (8, 512) tile put its rows
    on two warps, and the sums over L crossed warps through shared memory each loop trip: 2-5 KB
    of shared memory where fp32 used 0.1-2 KB, and slower than fp32 on an H200 on half the bytes.
    With fp32's layout the 16-bit kernel needs no more shared memory than the fp32 one, and no
    more registers either (within 8: ptxas's choices differ between versions), unless those it
    adds cost no residency: Triton 3.6's ptxas gives the bf16 gathered backward 128 registers for
    sm_90 against fp32's 116, and both fit 4 blocks (16 warps) on an SM."""
    rec, fp32 = _record(records, kernel, dtype, arch), _record(records, kernel, "fp32", arch)
    assert rec["shared_memory"] <= fp32["shared_memory"], (
        f"{kernel} sm_{arch}: {dtype} uses {rec['shared_memory']} bytes of shared memory, fp32 {fp32['shared_memory']}")
    assert rec["registers"] <= fp32["registers"] + 8 or rec["occupancy"] >= fp32["occupancy"], (
        f"{kernel} sm_{arch}: {dtype} needs {rec['registers']} registers a thread (occupancy {rec['occupancy']:.3f}), "
        f"fp32 {fp32['registers']} ({fp32['occupancy']:.3f})")


def test_the_16_bit_forwards_launch_with_the_register_cap_their_code_is_checked_with(monkeypatch):
    """The cases above compile the 16-bit forwards with maxnreg (without it ptxas spilled one for
    sm_90 with Triton 3.3 and 3.6); the launcher must set the same cap, and none for fp32, under
    the interpreter, or for a forced configuration (the old layout spilled under it for sm_89),
    unless that forces a cap of its own."""
    import torch

    sta = importlib.import_module("kernels.sparse_target_attention")
    for dtype in (torch.bfloat16, torch.float16, torch.float32):
        caps = {c["name"]: c.get("maxnreg") for c in sta.codegen_cases(dtype)}
        want = sta.FORWARD_MAX_REGISTERS_16_BIT if dtype != torch.float32 else None
        assert caps == {"asta_fwd": want, "asta_bwd": None, "asta_gather_fwd": want, "asta_gather_bwd": None}, dtype
        monkeypatch.setattr(sta, "INTERPRETING", False)
        assert sta._register_cap(torch.empty(0, dtype=dtype)) == ({"maxnreg": want} if want else {})
        with sta.forced_config(VEC=0):  # a forced configuration (timed against _config's) gets ptxas's own choice
            assert sta._register_cap(torch.empty(0, dtype=dtype)) == {}
        with sta.forced_config(maxnreg=64):  # unless it forces the cap (bench_asta's register-cap rows), in any dtype
            assert sta._register_cap(torch.empty(0, dtype=dtype)) == {"maxnreg": 64}
        with sta.forced_config(VEC=0, maxnreg=64):
            assert sta._register_cap(torch.empty(0, dtype=dtype)) == {"maxnreg": 64}
        monkeypatch.setattr(sta, "INTERPRETING", True)
        assert sta._register_cap(torch.empty(0, dtype=dtype)) == {}
        with sta.forced_config(maxnreg=64):  # the interpreter has no registers to cap
            assert sta._register_cap(torch.empty(0, dtype=dtype)) == {}


@pytest.mark.parametrize("kernel,dtype,arch", _params(QNN_KERNELS))
def test_qnn_passes_use_128_bit_accesses(records, kernel, dtype, arch):
    rec = _record(records, kernel, dtype, arch)
    pointer = QNN_WIDE_POINTERS[kernel]
    assert rec["ptx_loads_by_pointer"].get(pointer) == "128", (
        f"{kernel} ({dtype}, sm_{arch}) loads {pointer} with {rec['ptx_loads_by_pointer'].get(pointer)}-bit "
        f"loads (all pointers: {rec['ptx_loads_by_pointer']})")
    assert "128" in rec["store_widths"].split(","), f"{kernel}: SASS global stores {rec['store_widths']}"
    stores = rec["ptx_stores_by_pointer"]
    for pointer in QNN_WIDE_STORES[kernel]:
        assert stores.get(pointer) == "128", (
            f"{kernel} ({dtype}, sm_{arch}) stores {pointer} with {stores.get(pointer)}-bit stores (all: {stores})")


FP32_GEMM_KERNELS = [f"fp32_gemm_{form}{product}" for form in ("", "presplit_") for product in ("forward", "grad_x", "grad_w")]


@pytest.mark.parametrize("kernel", FP32_GEMM_KERNELS)
def test_fp32_gemm_multiplies_on_sm_90_tensor_cores_without_spilling(records, kernel):
    """kernels/fp32_gemm.py, the QNN's three fp32 products in their layouts (x @ W.T, G @ W, G.T @ x),
    the operands split in the kernel or in memory first (presplit_), on Hopper, where they run:
    wgmma (HGMMA), nothing in local memory (32-deep slices spilled 24 bytes in G.T @ x). sm_89
    compiles too (HMMA), though no RTX 4090 runs it: the split does not pay there. Only fp32 has
    these cases."""
    rec = _record(records, kernel, "fp32", 90)
    assert "HGMMA" in rec["matrix_instructions"].split(","), rec["matrix_instructions"]
    # Every operand in 16-byte accesses: rows past M clamped with tl.where had cost the offsets their
    # contiguity, and G.T, W and x in the backward were read 4 bytes at a time.
    operands = {p: w for p, w in rec["ptx_loads_by_pointer"].items() if p in ("a_ptr", "b_ptr", "a_small_ptr", "b_small_ptr")}
    assert set(operands.values()) == {"128"}, f"{kernel}: operand loads {operands}"
    assert rec["local_memory"] == 0, f"{kernel}: {rec['local_memory']} bytes of local memory at {rec['registers']} registers"
    assert "HMMA" in _record(records, kernel, "fp32", 89)["matrix_instructions"].split(",")
    assert not [r for r in records if r["kernel"] == kernel and r["dtype"] != "fp32"]


def test_rows_follow_the_csv_schema(records):
    from bench import common

    rows = codegen.to_rows([r for r in records if r["kernel"] == "asta_fwd"] + [
        {"kernel": "broken", "dtype": "bf16", "arch": "sm_90", "error": "CompilationError: boom"}])
    assert rows and all(list(r)[:len(common.CSV_FIELDS)] == common.CSV_FIELDS for r in rows)
    assert {r["provider"] for r in rows} == {"sm_89", "sm_90"}
    assert {r["mode"] for r in rows} == {"codegen"}
    assert {r["device"] for r in rows} == {"compiled for sm_89 (RTX 4090)", "compiled for sm_90 (H100)"}
    metrics = {r["metric"] for r in rows}
    assert {"registers", "shared_memory", "local_memory", "occupancy", "load_width_bits", "store_width_bits",
            "sass_instructions", "matrix_instructions", "compile_error"} <= metrics
    matrix = [r for r in rows if r["metric"] == "matrix_instructions"]
    assert all(isinstance(r["p50"], str) for r in matrix)
    assert [r["p50"] for r in rows if r["metric"] == "compile_error"] == ["CompilationError: boom"]


def test_run_spawns_its_own_compiler():
    """run() is what `qin bench --codegen` calls, from a process that may be in interpreter mode."""
    _need_tools()
    rows = codegen.run(dtypes=("bf16",), archs=(89,))
    names = {r["kernel"] for r in rows}
    assert {"asta_fwd", "qnn_dropout_sum"} <= names, names
    assert all(r["provider"] == "sm_89" and r["dtype"] == "bf16" for r in rows)


def test_a_module_without_codegen_cases_is_named():
    # kernels.reference has no codegen_cases: a record per arch says so instead of raising.
    recs = codegen.compile_all(("kernels.reference",), ("fp32",), (89, 90))
    assert [r["arch"] for r in recs] == ["sm_89", "sm_90"]
    assert all("kernels.reference has no codegen_cases" in r["error"] for r in recs)


# ----------------------------------------------------------------------------------------------
# The parsing, on toy kernels with known code and on literal text
# ----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("arch", ARCHS)
def test_vector_add_uses_128_bit_accesses(examples, arch):
    rec = examples[("example_add", "fp32", f"sm_{arch}")]
    assert rec["load_widths"] == "128" and rec["store_widths"] == "128", rec
    assert rec["ptx_loads_by_pointer"] == {"x_ptr": "128", "y_ptr": "128"}
    assert rec["matrix_instructions"] == "none"
    assert rec["local_memory"] == 0 and rec["shared_memory"] == 0
    assert rec["num_warps"] == 4
    assert rec["occupancy"] == 1.0  # few registers, no shared memory: 12 (16) blocks of 4 warps fill the SM


@pytest.mark.parametrize("arch", ARCHS)
def test_a_kernel_that_spills_is_seen_to(examples, arch):
    """The positive control of test_kernel_does_not_spill: spills land in cuobjdump's STACK, which
    a local-memory figure of LOCAL alone would miss."""
    rec = examples[("example_spill", "fp32", f"sm_{arch}")]
    assert rec["local_memory"] > 1000, rec
    assert rec["num_warps"] == 1


def test_dot_uses_tensor_cores(examples):
    assert "HMMA" in examples[("example_dot", "bf16", "sm_89")]["matrix_instructions"].split(",")
    # Triton 3.9 uses wgmma for a 64x64 bf16 dot on Hopper.
    assert "HGMMA" in examples[("example_dot", "bf16", "sm_90")]["matrix_instructions"].split(",")
    assert examples[("example_dot", "bf16", "sm_89")]["shared_memory"] > 0


def test_parse_resource_usage():
    text = (" Function k:\n  REG:168 STACK:16 SHARED:1024 LOCAL:8 CONSTANT[0]:600 TEXTURE:0 SURFACE:0\n")
    assert codegen.parse_resource_usage(text) == {"registers": 168, "shared": 1024, "local": 8, "stack": 16}


SASS = """
        /*0150*/              @!P0 LDG.E.128 R16, [R12.64] ;                /* 0x000000040c108981 */
        /*0160*/                   LDG.E.U16 R20, [R14.64] ;                /* 0x000000040e148981 */
        /*0170*/                   LDG.E.EL.64.CONSTANT R4, [R12.64+0x800] ; /* 0x0 */
        /*0180*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR4][R8.64] ; /* 0x0 */
        /*0190*/                   HMMA.16816.F32.BF16 R24, R4, R8, R24 ;   /* 0x0 */
        /*01a0*/                   STG.E [R2.64], R16 ;                     /* 0x0 */
        /*01b0*/              @P1 STG.E.U16 [R2.64+0x800], R4 ;             /* 0x0 */
        /*01c0*/                   EXIT ;                                   /* 0x0 */
        /*01d0*/                   BRA 0x1d0;                               /* 0x0 */
        /*01e0*/                   NOP;                                     /* 0x0 */
"""


def test_parse_sass():
    assert codegen.global_access_widths(SASS) == {"load_widths": "16,64,128", "store_widths": "16,32"}
    # An asynchronous copy into shared memory reads global memory: it counts as a load.
    assert codegen.global_access_widths("        /*0180*/  LDGSTS.E.BYPASS.128 [R3], desc[UR4][R8.64] ;") == {
        "load_widths": "128", "store_widths": ""}
    assert codegen.matrix_instructions(SASS) == "HMMA,LDGSTS"
    assert codegen.matrix_instructions("        /*0000*/  EXIT ;") == "none"
    # Blackwell's (sm_100) tensor-core products.
    assert codegen.matrix_instructions("        /*0200*/  UTCHMMA gdesc[UR4], gdesc[UR6], tmem[UR8] ;") == "UTCHMMA"
    assert codegen.count_instructions(SASS) == 9  # the NOP padding is not counted


def test_ptx_loads_are_attributed_to_pointers():
    ptx = """
        ld.param.b64 	%rd1, [k_param_0];
        ld.param.b64 	%rd2, [k_param_1];
        ld.param.b32 	%r1, [k_param_2];
        mul.wide.s32 	%rd3, %r1, 2;
        add.s64 	%rd4, %rd1, %rd3;
        add.s64 	%rd5, %rd2, %rd3;
    $L__BB0_1:
        @%p1 ld.global.v4.b32 { %r2, %r3, %r4, %r5 }, [ %rd6 + 0 ];
        ld.global.b16 { %rs1 }, [ %rd5 + 0 ];
        cp.async.cg.shared.global [ %r9 + 0 ], [ %rd5 + 0 ], 0x10, %r8;
        add.s64 	%rd6, %rd4, 16;
        ld.global.b64 	%rd7, [ %rd4 + 0 ];
        add.s64 	%rd8, %rd2, %rd7;
        ld.global.b32 	%r10, [ %rd8 + 0 ];
        bra.uni 	$L__BB0_1;
    """
    # %rd6 is defined after its use in the loop: the pass must go round until nothing changes.
    # %rd7 is an index read through x_ptr: the address m_ptr + %rd7 is m_ptr's alone (a gather's
    # table read must not be credited to the index pointer).
    got = codegen.ptx_load_widths_by_pointer(ptx, ["x_ptr", "m_ptr", "L"], ["x_ptr", "m_ptr"])
    assert got == {"x_ptr": "64,128", "m_ptr": "16,32,128"}


def test_occupancy():
    # 255 registers -> 8192 a warp -> 8 warps an SM -> one block of 8 warps of sm_89's 48.
    assert codegen.occupancy(89, 255, 0, 8) == pytest.approx(8 / 48)
    # Shared memory bound: 49152 + 1 KB reserved -> 2 blocks in 100 KB (sm_89), 4 in 228 KB (sm_90).
    assert codegen.occupancy(89, 32, 49152, 4) == pytest.approx(2 * 4 / 48)
    assert codegen.occupancy(90, 32, 49152, 4) == pytest.approx(4 * 4 / 64)
    # Block-count bound: 1-warp blocks stop at 24 (sm_89) / 32 (sm_90) blocks an SM.
    assert codegen.occupancy(89, 16, 0, 1) == pytest.approx(24 / 48)
    assert codegen.occupancy(90, 16, 0, 1) == pytest.approx(32 / 64)
    # Registers go to a warp in units of 256: 100 a thread is 3,328 a warp (not 3,200), 19 warps of
    # 65,536, four blocks of 4 warps (unrounded, 20 warps: five blocks).
    assert codegen.occupancy(89, 100, 0, 4) == pytest.approx(16 / 48)
    # More shared memory than a block may have on sm_89, fine on sm_90.
    assert codegen.occupancy(89, 32, 120 * 1024, 4) == 0.0
    assert codegen.occupancy(90, 32, 120 * 1024, 4) == pytest.approx(4 / 64)


@pytest.mark.parametrize("args, named", [(["--archs", "80,75"], "75: expected compute capabilities among 80, 89, 90, 100"),
                                         (["--archs", ","], "',': expected compute capabilities"),
                                         (["--archs", "sm_8x"], "sm_8x: expected"),
                                         (["--dtypes", "bf17"], "bf17: expected dtypes among fp32, bf16, fp16, fp64")])
def test_unknown_targets_and_dtypes_are_refused_by_name(args, named, capsys):
    with pytest.raises(SystemExit) as stop:
        codegen.main(args)
    assert stop.value.code == 2 and named in capsys.readouterr().err


def test_the_table_exits_1_when_a_case_failed_to_compile(monkeypatch, capsys):
    """The suite runs under TRITON_INTERPRET=1, so main() goes through compile_in_subprocess."""
    ok = {"kernel": "k", "dtype": "fp32", "arch": "sm_89", "registers": 1, "shared_memory": 0, "local_memory": 0,
          "occupancy": 1.0, "load_widths": "", "store_widths": "", "matrix_instructions": "none",
          "sass_instructions": 1, "ptx_loads_by_pointer": {}, "ptx_stores_by_pointer": {}}
    failed = {"kernel": "k", "dtype": "fp32", "arch": "sm_90", "error": "RuntimeError: cuobjdump --dump-sass failed"}
    monkeypatch.setattr(codegen, "compile_in_subprocess", lambda *args: [ok])
    assert codegen.main(["--archs", "89", "--dtypes", "fp32"]) == 0
    monkeypatch.setattr(codegen, "compile_in_subprocess", lambda *args: [ok, failed])
    assert codegen.main(["--archs", "89,90", "--dtypes", "fp32"]) == 1
    assert "ERROR RuntimeError: cuobjdump --dump-sass failed" in capsys.readouterr().out
    assert codegen.main(["--json", "--archs", "89,90", "--dtypes", "fp32"]) == 0  # the records carry it


def test_a_failing_cuobjdump_says_why(tmp_path, monkeypatch):
    fake = tmp_path / "cuobjdump"
    fake.write_text("#!/bin/sh\necho 'nvdisasm fatal : CUDA architecture \"SM70\" is deprecated' >&2\nexit 1\n")
    fake.chmod(0o755)
    monkeypatch.setattr(codegen, "_nvidia_bin", lambda: tmp_path)
    with pytest.raises(RuntimeError, match='cuobjdump --dump-sass failed \\(1\\): nvdisasm fatal : CUDA architecture "SM70"'):
        codegen._cuobjdump("--dump-sass", tmp_path / "k.cubin")
