"""report.html: a build's ledger as one static page with its plots, and one page across a fleet of targets' builds.

Self-contained: no script, and no stylesheet, font or image from elsewhere. The plots are matplotlib
figures written as inline SVG with their text left as text (svg.fonttype "none"), drawn on a bare
Figure (no pyplot, no GUI backend) with fixed ids, so the same manifest gives the same bytes. Every
figure comes from manifest.json; a manifest of a build that failed or stopped early (fewer stages,
parity or footprint None, no source stage) renders what it has.
"""

from __future__ import annotations

import html
import io
import math
import re
from typing import Any

from pipeline.report import ENDINGS, depth_lines, gate_mode_lines, reused_latency_lines, summary_table

BRANCHES = ("image", "text", "fusion")
STATUS_COLOURS = {"ok": "#1a7f37", "failed": "#cf222e", "error": "#cf222e", "interrupted": "#9a6700"}
ACCURACY, AGREEMENT, PREVIOUS, GATE = "#0969da", "#8250df", "#57606a", "#cf222e"
NOT_MEASURED = "not measured"

STYLE = """
body { font-family: system-ui, -apple-system, "Segoe UI", Roboto, "DejaVu Sans", sans-serif; margin: 2em auto; max-width: 1240px;
       padding: 0 1em; color: #1f2328; line-height: 1.45; }
h1 { font-size: 1.6em; margin-bottom: .2em; } h2 { border-bottom: 1px solid #d0d7de; padding-bottom: .2em; margin-top: 1.8em; }
.status { padding: .6em 1em; border-radius: 6px; color: #fff; font-weight: 600; margin: .6em 0; }
.engine { background: #f6f8fa; border: 1px solid #d0d7de; border-radius: 6px; padding: .5em 1em; }
table { border-collapse: collapse; margin: .6em 0; font-size: .86em; }
th, td { border: 1px solid #d0d7de; padding: .22em .45em; text-align: right; vertical-align: top; }
th { background: #f6f8fa; text-align: center; } td { white-space: nowrap; }
.wide { overflow-x: auto; } td:first-child, th:first-child, td.text { text-align: left; }
tr.failed td { background: #ffebe9; }
.muted { color: #57606a; } .note { color: #57606a; font-size: .92em; }
figure { margin: 1em 0; } figcaption { color: #57606a; font-size: .92em; }
svg { max-width: 100%; height: auto; }
pre { background: #f6f8fa; padding: .8em; overflow-x: auto; font-size: .8em; }
dl { display: grid; grid-template-columns: max-content auto; gap: .15em 1em; } dt { font-weight: 600; } dd { margin: 0; }
"""


# ------------------------------------------------------------------ the build's page


def report_html(manifest: dict[str, Any]) -> str:
    """report.html: status, accuracy, agreement, size and latency per stage, pruning sensitivity and what INT8 kept in float."""
    target = (manifest.get("target") or {}).get("name", "?")
    stages = manifest.get("stages") or []
    rows = stage_rows(manifest)
    body = [
        f"<h1>edgepipe build: {esc(target)}</h1>",
        status_block(manifest),
        f'<p class="engine">{engine_line(manifest)}</p>',
        build_facts(manifest),
        "<h2>Stages at a glance</h2>",
        stage_table(rows, manifest.get("status")) if rows else "<p>No stage finished: there is nothing to measure yet.</p>",
        '<p class="note">Accuracy and agreement are measured on the eval split against the source model; the interval of a stage\'s '
        "accuracy is the source's accuracy plus the paired 95% interval of the change (Newcombe), and the agreement's is a Wilson interval. "
        "fixed/broken: eval samples the stage made right / wrong.</p>",
    ]
    if rows:
        accuracy, agreement = plot_accuracy(rows), plot_agreement(rows)
        body += ["<h2>Where accuracy went</h2>", figure(accuracy, accuracy_caption(manifest)),
                 figure(agreement, "Top-1 agreement with the source (95% Wilson interval) and with each stage's input; "
                        "the red tick is the stage's agreement gate, which judges agreement with its input."),
                 "" if accuracy or agreement else "<p>No stage's accuracy was measured in this build.</p>",
                 notes(accuracy_notes(stages))]
        latency = plot_latency(rows)
        body += ["<h2>Where size and latency went</h2>",
                 figure(plot_size(rows), "Artifact size on disk (what the stage wrote), and params and MACs per sample "
                        "(an ONNX stage carries its torch input's counts)."),
                 figure(latency, "ONNX Runtime, CPU, 2 threads, median of 20 runs.") if latency else
                 f"<p><b>Latency: {NOT_MEASURED}</b> in this build (<code>python -m pipeline build --latency</code> measures it).</p>",
                 notes(latency_notes(stages))]
    body += sensitivity_section(stages) + float_section(stages)
    if rows:
        body.append("<details><summary>The ledger as text (as in report.md)</summary><pre>" + esc(summary_table(manifest)) + "</pre></details>")
    return page(f"edgepipe build: {target} ({manifest.get('status', '?')})", body)


