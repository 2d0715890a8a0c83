"""How closely does a build's compressed model follow its source on the split it trained on, and on the ones it did not?

    python benchmarks/split_fidelity.py out/jetson-orin-nano --stage prune

Reads the build's manifest for the source artifact and the stage's, runs both
torch models over the train, calib and eval splits of the built-in data set,
and prints per split the KL(source || stage) at T = 1, the top-1 agreement
and both accuracies. A student far closer to its teacher on train than on
calib has learned the teacher's answers, not its function: more epochs or
data of the same kind will not close the gap (BENCHMARKS.md, "Where the
fidelity goes"). Run it with the build's kernels (EDGEPIPE_KERNELS) for
figures that match the ledger's.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from pipeline.kernels import pin_kernels

pin_kernels()  # before torch loads, as the CLI does: the build's kernel path (EDGEPIPE_KERNELS)

import torch  # noqa: E402

from pipeline.data import load_dataset  # noqa: E402
from pipeline.data.encode import encode  # noqa: E402
from pipeline.models.checkpoint import input_spec_of, load_torch_artifact, read_description  # noqa: E402
from pipeline.training import fidelity, predict_logits  # noqa: E402


def artifact_path(build: Path, manifest: dict, stage: str) -> Path:
    found = next((s for s in manifest["stages"] if s["name"] == stage and s.get("artifact")), None)
    if found is None:
        raise SystemExit(f"{build / 'manifest.json'}: no '{stage}' stage with an artifact")
    return build / found["artifact"]["path"]


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("build", type=Path, help="a build's output directory (its manifest.json and stages/)")
    parser.add_argument("--stage", default="prune", help="the stage whose torch artifact is compared with the source's")
    parser.add_argument("--data", default="emoji", help="the data set the build used")
    parser.add_argument("--data-seed", type=int, default=0, help="the build's --data-seed")
    args = parser.parse_args()
    manifest = json.loads((args.build / "manifest.json").read_text())
    source_path, stage_path = artifact_path(args.build, manifest, "source"), artifact_path(args.build, manifest, args.stage)
    teacher, student = load_torch_artifact(source_path), load_torch_artifact(stage_path)
    spec = input_spec_of(read_description(source_path))
    data = load_dataset(args.data, args.data_seed)
    print(f"| split | samples | KL(source ‖ {args.stage}) | agreement | {args.stage} accuracy | source accuracy |")
    print("|---|---|---|---|---|---|")
    for split in ("train", "calib", "eval"):
        encoded = encode(data.split(split), spec)
        labels = torch.from_numpy(encoded.labels)
        source = torch.from_numpy(predict_logits(teacher, encoded, 64))
        compressed = fidelity(torch.from_numpy(predict_logits(student, encoded, 64)), source, labels)
        print(f"| {split} | {len(encoded)} | {compressed.kl:.4f} | {compressed.agreement:.4f} | {compressed.accuracy:.4f} | "
              f"{fidelity(source, source, labels).accuracy:.4f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
