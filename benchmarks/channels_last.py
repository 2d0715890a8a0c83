"""The default model's image encoder in NCHW and in channels-last: the frozen prefix and the trained suffix, side by side.

    python benchmarks/channels_last.py [--repeats 7] [--batch 64]

Builds the default model (pretrained EfficientNet-Lite0, split where the
jetson target's pruning reaches: the last 10 blocks are the suffix) and times,
alternating the two layouts in one process under the build's pinned kernels:
the frozen prefix in inference mode over the train batch in chunks of
pipeline.training.IMAGE_PREFIX_CHUNK images, and one training step of the
suffix (forward, backward; BatchNorm statistics frozen as in the build) on
the prefix outputs. Prints a markdown table of medians and their ratio.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from pipeline.kernels import cpu_facts, pin_kernels  # noqa: E402

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
pin_kernels()

import torch  # noqa: E402

from pipeline.models import build_model, default_config  # noqa: E402
from pipeline.settings import DEFAULT_MODEL  # noqa: E402
from pipeline.training import IMAGE_PREFIX_CHUNK, _set_train_mode  # noqa: E402

LAYOUTS = {"NCHW": torch.contiguous_format, "channels-last": torch.channels_last}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64, help="the default model's training batch")
    parser.add_argument("--suffix-blocks", type=int, default=10, help="the jetson target's image_blocks")
    args = parser.parse_args()
    config = default_config(DEFAULT_MODEL, 9)
    torch.manual_seed(0)
    model = build_model(config, pretrained=True)
    encoder = model.image_encoder
    encoder.split_at = len(encoder.blocks) - args.suffix_blocks
    size = config.input_spec().image_size
    images = torch.rand(args.batch, 3, size, size)

    def prefix(layout: torch.memory_format) -> tuple[float, torch.Tensor]:
        encoder.eval()
        start = time.perf_counter()
        with torch.inference_mode():
            hidden = torch.cat([encoder.prefix(chunk) for chunk in images.contiguous(memory_format=layout).split(IMAGE_PREFIX_CHUNK)])
        return time.perf_counter() - start, hidden.clone()

    def suffix_step(hidden: torch.Tensor) -> float:
        _set_train_mode(model)
        start = time.perf_counter()
        encoder.suffix(hidden).square().mean().backward()
        elapsed = time.perf_counter() - start
        encoder.zero_grad(set_to_none=True)
        return elapsed

    times: dict[str, dict[str, list[float]]] = {name: {"prefix": [], "suffix": []} for name in LAYOUTS}
    for repeat in range(args.repeats):
        for name in (LAYOUTS if repeat % 2 == 0 else reversed(list(LAYOUTS))):
            seconds, hidden = prefix(LAYOUTS[name])
            times[name]["prefix"].append(seconds)
            times[name]["suffix"].append(suffix_step(hidden))
    cpu = cpu_facts()
    print(f"{cpu.get('model', '?')}, torch kernels {torch.backends.cpu.get_cpu_capability()}, {torch.get_num_threads()} threads; "
          f"batch {args.batch} at {size} px, suffix = last {args.suffix_blocks} blocks + head; medians of {args.repeats} alternating repeats\n")
    print("| pass | NCHW s | channels-last s | channels-last / NCHW |")
    print("|---|---|---|---|")
    for part, label in (("prefix", f"frozen prefix, inference, {IMAGE_PREFIX_CHUNK} images a pass"), ("suffix", "suffix training step (forward + backward)")):
        nchw, last = (statistics.median(times[name][part]) for name in LAYOUTS)
        print(f"| {label} | {nchw:.3f} | {last:.3f} | {last / nchw:.2f} |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
