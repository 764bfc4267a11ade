"""Keep freed host memory for reuse, so that a CPU training step does not page-fault its way through
fresh memory every step, and keep what is kept bounded.

PyTorch's CPU allocator takes large tensors from glibc's malloc, which maps each one fresh from the
kernel (mmap) and returns it on free (munmap). The next step's tensor of the same size then faults
every page in again: on our 2-core test machine, gathering the (B*L, 384) fp32 history of batch 1024
(100 MB) takes 40 ms into fresh memory and 6 ms into memory used before (a 4 KiB page costs about
5 us to fault in on that virtual machine).

`keep_freed_memory()` does three things, process-wide:
- it tells glibc to serve every allocation from its heap (M_MMAP_MAX = 0) and to keep up to 1 GiB
  of freed memory at the heap's top (M_TRIM_THRESHOLD), through mallopt;
- it asks PyTorch to place tensors of 2 MiB and more on page boundaries and to advise the kernel to
  back them with transparent huge pages (PyTorch's THP_MEM_ALLOC_ENABLE, where the kernel has
  them and unless the environment sets it already). PyTorch reads that variable once, at its
  first large allocation, so this takes effect only before the process has made one; `qin train`
  calls it first thing;
- `bound_kept_memory()`, called once a training step, hands freed pages back to the system
  (malloc_trim) whenever the resident set has grown by more than 1 GiB since the last time.

The bound is needed: glibc trims only the top of its heap, and a step whose tensor sizes change from
batch to batch (the number of distinct items does) splits the freed blocks, so that the next step's
large tensor no longer fits and the heap grows. Training in bf16 at batch 512 on the built-in data
with the heap kept and nothing else, the resident set grew about 48 MB a step, to 9.7 GB after two
epochs, and the steps were 36% slower than with glibc's defaults (faulting in the growth). With
huge pages it grew about 0.3 GB an epoch (2.6 GB after four); bounded, it stays within 1 GiB of
where it was at the last trim.

Mean step of `qin train` on the built-in data (batch 512, two epochs) on that machine (Zen 5, 2
cores), and the largest resident set:

| setting | fp32 | bf16 |
|---|---|---|
| glibc's defaults (QIN_KEEP_FREED_MEMORY=0) | 385 ms, 1.1 GB | 170 ms, 1.3 GB |
| heap kept, no bound, no huge pages (before 2026-12-01) | 347 ms, 1.3 GB | 232 ms, 9.7 GB |
| heap kept, bounded, no huge pages (THP_MEM_ALLOC_ENABLE=0) | | 169 ms, 2.2 GB |
| heap kept, bounded, huge pages (the default) | 339 ms, 1.5 GB | 156 ms, 2.2 GB |

Where the C library is not glibc the heap part does nothing (a debug log says so), and QIN_KEEP_FREED_MEMORY=0
turns all of it off (a process that embeds the trainer and wants the defaults).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import logging
import os

from qin.errors import ConfigError

logger = logging.getLogger("qin.host_memory")

_M_TRIM_THRESHOLD = -1  # glibc's mallopt parameters (malloc.h)
_M_MMAP_MAX = -4
KEEP_BYTES = 2**30
_libc: list = []  # the C library once keep_freed_memory has taken effect, else empty
_done: list[bool] = []
_resident_after_trim: list[int] = []


def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse, large tensors on huge pages (see the module
    docstring). True if the heap part took effect; calling again does nothing."""
    if _done:
        return _done[0]
    ok = False
    if not _switched_on():
        _done.append(ok)
        return ok
    if huge_pages_available():
        os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = getattr(libc, "mallopt", None)
        ok = bool(mallopt and getattr(libc, "malloc_trim", None)
                  and mallopt(_M_MMAP_MAX, 0) == 1 and mallopt(_M_TRIM_THRESHOLD, KEEP_BYTES) == 1)
    except OSError:
        pass
    if ok:
        _libc.append(libc)
    else:
        logger.debug("not glibc (no mallopt): freed host memory is returned to the system as usual")
    _done.append(ok)
    return ok


def _switched_on() -> bool:
    """QIN_KEEP_FREED_MEMORY: on unless 0, false, no or off (any case); another value is an error
    rather than silently on."""
    value = os.environ.get("QIN_KEEP_FREED_MEMORY", "1").strip().lower()
    if value in ("0", "false", "no", "off"):
        return False
    if value in ("", "1", "true", "yes", "on"):
        return True
    raise ConfigError(f"QIN_KEEP_FREED_MEMORY must be 1 or 0 (on or off), got "
                      f"{os.environ['QIN_KEEP_FREED_MEMORY']!r}")


def huge_pages_available(setting: str = "/sys/kernel/mm/transparent_hugepage/enabled") -> bool:
    """Whether the kernel backs memory advised so with transparent huge pages: its setting is
    `always` or `madvise`. Elsewhere PyTorch's madvise would fail (a warning) or do nothing."""
    try:
        with open(setting) as fh:
            return "[never]" not in fh.read()
    except OSError:
        return False


def resident_bytes() -> int | None:
    """This process's resident set in bytes, or None where /proc does not say."""
    try:
        with open("/proc/self/statm") as fh:
            return int(fh.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return None


def bound_kept_memory() -> bool:
    """If the heap is kept and the resident set has grown by more than KEEP_BYTES since the first
    call or the last trim, return glibc's free pages to the system. True if it trimmed. Costs one
    read of /proc/self/statm when it does not trim."""
    if not _libc:
        return False
    resident = resident_bytes()
    if resident is None:
        return False
    if not _resident_after_trim:
        _resident_after_trim.append(resident)
        return False
    if resident - _resident_after_trim[0] <= KEEP_BYTES:
        return False
    _libc[0].malloc_trim(0)
    _resident_after_trim[0] = resident_bytes() or resident
    logger.debug("returned freed heap pages: resident %d -> %d MB", resident >> 20, _resident_after_trim[0] >> 20)
    return True
