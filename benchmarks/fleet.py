"""One fleet build against the same targets built one by one, each from a cold start, measured side by side in one run.

    python benchmarks/fleet.py --targets jetson-orin-nano,jetson-agx-orin,cpu --out /tmp/bench-fleet

Runs `python -m pipeline build --target T` for each target in its own fresh output directory (three
cold builds: each trains its own source model), then `python -m pipeline build --target T1,T2,T3` once
in a fresh directory (the fleet: one stage cache, a stage whose key the targets share runs once), and
prints a markdown table: per target its separate cold wall time and its share of the fleet's, which
stages the fleet ran and which it found cached, whether every stage's sha256 is the same in both, and
the ratio of the fleet's wall time to the sum of the separate ones.
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

from pipeline.kernels import cpu_facts


def timed_build(target: str, out: Path, extra: list[str]) -> tuple[float, int, dict]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", "build", "--target", target, "--out", str(out), "--json", *extra],
                            capture_output=True, text=True)
    wall = time.perf_counter() - start
    if not result.stdout.strip():
        sys.exit(f"build --target {target} printed no summary ({result.returncode}):\n{result.stderr[-3000:]}")
    return wall, result.returncode, json.loads(result.stdout)


def stages_of(summary: dict) -> dict[str, dict]:
    return {s["name"]: s for s in summary["stages"]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--targets", default="jetson-orin-nano,jetson-agx-orin,cpu", help="comma-separated targets (default: %(default)s)")
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgepipe-bench-fleet"), help="scratch directory (wiped first)")
    parser.add_argument("extra", nargs="*", help="more build flags, after --")
    args = parser.parse_args()
    targets = [t.strip() for t in args.targets.split(",")]
    shutil.rmtree(args.out, ignore_errors=True)
    built = [timed_build(t, args.out / "separate" / t, args.extra) for t in targets]
    separate = {summary["target"]: (wall, code, summary) for wall, code, summary in built}  # by name: an alias resolves
    fleet_wall, fleet_code, fleet = timed_build(args.targets, args.out / "fleet", args.extra)
    facts = cpu_facts()
    print(f"machine: {facts['model']} (ISA {', '.join(facts['isa'])}), {os.cpu_count()} CPU cores; "
          f"command: python benchmarks/fleet.py --targets {args.targets}\n")
    print("| target | separate cold build (s) | exit | fleet: its build (s) | fleet ran | fleet found cached | same sha256 every stage |")
    print("|---|---|---|---|---|---|---|")
    for entry in fleet["targets"]:
        wall, code, alone = separate[entry["target"]]
        mine = stages_of(alone)
        same = all(mine.get(s["name"], {}).get("sha256") == s["sha256"] for s in entry["stages"]) and len(mine) == len(entry["stages"])
        ran = ", ".join(s["name"] for s in entry["stages"] if not s["cached"]) or "-"
        cached = ", ".join(s["name"] for s in entry["stages"] if s["cached"]) or "-"
        print(f"| {entry['target']} | {wall:.1f} | {code} | {entry['wall_s']:.1f} | {ran} | {cached} | {'yes' if same else 'NO'} |")
    total = sum(wall for wall, _, _ in separate.values())
    print(f"\nseparate cold builds, sum of the whole commands: {total:.1f} s; the fleet, whole command: {fleet_wall:.1f} s "
          f"(exit {fleet_code}); fleet / separate = {fleet_wall / total:.2f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
