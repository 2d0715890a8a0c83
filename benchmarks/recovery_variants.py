"""How close does the pruned model come to its source under each pruning and recovery variant? The prune stage alone, side by side.

    python benchmarks/recovery_variants.py --warm out/jetson-orin-nano --out /tmp/edgepipe-variants
    python benchmarks/recovery_variants.py --warm DIR --only 0 --seeds 1 2 --kernels native   # other recovery seeds, kernels

Each variant is the jetson target with some compression keys changed (a
target file written next to the runs) and builds from a copy of WARM, whose
source model is cached, so only the prune stage runs (sensitivity, pruning,
recovery): the copy's target also carries a prune gate no model can pass
(`max_drop_pts = -100`), which ends the build right after the prune stage has
been measured on eval, before factorize, export and quantize. Prints one row
per variant: MACs, the recovery's calib KL to the source (what it selects
its checkpoint by), and on the 474 eval samples the SQNR of the logits vs the
source's, the top-1 agreement, fixed/broken and the accuracy change.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

from pipeline.kernels import RECORDED

# The rows of BENCHMARKS.md, "Pruning and recovery variants": each spells out its prune recovery budget, so a row
# measured at 8 epochs runs at 8 whatever the shipped target says now.
# The rows before "taylor importance" ranked channels by the weights' magnitude, the targets' default until then;
# the Taylor rows name the calib samples its gradient is taken on.
# Every row before 80462ba pruned MiniLM by 0.75 (the targets' since: 0.7), so they say so.
EIGHT = {"recovery_epochs": 8, "importance": "magnitude", "prune_text": 0.75}
DEFAULTS_4CA5971 = {"prune_image": 0.5, "prune_fusion": 0.0, "allocate": True, "recovery_features": 1.0, **EIGHT}
VARIANTS = {
    "image 0.6, text 0.75, fusion 0.5, logits only (the defaults before 4ca5971)":
        {"prune_image": 0.6, "prune_fusion": 0.5, "allocate": False, "recovery_features": 0.0, **EIGHT},
    "fusion whole": {"prune_image": 0.6, "prune_fusion": 0.0, "allocate": False, "recovery_features": 0.0, **EIGHT},
    "allocate": {"prune_image": 0.6, "prune_fusion": 0.5, "allocate": True, "recovery_features": 0.0, **EIGHT},
    "2 mixed pairs per train pair": {"prune_image": 0.6, "prune_fusion": 0.5, "allocate": False, "recovery_features": 0.0, "recovery_mixed": 2.0,
                                     **EIGHT},
    "hidden states matched (recovery_features 1.0)": {"prune_image": 0.6, "prune_fusion": 0.5, "allocate": False, "recovery_features": 1.0, **EIGHT},
    "allocate + fusion whole": {"prune_image": 0.6, "prune_fusion": 0.0, "allocate": True, "recovery_features": 0.0, **EIGHT},
    "allocate + fusion whole + hidden states": {"prune_image": 0.6, "prune_fusion": 0.0, "allocate": True, "recovery_features": 1.0, **EIGHT},
    "allocate + fusion whole, image 0.5": {"prune_image": 0.5, "prune_fusion": 0.0, "allocate": True, "recovery_features": 0.0, **EIGHT},
    "allocate + fusion whole, image 0.5, hidden states (the defaults of 4ca5971)": DEFAULTS_4CA5971,
    "the defaults of 4ca5971 + 2 mixed pairs per train pair": {**DEFAULTS_4CA5971, "recovery_mixed": 2.0},
    "the defaults of 4ca5971, 10 epochs (the defaults since 6439093)": {**DEFAULTS_4CA5971, "recovery_epochs": 10},
    "the defaults of 4ca5971 + 2 mixed pairs, 10 epochs": {**DEFAULTS_4CA5971, "recovery_mixed": 2.0, "recovery_epochs": 10},
    "the defaults of 6439093, recovery_lr 1e-3": {**DEFAULTS_4CA5971, "recovery_epochs": 10, "recovery_lr": 1e-3},
    "image only (text whole)": {**DEFAULTS_4CA5971, "recovery_epochs": 10, "prune_text": 0.0},
    "text only (image whole)": {**DEFAULTS_4CA5971, "recovery_epochs": 10, "prune_image": 0.0},
    "the defaults of 6439093, recovery_lr 2.5e-4": {**DEFAULTS_4CA5971, "recovery_epochs": 10, "recovery_lr": 2.5e-4},
    "taylor importance on 64 calib samples (the defaults of 818a968)": {**DEFAULTS_4CA5971, "recovery_epochs": 10, "importance": "taylor",
                                                                       "importance_samples": 64},
    "taylor importance on 256 calib samples (the defaults of 73a8a8c)": {**DEFAULTS_4CA5971, "recovery_epochs": 10, "importance": "taylor",
                                                                            "importance_samples": 256},
    "taylor on 256, image 0.55, text 0.7 (the defaults since this row)": {**DEFAULTS_4CA5971, "recovery_epochs": 10, "importance": "taylor", "importance_samples": 256,
                                            "prune_image": 0.55, "prune_text": 0.7},
    "taylor on 256, image 0.6, text 0.65": {**DEFAULTS_4CA5971, "recovery_epochs": 10, "importance": "taylor", "importance_samples": 256,
                                            "prune_image": 0.6, "prune_text": 0.65},
}


def toml_value(value: object) -> str:
    return str(value).lower() if isinstance(value, bool) else repr(value)


def write_target(directory: Path, index: int, changes: dict) -> Path:
    text = (resources.files("pipeline.resources") / "targets" / "jetson-orin-nano.toml").read_text()
    lines, section = [], None
    for line in text.splitlines():
        stripped = line.split("#")[0].strip()
        if stripped.startswith("["):
            section = stripped
        key = stripped.split("=")[0].strip() if "=" in stripped else None
        if section == "[compression]" and key in changes:
            continue  # written again below, changed
        lines.append(line)
        if stripped == "[compression]":
            lines += [f"{k} = {toml_value(v)}" for k, v in changes.items()]
    lines = [line.replace('name = "jetson-orin-nano"', f'name = "variant-{index}"') if line.startswith("name =") else line for line in lines]
    lines = [line for line in lines if not line.startswith("aliases")]
    lines += ["", "[gates.prune]", "max_drop_pts = -100.0  # no model passes: the build ends once the prune stage is measured"]
    path = directory / f"variant-{index}.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def row(label: str, seed: int, manifest: dict) -> str:
    source, prune = manifest["stages"][0], next(s for s in manifest["stages"] if s["name"] == "prune")
    parity, recovery = prune["parity"], prune["facts"]["recovery"]
    macs, reference = prune["footprint"]["macs"]["total"], source["footprint"]["macs"]["total"]
    return (f"| {label} | {seed} | {macs / 1e6:.0f} M ({100 * macs / reference:.1f}%) | {recovery['val_best']['kl']:.4f} | "
            f"{parity['vs_reference']['sqnr_db']:.2f} | {parity['vs_reference']['agreement']:.4f} | "
            f"{parity['paired']['fixed']}/{parity['paired']['broken']} | {parity['delta_pts']:+.2f} | {recovery['wall_s']:.0f} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--warm", type=Path, required=True, help="a jetson build directory whose source stage is cached")
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgepipe-variants"), help="scratch directory (wiped first)")
    parser.add_argument("--only", nargs="*", type=int, default=None, help="the variants to run, by their place in the table (0-based)")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0], help="recovery seeds (--recovery-seed)")
    parser.add_argument("--kernels", choices=("avx2", "native"), default="avx2",
                        help="EDGEPIPE_KERNELS for the builds (WARM must hold a source built with the same kernels, else it is trained)")
    args = parser.parse_args()
    environment = {k: v for k, v in os.environ.items() if k not in RECORDED} | {"EDGEPIPE_KERNELS": args.kernels}
    shutil.rmtree(args.out, ignore_errors=True)
    args.out.mkdir(parents=True)
    lines = ["| variant | seed | MACs | calib KL (the checkpoint's) | eval SQNR dB vs source | eval agreement | fixed/broken | Δpts | recovery s |",
             "|---|---|---|---|---|---|---|---|---|"]
    runs = [(index, label, changes, seed) for index, (label, changes) in enumerate(VARIANTS.items()) for seed in args.seeds
            if args.only is None or index in args.only]
    warm = args.warm
    for index, label, changes, seed in runs:
        out = args.out / f"variant-{index}-seed{seed}"
        for part in ("stages", "outputs"):
            shutil.copytree(warm / part, out / part, dirs_exist_ok=True)
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "pipeline", "build", "--target", str(write_target(args.out, index, changes)), "--out", str(out),
                        "--recovery-seed", str(seed), "--quiet"], capture_output=True, text=True, env=environment)
        manifest = json.loads((out / "manifest.json").read_text())
        lines.append(row(label, seed, manifest))
        print(f"{label}, seed {seed}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        warm = out  # its source stage is cached at this code's key, whatever WARM's was: the source trains once at most
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