def page(title: str, body: list[str]) -> str:
    return "\n".join(['<!DOCTYPE html>', '<html lang="en">', "<head>", '<meta charset="utf-8">',
                      '<meta name="viewport" content="width=device-width, initial-scale=1">', f"<title>{esc(title)}</title>",
                      f"<style>{STYLE}</style>", "</head>", "<body>", *body, "</body>", "</html>", ""])


def esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def verdict(manifest: dict[str, Any]) -> str:
    """One line: OK, or how the build ended and why."""
    status = manifest.get("status") or "?"
    if status == "ok":
        return "OK: every gate held"
    ending = ENDINGS.get(status, str(status).upper())
    return f"{ending}: {manifest.get('failure')}" if manifest.get("failure") else ending


def status_block(manifest: dict[str, Any]) -> str:
    colour = STATUS_COLOURS.get(manifest.get("status"), "#57606a")
    return f'<p class="status" style="background: {colour}">{esc(verdict(manifest))}</p>'


def engine_line(manifest: dict[str, Any]) -> str:
    engine = manifest.get("engine") or {}
    line = f"<b>engine: {esc(engine.get('status', 'not-run'))}</b>" + (f" ({esc(engine['reason'])})" if engine.get("reason") else "")
    if engine.get("plan"):
        line += f"; plan <code>{esc(engine['plan'])}</code>"
    if engine.get("bundle"):
        line += (f"<br><b>bundle: <code>{esc(engine['bundle'])}</code></b> (on the device: <code>python -m pipeline engine --bundle DIR</code>; "
                 "<code>python -m pipeline verify --bundle DIR</code>)")
    return line


def build_facts(manifest: dict[str, Any]) -> str:
    target, data, versions = manifest.get("target") or {}, manifest.get("data") or {}, manifest.get("versions") or {}
    calibration = data.get("calibration") or {}
    splits = ", ".join(f"{name} {size}" for name, size in sorted((data.get("splits") or {}).items()))  # as manifest.json orders them
    items = [("target", target.get("description", target.get("name"))), ("model", (manifest.get("config") or {}).get("model")),
             ("data", f"{data.get('dataset')} ({splits})"),
             ("calibration", f"{calibration.get('name')} ({calibration.get('size')} samples, sha256 {str(calibration.get('sha256'))[:12]})"),
             ("versions", ", ".join(f"{n} {versions[n]}" for n in ("edgepipe", "torch", "onnx", "onnxruntime", "tensorrt") if n in versions)),
             ("wall", f"{manifest['wall_s']:.1f} s" if isinstance(manifest.get("wall_s"), (int, float)) else None)]
    return "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items if v is not None) + "</dl>"


# ------------------------------------------------------------------ the figures, as rows


def stage_rows(manifest: dict[str, Any]) -> list[dict[str, Any]]:
    """Per stage, the numbers the page shows, None where the manifest has none (accuracy in %, sizes in MB, counts in M)."""
    stages = manifest.get("stages") or []
    first = (stages[0].get("parity") or {}) if stages else {}
    source_accuracy = first.get("accuracy") if stages and stages[0].get("name") == "source" else None
    reference = (stages[0].get("footprint") or {}) if stages else {}
    rows = []
    for index, stage in enumerate(stages):
        parity = stage.get("parity") or {}
        pair = (parity.get("paired") or {}) if index else {}  # the source compared with itself has nothing to resolve
        cost, gate = stage.get("footprint") or {}, stage.get("gate") or {}
        latency = cost.get("latency_ms") or {}
        accuracy = _pct(parity.get("accuracy"))
        ci = pair.get("delta_ci_pts")
        interval = None
        if ci and source_accuracy is not None:
            interval = (max(0.0, 100 * source_accuracy + ci[0]), min(100.0, 100 * source_accuracy + ci[1]))
        floor = None
        if gate.get("max_drop_pts") is not None and source_accuracy is not None:
            floor = 100 * source_accuracy - gate["max_drop_pts"]
        rows.append({
            "name": stage.get("name", "?"), "accuracy": accuracy, "interval": interval, "delta_pts": parity.get("delta_pts"),
            "delta_ci": ci, "fixed": pair.get("fixed"), "broken": pair.get("broken"),
            "agreement": _pct((parity.get("vs_reference") or {}).get("agreement")),
            "agreement_ci": tuple(100 * b for b in pair["agreement_ci"]) if pair.get("agreement_ci") else None,
            "agreement_previous": _pct((parity.get("vs_previous") or {}).get("agreement")) if index else None,
            "floor": floor, "min_agreement": _pct(gate.get("min_agreement")),
            "size_mb": _mb(stage.get("size_bytes")), "kind": (stage.get("artifact") or {}).get("kind"),
            "params": _m((cost.get("params") or {}).get("total")), "macs": _m((cost.get("macs") or {}).get("total")),
            "params_share": _share((cost.get("params") or {}).get("total"), (reference.get("params") or {}).get("total")),
            "macs_share": _share((cost.get("macs") or {}).get("total"), (reference.get("macs") or {}).get("total")),
            "b1": latency.get("batch1_ms"), "b16": latency.get("batch16_ms"),
            "wall_s": stage.get("wall_s"), "cached": stage.get("cached"),
        })
    return rows


