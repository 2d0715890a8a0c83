"""A fleet build: several targets in one run, one stage cache shared by all, one summary across them.

Each target is an ordinary build into out/<target>/ (its own manifest, reports and bundle); all of them
keep their stage entries and measured outputs in one cache (out/cache/ unless --cache says where). A
stage's cache key hashes its config, its input's sha256, the tool versions and its code, never the
target's name, so a stage two targets agree on (the source always; compression and export where the
budgets match; quantize where the form and calibration match) runs for the first and is a cache hit
for the others: the plan across the fleet is the key graph itself. One target failing its gate does not
stop the others; the fleet's exit code is the highest of its targets'. Ctrl-C or SIGTERM stops the
fleet, after writing the summary of what was built.
"""

from __future__ import annotations

import dataclasses
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from pipeline.build import BuildConfig, build
from pipeline.errors import PipelineError
from pipeline.report import fmt, text_table
from pipeline.report_html import fleet_html
from pipeline.store import atomic_write_json, atomic_write_text

FLEET_SCHEMA = 1
CACHE_DIR = "cache"  # out/cache/: the stage cache of a fleet build unless --cache names another
# A fleet's status is its worst target's, in this order (a target the fleet never reached is "not-run").
STATUS_ORDER = ("ok", "not-run", "failed", "error", "interrupted")


@dataclass(frozen=True)
class TargetOutcome:
    """How one target's build ended: its manifest (None if it wrote none) and the exit code a single build would have given."""

    name: str
    out: Path
    manifest: dict[str, Any] | None
    exit_code: int
    message: str | None = None  # the error a build without a manifest ended with (bad input found before any stage)

    @property
    def status(self) -> str:
        if self.manifest is not None:
            return self.manifest["status"]
        return "not-run" if self.exit_code == 0 else "error"


def fleet_configs(configs: list[BuildConfig], out: Path, cache: Path | None) -> list[BuildConfig]:
    """The targets' builds as a fleet lays them out: out/<target>/ each, one cache shared by all."""
    shared = cache if cache is not None else out / CACHE_DIR
    return [dataclasses.replace(c, out=out / c.target.name, cache=shared) for c in configs]


def build_fleet(configs: list[BuildConfig], out: Path, progress: Callable[[str], None] = print,
                on_target: Callable[[TargetOutcome], None] | None = None) -> dict[str, Any]:
    """Build every target in turn; return the fleet summary (also written to out/fleet.json, fleet.md, fleet.html).

    configs come from fleet_configs(). on_target hears each target's outcome as it ends (the CLI prints its ledger).
    """
    started = time.perf_counter()
    outcomes: list[TargetOutcome] = []

    def finish() -> dict[str, Any]:
        fleet = fleet_summary(out, configs, outcomes, time.perf_counter() - started)
        write_fleet(out, fleet, outcomes)
        return fleet

    for number, config in enumerate(configs, 1):
        progress(f"== target {number}/{len(configs)}: {config.target.name} -> {config.out}")
        try:
            outcome = TargetOutcome(config.target.name, config.out, build(config, progress), 0)
        except PipelineError as error:  # a gate, bad input, no engine: this target's verdict; the others still build
            manifest = getattr(error, "manifest", None)
            outcome = TargetOutcome(config.target.name, config.out, manifest, error.exit_code, None if manifest else str(error))
            progress(f"== {config.target.name}: {outcome.status} (exit {error.exit_code}): {error}")
        except BaseException as error:  # interrupted, or a defect: say what the fleet built so far, then stop
            manifest = getattr(error, "manifest", None)
            if manifest is not None:
                outcomes.append(TargetOutcome(config.target.name, config.out, manifest, getattr(error, "exit_code", 1)))
            error.fleet = finish()
            raise
        outcomes.append(outcome)
        if on_target is not None:
            on_target(outcome)
    return finish()


def fleet_summary(out: Path, configs: list[BuildConfig], outcomes: list[TargetOutcome], wall_s: float) -> dict[str, Any]:
    ended = {o.name: o for o in outcomes}
    entries = [target_entry(out, ended.get(c.target.name) or TargetOutcome(c.target.name, c.out, None, 0)) for c in configs]
    worst = max((e["status"] for e in entries), key=lambda s: STATUS_ORDER.index(s) if s in STATUS_ORDER else len(STATUS_ORDER))
    cache = configs[0].cache if configs else None
    return {
        "schema": FLEET_SCHEMA,
        "status": worst,
        "exit_code": max((o.exit_code for o in outcomes), default=0),
        "wall_s": round(wall_s, 2),
        "cache": os.path.relpath(cache, out) if cache is not None else None,
        "targets": entries,
        "shared": shared_stages(entries),
    }


