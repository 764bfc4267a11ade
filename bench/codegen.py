"""`python -m bench.codegen [--json] [--csv PATH]`: the GPU code of every Triton kernel, without a GPU.

Triton compiles for a named target on any machine: each kernel case that the kernel modules
describe (`codegen_cases(dtype)`: the launches at the paper's shapes) is compiled for sm_89
(RTX 4090) and sm_90 (H100), and the cubin is read with the cuobjdump that ships in the triton
wheel. Per (kernel, dtype, arch) this reports registers, shared and local (spill) memory, the
theoretical occupancy those allow, the widths of global loads and stores, the matrix and
async-copy instructions used, and the SASS instruction count. Loads are also attributed to the
kernel's pointer arguments through the PTX, so "history is read with 128-bit loads" can be
checked for the history pointer itself rather than for the widest load in the kernel.

Compiling needs a process without TRITON_INTERPRET=1 (under the interpreter @triton.jit functions
are interpreted, not compiled). `run()` therefore always works through a subprocess, so it can be
called from the test suite or the benchmark report whatever mode they run in.
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
KERNEL_MODULES = ("kernels.sparse_target_attention", "kernels.quadratic_projection", "kernels.fp32_gemm")
DTYPES = ("fp32", "bf16", "fp16")
ARCHS = (89, 90)
ARCH_NAMES = {80: "A100", 89: "RTX 4090", 90: "H100", 100: "B200"}  # ARCHS: the ones compiled by default

# Per-SM limits for the occupancy estimate (CUDA C Programming Guide, compute capabilities table).
# shared_sm is what one SM can give to blocks; shared_block is the most one block may ask for.
SM_LIMITS = {
    80: dict(regs=65536, max_warps=64, max_blocks=32, shared_sm=164 * 1024, shared_block=163 * 1024),
    89: dict(regs=65536, max_warps=48, max_blocks=24, shared_sm=100 * 1024, shared_block=99 * 1024),
    90: dict(regs=65536, max_warps=64, max_blocks=32, shared_sm=228 * 1024, shared_block=227 * 1024),
    100: dict(regs=65536, max_warps=64, max_blocks=32, shared_sm=228 * 1024, shared_block=227 * 1024),
}
REG_ALLOC_UNIT = 256        # registers are handed to a warp in chunks of 256
SHARED_RESERVED = 1024      # the CUDA runtime keeps 1 KB of shared memory per block (sm_80+)

# Instructions worth naming in the table: tensor-core products and asynchronous copies.
# (Blackwell's tensor-core products are the UTC*MMA family.)
MATRIX_OPS = ("HMMA", "HGMMA", "IMMA", "DMMA", "UTCHMMA", "UTCQMMA", "UTCIMMA", "UTCOMMA", "LDGSTS", "UTMALDG")


# ----------------------------------------------------------------------------------------------
# Compiling (only in a process without TRITON_INTERPRET)
# ----------------------------------------------------------------------------------------------

def _nvidia_bin() -> Path:
    import triton

    return Path(triton.__file__).parent / "backends" / "nvidia" / "bin"


def _torch_dtype(dtype: str):
    import torch

    return {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16, "fp64": torch.float64}[dtype]


def compile_case(case: dict, arch: int, dtype: str = "") -> dict:
    """Compile one case for sm_<arch> and return its record (see module docstring)."""
    if os.environ.get("TRITON_INTERPRET") == "1":
        raise RuntimeError("compile_case needs a process without TRITON_INTERPRET=1; use run()")
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    options = {"num_warps": case.get("num_warps", 4)}
    if case.get("num_stages") is not None:
        options["num_stages"] = case["num_stages"]
    if case.get("maxnreg") is not None:  # a register cap the launcher sets
        options["maxnreg"] = case["maxnreg"]
    src = ASTSource(case["fn"], case["signature"], case.get("constexprs") or {}, case.get("attrs"))
    # Triton and ptxas may print diagnostics; keep stdout clean for --json.
    with contextlib.redirect_stdout(sys.stderr):
        kernel = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)

    with tempfile.TemporaryDirectory() as tmp:
        cubin = Path(tmp) / "kernel.cubin"
        cubin.write_bytes(kernel.asm["cubin"])
        usage = _cuobjdump("--dump-resource-usage", cubin)
        sass = _cuobjdump("--dump-sass", cubin)

    resources = parse_resource_usage(usage)
    metadata = kernel.metadata
    num_warps = int(metadata.num_warps)
    # Triton allocates its shared memory dynamically (metadata.shared); cuobjdump sees the static part.
    shared = resources["shared"] + int(metadata.shared)
    pointer_args = [a for a, t in case["signature"].items() if t.startswith("*")]
    return {
        "kernel": case["name"], "dtype": dtype, "arch": f"sm_{arch}",
        "registers": resources["registers"], "shared_memory": shared,
        "local_memory": resources["local"] + resources["stack"],
        "num_warps": num_warps, "num_stages": int(metadata.num_stages),
        "occupancy": occupancy(arch, resources["registers"], shared, num_warps),
        **global_access_widths(sass),
        "matrix_instructions": matrix_instructions(sass),
        "sass_instructions": count_instructions(sass),
        "ptx_loads_by_pointer": ptx_load_widths_by_pointer(kernel.asm["ptx"], _value_args(case), pointer_args),
        "ptx_stores_by_pointer": ptx_store_widths_by_pointer(kernel.asm["ptx"], _value_args(case), pointer_args),
    }


def _cuobjdump(flag: str, cubin: Path) -> str:
    proc = subprocess.run([str(_nvidia_bin() / "cuobjdump"), flag, str(cubin)], capture_output=True, text=True)
    if proc.returncode != 0:  # its reason (an architecture the wheel's tools dropped, say) is on stderr
        raise RuntimeError(f"cuobjdump {flag} failed ({proc.returncode}): {proc.stderr.strip() or proc.stdout.strip()}")
    return proc.stdout


def _value_args(case: dict) -> list[str]:
    """The arguments that become kernel parameters, in order (constexprs are folded away)."""
    return [a for a, t in case["signature"].items() if t != "constexpr"]


# ----------------------------------------------------------------------------------------------
# Parsing (plain text in, numbers out: tested on toy kernels)
# ----------------------------------------------------------------------------------------------

def parse_resource_usage(text: str) -> dict:
    """REG / SHARED / LOCAL / STACK of the (single) function in `cuobjdump --dump-resource-usage`."""
    def field(name):
        m = re.search(rf"\b{name}:(\d+)", text)
        return int(m.group(1)) if m else 0

    return {"registers": field("REG"), "shared": field("SHARED"), "local": field("LOCAL"), "stack": field("STACK")}


# One SASS instruction line: "/*0150*/  @!P0 LDG.E.128 R16, [R12.64] ;". Captures the opcode.
_SASS_LINE = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)", re.MULTILINE)
# Width modifiers of memory instructions; no modifier means 32 bits.
_WIDTHS = {"U8": 8, "S8": 8, "U16": 16, "S16": 16, "64": 64, "128": 128}


def sass_opcodes(sass: str) -> list[str]:
    return _SASS_LINE.findall(sass)


def _width(opcode: str) -> int:
    for modifier in opcode.split(".")[1:]:
        if modifier in _WIDTHS:
            return _WIDTHS[modifier]
    return 32


def global_access_widths(sass: str) -> dict:
    """Sorted distinct bit widths of global loads (LDG, and LDGSTS which reads global memory
    into shared) and global stores (STG), as "16,128"-style strings ("" when there are none)."""
    loads, stores = set(), set()
    for op in sass_opcodes(sass):
        base = op.split(".")[0]
        if base in ("LDG", "LDGSTS"):
            loads.add(_width(op))
        elif base == "STG":
            stores.add(_width(op))
    return {"load_widths": ",".join(map(str, sorted(loads))), "store_widths": ",".join(map(str, sorted(stores)))}


def matrix_instructions(sass: str) -> str:
    """Which of MATRIX_OPS appear, e.g. "HMMA,LDGSTS", or "none"."""
    present = {op.split(".")[0] for op in sass_opcodes(sass)}
    found = [op for op in MATRIX_OPS if op in present]
    return ",".join(found) or "none"


def count_instructions(sass: str) -> int:
    """SASS instructions, not counting the NOP padding after the final EXIT."""
    return sum(1 for op in sass_opcodes(sass) if op != "NOP")


def occupancy(arch: int, registers: int, shared_bytes: int, num_warps: int) -> float:
    """Theoretical fraction of the SM's warp slots in use, from the three per-SM limits.

    0.0 when a block cannot launch at all (too much shared memory, or more than 255 registers).
    """
    lim = SM_LIMITS[arch]
    if shared_bytes > lim["shared_block"] or registers > 255 or num_warps <= 0:
        return 0.0
    regs_per_warp = -(-max(registers, 1) * 32 // REG_ALLOC_UNIT) * REG_ALLOC_UNIT  # round up
    blocks_by_regs = (lim["regs"] // regs_per_warp) // num_warps
    blocks_by_shared = lim["shared_sm"] // (shared_bytes + SHARED_RESERVED)
    blocks_by_warps = lim["max_warps"] // num_warps
    blocks = min(blocks_by_regs, blocks_by_shared, blocks_by_warps, lim["max_blocks"])
    return blocks * num_warps / lim["max_warps"]


# PTX: "ld.param.b64 %rd9, [kernel_param_1];" names which parameter a register holds.
_PTX_PARAM = re.compile(r"ld\.param\.\w+\s+(%\w+),\s*\[\w+_param_(\d+)\]")
_PTX_REG = re.compile(r"%\w+")
# "@%p5 ld.global.v4.b32 { %r69, .. }, [ %rd25 + 0 ];" (modifiers such as .nc or .L1::evict_last may
# come first): vector count, element bits, address register.
_PTX_GLOBAL_LOAD = re.compile(r"\bld\.global\.(?:[\w:]+\.)*?(?:v(\d)\.)?[busf](\d+)\b.*\[\s*(%\w+)")
# "cp.async.cg.shared.global [ %r101 + 0 ], [ %rd16 + 0 ], 0x10, %r102;": global address, bytes.
_PTX_ASYNC_COPY = re.compile(r"\bcp\.async\.c[ag]\.shared\.global\S*\s*\[[^\]]*\],\s*\[\s*(%\w+)[^\]]*\],\s*(0x[0-9a-fA-F]+|\d+)")


# "@%p3 st.global.v4.b32 [ %rd30 + 0 ], { %r41, .. };": vector count, element bits, address register.
_PTX_GLOBAL_STORE = re.compile(r"\bst\.global\.(?:[\w:]+\.)*?(?:v(\d)\.)?[busf](\d+)\s*\[\s*(%\w+)")


def _pointer_taint(ptx: str, value_args: list[str], pointer_args: list[str]) -> tuple[dict, list[str]]:
    """({register: the pointer args its value derives from}, the PTX's instructions).

    A forward taint pass over the PTX: a register loaded from a pointer parameter carries that
    pointer's name, and every instruction passes the names of its source registers to its
    destination registers. Repeated until nothing changes, because loops carry values backwards
    through `mov`s at the end of their bodies. Only pointer parameters are tracked, so an address
    built as x_ptr + row * stride names x_ptr alone.
    """
    taint: dict[str, set] = {}
    for reg, index in _PTX_PARAM.findall(ptx):
        index = int(index)
        if index < len(value_args) and value_args[index] in pointer_args:
            taint.setdefault(reg, set()).add(value_args[index])

    lines = [ln.split("//")[0].strip() for ln in ptx.splitlines()]
    # Instructions only: no directives (.reg, .loc), scope braces or labels ($L__BB0_2:).
    instructions = [ln for ln in lines if ln and not ln.startswith((".", "{", "}", "$"))]
    changed = True
    while changed:
        changed = False
        for ins in instructions:
            ins = re.sub(r"^@!?%\w+\s+", "", ins)  # drop the predicate guard
            # No destination register (stores, branches), or a value that is not an address: what a
            # load returns is data, so it does not carry the pointer's name on.
            if ins.startswith(("st.", "red.", "atom.", "bar.", "ret", "bra", "ld.", "cp.")):
                continue
            regs = _PTX_REG.findall(ins)
            if len(regs) < 2:
                continue
            # Destinations: the first operand, or the whole { %a, %b } vector of a vector load.
            head = ins.split(None, 1)[1] if " " in ins else ""
            if head.startswith("{"):
                dests = _PTX_REG.findall(head[: head.index("}")])
            else:
                dests = regs[:1]
            sources = set()
            for reg in regs[len(dests):]:
                sources |= taint.get(reg, set())
            for dest in dests:
                if not sources <= taint.setdefault(dest, set()):
                    taint[dest] |= sources
                    changed = True

    return taint, instructions


def ptx_load_widths_by_pointer(ptx: str, value_args: list[str], pointer_args: list[str]) -> dict:
    """{pointer arg: "64,128"}: bit widths of the global loads whose address derives from it."""
    taint, instructions = _pointer_taint(ptx, value_args, pointer_args)
    widths: dict[str, set] = {}
    for ins in instructions:
        load, copy = _PTX_GLOBAL_LOAD.search(ins), _PTX_ASYNC_COPY.search(ins)
        if load:
            vector, bits, address = load.groups()
            total = int(bits) * int(vector or 1)
        elif copy:  # asynchronous global -> shared copy (LDGSTS): reads global memory too
            address, size = copy.groups()
            total = int(size, 0) * 8
        else:
            continue
        for name in taint.get(address) or {"?"}:
            widths.setdefault(name, set()).add(total)
    return {name: ",".join(map(str, sorted(w))) for name, w in sorted(widths.items())}


def ptx_store_widths_by_pointer(ptx: str, value_args: list[str], pointer_args: list[str]) -> dict:
    """{pointer arg: "32,128"}: bit widths of the global stores whose address derives from it
    (atomic adds are not stores, and are left out)."""
    taint, instructions = _pointer_taint(ptx, value_args, pointer_args)
    widths: dict[str, set] = {}
    for ins in instructions:
        store = _PTX_GLOBAL_STORE.search(ins)
        if store:
            vector, bits, address = store.groups()
            for name in taint.get(address) or {"?"}:
                widths.setdefault(name, set()).add(int(bits) * int(vector or 1))
    return {name: ",".join(map(str, sorted(w))) for name, w in sorted(widths.items())}


# ----------------------------------------------------------------------------------------------
# Cases: the kernel modules' codegen_cases, or small examples for the parser tests
# ----------------------------------------------------------------------------------------------

def _example_cases(dtype: str) -> list[dict]:
    """Toy kernels with known code, used by tests/test_codegen.py to test the parsing: a vector
    add (fp32, BLOCK=1024, 4 warps: 4 consecutive floats a thread, so LDG.E.128), a 64x64x64
    tl.dot (16-bit inputs: HMMA on sm_89), and (fp32) a kernel that must spill, the positive
    control of "nothing spills"."""
    # Triton 3.3 (seen with 3.3.1) reads the string annotations (`from __future__ import annotations`)
    # in the kernel's module globals, so `tl` must be a global of this module; triton is still
    # imported only here, when compiling.
    global tl
    import triton
    import triton.language as tl

    @triton.jit
    def example_add(x_ptr, y_ptr, out_ptr, n, BLOCK: tl.constexpr):
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        keep = offs < n
        x = tl.load(x_ptr + offs, mask=keep)
        y = tl.load(y_ptr + offs, mask=keep)
        tl.store(out_ptr + offs, x + y, mask=keep)

    @triton.jit
    def example_dot(a_ptr, b_ptr, c_ptr, BLOCK: tl.constexpr):
        rows = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + rows[:, None] * BLOCK + rows[None, :])
        b = tl.load(b_ptr + rows[:, None] * BLOCK + rows[None, :])
        tl.store(c_ptr + rows[:, None] * BLOCK + rows[None, :], tl.dot(a, b))

    @triton.jit
    def example_spill(x_ptr, out_ptr, BLOCK: tl.constexpr):
        # One warp holding BLOCK floats live across two reductions: BLOCK / 32 values a thread,
        # more than the 255 registers a thread may have, so the rest goes to local memory.
        offs = tl.arange(0, BLOCK)
        x = tl.load(x_ptr + offs)
        tl.store(out_ptr + offs, x * tl.sum(x, axis=0) + tl.sum(x * x, axis=0))

    # Aligned pointers and n % 16 == 0, as the JIT would note for real tensors: allows vector loads.
    aligned = lambda *idx: {(i,): [["tt.divisibility", 16]] for i in idx}  # noqa: E731
    add = dict(name="example_add", fn=example_add, num_warps=4,
               signature={"x_ptr": "*fp32", "y_ptr": "*fp32", "out_ptr": "*fp32", "n": "i32", "BLOCK": "constexpr"},
               constexprs={"BLOCK": 1024}, attrs=aligned(0, 1, 2, 3))
    dot = dict(name="example_dot", fn=example_dot, num_warps=4,
               signature={"a_ptr": f"*{dtype}", "b_ptr": f"*{dtype}", "c_ptr": "*fp32", "BLOCK": "constexpr"},
               constexprs={"BLOCK": 64}, attrs=aligned(0, 1, 2))
    spill = dict(name="example_spill", fn=example_spill, num_warps=1,
                 signature={"x_ptr": "*fp32", "out_ptr": "*fp32", "BLOCK": "constexpr"},
                 constexprs={"BLOCK": 16384}, attrs=aligned(0, 1))
    return [add, dot, spill] if dtype == "fp32" else [dot]


def _cases(module_name: str, dtype: str) -> list[dict]:
    if module_name == "examples":
        return _example_cases(dtype)
    # importlib, not `from kernels import ...`: kernels/__init__ re-exports functions of the same name.
    module = importlib.import_module(module_name)
    make = getattr(module, "codegen_cases", None)
    if make is None:
        raise LookupError(f"{module_name} has no codegen_cases(dtype)")
    return make(_torch_dtype(dtype))


def compile_all(modules=KERNEL_MODULES, dtypes=DTYPES, archs=ARCHS) -> list[dict]:
    """Records for every case of every module, dtype and arch. A module or case that fails gives
    a record with an "error" instead of stopping the others, so the failure can be named."""
    records = []
    for module_name in modules:
        for dtype in dtypes:
            try:
                cases = _cases(module_name, dtype)
            except Exception as exc:  # noqa: BLE001 - reported per module, not raised
                for arch in archs:
                    records.append({"kernel": module_name, "dtype": dtype, "arch": f"sm_{arch}",
                                    "error": f"{type(exc).__name__}: {exc}"})
                continue
            for case in cases:
                for arch in archs:
                    try:
                        records.append(compile_case(case, arch, dtype))
                    except Exception as exc:  # noqa: BLE001
                        records.append({"kernel": case.get("name", "?"), "dtype": dtype, "arch": f"sm_{arch}",
                                        "error": f"{type(exc).__name__}: {str(exc)[-2000:]}"})
    return records


# ----------------------------------------------------------------------------------------------
# From any process: the subprocess, CSV rows, the table
# ----------------------------------------------------------------------------------------------

def compile_in_subprocess(dtypes=DTYPES, archs=ARCHS, examples: bool = False, timeout: float = 1200) -> list[dict]:
    """compile_all() in a fresh `python -m bench.codegen --json` without TRITON_INTERPRET."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join(p for p in (str(REPO), env.get("PYTHONPATH", "")) if p)
    env.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    cmd = [sys.executable, "-m", "bench.codegen", "--json", "--dtypes", ",".join(dtypes),
           "--archs", ",".join(map(str, archs))] + (["--examples"] if examples else [])
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=REPO, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
    return json.loads(proc.stdout)


# (record key, CSV metric, unit)
_METRICS = [
    ("registers", "registers", "regs/thread"), ("shared_memory", "shared_memory", "bytes"),
    ("local_memory", "local_memory", "bytes"), ("occupancy", "occupancy", "fraction"),
    ("load_widths", "load_width_bits", "bits"), ("store_widths", "store_width_bits", "bits"),
    ("sass_instructions", "sass_instructions", "count"), ("matrix_instructions", "matrix_instructions", ""),
]


def to_rows(records: list[dict]) -> list[dict]:
    """CSV rows (bench/common.py schema), one per (kernel, arch, dtype, metric). Width metrics are
    "16,128"-style strings, as is matrix_instructions; a failed compile is a "compile_error" row."""
    import torch

    from bench import common

    rows = []
    for rec in records:
        metrics = [("error", "compile_error", "")] if "error" in rec else _METRICS
        for key, metric, unit in metrics:
            row = common.make_row(rec["kernel"], rec["arch"], "codegen", metric, unit, "", "", rec[key],
                                  torch.device("cpu"), rec["dtype"])
            arch = int(rec["arch"].removeprefix("sm_"))
            row["device"] = f"compiled for {rec['arch']} ({ARCH_NAMES.get(arch, '?')})"
            rows.append(row)
    return rows


def run(dtypes=DTYPES, archs=ARCHS) -> list[dict]:
    """Rows for the benchmark report: every kernel case, compiled in a subprocess."""
    return to_rows(compile_in_subprocess(tuple(dtypes), tuple(archs)))


def format_table(records: list[dict]) -> str:
    cols = ["kernel", "dtype", "arch", "regs", "smem", "local", "occ", "ld bits", "st bits", "matrix", "instrs",
            "loads by pointer (PTX)", "stores by pointer (PTX)"]
    lines = []
    for r in records:
        if "error" in r:
            lines.append([r["kernel"], r["dtype"], r["arch"], f"ERROR {r['error'].splitlines()[-1][:120]}"])
            continue
        loads, stores = (" ".join(f"{k}:{v}" for k, v in r[key].items())
                         for key in ("ptx_loads_by_pointer", "ptx_stores_by_pointer"))
        lines.append([r["kernel"], r["dtype"], r["arch"], str(r["registers"]), str(r["shared_memory"]),
                      str(r["local_memory"]), f"{r['occupancy']:.2f}", r["load_widths"] or "-",
                      r["store_widths"] or "-", r["matrix_instructions"], str(r["sass_instructions"]), loads, stores])
    widths = [max([len(c)] + [len(ln[i]) for ln in lines if len(ln) == len(cols)]) for i, c in enumerate(cols)]
    out = ["  ".join(c.ljust(w) for c, w in zip(cols, widths)).rstrip()]
    out += ["  ".join(v.ljust(w) for v, w in zip(ln, widths)).rstrip() for ln in lines]
    return "\n".join(out)


def _list_of(kind: str, known, parse=str):
    """An argparse type: a comma-separated list, each item one of `known`."""
    def convert(text: str) -> tuple:
        items = tuple(parse(t.strip()) for t in text.split(",") if t.strip())
        unknown = [t for t in items if t not in known]
        if not items or unknown:
            raise argparse.ArgumentTypeError(
                f"{', '.join(map(str, unknown)) if unknown else repr(text)}: expected {kind} among "
                f"{', '.join(map(str, known))}")
        return items
    return convert


def _arch(text: str):
    """89 or sm_89 as 89; anything else as itself, for the message."""
    number = text.removeprefix("sm_")
    return int(number) if number.isdigit() else text


def main(argv: list[str] | None = None) -> int:
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9 warns when unset; 1 is its default
    parser = argparse.ArgumentParser(prog="python -m bench.codegen", description=__doc__.split("\n\n")[0])
    parser.add_argument("--json", action="store_true", help="print the records as JSON (used by run())")
    parser.add_argument("--csv", metavar="PATH", help="append the rows to this CSV file")
    parser.add_argument("--dtypes", default=DTYPES, type=_list_of("dtypes", (*DTYPES, "fp64")),
                        help=f"comma-separated, of {', '.join(DTYPES)}, fp64 (default: {','.join(DTYPES)})")
    # The targets whose occupancy limits SM_LIMITS holds.
    parser.add_argument("--archs", default=ARCHS, type=_list_of("compute capabilities", tuple(SM_LIMITS), _arch),
                        help=f"comma-separated, of {', '.join(map(str, SM_LIMITS))} (default: {','.join(map(str, ARCHS))})")
    parser.add_argument("--examples", action="store_true", help="compile the toy kernels, not the real ones")
    args = parser.parse_args(argv)
    dtypes, archs = args.dtypes, args.archs
    modules = ("examples",) if args.examples else KERNEL_MODULES

    if os.environ.get("TRITON_INTERPRET") == "1":  # e.g. run from a shell that exported it
        records = compile_in_subprocess(dtypes, archs, args.examples)
    else:
        records = compile_all(modules, dtypes, archs)
    if args.json:
        print(json.dumps(records))
    else:
        print(format_table(records))
    if args.csv:
        from bench import common

        common.append_csv(to_rows(records), args.csv)
    # With --json the errors travel in the records (run() names them); the table's exit code tells.
    return 1 if not args.json and any("error" in r for r in records) else 0


if __name__ == "__main__":
    sys.exit(main())
