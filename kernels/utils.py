"""Helpers shared by the Triton ops: interpreter detection, backend choice, autocast, argument checks."""
import contextlib
import importlib
import math
import os
import warnings

import torch

# Read once: TRITON_INTERPRET must be set before triton is imported, so it cannot change mid-run.
INTERPRETING = os.environ.get("TRITON_INTERPRET", "0") == "1"

BACKENDS = ("auto", "torch", "triton")

# (op, dtype, GPU) where a benchmark run of ours (bench/gpu_run.sh; `qin bench` prints the entries
# its measurements support) MEASURED the Triton path faster than every torch line, in every case
# it timed, on that GPU, named as kernels.choice.where names it ("NVIDIA H200 sm_90"): another
# GPU of the same compute capability (an H100 PCIe, an H20, a MIG slice) is not covered. An entry
# holds for every shape class, so it serves only where backend="auto" times nothing:
# QIN_AUTO_BACKEND=table, and a call traced by torch.compile or captured in a CUDA graph before
# any decision was timed in the process. Elsewhere on a GPU a decision timed there, for the call's
# shape class (kernels.choice), comes first.
# Measured on 2026-12-04 (bench/results/gpu-h200-2026-12-04, commit b97e354): the fp32 ASTA ops,
# plain and gathered, ran faster in Triton than every torch line (eager and compiled) in each mode,
# forward and fwd+bwd. Not entered, each having lost a case there: ASTA bf16/fp16 (the plain op's
# forward, 0.58x of the reference in bf16; the gathered forward tied the compiled reference) and
# the QNN in every dtype (fp32 fwd+bwd under TF32 1.16 vs 0.95 ms compiled, and without TF32 a
# tie, 4.38 vs 4.40; bf16 fwd+bwd 0.48x of cuBLAS eager).
# Measured again on 2026-12-04 (bench/results/gpu-h200-2026-12-04-3f11c2d, commit 3f11c2d), after
# the 16-bit rows took fp32's thread layout (34b9b74): ASTA bf16 and fp16, plain and gathered,
# beat every torch line in each mode (the plain forward with every position live, bf16 0.148 ms
# against the reference's 0.218 and the compiled reference's 0.213). The QNN still loses in every
# dtype (bf16 fwd+bwd 1.26 ms against eager's 0.586).
MEASURED_FASTER: set[tuple[str, torch.dtype, str]] = {
    ("asta", torch.float32, "NVIDIA H200 sm_90"),
    ("asta", torch.bfloat16, "NVIDIA H200 sm_90"),
    ("asta", torch.float16, "NVIDIA H200 sm_90"),
}