def target_entry(out: Path, outcome: TargetOutcome) -> dict[str, Any]:
    """A target's line in the fleet: its verdict, its shipped stage's accuracy, size and latency, and how it deploys."""
    manifest = outcome.manifest or {}
    stages = manifest.get("stages") or []
    last = next((s for s in reversed(stages) if s.get("parity")), None)
    parity = (last or {}).get("parity") or {}
    footprint = (last or {}).get("footprint") or {}
    engine = manifest.get("engine") or {}
    return {
        "target": outcome.name,
        "out": os.path.relpath(outcome.out, out),
        "status": outcome.status,
        "exit_code": outcome.exit_code,
        "failure": manifest.get("failure") or outcome.message,
        "stage": last["name"] if last else None,
        "accuracy": parity.get("accuracy"),
        "delta_pts": parity.get("delta_pts"),
        "delta_ci_pts": (parity.get("paired") or {}).get("delta_ci_pts"),
        "agreement": (parity.get("vs_reference") or {}).get("agreement"),
        "size_bytes": last.get("size_bytes") if last else None,
        "latency_ms": footprint.get("latency_ms"),
        "engine": {key: engine[key] for key in ("status", "plan", "bundle") if key in engine},
        "wall_s": manifest.get("wall_s"),
        "stages": [{"name": s["name"], "sha256": s["artifact"]["sha256"], "cached": s["cached"], "wall_s": s["wall_s"]} for s in stages],
    }


def shared_stages(entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Artifacts more than one target used: which target made each (the one that did not find it cached) and which reused it."""
    users: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for entry in entries:
        for stage in entry["stages"]:
            users.setdefault((stage["name"], stage["sha256"]), []).append({"target": entry["target"], "cached": stage["cached"]})
    shared = []
    for (name, sha256), used in users.items():
        if len(used) > 1:
            made = [u["target"] for u in used if not u["cached"]]
            shared.append({"stage": name, "sha256": sha256, "targets": [u["target"] for u in used],
                           "made_by": made[0] if made else None, "ran": len(made)})
    return shared


def write_fleet(out: Path, fleet: dict[str, Any], outcomes: list[TargetOutcome]) -> None:
    atomic_write_json(out / "fleet.json", fleet)
    atomic_write_text(out / "fleet.md", "# edgepipe fleet\n\n```\n" + fleet_table(fleet) + "\n```\n")
    atomic_write_text(out / "fleet.html", fleet_html({o.name: o.manifest for o in outcomes if o.manifest is not None}))


def fleet_table(fleet: dict[str, Any]) -> str:
    header = ["target", "status", "exit", "shipped", "acc", "Δpts", "Δ 95% CI", "agree", "MB", "b1 ms", "deploy", "ran/cached", "time s"]
    rows = []
    for e in fleet["targets"]:
        ci = e["delta_ci_pts"]
        ran = sum(not s["cached"] for s in e["stages"])
        rows.append([
            e["target"], e["status"], str(e["exit_code"]), e["stage"] or "-", fmt(e["accuracy"], ".4f"), fmt(e["delta_pts"], "+.2f"),
            f"[{ci[0]:+.2f}, {ci[1]:+.2f}]" if ci else "-", fmt(e["agreement"], ".4f"),
            "-" if e["size_bytes"] is None else f"{e['size_bytes'] / 1e6:.2f}", fmt((e["latency_ms"] or {}).get("batch1_ms"), ".1f"),
            _deploy(e["engine"]), f"{ran}/{len(e['stages']) - ran}", fmt(e["wall_s"], ".1f"),
        ])
    lines = [f"fleet: {len(rows)} targets  status {fleet['status']}  exit {fleet['exit_code']}  wall {fleet['wall_s']:.1f} s  "
             f"cache {fleet['cache']}", text_table(header, rows)]
    for share in fleet["shared"]:
        others = [t for t in share["targets"] if t != share["made_by"]]
        made = f"made by {share['made_by']}" if share["made_by"] else "from an earlier run's cache"
        lines.append(f"shared: {share['stage']} {share['sha256'][:12]} {made}, reused by {', '.join(others)}"
                     + (f" (ran {share['ran']} times)" if share["ran"] > 1 else ""))
    lines += [f"{e['target']}: {e['failure']}" for e in fleet["targets"] if e["failure"]]
    return "\n".join(lines)


def _deploy(engine: dict[str, Any]) -> str:
    status = engine.get("status", "not-run")
    return {"built": "engine", "deferred": "bundle", "not-applicable": "onnxruntime"}.get(status, status)

