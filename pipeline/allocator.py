"""Memory for a training loop: glibc keeps freed memory, and torch's large buffers sit on huge pages.

By default glibc serves large blocks with fresh mmap()s and hands freed heap
back to the kernel, so every training step's activations are new pages that
fault in one by one: a cold default build took 88 million minor page faults
and spent 306 of its 1,071 CPU seconds in the kernel (`/usr/bin/time -v`, BENCHMARKS.md). Raising the mmap threshold to
its ceiling (32 MiB on 64-bit), never trimming the heap and padding its growth
keeps those pages mapped between steps. It changes where memory comes from,
not what is computed: the prune stage's bytes were identical with and without
(BENCHMARKS.md). mallopt() is called at run time, so the settings take effect
however the process was started; a MALLOC_* variable the user set wins, and
EDGEPIPE_ALLOCATOR=system leaves glibc's defaults alone. Not glibc (macOS,
musl): nothing is changed.

torch's own CPU allocator asks the kernel for transparent huge pages for
buffers of 2 MiB and more when THP_MEM_ALLOC_ENABLE=1 (read when torch
loads, so this must run before it is imported; the kernel must allow THP in
`madvise` or `always` mode): one fault per 2 MiB instead of per 4 KiB.
Measured on the prune stage: 12.5 million minor faults down to 0.7 million,
the same bytes (BENCHMARKS.md).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys
from typing import Mapping, MutableMapping

# mallopt() parameters, from glibc's malloc.h
M_TRIM_THRESHOLD, M_TOP_PAD, M_MMAP_THRESHOLD = -1, -2, -3
SETTINGS = {  # parameter: (the user's variable that overrides it, value)
    M_MMAP_THRESHOLD: ("MALLOC_MMAP_THRESHOLD_", 32 * 1024 * 1024),  # glibc's maximum for 64-bit
    M_TRIM_THRESHOLD: ("MALLOC_TRIM_THRESHOLD_", 2**31 - 1),  # mallopt takes an int: give the heap back only past 2 GiB free
    M_TOP_PAD: ("MALLOC_TOP_PAD_", 256 * 1024 * 1024),  # grow the heap in large steps
}
POLICY_VARIABLE = "EDGEPIPE_ALLOCATOR"  # "keep" (default) or "system"
TORCH_HUGE_PAGES = "THP_MEM_ALLOC_ENABLE"


def tune_allocator(environ: MutableMapping[str, str] = os.environ) -> dict[str, object]:
    """Apply the settings (unless the user chose otherwise); return what was done."""
    policy = environ.get(POLICY_VARIABLE, "keep")
    if policy != "keep":
        return {"policy": policy, "applied": {}}
    applied: dict[str, object] = {}
    if "torch" not in sys.modules and environ.setdefault(TORCH_HUGE_PAGES, "1") == "1":
        applied[TORCH_HUGE_PAGES.lower()] = 1
    return {"policy": policy, "applied": {**applied, **_keep_freed_memory(environ)}}


def allocator_facts(environ: Mapping[str, str] = os.environ) -> dict[str, object]:
    """What the manifest records: the policy, torch's huge pages, and the user's own MALLOC_* settings."""
    return {"policy": environ.get(POLICY_VARIABLE, "keep"), TORCH_HUGE_PAGES: environ.get(TORCH_HUGE_PAGES),
            "glibc": _glibc() is not None, "user_settings": {v: environ[v] for v, _ in SETTINGS.values() if v in environ}}


def _keep_freed_memory(environ: Mapping[str, str]) -> dict[str, int]:
    libc = _glibc()
    if libc is None:
        return {}
    applied = {}
    for parameter, (variable, value) in SETTINGS.items():
        if variable in environ:
            continue
        if libc.mallopt(ctypes.c_int(parameter), value) == 1:
            applied[variable.rstrip("_").lower()] = value
    return applied


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
