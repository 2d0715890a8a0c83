"""The CPU kernel path a build computes with: pinned to AVX2 by default, and recorded.

Training and recovery bytes depend on the instruction set the kernels use:
unpinned, the same prune stage gave different weights on an AVX-512 Xeon and
an AVX2 EPYC, while the source stage's were identical (issue 11). Pinning
torch's ATen kernels and oneDNN (EfficientNet's convolutions) to their AVX2
paths makes an AVX-512 machine run the kernels an AVX2 machine runs. These
variables are read once, when the libraries load, so pin_kernels() must run
before torch is imported: the CLI's main() calls it first. A variable the
user already set is left as it is; EDGEPIPE_KERNELS=native leaves all of
them alone.

MKL (torch's BLAS here) is left on its own dispatch: the source stage,
whose training is mostly MKL matrix products, already gave identical bytes
on both machines, and MKL's conditional numerical reproducibility
(MKL_CBWR=AVX2) changed this EPYC's bytes without a promise in return (MKL
guarantees its AVX2 branch across Intel CPUs only; benchmarks/kernel_paths.py).
MKL_ENABLE_INSTRUCTIONS=AVX2 caps an Intel CPU's MKL at AVX2 and has no
effect on an AMD one. Byte equality between an Intel and an AMD machine is
the aim, not a guarantee: the manifest records the CPU and the kernel
settings, and the verdict rests on measured margin, not on equal bytes.
"""

from __future__ import annotations

import os
import platform
import sys
from typing import Any, MutableMapping
from pipeline.errors import InputError

PINNED = {"ATEN_CPU_CAPABILITY": "avx2", "ONEDNN_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
RECORDED = (*PINNED, "MKL_CBWR")  # MKL_CBWR is not set here, but one the user set changes the bytes: recorded and keyed
POLICY_VARIABLE = "EDGEPIPE_KERNELS"  # "avx2" (default) or "native"
ISA_FLAGS = ("avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx512_bf16", "amx_tile", "avx_vnni")


def pin_kernels(environ: MutableMapping[str, str] = os.environ) -> str:
    """Set the AVX2 kernel path unless the user chose otherwise; return the policy in force."""
    policy = environ.get(POLICY_VARIABLE, "avx2")
    if policy not in ("avx2", "native"):

        raise InputError(f"{POLICY_VARIABLE}={policy!r}: choose 'avx2' (pin the kernels, the default) or 'native'")
    if policy == "avx2" and "torch" not in sys.modules:
        for name, value in PINNED.items():
            environ.setdefault(name, value)
    return policy


def cpu_facts() -> dict[str, Any]:
    """The CPU model and the instruction-set flags that decide which kernels run."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as handle:
            for line in handle:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    model = value.strip()
                elif key.strip() == "flags":
                    flags = set(value.split())
                    break
    except OSError:
        pass
    return {"model": model, "isa": [flag for flag in ISA_FLAGS if flag in flags]}


def kernel_facts() -> dict[str, Any]:
    """What the build computes with: the policy, the settings in force and the kernel level torch chose."""
    import torch

    policy = os.environ.get(POLICY_VARIABLE, "avx2")
    settings = {name: os.environ.get(name) for name in RECORDED}
    return {"policy": policy, "settings": settings, "aten_capability": torch.backends.cpu.get_cpu_capability(),
            "pinned": policy == "avx2" and all(settings[name] == value for name, value in PINNED.items()), "cpu": cpu_facts()}


def kernel_signature(facts: dict[str, Any]) -> str:
    """The part of the kernel facts that changes artifacts: hashed into every stage's cache key."""
    settings = " ".join(f"{name}={value}" for name, value in sorted(facts["settings"].items()) if value is not None)
    return f"aten={facts['aten_capability']} {settings}".strip()
