"""Vocabulary trimming alone, before any pruning: what it changes in the answers of the user-model sources.

    python benchmarks/vocabulary_trim.py --out /tmp/edgepipe-bench-user-models

Reads the directory benchmarks/user_models.py wrote (its data folder and each model's source
artifact), trims every model's token tables as the prune stage does (compression.vocabulary =
"auto", pipeline.compression.vocabulary.trim_vocabulary) with no pruning and no recovery, and
compares the trimmed model with its source on the eval split. Prints one markdown table: rows
kept, the eval accuracy change and top-1 agreement with the source.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(REPO), str(REPO / "tests")]

from pipeline.compression.prune import model_batches  # noqa: E402
from pipeline.compression.vocabulary import trim_vocabulary  # noqa: E402
from pipeline.data import load_dataset  # noqa: E402
from pipeline.data.splits import Splits  # noqa: E402
from pipeline.models.checkpoint import build_architecture, input_spec_of, load_torch_artifact, read_description  # noqa: E402

MODELS = ("recurrent", "transformer", "residual", "gated")


def logits(model: torch.nn.Module, data) -> torch.Tensor:
    with torch.inference_mode():
        return torch.cat([model(*batch) for batch in model_batches(data, len(data))])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", type=Path, default=Path("/tmp/edgepipe-bench-user-models"), help="benchmarks/user_models.py's --out")
    args = parser.parse_args()
    dataset = load_dataset(str(args.out / "data"))
    print("| model | table rows kept | eval accuracy change (pts) | top-1 agreement with the source |\n|---|---|---|---|")
    for name in MODELS:
        source = next((args.out / name / "stages" / "source").glob("*/torch"))
        description = read_description(source)
        splits = Splits(dataset, input_spec_of(description))
        model, teacher = load_torch_artifact(source), load_torch_artifact(source)
        facts = trim_vocabulary(model, "auto", True, lambda: build_architecture(description, pretrained=True),
                                splits.get("train"), splits.get("calib"), built_in=False)
        evaluation = splits.get("eval")
        labels = torch.from_numpy(evaluation.labels)
        before, after = logits(teacher, evaluation).argmax(1), logits(model, evaluation).argmax(1)
        change = 100 * ((after == labels).float().mean() - (before == labels).float().mean()).item()
        rows = ", ".join(f"{t['module']} {t['rows_before']} -> {t['rows_after']}" for t in facts["trimmed"])
        print(f"| {name} | {rows} | {change:+.2f} | {(after == before).float().mean().item():.3f} |")


if __name__ == "__main__":
    main()