def resolve_backend(backend: str, device: torch.device, op: str = "", dtype: torch.dtype | None = None,
                    trial=None) -> str:
    """Map 'auto' to 'triton' where it was measured faster (`trial`, a kernels.choice.Trial of
    this call, timed on this device; where nothing is timed, MEASURED_FASTER) and to 'torch'
    elsewhere; refuse Triton where it cannot run."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if backend == "auto":
        return "triton" if auto_picks_triton(op, dtype, device, trial) else "torch"
    if backend == "triton" and device.type != "cuda" and not INTERPRETING:
        raise ValueError(
            f"backend='triton' needs a CUDA tensor, or TRITON_INTERPRET=1 set before triton is "
            f"imported to run the kernels on the CPU; got a tensor on {device}"
        )
    return backend


def triton_cannot_run(device: torch.device) -> str | None:
    """Why the Triton kernels cannot run for tensors on `device` in this process, or None where they can."""
    try:
        importlib.import_module("triton")  # (kernels/__init__ has imported it, or fell back without it)
    except ImportError:
        return "the triton package cannot be imported here (PyPI has triton wheels for Linux x86_64 and aarch64 only)"
    if device.type != "cuda" and not INTERPRETING:
        return (f"they run on a CUDA device, or on the CPU under TRITON_INTERPRET=1 set before triton is imported "
                f"(Triton's interpreter, slow); this is {device}")
    return None


@contextlib.contextmanager
def forcing(forced: dict, cfg: dict, forceable: tuple[str, ...]):
    """The body of a kernel module's forced_config: `cfg` (checked against `forceable`; the caller
    checks the values) in `forced`, the dict its _config reads, for the block. Blocks do not nest."""
    if set(cfg) - set(forceable):
        raise ValueError(f"forced_config takes {', '.join(forceable)}; got {', '.join(sorted(set(cfg) - set(forceable)))}")
    if forced:
        raise RuntimeError("forced_config is already in force (its blocks do not nest)")
    forced.update(cfg)
    try:
        yield
    finally:
        forced.clear()


def constant_under_compile(fn):
    """torch.compiler.assume_constant_result(fn), without importing torch._dynamo: torch.compile
    calls fn once while it traces and keeps its result as a constant. The public decorator imports
    torch._dynamo (2.3 s on our 2-core test machine, a third of `qin --help`) only to set this one
    mark on fn; dynamo reads the mark when it traces, by which time it is loaded anyway.
    tests/test_imports.py holds the two to the same marks, so a torch that marks otherwise fails
    there, not silently under compile."""
    fn._dynamo_marked_constant = True
    return fn


def warn_reference_runs(op: str, why: str) -> None:
    """Once per op and process: a registered Triton op called where Triton cannot run computes
    the same function with the plain-PyTorch reference."""
    if op not in _WARNED:
        _WARNED.add(op)
        warnings.warn(f"{op}: the Triton kernel cannot run here ({why}); computing it with the PyTorch "
                      f"reference (the same function)", stacklevel=3)


_WARNED: set[str] = set()


def transforms_active() -> bool:
    """Whether forward-mode AD (a dual level) or a torch.func transform (grad, vmap, jvp, ...) is in
    force. The fused ops and the memory-saving autograd Functions of the torch path implement
    reverse-mode autograd only: a custom op has no forward-mode rule (its tangent would silently
    be zero), and the Functions' NumPy-drawn dropout masks cannot follow vmap. (False while
    torch.compile traces, which supports neither.)"""
    if torch.compiler.is_compiling():
        return False
    from torch.autograd import forward_ad

    # Private names (torch's autograd.Function reads the first; the second has held the dual level
    # since torch 1.9): where a later torch renames them, nothing is taken to be active.
    functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)
    return functorch_active() or getattr(forward_ad, "_current_level", -1) >= 0


def differentiable_backend(backend: str, op: str, mask: torch.Tensor | None = None) -> str:
    """`backend`, where the Triton kernels can give what autograd may ask of this call; elsewhere
    "auto" becomes "torch" and "triton" raises. They cannot: under forward-mode AD or a torch.func
    transform (transforms_active), or where the mask requires grad (their backward does not
    differentiate the mask)."""
    if backend not in ("auto", "triton"):
        return backend
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        reason = "a gradient in the mask (mask.requires_grad)"
    elif transforms_active():
        reason = "forward-mode AD or torch.func transforms"
    else:
        return backend
    if backend == "triton":
        raise NotImplementedError(f"{op} with backend='triton' does not support {reason}: its kernels "
                                  f"differentiate in reverse mode, in the floating inputs; use backend='torch' or 'auto'")
    return "torch"


def auto_picks_triton(op: str, dtype: torch.dtype | None, device: torch.device, trial=None) -> bool:
    from kernels import choice

    if trial is not None and device.type in choice.TIMED_DEVICE_TYPES and choice.mode() != "table":
        decided = choice.decide(trial, device)
        if decided is not None:
            return decided == "triton"
    # (The GPU is only named when there is an entry to match: a call that torch.compile traces
    # then holds nothing but constants and dictionary lookups.)
    return device.type == "cuda" and bool(MEASURED_FASTER) and (op, dtype, choice.where(device)) in MEASURED_FASTER


def autocast_off(device_type: str):
    """A context with autocast off on `device_type`, for code whose casts are all explicit.

    None where autocast is off already and nothing is being traced (the usual eager case: building
    an autocast object costs host time, a dozen times a step); a traced program (torch.compile,
    torch.export) records the region, so that it keeps its casts when run under autocast later.
    None on a device type autocast does not know (meta tensors, where torch.autocast itself would
    raise). The CPU and CUDA are known without asking: dynamo in torch 2.11 cannot trace
    torch.amp.is_autocast_available, and a fullgraph compile of the model failed on it."""
    if device_type not in ("cpu", "cuda") and not _autocast_available(device_type):
        return contextlib.nullcontext()
    if torch.is_autocast_enabled(device_type) or torch.compiler.is_compiling():
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def _autocast_available(device_type: str) -> bool:
    return getattr(torch.amp, "is_autocast_available", lambda t: t in ("cpu", "cuda"))(device_type)


def launching_on(device: torch.device):
    """The context a Triton launch for tensors on `device` runs in. Triton launches on the current
    CUDA device and its current stream, not on its arguments' device as a torch op does: a kernel
    for tensors on cuda:1 while cuda:0 is current (train.device=cuda:1) would run on the wrong GPU."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()


