"""The factorize pass: low-rank Linear / 1x1 conv layers and the token embedding, then recovery by distillation.

Recovery reaches what was factorized: the compression's reach, and the
whole text encoder (embedding included) when the embedding is factorized.
The image blocks in reach keep training too: their frozen prefix is the
prune stage's, so its outputs come from the build's cache, where freezing
them would mean running every block again for the whole train split.
The embedding is factorized weighted by token frequency in the train split.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Mapping

from pipeline.artifacts import Artifact
from pipeline.compression.factorize import factorize, factorize_sensitivity, layers_with_energy, token_frequencies
from pipeline.compression.prune import probe_tensors, set_trainable_split
from pipeline.compression.recovery import Recovery, recover
from pipeline.data.encode import Encoded, InputSpec
from pipeline.errors import InputError
from pipeline.export import example_inputs
from pipeline.models.checkpoint import load_torch_artifact, read_description, save_torch_artifact
from pipeline.stages.base import Context, Measure, Pass
from pipeline.stages.recovery import RecoveryConfig, onnx_source_skip, recovery, recovery_config, structure_unsupported
from pipeline.store import artifact_digest
from pipeline.targets import Compression


@dataclass(frozen=True)
class FactorizeConfig:
    compression: Compression  # the target's, without the prune pass's fields
    recovery: RecoveryConfig
    probe_samples: int
    scope: str = "trainable"
    embedding_weights: str = "train-split token frequency + 0.2 uniform"


def factorize_only(compression: Compression) -> Compression:
    defaults = Compression()
    return dataclasses.replace(compression, prune_image=0.0, prune_text=0.0, prune_fusion=0.0, text_depth=None, importance=defaults.importance,
                               allocate=False, budget_macs=None, recovery_lr=defaults.recovery_lr)


def declare(ctx: Context, done: Mapping[str, Artifact]) -> Pass:
    compression, source = ctx.target.compression, done["source"]
    # Factorization perturbs a model that already works: recovery fine-tunes at the model's own encoder
    # rate. At recovery_lr (meant for pruning) the calib accuracy fell in the second epoch (BENCHMARKS.md).
    epochs = compression.recovery_epochs if compression.factorize_epochs is None else compression.factorize_epochs
    config = FactorizeConfig(factorize_only(compression), recovery_config(ctx, source, epochs, ctx.train.encoder_lr), ctx.probe_samples)
    skip = onnx_source_skip(ctx) or ("the target asks for no factorization" if not compression.factorizes() else structure_unsupported(done))
    model = next(reversed(done.values()))
    run = lambda workdir: factorize_stage(model, config.compression, ctx.spec, recovery(ctx, source, config.recovery), ctx.probe(), workdir)
    return Pass("factorize", config, model.sha256, run, Measure("torch", reach=compression), code=__name__, gate="factorize", skip=skip)


def factorize_stage(source: Artifact, compression: Compression, spec: InputSpec, recovery: Recovery, probe: Encoded, workdir: Path) -> Artifact:
    """Factorize a torch artifact (sensitivity of each layer measured on probe), then recover it."""
    model = load_torch_artifact(source.path)
    embeddings = compression.embedding_energy is not None
    text_layers = len(model.text_encoder.encoder.layer) if embeddings and hasattr(model, "text_encoder") else compression.text_layers
    set_trainable_split(model, text_layers=text_layers, image_blocks=compression.image_blocks)
    inputs, labels = probe_tensors(probe)
    chosen = layers_with_energy(model, compression.factorize_energy, "trainable", embeddings, compression.embedding_energy)
    weights = token_frequencies(recovery.train, model.text_encoder.embeddings.word_embeddings.num_embeddings) if embeddings else None
    sensitivities = factorize_sensitivity(model, inputs, chosen, labels, token_weights=weights)
    factorized, facts = factorize(model, compression.factorize_energy, scope="trainable", example_inputs=example_inputs(spec),
                                  embeddings=embeddings, embedding_energy=compression.embedding_energy, token_weights=weights)
    if not facts["layers_factorized"]:
        raise InputError(f"compression.factorize_energy = {compression.factorize_energy}, embedding_energy = {compression.embedding_energy}: "
                         "no layer in reach would get smaller; lower the energy or drop the factorize settings")
    set_trainable_split(factorized, text_layers=text_layers, image_blocks=compression.image_blocks)
    recovered, recovery_facts = recover(factorized, recovery, "recover (factorize)")
    directory = workdir / "torch"
    save_torch_artifact(directory, recovered, read_description(source.path))
    facts["sensitivity"] = [asdict(s) for s in sensitivities]
    return Artifact("torch", directory, artifact_digest(directory), {**facts, "recovery": recovery_facts})
