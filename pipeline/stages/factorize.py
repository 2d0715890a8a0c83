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

import torch
from torch import nn

from pipeline.artifacts import Artifact
from pipeline.compression.discover import called_modules, module_branches
from pipeline.compression.factorize import factorize, factorize_sensitivity, layers_with_energy, token_frequencies
from pipeline.compression.prune import probe_tensors, set_trainable_split
from pipeline.compression.recovery import Recovery, recover
from pipeline.compression.trimmed import TrimmedEmbedding, vocabulary_size
from pipeline.data.encode import Encoded, InputSpec
from pipeline.errors import InputError
from pipeline.export import example_inputs
from pipeline.models.checkpoint import load_torch_artifact, read_description, save_torch_artifact
from pipeline.stages.base import Context, Measure, Pass
from pipeline.stages.recovery import RecoveryConfig, built_in_model, onnx_source_skip, recovery, recovery_config
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
                               allocate=False, budget_macs=None, recovery_lr=defaults.recovery_lr, recovery_seed=None)


def declare(ctx: Context, done: Mapping[str, Artifact]) -> Pass:
    compression, source = ctx.target.compression, done["source"]
    # Factorization perturbs a model that already works: recovery fine-tunes at the model's own encoder
    # rate. At recovery_lr (meant for pruning) the calib accuracy fell in the second epoch (BENCHMARKS.md).
    epochs = compression.recovery_epochs if compression.factorize_epochs is None else compression.factorize_epochs
    config = FactorizeConfig(factorize_only(compression), recovery_config(ctx, source, epochs, ctx.train.encoder_lr), ctx.probe_samples)
    skip = onnx_source_skip(ctx) or ("the target asks for no factorization" if not compression.factorizes() else None)
    model = next(reversed(done.values()))
    run = lambda workdir: factorize_stage(model, config.compression, ctx.spec, recovery(ctx, source, config.recovery), ctx.probe(), workdir)
    return Pass("factorize", config, model.sha256, run, Measure("torch", reach=compression), code=__name__, gate="factorize", skip=skip)


def token_tables_weights(chosen, train: Encoded, spec: InputSpec) -> dict[str, torch.Tensor]:
    """Token-frequency weights for each chosen embedding the token ids index (more ids than the largest id; a position table has fewer).

    A trimmed table's weights are per row: each kept id's own, and the shared row all the dropped ids' together.
    """
    if "input_ids" not in spec.roles:
        return {}
    ids, mask = spec.name_of("input_ids"), spec.name_of("attention_mask") if "attention_mask" in spec.roles else None
    largest = int(train.inputs[ids].max()) if len(train) else 0
    weights = {}
    for name, layer, _ in chosen:
        if isinstance(layer, nn.Embedding) and vocabulary_size(layer) > largest:
            per_id = token_frequencies(train, vocabulary_size(layer), ids_name=ids, mask_name=mask)
            weights[name] = layer.fold(per_id) if isinstance(layer, TrimmedEmbedding) else per_id
    return weights


def factorize_stage(source: Artifact, compression: Compression, spec: InputSpec, recovery: Recovery, probe: Encoded, workdir: Path) -> Artifact:
    """Factorize a torch artifact (sensitivity of each layer measured on probe), then recover it."""
    model = load_torch_artifact(source.path)
    embeddings = compression.embedding_energy is not None
    text_layers = len(model.text_encoder.encoder.layer) if embeddings and hasattr(model, "text_encoder") else compression.text_layers
    set_trainable_split(model, text_layers=text_layers, image_blocks=compression.image_blocks)
    inputs, labels = probe_tensors(probe)
    built_in = built_in_model(source)  # its token table is known by name
    called = None if built_in else called_modules(model, example_inputs(spec))
    chosen = layers_with_energy(model, compression.factorize_energy, "trainable", embeddings, compression.embedding_energy, called, compression.keep)
    if not embeddings:
        weights = None
    elif built_in:
        table = model.text_encoder.embeddings.word_embeddings
        weights = token_frequencies(recovery.train, vocabulary_size(table))
        weights = table.fold(weights) if isinstance(table, TrimmedEmbedding) else weights  # compression.vocabulary = "train"
    else:
        weights = token_tables_weights(chosen, recovery.train, spec)
    branches = None if built_in else module_branches(model, example_inputs(spec))
    sensitivities = factorize_sensitivity(model, inputs, chosen, labels, token_weights=weights, branches=branches)
    factorized, facts = factorize(model, compression.factorize_energy, scope="trainable", example_inputs=example_inputs(spec),
                                  embeddings=embeddings, embedding_energy=compression.embedding_energy, token_weights=weights,
                                  called=called, keep=compression.keep)
    if not facts["layers_factorized"] and not built_in:
        # a user's model on a target written for another one: nothing in it gets smaller at these energies, and that is no error
        directory = workdir / "torch"
        save_torch_artifact(directory, model, read_description(source.path))
        facts["note"] = "no layer would get smaller at these energies (see skipped); the model goes on as it came"
        return Artifact("torch", directory, artifact_digest(directory), {**facts, "sensitivity": [asdict(s) for s in sensitivities]})
    if not facts["layers_factorized"]:
        raise InputError(f"compression.factorize_energy = {compression.factorize_energy}, embedding_energy = {compression.embedding_energy}: "
                         "no layer in reach would get smaller; lower the energy or drop the factorize settings")
    set_trainable_split(factorized, text_layers=text_layers, image_blocks=compression.image_blocks)
    recovered, recovery_facts = recover(factorized, recovery, "recover (factorize)")
    directory = workdir / "torch"
    save_torch_artifact(directory, recovered, read_description(source.path))
    facts["sensitivity"] = [asdict(s) for s in sensitivities]
    return Artifact("torch", directory, artifact_digest(directory), {**facts, "recovery": recovery_facts})
