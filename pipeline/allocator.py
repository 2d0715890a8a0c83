"""Keep freed memory in the process: glibc's malloc settings for a training loop.

By default glibc serves large blocks with fresh mmap()s and hands freed heap
back to the kernel, so every training step's activations are new pages that
fault in one by one: a cold default build took 88 million minor page faults
and spent a third of its CPU time in the kernel. Raising the mmap threshold to
its ceiling (32 MiB on 64-bit), never trimming the heap and padding its growth
keeps those pages mapped between steps. It changes where memory comes from,
not what is computed: the prune stage's bytes were identical with and without
(BENCHMARKS.md). mallopt() is called at run time, so the settings take effect
however the process was started; a MALLOC_* variable the user set wins, and
EDGEPIPE_ALLOCATOR=system leaves glibc's defaults alone. Not glibc (macOS,
musl): nothing is changed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from typing import Mapping

# mallopt() parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {  # parameter: (the user's variable that overrides it, value)
    M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", 32 * 1024 * 1024),  # glibc's maximum for 64-bit
    M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", 2**31 - 1),  # mallopt takes an int: give the heap back only past 2 GiB free
    M_TOP_PAD: ("MALLOC_TOP_PAD_", 256 * 1024 * 1024),  # grow the heap in large steps
}
POLICY_VARIABLE = "EDGEPIPE_ALLOCATOR"  # "keep" (default) or "system"


def keep_freed_memory(environ: Mapping[str, str] = os.environ) -> dict[str, object]:
    """Apply the settings where glibc is the allocator; return what was done (for the manifest)."""
    policy = environ.get(POLICY_VARIABLE, "keep")
    if policy != "keep":
        return {"policy": policy, "applied": {}}
    libc = _glibc()
    if libc is None:
        return {"policy": policy, "applied": {}, "reason": "not glibc"}
    applied = {}
    for parameter, (variable, value) in SETTINGS.items():
        if variable in environ:
            continue
        if libc.mallopt(ctypes.c_int(parameter), value) == 1:
            applied[variable.rstrip("_").lower()] = value
    return {"policy": policy, "applied": applied}


def _glibc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name or not os.confstr_names.get("CS_GNU_LIBC_VERSION"):
        return None
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION"):
            return None
        libc = ctypes.CDLL(name)
        libc.mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
        libc.mallopt.restype = ctypes.c_int
        return libc
    except (OSError, AttributeError, ValueError):
        return None
