"""Does the default build's verdict hold across seeds and CPU kinds? Every gate's margin, side by side.

    python benchmarks/robustness.py --out /tmp/edgepipe-robustness

For each CPU kind (`native`: the kernels this CPU picks, EDGEPIPE_KERNELS=native
and none of the pinning variables; `avx2`: the build's default, torch's ATen
kernels, oneDNN and MKL's instruction set pinned to AVX2, see pipeline/kernels.py) the source model
is trained once; then for each recovery seed the compression stages run fresh
(`--recovery-seed`) and each target is built on top of them (the targets share
the compression budget, so `cpu` reuses `jetson`'s prune, factorize and export
stages from the cache and quantizes them its own way). Latency is not timed
(`--no-latency`): this is about verdicts. Prints a markdown table: per run the
status, every stage's accuracy change with its 95% interval, the final
model's agreement with the source, the smallest margin to an accuracy gate,
stage times, and the sha256 of the artifacts, so the two kinds' bytes can be
compared.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from pipeline.kernels import RECORDED, cpu_facts
ACCURACY_GATED = ("prune", "factorize", "quantize")


def kind_environment(kind: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in RECORDED}
    env["EDGEPIPE_KERNELS"] = "native" if kind == "native" else "avx2"
    return env


def build(target: str, out: Path, seed: int, kind: str, extra: list[str]) -> tuple[int, float, dict | None, str]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", "build", "--target", target, "--out", str(out), "--recovery-seed", str(seed),
                             "--no-latency", "--json", *extra], capture_output=True, text=True, env=kind_environment(kind))
    wall = time.perf_counter() - start
    try:
        summary = json.loads(result.stdout)
    except ValueError:
        summary = None
    return result.returncode, wall, summary, result.stderr[-2000:]


def margins(summary: dict, manifest: dict) -> dict[str, float]:
    """Budget minus drop, points, for every accuracy-gated stage (negative: the gate failed)."""
    gates = manifest["target"]["gates"]
    found = {}
    for stage in summary["stages"]:
        budget = (gates.get(stage["name"]) or {}).get("max_drop_pts")
        if stage["name"] in ACCURACY_GATED and budget is not None and stage["parity"]:
            found[stage["name"]] = budget + stage["parity"]["delta_pts"]
    return found


def row(target: str, kind: str, seed: int, code: int, wall: float, summary: dict | None, manifest: dict | None, error: str) -> dict:
    if summary is None or manifest is None:
        return {"target": target, "kind": kind, "seed": seed, "status": f"exit {code}", "error": error.strip().splitlines()[-1:] or [""]}
    stages = {s["name"]: s for s in summary["stages"]}
    final = stages.get("quantize") or summary["stages"][-1]
    return {
        "target": target, "kind": kind, "seed": seed, "status": summary["status"], "exit": code, "wall_s": round(wall, 1),
        "aten": manifest["machine"]["aten_capability"], "kernels": manifest["versions"].get("kernels"),
        "delta": {n: s["parity"]["delta_pts"] for n, s in stages.items() if s["parity"]},
        "ci": {n: s["parity"]["paired"]["delta_ci_pts"] for n, s in stages.items() if s["parity"]},
        "fixed_broken": {n: (s["parity"]["paired"]["fixed"], s["parity"]["paired"]["broken"]) for n, s in stages.items() if s["parity"]},
        "agreement": final["parity"]["vs_reference"]["agreement"] if final["parity"] else None,
        "margins": margins(summary, manifest),
        "times": {n: s["wall_s"] for n, s in stages.items() if not s["cached"]},
        "sha256": {n: s["sha256"] for n, s in stages.items()},
    }


def markdown(rows: list[dict]) -> str:
    header = ("| target | CPU kind | seed | status | prune Δpts [95% CI] | factorize Δpts | INT8 Δpts [95% CI] | INT8 fixed/broken | "
              "INT8 agreement | worst margin to an accuracy gate (pts) | stage times run (s) |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in rows:
        if "delta" not in r:
            lines.append(f"| {r['target']} | {r['kind']} | {r['seed']} | {r['status']} | {' '.join(r['error'])} |  |  |  |  |  |  |")
            continue
        ci = lambda name: "[{:+.2f}, {:+.2f}]".format(*r["ci"][name]) if name in r["ci"] else ""
        delta = lambda name: f"{r['delta'][name]:+.2f}" if name in r["delta"] else "-"
        worst = min(r["margins"].values()) if r["margins"] else float("nan")
        times = ", ".join(f"{n} {t:.0f}" for n, t in r["times"].items())
        fixed, broken = r["fixed_broken"].get("quantize", ("-", "-"))
        lines.append(f"| {r['target']} | {r['kind']} (aten {r['aten']}) | {r['seed']} | {r['status']} | {delta('prune')} {ci('prune')} | "
                     f"{delta('factorize')} | {delta('quantize')} {ci('quantize')} | {fixed}/{broken} | {r['agreement']:.4f} | "
                     f"{worst:+.2f} | {times} |")
    return "\n".join(lines)


def byte_comparison(rows: list[dict]) -> list[str]:
    """Per seed and target: which stages' artifacts are byte-identical between the CPU kinds."""
    lines = []
    runs = {(r["target"], r["seed"], r["kind"]): r for r in rows if "sha256" in r}
    for (target, seed, kind), r in sorted(runs.items()):
        other = runs.get((target, seed, "avx2"))
        if kind != "native" or other is None:
            continue
        same = [n for n, sha in r["sha256"].items() if other["sha256"].get(n) == sha]
        differ = [n for n in r["sha256"] if n not in same]
        lines.append(f"- {target}, seed {seed}: identical {', '.join(same) or 'none'}; different {', '.join(differ) or 'none'}")
    return lines


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgepipe-robustness"), help="scratch directory (wiped first)")
    parser.add_argument("--targets", nargs="+", default=["jetson", "cpu"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--kinds", nargs="+", choices=("native", "avx2"), default=["native", "avx2"])
    parser.add_argument("--json", type=Path, default=None, help="also write the rows here")
    parser.add_argument("--warm", type=Path, nargs="*", default=[],
                        help="build directories whose stage cache (and logits) each kind's first run starts from; a stage is "
                             "reused only where its cache key matches (same code inputs, versions and kernel settings), else it runs")
    parser.add_argument("extra", nargs="*", help="more build flags, after --")
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    rows = []
    for kind in args.kinds:
        previous: Path | None = None
        for seed in args.seeds:
            out = args.out / kind / f"seed{seed}"
            if previous is not None:  # the source model (and its logits) from the cache: only the compression is fresh
                shutil.copytree(previous, out, ignore=shutil.ignore_patterns(".lock", "bundle"))
            else:
                for warm in args.warm:
                    for part in ("stages", "outputs"):
                        shutil.copytree(warm / part, out / part, dirs_exist_ok=True)
            for target in args.targets:
                code, wall, summary, error = build(target, out, seed, kind, args.extra)
                manifest = json.loads((out / "manifest.json").read_text()) if (out / "manifest.json").is_file() else None
                rows.append(row(target, kind, seed, code, wall, summary, manifest, error))
                print(f"{kind} seed {seed} {target}: {rows[-1]['status']} ({wall:.0f} s)", file=sys.stderr, flush=True)
            previous = out
    print(f"machine: {cpu_facts()['model']} (ISA {', '.join(cpu_facts()['isa'])}), {os.cpu_count()} cores; command: python benchmarks/robustness.py "
          f"--targets {' '.join(args.targets)} --seeds {' '.join(map(str, args.seeds))} --kinds {' '.join(args.kinds)}\n")
    print(markdown(rows))
    comparison = byte_comparison(rows)
    if comparison:
        print("\nbytes, native vs avx2 kernels:\n" + "\n".join(comparison))
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2))
    return 0 if all(r.get("status") == "ok" for r in rows) else 1


if __name__ == "__main__":
    raise SystemExit(main())
