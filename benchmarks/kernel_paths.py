"""Do the kernel-pinning variables change what torch computes on this CPU? Bytes and time per setting.

    python benchmarks/kernel_paths.py

Runs the same seeded training steps (1x1 conv, BatchNorm, depthwise 3x3 conv,
Linear: EfficientNet's building blocks, forward and backward, AdamW) and one
384x1536 matmul in a fresh process per setting, and prints the sha256 of the
trained weights and of the matmul, the kernel level torch reports and the
median time of the steps. A setting whose hashes equal the native row's did
not change the kernels on this CPU; one that differs did. On an AVX-512
machine the `pinned` row is the build's default (pipeline/kernels.py) and
should equal an AVX2 machine's `pinned` row if the pinning does its job.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

from pipeline.kernels import PINNED, RECORDED, cpu_facts

SETTINGS = {
    "native": {},
    "pinned (the build's default: ATen, oneDNN, MKL instructions at AVX2)": dict(PINNED),
    "pinned + MKL_CBWR=AVX2 (MKL's reproducibility mode)": {**PINNED, "MKL_CBWR": "AVX2"},
    "MKL_CBWR=AVX2 alone": {"MKL_CBWR": "AVX2"},
    "ATEN_CPU_CAPABILITY=avx2 alone": {"ATEN_CPU_CAPABILITY": "avx2"},
    "ONEDNN_MAX_CPU_ISA=AVX2 alone": {"ONEDNN_MAX_CPU_ISA": "AVX2"},
    "ATEN_CPU_CAPABILITY=default": {"ATEN_CPU_CAPABILITY": "default"},
    "ONEDNN_MAX_CPU_ISA=SSE41": {"ONEDNN_MAX_CPU_ISA": "SSE41"},
    "MKL_ENABLE_INSTRUCTIONS=SSE4_2": {"MKL_ENABLE_INSTRUCTIONS": "SSE4_2"},
    "MKL_CBWR=COMPATIBLE": {"MKL_CBWR": "COMPATIBLE"},
}

PROBE = r'''
import hashlib, json, statistics, time, torch, torch.nn as nn
torch.manual_seed(0)
model = nn.Sequential(nn.Conv2d(32, 64, 1), nn.BatchNorm2d(64), nn.ReLU6(), nn.Conv2d(64, 64, 3, padding=1, groups=64),
                      nn.Conv2d(64, 32, 1), nn.Flatten(), nn.Linear(32 * 14 * 14, 10))
optimizer = torch.optim.AdamW(model.parameters(), 1e-3)
x, y = torch.randn(64, 32, 14, 14), torch.randint(0, 10, (64,))
times = []
for _ in range(30):
    start = time.perf_counter()
    loss = nn.functional.cross_entropy(model(x), y)
    optimizer.zero_grad(); loss.backward(); optimizer.step()
    times.append(time.perf_counter() - start)
weights = hashlib.sha256(b"".join(p.detach().numpy().tobytes() for p in model.parameters())).hexdigest()
a, b = torch.randn(256, 384), torch.randn(384, 1536)
print(json.dumps({"aten": torch.backends.cpu.get_cpu_capability(), "weights": weights,
                  "matmul": hashlib.sha256((a @ b).numpy().tobytes()).hexdigest(), "step_ms": 1000 * statistics.median(times)}))
'''


def main() -> int:
    base = {k: v for k, v in os.environ.items() if k not in RECORDED}
    base.update(OMP_NUM_THREADS="2", OMP_WAIT_POLICY="PASSIVE")  # as the build runs
    rows = {}
    for name, extra in SETTINGS.items():
        result = subprocess.run([sys.executable, "-c", PROBE], capture_output=True, text=True, env={**base, **extra}, check=True)
        rows[name] = json.loads(result.stdout)
    native = rows["native"]
    print(f"machine: {cpu_facts()['model']} (ISA {', '.join(cpu_facts()['isa'])}), {os.cpu_count()} cores; command: python benchmarks/kernel_paths.py\n")
    print("| setting | torch kernel level | trained weights sha256 | same as native | matmul sha256 | same as native | step ms (median of 30) |")
    print("|---|---|---|---|---|---|---|")
    for name, r in rows.items():
        print(f"| {name} | {r['aten']} | {r['weights'][:12]} | {'yes' if r['weights'] == native['weights'] else 'no'} | {r['matmul'][:12]} | "
              f"{'yes' if r['matmul'] == native['matmul'] else 'no'} | {r['step_ms']:.1f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