def alert_not_deterministic(what: str) -> None:
    """As torch's own non-deterministic CUDA ops do: under torch.use_deterministic_algorithms(True)
    raise (with warn_only=True, warn) that `what` has no deterministic implementation."""
    if not torch.are_deterministic_algorithms_enabled():
        return
    message = (f"{what} is not deterministic, but torch.use_deterministic_algorithms(True) is set; "
               f"use backend='torch', or warn_only=True if that is acceptable")
    if torch.is_deterministic_algorithms_warn_only_enabled():
        warnings.warn(message, stacklevel=3)
    else:
        raise RuntimeError(message)


def next_power_of_2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """The dtype autocast casts matrix products to on this device type, or None when it is off."""
    if device_type not in ("cpu", "cuda") or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def compute_dtype(device: torch.device, *tensors: torch.Tensor) -> torch.dtype:
    """The one dtype an op reads its floating inputs in: autocast's where it is on (inputs of any
    floating dtype are cast to it, as torch.matmul's would be), else their common promoted type."""
    dtype = autocast_dtype(device.type)
    if dtype is not None:
        return dtype
    common = tensors[0].dtype
    for t in tensors[1:]:
        common = torch.promote_types(common, t.dtype)
    return common


def cast(dtype: torch.dtype, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The tensors in `dtype`, copying only those that are not already."""
    return [t if t.dtype == dtype else t.to(dtype) for t in tensors]


_LIBRARIES: list = []  # a Library's registrations last as long as the object

_PLAIN_TENSOR_TYPES = (torch.Tensor, torch.nn.Parameter)


def needs_registered_op(*args) -> bool:
    """Whether a call of one of our ops must go through its registered op (torch.library) rather
    than straight to its implementation: while torch.compile or torch.export trace it (the graph
    must hold the op; their tensors are fake or functional ones), under a Python dispatch mode
    (FakeTensorMode, FlopCounterMode, a user's: they see the op whole), or for a tensor subclass.

    Why not always: on the host the dispatcher's path for a custom op with Python autograd
    (redispatch, the generated autograd function, filling in the schema's defaults, dynamo's
    disable wrapper) costs about 50 us a forward and backward of the Triton QNN on our 2-core test
    machine, as much again as everything else that call runs there; and a GPU step of QIN in bf16
    is bound by its host (bench/results/gpu-h200-2026-12-04-3f11c2d)."""
    if torch.compiler.is_compiling() or torch._C._len_torch_dispatch_stack():
        return True
    return any(isinstance(a, torch.Tensor) and type(a) not in _PLAIN_TENSOR_TYPES for a in args)


def call_op(registered, direct, *args):
    """registered(*args), the registered op, where needs_registered_op(*args), else direct(*args):
    the same code without the dispatcher (a direct_autograd function's apply, or a backward op's
    implementation), so the same values and gradients."""
    return (registered if needs_registered_op(*args) else direct)(*args)


def direct_autograd(name: str, implementation, setup_context, backward, autocast_free: bool):
    """An autograd.Function computing what a registered op computes, for eager calls of plain
    tensors (needs_registered_op): forward is the op's `implementation`, then its
    `setup_context(ctx, inputs, output)`, and `backward(ctx, *grads)` the op's autograd backward
    (which calls its backward's implementation the same way). `autocast_free`: the op has an
    autocast registration, which runs it with autocast off (register_autocast): so does forward."""
    def forward(ctx, *inputs):
        device = next(t for t in inputs if isinstance(t, torch.Tensor)).device
        with autocast_off(device.type) if autocast_free else contextlib.nullcontext():
            output = implementation(*inputs)
        setup_context(ctx, inputs, output)
        return output

    return type(name, (torch.autograd.Function,), dict(
        forward=staticmethod(forward), backward=staticmethod(backward),
        __doc__=f"Eager calls of plain tensors: {implementation.__name__} and its autograd, without the dispatcher."))


def register_autocast(qualname: str, op, float_args: tuple[int, ...] = (), dtype_arg: int | None = None) -> None:
    """Autocast on a custom op: the floating arguments at positions `float_args` are cast to the
    autocast dtype in force at call time (bf16 or fp16, whichever the user chose; torch's own
    register_autocast fixes one dtype), and the argument at `dtype_arg` (an op that casts inside)
    is set to it; then the op runs with autocast off."""
    namespace, name = qualname.split("::")
    lib = torch.library.Library(namespace, "FRAGMENT")
    for device_type, key in (("cpu", "AutocastCPU"), ("cuda", "AutocastCUDA")):
        dispatch_key = getattr(torch._C.DispatchKey, key)

        def kernel(_keyset, *args, _device_type=device_type, _key=dispatch_key):
            dtype = torch.get_autocast_dtype(_device_type)
            args = [a.to(dtype) if i in float_args and isinstance(a, torch.Tensor) and a.is_floating_point()
                    and a.device.type == _device_type else a for i, a in enumerate(args)]
            if dtype_arg is not None:
                args[dtype_arg] = dtype
            with torch._C._ExcludeDispatchKeyGuard(torch._C.DispatchKeySet(_key)):
                return op(*args)

        lib.impl(name, kernel, key, with_keyset=True)
    _LIBRARIES.append(lib)


def check_index_rows(index: torch.Tensor, mask: torch.Tensor, rows: int) -> None:
    """The gathered ASTA's index: every position's value a row of reps (0..rows-1), masked positions
    too, since the Triton kernel never reads a masked position's index but the torch path gathers it:
    a ValueError either way, not a result on one backend and an IndexError on the other. On the CPU
    only (on a GPU it would cost a device sync per call; a bad index faults there instead)."""
    if index.device.type != "cpu" or not index.numel() or torch.compiler.is_compiling():
        return
    if int(index.min()) < 0 or int(index.max()) >= rows:
        where = "unmasked" if bool(((index < 0) | (index >= rows))[mask != 0].any()) else "masked"
        raise ValueError(f"index holds rows outside reps' {rows} rows (at {where} positions; every "
                         f"position's index must be a row of reps)")


FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
INT32_LIMIT = 2**31  # the kernels' offsets and seeds are int32


def check_dropout_p(dropout_p) -> float:
    try:
        p = float(dropout_p)
    except (TypeError, ValueError):
        raise ValueError(f"dropout_p must be a number in [0, 1), got {dropout_p!r}") from None
    if not math.isfinite(p) or not 0.0 <= p < 1.0:
        raise ValueError(f"dropout_p must be a finite number in [0, 1), got {dropout_p!r}")
    return p


def check_seed(seed):
    if seed is None:
        return None
    if isinstance(seed, torch.Tensor):
        if seed.numel() != 1 or seed.is_floating_point() or seed.is_complex() or seed.dtype == torch.bool:
            raise ValueError(f"seed must be one integer, got a {seed.dtype} tensor of shape {tuple(seed.shape)}")
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < INT32_LIMIT:
        raise ValueError(f"seed must be None, an int in [0, 2**31) or a one-element integer tensor, got {seed!r}")
    return seed


def check_projection_args(x, weight, bias, num_row) -> None:
    """quadratic_projection's tensors and num_row (both packages: kernels/torch_only.py too)."""
    if isinstance(num_row, bool) or not isinstance(num_row, int) or num_row < 1:
        raise ValueError(f"num_row must be a positive int, got {num_row!r}")
    check_tensor("x", x, 2, FLOAT_DTYPES)
    batch, dim = x.shape
    if dim < 1:
        raise ValueError(f"x must have at least one column, got shape {tuple(x.shape)}")
    check_tensor("weight", weight, 2, FLOAT_DTYPES, x.device)
    if tuple(weight.shape) != (num_row * dim, dim):
        raise ValueError(f"weight must have shape (num_row * D, D) = {(num_row * dim, dim)} for x of shape "
                         f"{tuple(x.shape)} and num_row={num_row}, got {tuple(weight.shape)}")
    check_tensor("bias", bias, 1, FLOAT_DTYPES, x.device)
    if tuple(bias.shape) != (num_row * dim,):
        raise ValueError(f"bias must have shape (num_row * D,) = {(num_row * dim,)}, got {tuple(bias.shape)}")


def _check_query_mask(query, mask, batch: int, seq_len: int, dim: int, what: str, device) -> None:
    check_tensor("query", query, 2, FLOAT_DTYPES, device)
    if tuple(query.shape) != (batch, dim):
        raise ValueError(f"query must have shape (B, D) = {(batch, dim)} for {what}, got {tuple(query.shape)}")
    check_tensor("mask", mask, 2, device=device)
    if mask.is_complex():
        raise ValueError(f"mask must be bool, integer or real floating point, got {mask.dtype}")
    if tuple(mask.shape) != (batch, seq_len):
        raise ValueError(f"mask must have shape (B, L) = {(batch, seq_len)} for {what}, got {tuple(mask.shape)}")


def check_attention_args(history, query, mask) -> None:
    """sparse_target_attention's arguments (both packages)."""
    check_tensor("history", history, 3, FLOAT_DTYPES)
    batch, seq_len, dim = history.shape
    _check_query_mask(query, mask, batch, seq_len, dim, f"history of shape {tuple(history.shape)}", history.device)


def check_gathered_attention_args(reps, index, query, mask) -> None:
    """gathered_sparse_target_attention's arguments (both packages), index values on the CPU."""
    check_tensor("reps", reps, 2, FLOAT_DTYPES)
    check_tensor("index", index, 2, (torch.int32, torch.int64), reps.device)
    batch, seq_len = index.shape
    _check_query_mask(query, mask, batch, seq_len, reps.shape[1], f"index of shape {tuple(index.shape)} and reps of "
                      f"shape {tuple(reps.shape)}", reps.device)
    check_index_rows(index, mask, reps.shape[0])


def check_tensor(name: str, t, ndim: int, dtypes=None, device=None) -> None:
    """Raise ValueError naming the argument if `t` is not a tensor of the expected rank/dtype/device."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dim() != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    if dtypes is not None and t.dtype not in dtypes:
        raise ValueError(f"{name} has dtype {t.dtype}; expected one of {tuple(dtypes)}")
    if device is not None and t.device != device:
        raise ValueError(f"{name} is on {t.device}, but the other inputs are on {device}")
