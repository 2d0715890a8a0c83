"""Where an ONNX model's CPU time goes: ONNX Runtime's own profiler, time per op type.

    python benchmarks/ort_profile.py out/cpu/stages/quantize/<key>/model.int8.onnx --batch 1

Runs the model (2 threads, the inputs the export stage uses) with
SessionOptions.enable_profiling and sums the kernel time of every node per op
type. Profiling adds overhead of its own: compare op types within one run.
"""

from __future__ import annotations

import argparse
import collections
import json
import tempfile
from pathlib import Path

from pipeline.data.encode import InputSpec
from pipeline.export import example_inputs
from pipeline.runners import ort_session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("onnx", type=Path)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--runs", type=int, default=30)
    parser.add_argument("--image-size", type=int, default=192)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        session = ort_session(args.onnx, threads=2, profile_prefix=Path(tmp) / "profile")
        names = [i.name for i in session.get_inputs()]
        feed = {n: t.numpy() for n, t in zip(names, example_inputs(InputSpec(image_size=args.image_size), args.batch))}
        for _ in range(args.runs):
            session.run(None, feed)
        events = json.loads(Path(session.end_profiling()).read_text())
    time_us, nodes = collections.Counter(), collections.defaultdict(set)
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            time_us[event["args"]["op_name"]] += event["dur"]
            nodes[event["args"]["op_name"]].add(event["name"])
    total = sum(time_us.values())
    print(f"{args.onnx} batch {args.batch}: {total / args.runs / 1000:.2f} ms of kernel time per run (profiled)")
    for op, us in time_us.most_common(15):
        print(f"  {op:28s} {us / args.runs / 1000:7.3f} ms  {100 * us / total:5.1f}%  {len(nodes[op])} nodes")


if __name__ == "__main__":
    main()
