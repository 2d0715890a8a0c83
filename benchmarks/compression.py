"""Benchmark the compression stages on a trained model: params, MACs, accuracy before/after, recovery cost.

    python benchmarks/compression.py --reference out/jetson-orin-nano/stages/source/<key>/torch \
        --plans text-trainable,text-all,text-all+image-all --epochs 6

Each plan prunes (and/or factorizes) the reference, recovers by distillation
against the reference's logits on the train split (pipeline.training.train,
early stop once calib accuracy is within --max-drop of the reference's), and
is scored on the eval split. Writes a markdown table (--out) and prints it.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.compression.measure import macs_by_branch, onnx_cpu_latency_ms, params_by_branch
from pipeline.data import load_dataset
from pipeline.data.encode import Encoded, encode
from pipeline.models.checkpoint import input_spec_of, load_torch_artifact, read_description
from pipeline.export import example_inputs, export_onnx
from pipeline.compression.factorize import factorize
from pipeline.compression.prune import prune, set_trainable_split
from pipeline.targets import Compression
from pipeline.training import TrainSettings, train


@dataclass(frozen=True)
class Plan:
    name: str
    compression: Compression
    scope: str = "trainable"
    widen_text: bool = False  # train every pruned text layer during recovery
    energy: float | None = None  # factorize after pruning
    embeddings: bool = False
    embedding_energy: float | None = None
    allocate: bool = False  # per-unit ratios from sensitivity (same parameter budget per branch)


PLANS = {
    "text-trainable": Plan("text-trainable", Compression(prune_image=0.5, prune_text=0.5, prune_fusion=0.5)),
    "text-all": Plan("text-all", Compression(prune_text=0.5, prune_fusion=0.5), scope="all", widen_text=True),
    "text-all+image-all": Plan("text-all+image-all", Compression(prune_image=0.5, prune_text=0.5, prune_fusion=0.5), scope="all", widen_text=True),
    "text-all-allocated": Plan("text-all-allocated", Compression(prune_text=0.5, prune_fusion=0.5), scope="all", widen_text=True, allocate=True),
    "image-all": Plan("image-all", Compression(prune_image=0.5), scope="all"),
    "image-all-0.3": Plan("image-all-0.3", Compression(prune_image=0.3), scope="all"),
    "factorize-0.9": Plan("factorize-0.9", Compression(), energy=0.9),
    "text-all+factorize-0.9": Plan("text-all+factorize-0.9", Compression(prune_text=0.5, prune_fusion=0.5), scope="all", widen_text=True, energy=0.9),
    "text-all+emb-0.8": Plan("text-all+emb-0.8", Compression(prune_text=0.5, prune_fusion=0.5), scope="all", widen_text=True,
                             energy=1.0, embeddings=True, embedding_energy=0.8),
}


_PREFIX_CACHE: dict[tuple, torch.Tensor] = {}


def _prefix_fingerprint(encoder: torch.nn.Module) -> tuple:
    """Identifies the frozen image prefix's weights: plans that leave it alone share its (costly) outputs."""
    modules = [encoder.stem, *encoder.blocks[: encoder.split_at]]
    return tuple((tuple(p.shape), round(float(p.detach().double().sum()), 6)) for m in modules for p in m.parameters())


def _image_prefix(model: torch.nn.Module, data: Encoded, batch: int) -> torch.Tensor:
    key = (id(data), _prefix_fingerprint(model.image_encoder))
    if key not in _PREFIX_CACHE:
        with torch.inference_mode():
            _PREFIX_CACHE[key] = torch.cat([model.image_encoder.prefix(torch.from_numpy(b["image"])) for b in data.batches(batch)])
    return _PREFIX_CACHE[key]


def predict(model: torch.nn.Module, data: Encoded, batch: int = 64) -> np.ndarray:
    """Logits on a split; the EfficientNet prefix runs once per distinct prefix (EffNet at 224 px dominates the time)."""
    model.eval()
    prefix = _image_prefix(model, data, batch)
    out = []
    with torch.inference_mode():
        for start, b in zip(range(0, len(data), batch), data.batches(batch)):
            image = model.image_encoder.suffix(prefix[start:start + batch])
            text = model.text_encoder(torch.from_numpy(b["input_ids"]), torch.from_numpy(b["attention_mask"]))
            out.append(model.head(image, text).numpy())
    return np.concatenate(out)


