"""Cold and cached wall time of a whole build, measured side by side in one run.

    python benchmarks/build_time.py --target jetson --runs 1 --out /tmp/bench-build

Runs `python -m pipeline build` in a fresh output directory (cold: trains,
prunes, factorizes, exports, quantizes, bundles), then again `--runs` times on the same directory
(everything served from the stage cache), and prints a markdown table with the
per-stage times of the cold run, each stage's accuracy change with its 95%
interval, fixed/broken samples, agreement, params, MACs and ONNX size (as the
build measured them) and each artifact's sha256, and the median cached time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

from pipeline.kernels import cpu_facts


def run_build(target: str, out: Path, extra: list[str]) -> tuple[float, dict]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", "build", "--target", target, "--out", str(out), "--json", *extra],
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if result.returncode != 0:
        sys.exit(f"build failed ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall, json.loads(result.stdout)


def ledger_table(cold: dict) -> str:
    """The cold build's ledger as a markdown table."""
    lines = []
    lines.append("| stage | cold: stage time (s) | accuracy | Δ pts vs source [95% CI] | fixed/broken | agreement [95% CI] | params (M) | MACs (M) | ONNX MB | sha256 |")
    lines.append("|---|---|---|---|---|---|---|---|---|---|")
    source = cold["stages"][0].get("footprint") or {}
    for index, stage in enumerate(cold["stages"]):
        p = stage["parity"] or {}
        pair = p.get("paired") or {}
        cost = stage.get("footprint") or {}
        params, macs = (cost.get("params") or {}).get("total"), (cost.get("macs") or {}).get("total")
        share = lambda value, key: "-" if value is None else f"{value / 1e6:.2f} ({100 * value / source[key]['total']:.0f}%)"
        ci = lambda bounds, spec: "" if not bounds or index == 0 else f" [{format(bounds[0], spec)}, {format(bounds[1], spec)}]"
        onnx_mb = "-" if cost.get("onnx_bytes") is None else f"{cost['onnx_bytes'] / 1e6:.1f}"
        counts = "-" if index == 0 else f"{pair.get('fixed')}/{pair.get('broken')}"
        lines.append(f"| {stage['name']} | {stage['wall_s']:.1f} | {p.get('accuracy', 0):.4f} | {p.get('delta_pts', 0):+.2f}{ci(pair.get('delta_ci_pts'), '+.2f')} | "
              f"{counts} | "
              f"{p.get('vs_reference', {}).get('agreement', 0):.4f}{ci(pair.get('agreement_ci'), '.3f')} | {share(params, 'params')} | {share(macs, 'macs')} | "
              f"{onnx_mb} | {stage['sha256'][:12]} |")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--target", default="jetson", help="target to build (default: jetson)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgepipe-bench-build"), help="scratch output directory (wiped first)")
    parser.add_argument("--runs", type=int, default=3, help="cached rebuilds to time (default: 3)")
    parser.add_argument("extra", nargs="*", help="more build flags, after --")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    cold_wall, cold = run_build(args.target, args.out, args.extra)
    cached = [run_build(args.target, args.out, args.extra)[0] for _ in range(args.runs)]
    print(f"machine: {cpu_facts()['model']} (ISA {', '.join(cpu_facts()['isa'])}), {os.cpu_count()} CPU cores; command: python benchmarks/build_time.py --target {args.target} --runs {args.runs}\n")
    print(ledger_table(cold))
    print(f"\ncold build, whole command: {cold_wall:.1f} s; cached rebuild, median of {args.runs}: {statistics.median(cached):.1f} s "
          f"(ratio {cold_wall / statistics.median(cached):.0f}x)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
