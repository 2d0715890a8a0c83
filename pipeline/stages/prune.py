"""The prune pass: structural pruning per branch, sensitivity-allocated when asked, then recovery by distillation.

Drop the token-table rows a user's model, trained here from scratch, never
read in its train split (pipeline.compression.vocabulary), widen the
trainable split to the compression's reach, drop the least
sensitive text layers when the target asks for a shallower text branch
(pipeline.compression.depth), measure each unit's sensitivity, prune
(pipeline.compression.prune), re-estimate the BatchNorm statistics pruning
made stale (pipeline.compression.recalibrate), then recover
(pipeline.compression.recovery).
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from pipeline.artifacts import Artifact
from pipeline.compression.depth import drop_text_layers, text_layer_list
from pipeline.compression.measure import count_params
from pipeline.compression.prune import (branch_ratios, check_ratios, fit_macs_budget, fit_user_budget, model_units, nothing_to_prune,
                                        probe_tensors, prune, recalibration_inputs, user_caps, widen_reach)
from pipeline.compression.recalibrate import recalibrate_batchnorms
from pipeline.compression.recovery import Recovery, recover
from pipeline.compression.sensitivity import allocate_ratios, prune_sensitivity
from pipeline.compression.vocabulary import trim_vocabulary
from pipeline.data.encode import Encoded, InputSpec
from pipeline.errors import InputError
from pipeline.export import example_inputs
from pipeline.models.checkpoint import build_architecture, load_torch_artifact, read_description, save_torch_artifact
from pipeline.stages.base import Context, Measure, Pass
from pipeline.stages.recovery import RecoveryConfig, built_in_model, onnx_source_skip, recovery, recovery_config
from pipeline.store import artifact_digest
from pipeline.targets import Compression


@dataclass(frozen=True)
class PruneConfig:
    compression: Compression  # the target's, without the factorize pass's fields
    recovery: RecoveryConfig
    probe_samples: int
    scope: str = "trainable"
    trained_here: bool = True  # the source was trained on this train split (not --weights): what vocabulary "auto" trims


def prune_only(compression: Compression) -> Compression:
    # recovery_seed: the recovery config holds the seed it resolves to, so --recovery-seed 0 shares the default's cache
    return dataclasses.replace(compression, factorize_energy=None, embedding_energy=None, factorize_epochs=None, recovery_seed=None)


def declare(ctx: Context, done: Mapping[str, Artifact]) -> Pass:
    compression, source = ctx.target.compression, done["source"]
    config = PruneConfig(prune_only(compression), recovery_config(ctx, source, compression.recovery_epochs, compression.recovery_lr),
                         ctx.probe_samples, trained_here=ctx.weights is None)
    skip = onnx_source_skip(ctx) or ("the target asks for no pruning" if not compression.prunes() else None)
    model = next(reversed(done.values()))
    run = lambda workdir: prune_stage(model, config.compression, ctx.spec, recovery(ctx, source, config.recovery), ctx.probe(), workdir,
                                      config.trained_here, ctx.probe(compression.importance_samples))
    return Pass("prune", config, model.sha256, run, Measure("torch", reach=compression), code=__name__, gate="prune", skip=skip)


def prune_stage(source: Artifact, compression: Compression, spec: InputSpec, recovery: Recovery, probe: Encoded, workdir: Path,
                trained_here: bool = True, importance_probe: Encoded | None = None) -> Artifact:
    """Trim token tables, prune a torch artifact per branch (sensitivity measured on probe, ratios allocated when asked), then recover it.

    importance_probe: the labelled samples Taylor importance takes its gradient on (None: probe)."""
    model = load_torch_artifact(source.path)
    source_params = count_params(model)
    vocabulary = trim_vocabulary(model, compression.vocabulary, trained_here, lambda: build_architecture(read_description(source.path), pretrained=True),
                                 recovery.train, recovery.val, compression.keep, built_in_model(source))
    inputs, labels = probe_tensors(probe)
    depth = None
    if compression.text_depth is not None:
        depth = (drop_text_layers(model, compression.text_depth, inputs, labels) if text_layer_list(model) is not None or built_in_model(source)
                 else {"skipped": f"compression.text_depth = {compression.text_depth} drops layers of the built-in MiniLM stack; this model has none"})
    widen_reach(model, compression)
    found = model_units(model, example_inputs(spec), compression.keep)
    units, discovery = found
    if discovery is not None:  # a user's model: the ratios of its budget, not the ones chosen on the built-in model
        compression = user_caps(compression)
    ratios = {branch: r for branch, r in branch_ratios(compression).items() if r > 0}
    units = [u for u in units if u.trainable and u.branch in ratios]
    if discovery is not None:  # a user's model: the branches it has
        ratios = {branch: r for branch, r in ratios.items() if any(u.branch == branch for u in units)}
        if not units:
            raise InputError(nothing_to_prune(discovery))
    check_ratios(ratios, units)
    sensitivities = prune_sensitivity(model, units, inputs, labels)
    allocate = (lambda c: allocate_ratios(sensitivities, branch_ratios(c))) if compression.allocate else (lambda c: None)
    budget = None
    if discovery is not None and compression.user_budget is not None:
        most_sensitive_first = [m.name for m in sorted(sensitivities, key=lambda m: -m.nmse)]
        compression, unit_ratios, budget = fit_user_budget(model, compression, example_inputs(spec), compression.user_budget, source_params,
                                                           allocate, found, most_sensitive_first)
    else:
        if compression.budget_macs is not None:
            compression, budget = fit_macs_budget(model, compression, example_inputs(spec), allocate, found=found)
        unit_ratios = allocate(compression)
    # Magnitude importance reads the batch only for the token rows an embedding is scored on: the probe, as it was measured
    taylor = compression.importance == "taylor" and importance_probe is not None
    pruned, facts = prune(model, compression, example_inputs(spec), compression.importance, "trainable", unit_ratios or None,
                          importance_batch=probe_tensors(importance_probe) if taylor else (inputs, labels), found=found)
    facts["budget"] = budget
    facts["vocabulary"] = vocabulary
    facts["depth"] = depth
    facts["recalibrated_batchnorms"] = recalibrate_batchnorms(model, pruned, *recalibration_inputs(model, pruned, recovery))
    widen_reach(pruned, compression)
    recovered, recovery_facts = recover(pruned, recovery, "recover (prune)")
    directory = workdir / "torch"
    save_torch_artifact(directory, recovered, read_description(source.path))
    facts["sensitivity"] = [asdict(s) for s in sensitivities]
    return Artifact("torch", directory, artifact_digest(directory), {**facts, "recovery": recovery_facts})
