"""Human and machine summaries of a manifest: the one-screen ledger table and report.md."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from pipeline.errors import InputError


def read_manifest(out: Path) -> dict[str, Any]:
    """The manifest.json a build wrote into out, or an error naming the file."""
    path = Path(out) / "manifest.json"
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise InputError(f"{path}: not found; build first (python -m pipeline build --out {out})") from None
    except (OSError, ValueError) as error:
        raise InputError(f"{path}: not a readable manifest ({error})") from None
    problem = _manifest_problem(manifest)
    if problem:
        raise InputError(f"{path}: not a build manifest ({problem}); rebuild to write it again (python -m pipeline build --out {out})")
    return manifest


# What the ledger reads of a manifest, by key and JSON type (manifest.schema.json has the whole shape).
_MANIFEST_KEYS = {"status": str, "target": dict, "data": dict, "stages": list, "engine": dict, "wall_s": (int, float)}


def _manifest_problem(manifest: Any) -> str | None:
    if not isinstance(manifest, dict):
        return f"a JSON {type(manifest).__name__}, not an object"
    for key, kind in _MANIFEST_KEYS.items():
        if key not in manifest:
            return f"no key '{key}'"
        if not isinstance(manifest[key], kind) or isinstance(manifest[key], bool):
            return f"'{key}' is a {type(manifest[key]).__name__}"
    if "name" not in manifest["target"]:
        return "no key 'target.name'"
    for number, stage in enumerate(manifest["stages"]):
        if not isinstance(stage, dict) or not isinstance(stage.get("artifact"), dict) or "name" not in stage:
            return f"stages[{number}] is not a stage with a name and an artifact"
    return None


def report_markdown(manifest: dict[str, Any]) -> str:
    """report.md: what a reader of a CI artifact needs first, from the manifest beside it."""
    target, data, versions = manifest["target"], manifest["data"], manifest.get("versions", {})
    splits = ", ".join(f"{name} {size}" for name, size in data.get("splits", {}).items())
    calibration = data.get("calibration") or {}
    lines = [
        f"# edgepipe build: {target['name']} ({manifest['status']})", "",
        f"- target: {target.get('description', target['name'])}",
        f"- data: {data.get('dataset')} ({splits}); calibration set {calibration.get('name')} ({calibration.get('size')} samples, "
        f"sha256 {str(calibration.get('sha256'))[:12]})",
        "- versions: " + ", ".join(f"{name} {versions[name]}" for name in ("torch", "onnx", "onnxruntime", "tensorrt") if name in versions),
        "- every figure below is in manifest.json beside this file; parity is measured against the source model on the eval split",
        "", "```text", summary_table(manifest), "```", "",
    ]
    return "\n".join(lines)


def fmt(value: Any, spec: str) -> str:
    """A ledger figure: "-" when absent, a string as it is, a number in spec."""
    if value is None:
        return "-"
    if isinstance(value, str):
        return value
    return format(value, spec)


def text_table(header: list[str], rows: list[list[str]]) -> str:
    """Left-aligned columns under a header and a rule: the CLI's plain tables (targets, the fleet)."""
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(cell.ljust(w) for cell, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([line(header), line(["-" * w for w in widths]), *map(line, rows)])


def _interval(bounds: list[float] | None, spec: str) -> str:
    return "-" if not bounds else f"{format(bounds[0], spec)}..{format(bounds[1], spec)}"


def _mb(size: int | None) -> str:
    return "-" if size is None else f"{size / 1e6:.1f}"


ENDINGS = {"failed": "FAILED", "interrupted": "INTERRUPTED (rerun to resume from the cache)", "error": "ERROR"}


def summary(manifest: dict[str, Any]) -> dict[str, Any]:
    """The manifest without the bulky parts: status, ledger rows, engine outcome."""
    return {
        "status": manifest["status"],
        "failure": manifest.get("failure"),
        "error": manifest.get("error"),
        "target": manifest["target"]["name"],
        "wall_s": manifest["wall_s"],
        "stages": [
            {"name": s["name"], "path": s["artifact"]["path"], "sha256": s["artifact"]["sha256"], "size_bytes": s["size_bytes"],
             "cached": s["cached"], "wall_s": s["wall_s"], "parity": s["parity"], "footprint": s.get("footprint"),
             "resolution": s.get("resolution")}
            for s in manifest["stages"]
        ],
        "compression": manifest.get("compression"),
        "engine": manifest["engine"],
    }


def _millions(value: int) -> str:
    m = value / 1e6
    return f"{m:.0f}" if m >= 100 else f"{m:.1f}" if m >= 1 else f"{m:.2f}"


def _share(value: int | None, reference: int | None) -> str:
    return "-" if value is None or not reference else f"{100 * value / reference:.0f}%"


def summary_table(manifest: dict[str, Any]) -> str:
    header = ["stage", "acc", "Δpts", "Δ 95% CI", "fix/brk", "agree", "agree 95%", "cos min", "max|Δ|", "SQNR dB", "params M", "MACs M", "ONNX MB", "b1 ms", "b16 ms", "time s", "cached"]
    rows = []
    stages = manifest["stages"]
    reference = (stages[0].get("footprint") or {}) if stages else {}
    for stage in stages:
        p = stage["parity"] or {}
        ref = p.get("vs_reference", {})
        cost = stage.get("footprint") or {}
        params, macs = (cost.get("params") or {}).get("total"), (cost.get("macs") or {}).get("total")
        latency = cost.get("latency_ms") or {}
        pair = (p.get("paired") or {}) if stage is not stages[0] else {}  # the source compared with itself has nothing to resolve
        rows.append([
            stage["name"], fmt(p.get("accuracy"), ".4f"), fmt(p.get("delta_pts"), "+.2f"), _interval(pair.get("delta_ci_pts"), "+.2f"),
            f"{pair['fixed']}/{pair['broken']}" if pair else "-", fmt(ref.get("agreement"), ".4f"), _interval(pair.get("agreement_ci"), ".3f"),
            fmt(ref.get("cosine_min"), ".4f"), fmt(ref.get("max_abs_error"), ".2e"), fmt(ref.get("sqnr_db"), ".1f"),
            "-" if params is None else f"{_millions(params)} ({_share(params, (reference.get('params') or {}).get('total'))})",
            "-" if macs is None else f"{_millions(macs)} ({_share(macs, (reference.get('macs') or {}).get('total'))})",
            _mb(cost.get("onnx_bytes")), fmt(latency.get("batch1_ms"), ".1f"), fmt(latency.get("batch16_ms"), ".1f"),
            fmt(stage["wall_s"], ".1f"), "yes" if stage["cached"] else "no",
        ])
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(header)]
    line = lambda cells: "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))
    out = [f"target {manifest['target']['name']}  status {manifest['status']}  wall {manifest['wall_s']:.1f} s  (vs the source model on {manifest['data']['splits'].get('eval', '?')} eval samples)",
           line(header), line(["-" * w for w in widths]), *map(line, rows)]
    out.append("Δ 95% CI: paired interval of the accuracy change vs the source (points); fix/brk: eval samples the stage made right / wrong; "
               "agree 95%: Wilson interval of top-1 agreement with the source")
    out += confident_lines(stages)
    out += [f"resolution: {s['resolution']}" for s in stages if s.get("resolution")]
    out += gate_mode_lines(stages)
    out += branch_lines(stages) + depth_lines(stages) + vocabulary_lines(stages) + sensitivity_lines(stages)
    for stage in manifest["stages"]:
        facts = stage.get("facts") or {}
        if facts.get("ort_session_config"):
            out.append(f"{stage['name']}: parity measured with ONNX Runtime session config {facts['ort_session_config']} "
                       "(Q/DQ computed in float, as TensorRT's fused INT8 kernels do, not with the CPU's own int8 kernels, which saturate S8xS8 sums without VNNI)")
        if facts.get("form") == "tensorrt" and (stage.get("footprint") or {}).get("latency_ms"):
            out.append(f"{stage['name']}: b1/b16 ms are ONNX Runtime's CPU running TensorRT's Q/DQ placement, for which it has no INT8 kernel "
                       "(weights are dequantized on every run): a cost of that runtime, not of the engine; "
                       "`--target cpu` writes the form ONNX Runtime runs in INT8")
    out += reused_latency_lines(stages)
    skipped = (manifest.get("compression") or {}).get("skipped")
    if skipped:
        out.append(f"compression: skipped ({skipped})")
    engine = manifest.get("engine", {})
    out.append(f"engine: {engine.get('status')}" + (f" ({engine.get('reason')})" if engine.get("reason") else ""))
    if engine.get("bundle"):
        out.append(f"bundle: {engine['bundle']}  (on the device: python -m pipeline engine --bundle DIR; python -m pipeline verify --bundle DIR)")
    if manifest.get("failure"):
        out.append(f"{ENDINGS.get(manifest['status'], manifest['status'].upper())}: {manifest['failure']}")
    return "\n".join(out)