def reference_logits(reference, splits, cache: Path | None) -> dict[str, np.ndarray]:
    if cache is not None and cache.exists():
        stored = np.load(cache)
        return {name: stored[name] for name in stored.files}
    logits = {name: predict(reference, data) for name, data in splits.items()}
    if cache is not None:
        np.savez(cache, **logits)
    return logits


def score(logits: np.ndarray, reference: np.ndarray, labels: np.ndarray) -> dict[str, float]:
    return {"accuracy": float((logits.argmax(1) == labels).mean()), "agreement": float((logits.argmax(1) == reference.argmax(1)).mean())}


def allocated_ratios(model, plan: Plan, calib: Encoded, samples: int = 64) -> dict[str, float]:
    from pipeline.compression.sensitivity import allocate_ratios, prune_sensitivity
    from pipeline.compression.prune import branch_ratios, units_in_scope

    batch = calib.subset(range(min(samples, len(calib))))
    inputs = tuple(torch.from_numpy(batch.inputs[k]) for k in ("image", "input_ids", "attention_mask"))
    ratios = {b: r for b, r in branch_ratios(plan.compression).items() if r > 0}
    units = [u for u in units_in_scope(model, plan.scope, tuple(t[:2] for t in inputs)) if u.branch in ratios]
    sensitivities = prune_sensitivity(model, units, inputs, torch.from_numpy(batch.labels))
    allocation = allocate_ratios(sensitivities, ratios)
    for s in sensitivities:
        print(f"sensitivity {s.name:28s} nmse={s.nmse:.4f} agreement={s.agreement:.3f} drop={s.accuracy_drop_pts:+.1f} -> ratio {allocation.get(s.name)}", flush=True)
    return allocation


def recover(model, splits, teacher, reference_calib_accuracy, epochs, max_drop, widen_text):
    if widen_text:
        set_trainable_split(model, text_layers=len(model.text_encoder.encoder.layer))
    stop = lambda accuracy: accuracy >= reference_calib_accuracy - max_drop
    start = time.perf_counter()
    model, report = train(model, splits["train"], splits["calib"], TrainSettings(epochs=epochs), teacher_logits=teacher, stop_when=stop, desc="recover")
    return model, {"epochs_run": report.epochs_run, "best_epoch": report.best_epoch, "calib_accuracy": report.best_val_accuracy,
                   "recover_s": round(time.perf_counter() - start, 1)}


def measure(model, inputs) -> dict[str, Any]:
    return {"params": params_by_branch(model), "macs": macs_by_branch(model, inputs)}


def onnx_row(model, spec, workdir: Path) -> dict[str, Any]:
    artifact = export_onnx(model, spec, workdir)
    return {"onnx_mb": round(artifact.meta["size_bytes"] / 1e6, 2), **{k: round(v, 2) for k, v in onnx_cpu_latency_ms(artifact.path, spec).items()}}


def run_plan(plan: Plan, reference, spec, splits, teacher, ref_eval, ref_calib_acc, args) -> list[dict[str, Any]]:
    inputs = example_inputs(spec)
    rows, model = [], reference
    if any((plan.compression.prune_image, plan.compression.prune_text, plan.compression.prune_fusion)):
        start = time.perf_counter()
        unit_ratios = allocated_ratios(model, plan, splits["calib"]) if plan.allocate else None
        model, facts = prune(model, plan.compression, inputs, scope=plan.scope, unit_ratios=unit_ratios)
        prune_s = time.perf_counter() - start
        before = score(predict(model, splits["eval"]), ref_eval, splits["eval"].labels)
        model, rec = recover(model, splits, teacher, ref_calib_acc, args.epochs, args.max_drop, plan.widen_text)
        rows.append({"plan": plan.name, "stage": "prune", "stage_s": round(prune_s, 1), "units": len(facts["units"]),
                     "accuracy_before_recovery": before["accuracy"], **score(predict(model, splits["eval"]), ref_eval, splits["eval"].labels),
                     **rec, **measure(model, inputs)})
    if plan.energy is not None:
        start = time.perf_counter()
        model, facts = factorize(model, plan.energy, embeddings=plan.embeddings, embedding_energy=plan.embedding_energy)
        factorize_s = time.perf_counter() - start
        before = score(predict(model, splits["eval"]), ref_eval, splits["eval"].labels)
        model, rec = recover(model, splits, teacher, ref_calib_acc, args.epochs, args.max_drop, plan.widen_text or plan.embeddings)
        rows.append({"plan": plan.name, "stage": "factorize", "stage_s": round(factorize_s, 1), "units": len(facts["layers_factorized"]),
                     "accuracy_before_recovery": before["accuracy"], **score(predict(model, splits["eval"]), ref_eval, splits["eval"].labels),
                     **rec, **measure(model, inputs)})
    if args.onnx and rows:
        with tempfile.TemporaryDirectory() as tmp:
            rows[-1].update(onnx_row(model, spec, Path(tmp)))
    return rows


