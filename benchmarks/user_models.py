"""The four user-style test models through the whole pipeline on the emoji matching task, then --onnx on one of their exports.

    python benchmarks/user_models.py --out /tmp/bench-user-models

The models are tests/user_models (a GRU text encoder, torch's TransformerEncoder with cross-attention,
a residual CNN with BatchNorm and gated fusion, an image + ids-only gated model), none written like the
built-in ones. The task is image-text matching (does the text name the emoji?), written by
tests/helpers.write_matching_folder with every emoji (3,796 samples, 948 on eval); recurrent:own_vocabulary
is the GRU model on its own word-level tokenizer (every word of the emoji names) instead of MiniLM's
30,522 ids, and recurrent+keep=words the GRU model with its token table pinned (--keep words). Each model is built
with `python -m pipeline build --model user_models.M:build --data DIR --target jetson --epochs 15`
(the jetson target's real ratios and gates), its bundle checked with `verify --runtime ort`; then the
FP32 ONNX the first model's export stage wrote is built again with `--onnx FILE` and verified. Prints
one markdown table: params and MACs of the shipped model against the source, the shipped stage's
accuracy change with its 95% interval, top-1 agreement with the source, each stage's time, verify's
exit, and the groups pruned and left whole.
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

REPO = Path(__file__).resolve().parent.parent
MODELS = ("recurrent", "transformer", "residual", "gated", "recurrent:own_vocabulary", "recurrent+keep=words")


TOKENIZER_WORDS = 4000  # more than the emoji names have: every word (the tokenizer came to 1,806 entries)


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), str(REPO / "tests")])}


def run(*args: str) -> tuple[float, subprocess.CompletedProcess]:
    start = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "pipeline", *args], capture_output=True, text=True, env=env())
    return time.perf_counter() - start, result


def row(name: str, wall: float, out: Path, verify_code: int) -> str:
    manifest = json.loads((out / "manifest.json").read_text())
    stages = {s["name"]: s for s in manifest["stages"]}
    source, shipped = manifest["stages"][0], manifest["stages"][-1]
    params = shipped["footprint"]["params"]["total"] / source["footprint"]["params"]["total"]
    macs = shipped["footprint"]["macs"]["total"] / source["footprint"]["macs"]["total"] if "total" in source["footprint"]["macs"] else None
    low, high = shipped["parity"]["paired"]["delta_ci_pts"]
    prune = (stages.get("prune") or {}).get("facts") or {}
    discovered = prune.get("discovered") or {}
    times = " / ".join(f"{stages[s]['wall_s']:.0f}" if s in stages else "-" for s in ("source", "prune", "factorize", "export", "quantize"))
    return (f"| {name} | {manifest['status']} | {source['parity']['accuracy']:.3f} | {shipped['parity']['accuracy']:.3f} | "
            f"{shipped['parity']['delta_pts']:+.2f} [{low:+.2f}, {high:+.2f}] | {shipped['parity']['vs_reference']['agreement']:.3f} | "
            f"{source['footprint']['params']['total'] / 1e3:.0f}k -> {params:.0%} | {'-' if macs is None else f'{macs:.0%}'} | {times} | {wall:.0f} | "
            f"{'ok' if verify_code == 0 else 'no bundle' if verify_code < 0 else f'exit {verify_code}'} | {len(prune.get('units', []))} / {len(discovered.get('left_whole', []))} |")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgepipe-bench-user-models"), help="scratch directory (wiped first)")
    parser.add_argument("--epochs", type=int, default=15)
    parser.add_argument("--models", default=",".join(MODELS))
    args = parser.parse_args()
    shutil.rmtree(args.out, ignore_errors=True)
    sys.path.insert(0, str(REPO / "tests"))
    from helpers import write_matching_folder
    from pipeline.kernels import cpu_facts

    from test_user_inputs import write_tokenizer

    data = write_matching_folder(args.out / "data", images=1898)
    texts = [json.loads(line)["text"] for line in (data / "samples.jsonl").read_text().splitlines()]
    os.environ["USER_MODELS_TOKENIZER"] = str(write_tokenizer(args.out / "tokenizer", texts, TOKENIZER_WORDS))
    rows, first_export = [], None
    for name in args.models.split(","):
        model, _, keep = name.partition("+keep=")  # recurrent+keep=words: its token table pinned (--keep words)
        out = args.out / name.replace(":", "-").replace("+keep=", "-keep-")
        factory = model if ":" in model else f"{model}:build"
        wall, built = run("build", "--model", f"user_models.{factory}", "--data", str(data), "--target", "jetson",
                          "--epochs", str(args.epochs), "--out", str(out), *(["--keep", keep] if keep else []))
        if not (out / "manifest.json").is_file():
            sys.exit(f"{name}: no manifest (exit {built.returncode}):\n{built.stderr[-3000:]}")
        _, verified = run("verify", "--bundle", str(out / "bundle"), "--runtime", "ort") if (out / "bundle").is_dir() else (0, built)
        rows.append(row(name, wall, out, verified.returncode if (out / "bundle").is_dir() else -1))
        export = next((s for s in json.loads((out / "manifest.json").read_text())["stages"] if s["name"] == "export"), None)
        if first_export is None and export is not None:
            first_export = (name, out / export["artifact"]["path"])
    if first_export is None:
        sys.exit("no model got as far as its export stage: nothing to build with --onnx\n" + "\n".join(rows))
    name, onnx = first_export
    out = args.out / f"onnx-{name}"
    wall, built = run("build", "--onnx", str(onnx), "--data", str(data), "--target", "jetson", "--out", str(out))
    _, verified = run("verify", "--bundle", str(out / "bundle"), "--runtime", "ort")
    rows.append(row(f"--onnx ({name}'s FP32 export)", wall, out, verified.returncode))
    facts = cpu_facts()
    print(f"machine: {facts['model']} (ISA {', '.join(facts['isa'])}), {os.cpu_count()} CPU cores; "
          f"command: python benchmarks/user_models.py (--epochs {args.epochs})\n")
    print("| model | status | source acc | shipped acc | Δpts [95% CI] | agreement | params -> shipped | MACs | "
          "stage s (source / prune / factorize / export / quantize) | build s | verify ort | groups pruned / left whole |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