def confident_lines(stages: list[dict[str, Any]]) -> list[str]:
    """Where the disagreements are: agreement on the samples the source is sure of, for the last stage that has it."""
    measured = [s for s in stages[1:] if ((s.get("parity") or {}).get("paired") or {}).get("confident_agreement") is not None]
    if not measured:
        return []
    last, pair = measured[-1], measured[-1]["parity"]["paired"]
    return [f"agreement where the source is sure (top-1 probability >= {pair['confident_margin']:g} ahead of the second, "
            f"{pair['confident_samples']} of {pair['samples']} eval samples): {last['name']} {pair['confident_agreement']:.4f}"]


def gate_mode_lines(stages: list[dict[str, Any]]) -> list[str]:
    """Which stages judge the interval's bound instead of the point estimate."""
    judged = [s["name"] for s in stages if (s.get("gate") or {}).get("mode") == "confidence" and (s["gate"] or {}).get("max_drop_pts") is not None]
    return [f"gates: {', '.join(judged)} judged on the upper 95% bound of the drop (mode confidence)"] if judged else []


def sensitivity_lines(stages: list[dict[str, Any]]) -> list[str]:
    """Per branch, the most and least sensitive unit/layer a structural stage measured (NMSE of the logits when only it is compressed)."""
    lines = []
    for stage in stages:
        measured = (stage.get("facts") or {}).get("sensitivity") or []
        for branch in ("image", "text", "fusion"):
            members = sorted((m for m in measured if m["branch"] == branch), key=lambda m: m["nmse"])
            if len(members) == 1:
                lines.append(f"{stage['name']:>9} sensitivity, {branch}: {members[0]['name']} (NMSE {members[0]['nmse']:.3g})")
            elif members:
                low, high = members[0], members[-1]
                lines.append(f"{stage['name']:>9} sensitivity, {branch}: {len(members)} measured; most {high['name']} (NMSE {high['nmse']:.3g}), "
                             f"least {low['name']} (NMSE {low['nmse']:.3g})")
    return lines