def markdown(rows: list[dict[str, Any]], reference_row: dict[str, Any]) -> str:
    ref_params, ref_macs, ref_acc = reference_row["params"]["total"], reference_row["macs"]["total"], reference_row["accuracy"]
    header = ("| plan | stage | params (M) | % ref | MACs (M) | % ref | image/text/fusion MACs (M) | eval acc | Δ pts | agreement | "
              "acc before recovery | recovery epochs | recovery s | stage s | ONNX MB | ORT b1 ms | ORT b16 ms |")
    lines = [header, "|" + "---|" * (header.count("|") - 1)]
    for r in [reference_row, *rows]:
        m = r["macs"]
        lines.append(
            f"| {r['plan']} | {r['stage']} | {r['params']['total'] / 1e6:.2f} | {100 * r['params']['total'] / ref_params:.0f}% | "
            f"{m['total'] / 1e6:.1f} | {100 * m['total'] / ref_macs:.0f}% | {m.get('image', 0) / 1e6:.0f}/{m.get('text', 0) / 1e6:.0f}/{m.get('fusion', 0) / 1e6:.1f} | "
            f"{100 * r['accuracy']:.2f} | {100 * (r['accuracy'] - ref_acc):+.2f} | {100 * r['agreement']:.1f} | "
            f"{100 * r['accuracy_before_recovery']:.2f} | {r.get('epochs_run', '-')} | {r.get('recover_s', '-')} | {r.get('stage_s', '-')} | "
            f"{r.get('onnx_mb', '-')} | {r.get('batch1_ms', '-')} | {r.get('batch16_ms', '-')} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reference", type=Path, required=True, help="torch artifact dir (model.pt + model.json)")
    parser.add_argument("--plans", default="text-trainable,text-all", help=f"comma-separated, from: {', '.join(PLANS)}")
    parser.add_argument("--epochs", type=int, default=6, help="recovery epoch budget per stage")
    parser.add_argument("--max-drop", type=float, default=0.005, help="early stop once calib accuracy is within this of the reference's")
    parser.add_argument("--onnx", action="store_true", help="also export each plan's final model: ONNX size and ORT CPU latency (2 threads)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--reference-cache", type=Path, help="npz of the reference's logits per split (written if absent)")
    parser.add_argument("--out", type=Path, help="write the markdown table here")
    parser.add_argument("--json", type=Path, help="write the raw rows here")
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)

    description = read_description(args.reference)
    spec = input_spec_of(description)
    reference = load_torch_artifact(args.reference)
    dataset = load_dataset("emoji")
    splits = {name: encode(dataset.split(name), spec) for name in ("train", "calib", "eval")}
    ref_logits = reference_logits(reference, splits, args.reference_cache)
    teacher, ref_eval = ref_logits["train"], ref_logits["eval"]
    ref_calib_acc = float((ref_logits["calib"].argmax(1) == splits["calib"].labels).mean())
    reference_row = {"plan": "reference", "stage": "source", **score(ref_eval, ref_eval, splits["eval"].labels), **measure(reference, example_inputs(spec))}
    reference_row["accuracy_before_recovery"] = reference_row["accuracy"]
    if args.onnx:
        with tempfile.TemporaryDirectory() as tmp:
            reference_row.update(onnx_row(reference, spec, Path(tmp)))
    rows: list[dict[str, Any]] = []
    for name in args.plans.split(","):
        rows += run_plan(PLANS[name], reference, spec, splits, teacher, ref_eval, ref_calib_acc, args)
        print(json.dumps(rows[-1], default=str), flush=True)
        write_results(args, reference_row, rows)  # after every plan: a long run that is cut short still leaves its rows


def write_results(args, reference_row: dict[str, Any], rows: list[dict[str, Any]]) -> None:
    table = markdown(rows, reference_row)
    print(table, flush=True)
    if args.out:
        args.out.write_text(f"Command: `python {' '.join(sys.argv)}`\n\n{table}\n")
    if args.json:
        args.json.write_text(json.dumps([reference_row, *rows], indent=1, default=str))


if __name__ == "__main__":
    main()
