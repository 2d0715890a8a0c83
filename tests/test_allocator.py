"""The process's memory settings: huge pages for torch's buffers and glibc keeping freed memory, unless the user opts out."""

from __future__ import annotations

import json
import subprocess
import sys

import torch  # noqa: F401  (loaded: too late to ask for huge pages in this process)

from pipeline.allocator import TORCH_HUGE_PAGES, allocator_facts, tune_allocator


def test_torch_huge_pages_are_asked_for_only_before_torch_loads():
    environ: dict[str, str] = {}
    done = tune_allocator(environ)
    assert TORCH_HUGE_PAGES not in environ and TORCH_HUGE_PAGES.lower() not in done["applied"]
    fresh = "import json, os; from pipeline.allocator import tune_allocator; done = tune_allocator(); print(json.dumps([done, os.environ.get('THP_MEM_ALLOC_ENABLE')]))"
    env = {"PATH": "/usr/bin:/bin"}
    done, value = json.loads(subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, check=True, env=env).stdout)
    assert value == "1" and done["applied"][TORCH_HUGE_PAGES.lower()] == 1
    mine = subprocess.run([sys.executable, "-c", fresh], capture_output=True, text=True, check=True, env={**env, TORCH_HUGE_PAGES: "0"})
    assert json.loads(mine.stdout)[1] == "0"  # the user's own setting wins


def test_glibc_keeps_freed_memory_unless_the_user_set_it_or_opted_out():
    done = tune_allocator({})
    facts = allocator_facts({})
    if facts["glibc"]:
        assert done["applied"]["malloc_mmap_threshold"] == 32 * 1024 * 1024
    ours = tune_allocator({"MALLOC_MMAP_THRESHOLD_": "65536"})["applied"]
    assert "malloc_mmap_threshold" not in ours
    assert tune_allocator({"EDGEPIPE_ALLOCATOR": "system"}) == {"policy": "system", "applied": {}}
    assert allocator_facts({"MALLOC_TOP_PAD_": "0"})["user_settings"] == {"MALLOC_TOP_PAD_": "0"}