def reused_latency_lines(stages: list[dict[str, Any]]) -> list[str]:
    """A warning when some latency columns were measured by an earlier build: ratios across runs mix machine states."""
    reused = [s["name"] for s in stages if s.get("footprint_reused") and (s.get("footprint") or {}).get("latency_ms")]
    if not reused:
        return []
    return [f"latency: b1/b16 ms of {', '.join(reused)} were measured by the earlier build that made "
            f"{'that artifact' if len(reused) == 1 else 'those artifacts'}; ratios between runs mix machine states "
            "(time a build's files side by side: python -m pipeline bench --out DIR)"]


def vocabulary_lines(stages: list[dict[str, Any]]) -> list[str]:
    """The token tables trimmed to the train split's ids, and the user budget the pruning was fitted to."""
    lines = []
    for stage in stages:
        facts = stage.get("facts") or {}
        for table in (facts.get("vocabulary") or {}).get("trimmed") or []:
            lines.append(f"{stage['name']:>9} vocabulary: {table['module']} {table['rows_before']} -> {table['rows_after']} rows "
                         f"(the ids the train split reads; {table['calib_ids_with_own_row']} of the {table['calib_ids']} distinct calib ids keep a row of their own, "
                         "the rest share one)")
        budget = facts.get("budget") or {}
        if "user_budget" in budget:
            wanted = ", ".join(f"{k} <= {budget['user_budget'][k]:g}" for k in ("params", "macs") if budget["user_budget"].get(k) is not None)
            lines.append(f"{stage['name']:>9} budget ({wanted}): the user budget's ratios x {budget['factor']:g} -> params {budget['params_after']:.2f}, "
                         f"MACs {budget['macs_after']:.2f} of the source" + (f"; {budget['out_of_reach']}" if budget.get("out_of_reach") else ""))
    return lines


def depth_lines(stages: list[dict[str, Any]]) -> list[str]:
    """The text layers depth pruning removed, each with the NMSE of skipping it when it went."""
    lines = []
    for stage in stages:
        depth = (stage.get("facts") or {}).get("depth")
        if depth and "skipped" in depth:
            lines.append(f"{stage['name']:>9} depth: skipped ({depth['skipped']})")
        if not depth or not depth.get("dropped"):
            continue
        costs = [next(m["nmse"] for m in measured if m["name"] == name) for name, measured in zip(depth["dropped"], depth["rounds"])]
        dropped = ", ".join(f"{name} (NMSE {cost:.3g})" for name, cost in zip(depth["dropped"], costs))
        lines.append(f"{stage['name']:>9} depth, text: {depth['layers_before']} -> {depth['layers_after']} layers; dropped {dropped}")
    return lines


def branch_lines(stages: list[dict[str, Any]]) -> list[str]:
    """Params and MACs per branch (image/text/fusion) for every stage that changed the model's structure."""
    lines = []
    for stage in stages:
        cost = stage.get("footprint") or {}
        if stage["name"] not in ("source", "prune", "factorize") or not cost.get("params") or "image" not in cost["params"]:
            continue
        parts = ", ".join(f"{b} {_millions(cost['params'][b])} M params / {_millions(cost['macs'].get(b, 0))} M MACs" for b in ("image", "text", "fusion"))
        lines.append(f"{stage['name']:>9} by branch: {parts}")
    return lines
