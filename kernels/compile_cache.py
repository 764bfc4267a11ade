"""Where torch.compile keeps its disk caches: QIN's own cache folder, not a shared temp name.

torch's default, /tmp/torchinductor_<user>, is a name anyone on the machine can take first: torch
uses that folder whoever made it, and runs the Python modules it finds cached there (PyTorch issue
121122 proposes ~/.cache instead). torch fixes the folder the first time anything asks for it,
which importing the kernels already does (torch._dynamo.package), so this runs first, from
kernels/__init__.py, with the standard library alone.
"""
from __future__ import annotations

import os
import stat
from pathlib import Path


def cache_root() -> Path:
    """QIN's cache folder: $QIN_CACHE, else ~/.cache/qin (the built-in dataset, backend='auto''s
    timed decisions, torch.compile's caches). OSError naming QIN_CACHE where there is no home."""
    if os.environ.get("QIN_CACHE"):
        return Path(os.environ["QIN_CACHE"])
    try:
        return Path.home() / ".cache" / "qin"
    except RuntimeError:  # neither HOME nor a passwd entry (a container run under an arbitrary uid)
        raise OSError("this user has no home folder to keep QIN's cache in; set QIN_CACHE to a folder "
                      "this user can write") from None


def keep_compile_caches_private() -> None:
    """TORCHINDUCTOR_CACHE_DIR = QIN_CACHE (or ~/.cache/qin) / inductor, readable by its owner
    only, unless it is set already (by the user, or by torch before the kernels were imported).
    A folder that cannot be made, or one another user owns, leaves torch's default."""
    if os.environ.get("TORCHINDUCTOR_CACHE_DIR"):
        return
    try:
        folder = cache_root() / "inductor"
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        status = folder.stat()
        if hasattr(os, "getuid") and status.st_uid != os.getuid():
            return
        if stat.S_IMODE(status.st_mode) & 0o077:  # made earlier with other rights: owner-only now
            folder.chmod(0o700)
    except OSError:
        return
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = str(folder)
