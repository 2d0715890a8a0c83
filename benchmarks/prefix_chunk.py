"""The frozen image prefix run a few images at a time against whole batches: time and bits, side by side.

    python benchmarks/prefix_chunk.py --out out/jetson-orin-nano [--chunks 64,16,8,4] [--repeats 2]

Reads a build's source model and computes its frozen-prefix outputs on the
train split (pipeline.training.prefix_outputs, batches of the model's
training batch size, with prune's waypoint after block 6 kept on the way, as
in a cold build) once per chunk size per repeat, alternating the order.
pipeline.training.IMAGE_PREFIX_CHUNK is set for each run; 64 is the whole
batch (the code before chunking). Prints a markdown table: median seconds,
minor page faults and system CPU seconds per run, and whether the outputs
are bitwise those of the whole-batch run. Kernels and memory settings are
the CLI's (set before torch loads).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.allocator import tune_allocator  # noqa: E402
from pipeline.kernels import cpu_facts, pin_kernels  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
tune_allocator()
pin_kernels()

import torch  # noqa: E402

import pipeline.training as training  # noqa: E402
from pipeline.compression.prune import widen_reach  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.data.splits import Splits  # noqa: E402
from pipeline.models import train_defaults  # noqa: E402
from pipeline.models.checkpoint import input_spec_of, load_torch_artifact, read_description  # noqa: E402
from pipeline.targets import resolve_target  # noqa: E402


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True, help="a build's output directory (manifest.json, stages/)")
    parser.add_argument("--chunks", default="64,16,8,4")
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    chunks = [int(c) for c in args.chunks.split(",")]
    manifest = json.loads((args.out / "manifest.json").read_text())
    source = args.out / next(s for s in manifest["stages"] if s["name"] == "source")["artifact"]["path"]
    compression = resolve_target(manifest["target"]["name"]).compression
    model = load_torch_artifact(source).eval()
    train = Splits(load_dataset(manifest["config"]["data"]), input_spec_of(read_description(source))).get("train")
    batch = train_defaults(manifest["config"]["model"]).batch_size

    def run(chunk: int) -> tuple[float, int, float, list[torch.Tensor]]:
        training.IMAGE_PREFIX_CHUNK = chunk
        cache = training.PrefixCache(waypoints=[lambda m: widen_reach(m, compression)])
        before, start = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        training.prefix_outputs(model, train, batch, cache, desc=f"chunk {chunk}")
        wall, after = time.perf_counter() - start, resource.getrusage(resource.RUSAGE_SELF)
        kept = [t for _, value in cache._entries.values() for t in value]  # the split's and the waypoint's outputs
        return wall, after.ru_minflt - before.ru_minflt, after.ru_stime - before.ru_stime, kept

    runs: dict[int, list[tuple[float, int, float]]] = {c: [] for c in chunks}
    reference: list[torch.Tensor] | None = None
    same: dict[int, bool] = {}
    for repeat in range(args.repeats):
        for chunk in (chunks if repeat % 2 == 0 else list(reversed(chunks))):
            wall, faults, system, outputs = run(chunk)
            runs[chunk].append((wall, faults, system))
            if chunk == max(chunks) and reference is None:
                reference = outputs
            same.setdefault(chunk, True)
            same[chunk] = same[chunk] and (reference is None or all(torch.equal(a, b) for a, b in zip(outputs, reference)))
            print(f"repeat {repeat}: chunk {chunk}: {wall:.1f} s", file=sys.stderr)
    cpu = cpu_facts()
    print(f"prefix outputs of the train split ({len(train)} samples, batches of {batch}); {cpu.get('model', '?')}, "
          f"{os.cpu_count()} cores, {args.repeats} alternating repeats\n")
    print(f"| images per pass | median s | runs (s) | minor page faults (median) | system CPU s (median) | bitwise the {max(chunks)}-image run's |")
    print("|---|---|---|---|---|---|")
    for chunk in chunks:
        walls = [r[0] for r in runs[chunk]]
        print(f"| {chunk} | {statistics.median(walls):.1f} | {', '.join(f'{w:.1f}' for w in walls)} | "
              f"{statistics.median(r[1] for r in runs[chunk]):,.0f} | {statistics.median(r[2] for r in runs[chunk]):.1f} | "
              f"{'yes' if same[chunk] else 'NO'} |")
    return 0 if all(same.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