def _pct(value: float | None) -> float | None:
    return None if value is None else 100 * value


def _mb(size: int | None) -> float | None:
    return None if size is None else size / 1e6


def _m(count: int | None) -> float | None:
    return None if count is None else count / 1e6


def _share(value: int | None, reference: int | None) -> float | None:
    return None if value is None or not reference else 100 * value / reference


def _num(value: float | None, spec: str, missing: str = "-") -> str:
    return missing if value is None else format(value, spec)


def stage_table(rows: list[dict[str, Any]], status: str | None) -> str:
    header = ["stage", "accuracy % [95%]", "Δ pts vs source [95%]", "fixed / broken", "agreement % [95%]", "artifact MB",
              "params M", "MACs M", "latency ms batch 1 / 16", "time s", "cached"]
    out = ['<div class="wide"><table>', "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for index, r in enumerate(rows):
        failed = status == "failed" and index == len(rows) - 1  # a gate failed right after its stage was recorded
        latency = NOT_MEASURED if r["b1"] is None and r["b16"] is None else f"{_num(r['b1'], '.2f')} / {_num(r['b16'], '.2f')}"
        cells = [
            r["name"] + (" (gate failed)" if failed else ""), _num(r["accuracy"], ".2f") + _bracket(r["interval"], ".1f"),
            _num(r["delta_pts"], "+.2f") + _bracket(r["delta_ci"], "+.2f"),
            "-" if r["fixed"] is None else f"{r['fixed']} / {r['broken']}",
            _num(r["agreement"], ".2f") + _bracket(r["agreement_ci"], ".1f"), _num(r["size_mb"], ".2f"),
            _num(r["params"], ".3g") + ("" if r["params_share"] is None else f" ({r['params_share']:.0f}%)"),
            _num(r["macs"], ".3g") + ("" if r["macs_share"] is None else f" ({r['macs_share']:.0f}%)"),
            latency, _num(r["wall_s"], ".1f"), "-" if r["cached"] is None else "yes" if r["cached"] else "no",
        ]
        out.append(f'<tr{" class=failed" if failed else ""}>' + "".join(f"<td>{esc(c)}</td>" for c in cells) + "</tr>")
    return "\n".join(out + ["</table></div>"])


def _bracket(bounds: Any, spec: str) -> str:
    return "" if not bounds else f" [{format(bounds[0], spec)}, {format(bounds[1], spec)}]"


def accuracy_caption(manifest: dict[str, Any]) -> str:
    samples = ((manifest.get("data") or {}).get("splits") or {}).get("eval", "?")
    return (f"Accuracy on the {samples} eval samples per stage, with the 95% interval of the change vs the source; "
            "the dashed line is the source's accuracy, the red tick each stage's accuracy gate (source minus the allowed drop).")


def accuracy_notes(stages: list[dict[str, Any]]) -> list[str]:
    lines = [f"resolution: {s['resolution']}" for s in stages if s.get("resolution")]
    measured = [s for s in stages[1:] if (((s.get("parity") or {}).get("paired") or {}).get("confident_agreement")) is not None]
    if measured:
        pair = measured[-1]["parity"]["paired"]
        lines.append(f"agreement where the source is sure (top-1 probability >= {pair.get('confident_margin')} ahead of the second, "
                     f"{pair.get('confident_samples')} of {pair.get('samples')} eval samples): {measured[-1]['name']} "
                     f"{100 * pair['confident_agreement']:.1f}%")
    return lines + gate_mode_lines(stages)


def latency_notes(stages: list[dict[str, Any]]) -> list[str]:
    lines = []
    for stage in stages:
        if (stage.get("facts") or {}).get("form") == "tensorrt" and ((stage.get("footprint") or {}).get("latency_ms")):
            lines.append(f"{stage['name']}: its latency is ONNX Runtime's CPU running TensorRT's Q/DQ placement, which it has no INT8 kernel for: "
                         "a cost of that runtime, not of the engine (--target cpu writes the form ONNX Runtime runs in INT8)")
    return lines + reused_latency_lines(stages)


def notes(lines: list[str]) -> str:
    return "" if not lines else '<ul class="note">' + "".join(f"<li>{esc(line)}</li>" for line in lines) + "</ul>"


def figure(svg: str | None, caption: str) -> str:
    return "" if not svg else f"<figure>{svg}<figcaption>{esc(caption)}</figcaption></figure>"


# ------------------------------------------------------------------ sensitivity and what stayed float


def sensitivity_section(stages: list[dict[str, Any]]) -> list[str]:
    """Per structural stage, the NMSE of the logits when only one unit is compressed, per branch: a plot and its table."""
    out = []
    for stage in stages:
        facts = stage.get("facts") or {}
        measured = [m for m in (facts.get("sensitivity") or []) if isinstance(m, dict) and m.get("nmse") is not None]
        if not measured:
            continue
        if not out:
            out.append("<h2>Sensitivity of each compressed unit</h2>")
        name = stage.get("name", "?")
        out.append(f"<h3>{esc(name)}</h3>")
        out.append(figure(plot_sensitivity(name, measured),
                          f"{name}: NMSE of the logits when only that unit is compressed, at the stage's setting (lower is safer), per branch."))
        out.append(sensitivity_table(measured, facts))
        out.append(notes([line.strip() for line in depth_lines([stage])]))
    return out


def sensitivity_table(measured: list[dict[str, Any]], facts: dict[str, Any]) -> str:
    kept = {u.get("unit"): u for u in facts.get("units") or [] if isinstance(u, dict)}
    ranks = {layer.get("module"): layer for layer in facts.get("layers_factorized") or [] if isinstance(layer, dict)}
    header = ["branch", "unit", "setting", "size", "NMSE", "accuracy drop pts", "agreement", "result"]
    out = ["<table>", "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for m in sorted(measured, key=lambda m: (_branch_order(m.get("branch")), -m["nmse"])):
        unit, layer = kept.get(m.get("name")), ranks.get(m.get("name"))
        result = "-"
        if unit:
            result = f"{unit.get('channels_before')} -> {unit.get('channels_after')} channels"
        elif layer:
            result = f"rank {layer.get('rank')}, {100 * layer.get('energy_kept', 0):.1f}% energy kept"
        cells = [m.get("branch"), m.get("name"), m.get("setting"), m.get("size"), f"{m['nmse']:.3g}",
                 _num(m.get("accuracy_drop_pts"), ".1f"), _num(m.get("agreement"), ".3f"), result]
        out.append("<tr>" + "".join(f'<td class="text">{esc(c)}</td>' if i in (0, 1, 7) else f"<td>{esc(c)}</td>" for i, c in enumerate(cells)) + "</tr>")
    return "\n".join(out + ["</table>"])


def _branch_order(branch: Any) -> int:
    return BRANCHES.index(branch) if branch in BRANCHES else len(BRANCHES)


def float_section(stages: list[dict[str, Any]]) -> list[str]:
    """What INT8 left in float: the quantize stage's regions and fallback, and the engine's float layers where one was built."""
    out = []
    for stage in stages:
        facts = stage.get("facts") or {}
        if stage.get("name") == "quantize" or "float_regions" in facts:
            out += quantize_facts(stage.get("name", "quantize"), facts)
        if stage.get("name") == "engine" and ("float_compute_layers" in facts or "layer_precisions" in facts):
            precisions = ", ".join(f"{k} {v}" for k, v in sorted((facts.get("layer_precisions") or {}).items()))
            out.append(f"<h3>engine</h3><p>layer precisions: {esc(precisions or '-')}; layers computing in float: "
                       f"{esc(len(facts.get('float_compute_layers') or []))}; GPU fallback layers (DLA): {esc(len(facts.get('gpu_fallback_layers') or []))}</p>")
            out.append(_name_list(facts.get("float_compute_layers") or []))
    return (["<h2>INT8: what stayed in float</h2>"] + out) if out else []


def quantize_facts(name: str, facts: dict[str, Any]) -> list[str]:
    kinds = facts.get("quantized_regions") or {}
    items = [("form", facts.get("form")), ("calibration", f"{facts.get('method')}, {facts.get('calibration_samples')} samples, "
                                                           f"{facts.get('calibrated_tensors')} tensors"),
             ("regions found", facts.get("regions")),
             ("quantized", ", ".join(f"{k} {v}" for k, v in sorted(kinds.items())) or None),
             ("kept in float by the fallback", len(facts.get("float_regions") or [])),
             ("fallback", f"{facts.get('fallback_steps')} of at most {facts.get('fallback_max_steps')} steps; {facts.get('fallback_stop')}"),
             ("tuning set", _tuning(facts)),
             ("Q/DQ in the graph", _qdq(facts.get("ops") or {})),
             ("placement rule", facts.get("placement_rule")), ("form rule", facts.get("form_rule"))]
    out = [f"<h3>{esc(name)}</h3>", "<dl>" + "".join(f"<dt>{esc(k)}</dt><dd>{esc(v)}</dd>" for k, v in items if v not in (None, "")) + "</dl>"]
    floats, tried = facts.get("float_regions") or [], facts.get("fallback_tried") or []
    if floats:
        out += ["<p>Regions the fallback kept in float:</p>", region_table(floats)]
    else:
        out.append("<p>No region was kept in float by the accuracy fallback; what the rules above leave in float stays float.</p>")
    if tried:
        out += ["<p>Regions the fallback tried in float and put back to INT8 (no gain):</p>", region_table(tried)]
    return out


def _qdq(ops: dict[str, Any]) -> str | None:
    if "QuantizeLinear" not in ops and "DequantizeLinear" not in ops:
        return None
    return f"QuantizeLinear {ops.get('QuantizeLinear', 0)}, DequantizeLinear {ops.get('DequantizeLinear', 0)}"


def region_table(regions: list[Any]) -> str:
    header = ["step", "region", "op", "kind", "nodes", "score", "accuracy (tuning)", "agreement (tuning)", "mean error (tuning)"]
    out = ['<div class="wide"><table>', "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for region in regions:
        if not isinstance(region, dict):
            out.append(f'<tr><td class="text" colspan="{len(header)}">{esc(region)}</td></tr>')
            continue
        nodes = [str(n) for n in region.get("nodes") or []]
        cells = [region.get("step", "-"), region.get("name", "-"), region.get("op_type", "-"), region.get("kind", "-"),
                 f"{len(nodes)}: {', '.join(nodes[:3])}{' ...' if len(nodes) > 3 else ''}",
                 format(region["score"], ".3g") if isinstance(region.get("score"), (int, float)) else "-",
                 *(_change(region.get("before"), region.get("after"), key) for key in ("accuracy", "agreement", "mean_error"))]
        out.append("<tr>" + "".join(f'<td class="text">{esc(c)}</td>' for c in cells) + "</tr>")
    return "\n".join(out + ["</table></div>"])


def _change(before: Any, after: Any, key: str) -> str:
    """before -> after of one metric of the fallback's tuning evaluations."""
    values = [e.get(key) if isinstance(e, dict) else None for e in (before, after)]
    return " -> ".join("-" if v is None else format(v, ".4g") if isinstance(v, (int, float)) else str(v) for v in values)


def _tuning(facts: dict[str, Any]) -> str | None:
    before, after = facts.get("tuning_before"), facts.get("tuning_after")
    if not isinstance(before, dict) and not isinstance(after, dict):
        return None
    held = {True: "holds", False: "fails"}
    return (f"{facts.get('tuning_samples', '?')} samples: accuracy {_change(before, after, 'accuracy')}, agreement {_change(before, after, 'agreement')}; "
            f"the gate {held.get((before or {}).get('passes'), '?')} before the fallback, {held.get((after or {}).get('passes'), '?')} after")


def _name_list(names: list[Any], limit: int = 40) -> str:
    if not names:
        return ""
    shown = ", ".join(map(str, names[:limit])) + (f" ... and {len(names) - limit} more" if len(names) > limit else "")
    return f'<p class="note">{esc(shown)}</p>'


# ------------------------------------------------------------------ the fleet's page


def fleet_html(manifests: dict[str, dict[str, Any]]) -> str:
    """One page across several targets' manifests (label -> manifest): a row and a table per target, and one plot comparing them."""
    entries = [fleet_entry(label, manifest) for label, manifest in manifests.items()]
    ok = sum(e["status"] == "ok" for e in entries)
    header = ["target", "status", "last stage", "accuracy % [95%]", "Δ pts vs source", "artifact MB", "latency ms batch 1 / 16", "engine / bundle"]
    table = ['<div class="wide"><table>', "<tr>" + "".join(f"<th>{esc(h)}</th>" for h in header) + "</tr>"]
    for e in entries:
        colour = STATUS_COLOURS.get(e["status"], "#57606a")
        latency = NOT_MEASURED if e["b1"] is None and e["b16"] is None else f"{_num(e['b1'], '.2f')} / {_num(e['b16'], '.2f')}"
        cells = [esc(e["label"]), f'<b style="color: {colour}">{esc(e["status"])}</b>', esc(e["stage"] or "-"),
                 esc(_num(e["accuracy"], ".2f") + _bracket(e["interval"], ".1f")), esc(_num(e["delta_pts"], "+.2f")),
                 esc(_num(e["size_mb"], ".2f")), esc(latency), esc(e["deploy"])]
        table.append("<tr>" + "".join(f'<td class="text">{c}</td>' if i in (0, 1, 2, 7) else f"<td>{c}</td>" for i, c in enumerate(cells)) + "</tr>")
    table.append("</table></div>")
    body = [f"<h1>edgepipe fleet: {len(entries)} target{'s' if len(entries) != 1 else ''}, {ok} ok</h1>", "\n".join(table)]
    body.append(figure(plot_fleet(entries), "Per target, its last measured stage: accuracy with the 95% interval of the change vs its source "
                                            "(the grey dot is the source), artifact size, and batch-1 latency where measured."))
    for e in entries:
        manifest = e["manifest"]
        body += [f"<h2>{esc(e['label'])}</h2>", status_block(manifest), f'<p class="engine">{engine_line(manifest)}</p>',
                 stage_table(e["rows"], manifest.get("status")) if e["rows"] else "<p>No stage finished.</p>"]
    return page(f"edgepipe fleet: {len(entries)} targets", body)


def fleet_entry(label: str, manifest: dict[str, Any]) -> dict[str, Any]:
    """A target's last measured stage (the one that ships), its source accuracy and how it deploys."""
    rows = stage_rows(manifest)
    last = next((r for r in reversed(rows) if r["accuracy"] is not None), None)
    engine = manifest.get("engine") or {}
    deploy = f"engine {engine.get('status', 'not-run')}"
    if engine.get("plan"):
        deploy += f": {engine['plan']}"
    if engine.get("bundle"):
        deploy += f"; bundle in {engine['bundle']}/"
    return {"label": label, "manifest": manifest, "rows": rows, "status": manifest.get("status", "?"),
            "stage": last["name"] if last else None, "accuracy": last["accuracy"] if last else None,
            "interval": last["interval"] if last else None, "delta_pts": last["delta_pts"] if last else None,
            "source": rows[0]["accuracy"] if rows and rows[0]["name"] == "source" else None,
            "size_mb": last["size_mb"] if last else None, "b1": last["b1"] if last else None, "b16": last["b16"] if last else None,
            "deploy": deploy}


# ------------------------------------------------------------------ the plots (matplotlib, inline SVG)


def _figure(width: float, height: float, columns: int = 1):
    from matplotlib.figure import Figure  # a bare Figure: no pyplot state, no GUI backend (headless by construction)

    fig = Figure(figsize=(width, height), layout="constrained")
    axes = fig.subplots(1, columns, squeeze=False)[0]
    for ax in axes:
        ax.spines[["top", "right"]].set_visible(False)
        ax.grid(axis="y", color="#d0d7de", linewidth=0.6)
        ax.set_axisbelow(True)
    return fig, list(axes)


def svg_of(fig: Any, salt: str) -> str:
    """The figure as an inline <svg> element: text as text, ids fixed by salt (unique per plot), no date, no XML prologue."""
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": f"edgepipe-{salt}", "font.size": 9}):
        fig.savefig(buffer, format="svg", metadata={"Date": None, "Creator": None, "Format": None, "Type": None})
    text = buffer.getvalue()
    text = text[text.index("<svg"):]
    text = re.sub(r"<metadata>.*?</metadata>\s*", "", text, flags=re.S)
    # Inline in HTML the SVG namespace is implied; ids are prefixed so that the page's plots never share one.
    text = re.sub(r'\s+xmlns(:xlink)?="[^"]*"', "", text)
    prefix = re.sub(r"[^A-Za-z0-9_-]", "-", salt)
    text = re.sub(r'\bid="([^"]+)"', lambda m: f'id="{prefix}-{m.group(1)}"', text)
    text = re.sub(r'href="#([^"]+)"', lambda m: f'href="#{prefix}-{m.group(1)}"', text)
    text = re.sub(r"url\(#([^)]+)\)", lambda m: f"url(#{prefix}-{m.group(1)})", text)
    return text.replace("<svg ", f'<svg role="img" aria-label="{esc(salt)} plot" ', 1)


def _plain(text: Any) -> str:
    """Text matplotlib draws as written (a $ would start mathtext)."""
    return str(text).replace("$", r"\$")


def _positions(count: int) -> list[int]:
    return list(range(count))


def plot_accuracy(rows: list[dict[str, Any]]) -> str | None:
    """Accuracy per stage (%) with its 95% interval, the source's accuracy and each stage's accuracy gate."""
    measured = [(i, r) for i, r in enumerate(rows) if r["accuracy"] is not None]
    if not measured:
        return None
    fig, (ax,) = _figure(8, 3.6)
    for i, r in measured:
        low, high = r["interval"] or (r["accuracy"], r["accuracy"])
        ax.errorbar([i], [r["accuracy"]], yerr=[[max(0.0, r["accuracy"] - low)], [max(0.0, high - r["accuracy"])]], fmt="o", color=ACCURACY,
                    capsize=5, markersize=6, linewidth=1.5)
        label = f"{r['accuracy']:.1f}%" + ("" if not i or r["delta_pts"] is None else f"\nΔ {r['delta_pts']:+.2f} pts")
        ax.annotate(label, (i, high), textcoords="offset points", xytext=(0, 6), ha="center", fontsize=8)
        if r["floor"] is not None:
            ax.hlines(r["floor"], i - 0.28, i + 0.28, colors=GATE, linewidth=2)
    if rows[0]["name"] == "source" and rows[0]["accuracy"] is not None:
        ax.axhline(rows[0]["accuracy"], color=PREVIOUS, linestyle="--", linewidth=0.9)
    _stage_axis(ax, rows)
    values = [v for _, r in measured for v in (r["accuracy"], *(r["interval"] or ()), r["floor"]) if v is not None]
    _pad(ax, values, top=0.22)
    ax.set_ylabel("accuracy on eval (%)")
    ax.set_title("Accuracy per stage, 95% interval", loc="left")
    return svg_of(fig, "accuracy")


def plot_agreement(rows: list[dict[str, Any]]) -> str | None:
    """Top-1 agreement per stage with the source (Wilson 95% interval) and with the stage's input, and the agreement gate."""
    measured = [(i, r) for i, r in enumerate(rows) if r["agreement"] is not None]
    if not measured:
        return None
    fig, (ax,) = _figure(8, 3.4)
    for n, (i, r) in enumerate(measured):
        low, high = r["agreement_ci"] or (r["agreement"], r["agreement"])
        ax.errorbar([i], [r["agreement"]], yerr=[[max(0.0, r["agreement"] - low)], [max(0.0, high - r["agreement"])]], fmt="o", color=AGREEMENT,
                    capsize=5, markersize=6, linewidth=1.5, label="with the source (95%)" if n == 0 else None)
        ax.annotate(f"{r['agreement']:.1f}%", (i, high), textcoords="offset points", xytext=(-12, 6), ha="center", fontsize=8)
    previous = [(i, r["agreement_previous"]) for i, r in measured if r["agreement_previous"] is not None]
    if previous:
        ax.plot([i + 0.15 for i, _ in previous], [v for _, v in previous], "D", markerfacecolor="none", color=PREVIOUS, markersize=5,
                linestyle="none", label="with the stage's input")
    gated = [(i, r["min_agreement"]) for i, r in measured if r["min_agreement"] is not None]
    for n, (i, value) in enumerate(gated):
        ax.hlines(value, i - 0.28, i + 0.28, colors=GATE, linewidth=2, label="gate (vs the input)" if n == 0 else None)
    _stage_axis(ax, rows)
    values = [v for _, r in measured for v in (r["agreement"], *(r["agreement_ci"] or ()), r["agreement_previous"], r["min_agreement"]) if v is not None]
    _pad(ax, values, top=0.18, ceiling=100)
    ax.set_ylabel("top-1 agreement (%)")
    ax.set_title("Agreement per stage", loc="left")
    ax.legend(loc="lower left", fontsize=8, frameon=False)
    return svg_of(fig, "agreement")


def plot_size(rows: list[dict[str, Any]]) -> str | None:
    """Artifact size on disk per stage, and params and MACs per sample (millions, with the share of the source's): the panels measured."""
    on_disk, counted = any(r["size_mb"] is not None for r in rows), any(r["params"] is not None or r["macs"] is not None for r in rows)
    if not on_disk and not counted:
        return None
    fig, axes = _figure(10 if on_disk and counted else 5.5, 3.4, columns=on_disk + counted)
    panels = iter(axes)
    x = _positions(len(rows))
    if on_disk:
        disk = next(panels)
        sizes = [r["size_mb"] or 0.0 for r in rows]
        bars = disk.bar(x, sizes, color="#54aeff", width=0.6)
        for bar, r in zip(bars, rows):
            if r["size_mb"] is not None:
                disk.annotate(f"{r['size_mb']:.2f}\n{_plain(r['kind'] or '')}", (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                              textcoords="offset points", xytext=(0, 3), ha="center", fontsize=7)
        disk.set_ylabel("artifact MB")
        disk.set_title("Size on disk", loc="left")
        disk.set_ylim(0, max(sizes + [0.01]) * 1.3)
        _stage_axis(disk, rows)
    if counted:
        counts, width = next(panels), 0.38
        for offset, key, share, colour, label in ((-width / 2, "params", "params_share", "#0969da", "params M"),
                                                   (width / 2, "macs", "macs_share", "#bf8700", "MACs M")):
            bars = counts.bar([i + offset for i in x], [r[key] or 0.0 for r in rows], width=width, color=colour, label=label)
            for bar, r in zip(bars, rows):
                if r[share] is not None:
                    counts.annotate(f"{r[share]:.0f}%", (bar.get_x() + bar.get_width() / 2, bar.get_height()), textcoords="offset points",
                                    xytext=(0, 2), ha="center", fontsize=7)
        peak = max([r["params"] or 0.0 for r in rows] + [r["macs"] or 0.0 for r in rows] + [0.01])
        counts.set_ylim(0, peak * 1.25)
        counts.set_ylabel("millions (per sample)")
        counts.set_title("Params and MACs (% of the source)", loc="left")
        counts.legend(fontsize=8, frameon=False, loc="upper right")
        _stage_axis(counts, rows)
    return svg_of(fig, "size")


def plot_latency(rows: list[dict[str, Any]]) -> str | None:
    """Batch-1 and batch-16 latency per stage, "not measured" where a stage has none; None when no stage was timed."""
    if all(r["b1"] is None and r["b16"] is None for r in rows):
        return None
    fig, (b1, b16) = _figure(10, 3.2, columns=2)
    for ax, key, title in ((b1, "b1", "batch 1"), (b16, "b16", "batch 16")):
        values = [r[key] for r in rows]
        peak = max([v for v in values if v is not None] + [0.01])
        for i, value in enumerate(values):
            if value is None:
                ax.text(i, peak * 0.05, NOT_MEASURED, rotation=90, ha="center", va="bottom", fontsize=8, color=PREVIOUS)
                continue
            ax.bar([i], [value], width=0.6, color="#2da44e")
            ax.annotate(f"{value:.2f}", (i, value), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
        ax.set_ylim(0, peak * 1.2)
        ax.set_ylabel("ms (median)")
        ax.set_title(f"Latency, {title}", loc="left")
        _stage_axis(ax, rows)
    return svg_of(fig, "latency")


def plot_sensitivity(stage: str, measured: list[dict[str, Any]]) -> str | None:
    """One panel per branch: each unit's NMSE when only it is compressed, most sensitive on top."""
    branches = sorted({m.get("branch") or "?" for m in measured}, key=_branch_order)
    if not branches:
        return None
    tallest = max(sum((m.get("branch") or "?") == b for m in measured) for b in branches)
    fig, axes = _figure(min(12, 3.6 * len(branches) + 1), 0.9 + 0.32 * tallest, columns=len(branches))
    for ax, branch in zip(axes, branches):
        members = sorted((m for m in measured if (m.get("branch") or "?") == branch), key=lambda m: m["nmse"])
        names = [_plain(m.get("name", "?")) for m in members]
        ax.barh(range(len(members)), [m["nmse"] for m in members], color="#fb8f44", height=0.6)
        for y, m in enumerate(members):
            ax.annotate(f"{m['nmse']:.3g}", (m["nmse"], y), textcoords="offset points", xytext=(3, 0), va="center", fontsize=7)
        ax.set_yticks(range(len(members)), names, fontsize=7)
        ax.set_xlim(0, max(m["nmse"] for m in members) * 1.35 or 1)
        ax.grid(axis="y", visible=False)
        ax.grid(axis="x", color="#d0d7de", linewidth=0.6)
        ax.set_xlabel("NMSE of the logits")
        ax.set_title(_plain(branch), loc="left")
    fig.suptitle(_plain(f"{stage}: sensitivity per unit"), x=0.01, ha="left", fontsize=10)
    return svg_of(fig, f"sensitivity-{stage}")


def plot_fleet(entries: list[dict[str, Any]]) -> str | None:
    """Targets side by side: last stage's accuracy with its interval (and the source's), artifact size, batch-1 latency."""
    if not entries:
        return None
    fig, (acc, size, latency) = _figure(11, 3.4, columns=3)
    x = _positions(len(entries))
    labels = [_plain(e["label"]) for e in entries]
    for i, e in enumerate(entries):
        colour = STATUS_COLOURS.get(e["status"], PREVIOUS)
        if e["source"] is not None:
            acc.plot([i - 0.18], [e["source"]], "o", color=PREVIOUS, markersize=5)
        if e["accuracy"] is None:
            acc.text(i, 0.5, NOT_MEASURED, transform=acc.get_xaxis_transform(), rotation=90, ha="center", va="center", fontsize=8, color=PREVIOUS)
            continue
        low, high = e["interval"] or (e["accuracy"], e["accuracy"])
        acc.errorbar([i], [e["accuracy"]], yerr=[[max(0.0, e["accuracy"] - low)], [max(0.0, high - e["accuracy"])]], fmt="o", color=colour,
                     capsize=5, markersize=6)
        acc.annotate(f"{e['accuracy']:.1f}%", (i, high), textcoords="offset points", xytext=(0, 4), ha="center", fontsize=7)
    values = [v for e in entries for v in (e["accuracy"], e["source"], *(e["interval"] or ())) if v is not None]
    _pad(acc, values or [0.0, 100.0], top=0.2)
    acc.set_ylabel("accuracy on eval (%)")
    acc.set_title("Accuracy (last stage, 95%)", loc="left")
    for ax, key, title, unit, colour in ((size, "size_mb", "Artifact size", "MB", "#54aeff"), (latency, "b1", "Latency, batch 1", "ms", "#2da44e")):
        measured = [e[key] for e in entries if e[key] is not None]
        peak = max(measured + [0.01])
        for i, e in enumerate(entries):
            if e[key] is None:
                ax.text(i, peak * 0.05, NOT_MEASURED, rotation=90, ha="center", va="bottom", fontsize=8, color=PREVIOUS)
                continue
            ax.bar([i], [e[key]], width=0.6, color=colour)
            ax.annotate(f"{e[key]:.2f}", (i, e[key]), textcoords="offset points", xytext=(0, 2), ha="center", fontsize=7)
        ax.set_ylim(0, peak * 1.25)
        ax.set_ylabel(unit)
        ax.set_title(title, loc="left")
    for ax in (acc, size, latency):
        crowded = len(entries) > 3 or max(len(label) for label in labels) > 12  # long target names overlap level
        ax.set_xticks(x, labels, rotation=20 if crowded else 0, ha="right" if crowded else "center")
        ax.set_xlim(-0.6, len(entries) - 0.4)
    return svg_of(fig, "fleet")


def _stage_axis(ax: Any, rows: list[dict[str, Any]]) -> None:
    ax.set_xticks(_positions(len(rows)), [_plain(r["name"]) for r in rows])
    ax.set_xlim(-0.6, len(rows) - 0.4)


def _pad(ax: Any, values: list[float], top: float = 0.15, ceiling: float | None = None) -> None:
    low, high = min(values), max(values)
    span = max(high - low, 1.0)
    upper = high + top * span * 2
    ax.set_ylim(max(0.0, low - 0.12 * span), upper if ceiling is None or upper <= ceiling + 5 else ceiling + 5)
    if math.isclose(low, high):
        ax.set_ylim(low - 1, high + 1)
