"""The jetson INT8 model under another calibration method, on the cached stages of a robustness run.

    python benchmarks/quantize_methods.py --runs /tmp/rob5out --method entropy --out /tmp/edgepipe-qm-entropy

RUNS is the --out directory of benchmarks/robustness.py (RUNS/<kind>/seed<N>): each
run's stages are copied, so source, prune, factorize and export come from the cache
and only the quantize stage runs (`--calibration-method METHOD`, the same kernels and
recovery seed as the run). Prints per run the INT8 model's eval agreement with the
source and with its FP32 input, its accuracy change, its size and the quantize time.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from pipeline.kernels import RECORDED


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=Path, required=True, help="a robustness.py --out directory")
    parser.add_argument("--method", choices=("minmax", "entropy", "percentile"), required=True)
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgepipe-quantize-methods"), help="scratch directory (wiped first)")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    print("| CPU kind | seed | INT8 agreement with the source | with its FP32 input | Δpts | INT8 MB | quantize s |")
    print("|---|---|---|---|---|---|---|")
    for run in sorted(args.runs.glob("*/seed*")):
        kind, seed = run.parent.name, int(run.name.removeprefix("seed"))
        out = args.out / kind / run.name
        for part in ("stages", "outputs"):
            shutil.copytree(run / part, out / part)
        environment = {k: v for k, v in os.environ.items() if k not in RECORDED} | {"EDGEPIPE_KERNELS": "native" if kind == "native" else "avx2"}
        subprocess.run([sys.executable, "-m", "pipeline", "build", "--target", "jetson", "--out", str(out), "--recovery-seed", str(seed),
                        "--calibration-method", args.method, "--quiet"], capture_output=True, text=True, env=environment)
        stage = next(s for s in json.loads((out / "manifest.json").read_text())["stages"] if s["name"] == "quantize")
        parity = stage["parity"]
        print(f"| {kind} | {seed} | {parity['vs_reference']['agreement']:.4f} | {parity['vs_previous']['agreement']:.4f} | "
              f"{parity['delta_pts']:+.2f} | {stage['size_bytes'] / 1e6:.1f} | {stage['wall_s']:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
