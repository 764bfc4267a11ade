"""qin.host_memory: freed host memory is kept for reuse, so a step's large tensors stop faulting
in fresh pages. Each check runs in its own process (the setting is process-wide)."""
import os
import platform
import subprocess
import sys

import pytest

from qin.host_memory import huge_pages_available  # reads a file; sets nothing in this process

# What is kept is glibc's heap: with another C library keep_freed_memory is a no-op, and says so.
GLIBC = platform.libc_ver()[0] == "glibc"

PROBE = """
import resource, sys
import torch
from qin.host_memory import keep_freed_memory
if sys.argv[1] == "keep":
    assert keep_freed_memory()
elif sys.argv[1] == "off":  # QIN_KEEP_FREED_MEMORY=0 in the environment
    assert not keep_freed_memory()
faults = []
for _ in range(10):  # a training step's pattern: the same large tensors made, used and freed
    before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    hidden = torch.empty(16 * 2**20).fill_(1.0)  # 64 MiB: 16,384 pages of 4 KiB
    history = torch.empty(8 * 2**20).fill_(2.0)  # 32 MiB
    float(hidden[:4].sum() + history[:4].sum())
    del hidden, history
    faults.append(resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before)
print(" ".join(map(str, faults)))
"""


def clean_environment(**settings) -> dict:
    """This process's environment without the memory settings (a test before this one may have
    called keep_freed_memory here, which sets THP_MEM_ALLOC_ENABLE for child processes), plus
    `settings`."""
    base = {k: v for k, v in os.environ.items() if k not in ("THP_MEM_ALLOC_ENABLE", "QIN_KEEP_FREED_MEMORY")}
    return {**base, **settings}


def minor_faults(mode: str) -> list[int]:
    env = clean_environment(QIN_KEEP_FREED_MEMORY="0" if mode == "off" else "1")
    out = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, check=True,
                         env=env).stdout
    return [int(n) for n in out.split()]


def test_it_takes_effect_exactly_with_glibc_and_unless_turned_off():
    def result(setting):
        env = clean_environment(QIN_KEEP_FREED_MEMORY=setting)
        code = "from qin.host_memory import keep_freed_memory as k; print(k(), k())"
        return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                              env=env).stdout.split()

    assert result("1") == [str(GLIBC)] * 2  # a second call is a no-op that agrees
    assert result("0") == ["False", "False"]
    assert result("Off") == ["False", "False"] and result(" false") == ["False", "False"]
    with pytest.raises(subprocess.CalledProcessError) as refused:
        result("of")
    assert "QIN_KEEP_FREED_MEMORY must be 1 or 0" in refused.value.stderr


@pytest.mark.skipif(not GLIBC, reason="no glibc heap to keep: keep_freed_memory is a no-op here, as the test "
                                      "above checks")
def test_kept_memory_is_reused_without_page_faults():
    usual, kept, off = minor_faults("usual"), minor_faults("keep"), minor_faults("off")
    # Freed and mapped anew, the pages fault again every time (24,578 a step here). Kept, the heap
    # grows over the first steps, and then the steps mostly reuse it: 0 faults in most steps after
    # the first, 8,192 or 16,384 in some, in an order that varies from run to run (glibc's heap
    # fragments a little). Over steps 2-10: 16,384-40,960 faults in 12 runs here, 32,768 in the last
    # five steps alone in one CI-like run (against 24,578 x 9 = 221,202 without), so the bound
    # is on the nine steps' sum: at most half.
    assert min(usual[-5:]) > 20_000, usual
    assert sum(kept[1:]) < sum(usual[1:]) / 2, kept
    assert min(off[-5:]) > 20_000, off  # QIN_KEEP_FREED_MEMORY=0: glibc's defaults, as usual


HUGE_PAGES_PROBE = """
import os, sys, torch
from qin.host_memory import keep_freed_memory
keep_freed_memory()
print(os.environ.get("THP_MEM_ALLOC_ENABLE"), all(torch.empty(2**20).data_ptr() % 4096 == 0 for _ in range(3)))
"""


def test_huge_pages_are_asked_for_only_where_the_kernel_has_them(tmp_path):
    setting = tmp_path / "enabled"
    for text, available in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                            ("always madvise [never]\n", False)):
        setting.write_text(text)
        assert huge_pages_available(str(setting)) is available
    assert huge_pages_available(str(tmp_path / "absent")) is False  # no THP in this kernel, or not Linux


def test_large_tensors_go_on_page_boundaries_for_huge_pages_unless_the_environment_says_no():
    def probe(**env):
        return subprocess.run([sys.executable, "-c", HUGE_PAGES_PROBE], capture_output=True, text=True,
                              check=True, env=clean_environment(**env)).stdout.split()

    # A user's own setting always stands, and QIN_KEEP_FREED_MEMORY=0 sets nothing.
    assert probe(THP_MEM_ALLOC_ENABLE="0")[0] == "0"
    assert probe(QIN_KEEP_FREED_MEMORY="0")[0] == "None"
    if not huge_pages_available():  # this kernel has none: the switch is left off
        assert probe()[0] == "None"
        return
    assert probe() == ["1", "True"]  # 4 MiB tensors: page-aligned, so huge pages can back them
    # Without the switch they are not; three page-aligned tensors by chance: a 1 in 2^18 event.
    assert probe(THP_MEM_ALLOC_ENABLE="0")[1] == "False"
    assert probe(QIN_KEEP_FREED_MEMORY="0")[1] == "False"


BOUND_PROBE = """
import torch
from qin.host_memory import KEEP_BYTES, bound_kept_memory, keep_freed_memory, resident_bytes
assert keep_freed_memory()
assert not bound_kept_memory()  # the first call only notes where the resident set starts
big, live = [], []
for _ in range(KEEP_BYTES // 2**26 + 4):  # 64 MiB blocks, each followed by a live one
    big.append(torch.ones(2**24))
    live.append(torch.ones(2**24))
del big  # freed between live blocks: not at the heap's top, so glibc does not trim it itself
before = resident_bytes()
trimmed = bound_kept_memory()
# What stays resident is live (more than KEEP_BYTES above the start): the bound now counts from
# here, so the next call does not trim again, nor would every later step.
print(trimmed, (before - resident_bytes()) >> 20, bound_kept_memory())
# ... and from here, not from before the trim: growing by just over KEEP_BYTES trims again.
more = torch.ones(KEEP_BYTES // 4 + 2**25)
print(bound_kept_memory())
"""


def test_freed_memory_kept_past_the_bound_is_returned_to_the_system():
    # The training loop calls bound_kept_memory once a step, after the optimizer step, when the
    # step's tensors are freed. Here 1.25 GiB is freed but kept, and 1.25 GiB more is live; the
    # call returns the freed pages, and the next finds nothing more to do. Without glibc nothing is kept, and the bound does nothing.
    env = clean_environment(QIN_KEEP_FREED_MEMORY="1")
    if not GLIBC:
        code = "from qin.host_memory import bound_kept_memory as b, keep_freed_memory as k; print(k(), b(), b())"
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
        assert out.stdout.split() == ["False", "False", "False"]
        return
    out = subprocess.run([sys.executable, "-c", BOUND_PROBE], capture_output=True, text=True, check=True,
                         env=env).stdout.split()
    assert out[0] == "True" and int(out[1]) > 1024 and out[2] == "False" and out[3] == "True", out
