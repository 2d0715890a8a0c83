"""The compression stages on fused-tiny: prune, factorize, sensitivity, and the torch artifact round trip."""

from __future__ import annotations

import copy
import os

import numpy as np
import pytest
import torch

from pipeline.compression.sensitivity import BranchRunner, _restore, _zero_group_outputs, allocate_ratios, prune_sensitivity
from pipeline.compression.structure import dependency_graph
from pipeline.compression.units import prunable_units
from pipeline.errors import InputError
from pipeline.models import build_model, default_config
from pipeline.models.checkpoint import describe_registry_model, load_torch_artifact, save_torch_artifact
from pipeline.export import example_inputs, export_onnx
from pipeline.compression.factorize import factorize, rank_for_energy
from pipeline.compression.prune import set_trainable_split, unit_group, channels_to_remove, prune, prune_settings, unit_scores, importance_scorer
from pipeline.data.encode import Encoded
from pipeline.quantization.quantize import quantize
from pipeline.targets import Compression, Quantize

HALF = Compression(prune_image=0.5, prune_text=0.5, prune_fusion=0.5)


def tiny(fusion: str = "attention"):
    config = default_config("fused-tiny", 9, fusion)
    torch.manual_seed(0)
    return config, build_model(config, pretrained=False).eval()


def logits(model, inputs) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(*inputs)


@pytest.fixture(scope="module")
def pruned_tiny():
    config, model = tiny("attention")
    inputs = example_inputs(config.input_spec())
    pruned, facts = prune(model, HALF, inputs)
    return config, model, pruned, facts


# --- prune --------------------------------------------------------------------


def test_pruning_shrinks_every_branch_and_keeps_the_forward_pass(pruned_tiny):
    config, model, pruned, facts = pruned_tiny
    for branch in ("image", "text", "fusion"):
        assert facts["params_after"][branch] < facts["params_before"][branch]
    assert facts["macs_after"]["total"] < 0.6 * facts["macs_before"]["total"]
    out = logits(pruned, example_inputs(config.input_spec(), batch=3))
    assert out.shape == (3, 9)  # class outputs are never pruned
    assert torch.isfinite(out).all()
    assert sum(p.numel() for p in model.parameters()) == facts["params_before"]["total"]  # the input model is untouched


def test_pruned_widths_are_whole_heads_and_multiples_of_eight(pruned_tiny):
    _, model, pruned, facts = pruned_tiny
    attention = pruned.text_encoder.encoder.layer[0].attention.self
    original = model.text_encoder.encoder.layer[0].attention.self
    assert attention.head_dim == original.head_dim  # whole heads go, head_dim stays
    assert attention.num_heads == original.num_heads // 2
    assert attention.query.out_features == attention.num_heads * attention.head_dim
    for unit in facts["units"]:
        assert unit["channels_after"] % 8 == 0 and unit["channels_after"] < unit["channels_before"]
    assert pruned.fusion.image_proj.in_features == pruned.image_encoder.features[-3].out_channels  # fusion input remapped


@pytest.mark.parametrize("fusion", ["concat", "weighted"])
def test_pruning_works_for_every_fusion(fusion):
    config, model = tiny(fusion)
    pruned, facts = prune(model, Compression(prune_fusion=0.5), example_inputs(config.input_spec()))
    assert logits(pruned, example_inputs(config.input_spec(), batch=3)).shape == (3, 9)
    if fusion == "weighted":
        assert pruned.fusion.modality_logits.numel() == 2  # one weight per modality, not per channel
    assert facts["params_after"]["fusion"] < facts["params_before"]["fusion"]


@pytest.mark.parametrize("ratio", [1.0, 1.5, -0.1])
def test_a_ratio_that_removes_everything_is_refused(ratio):
    config, model = tiny()
    with pytest.raises(InputError, match="must be in \\[0, 1\\)"):
        prune(model, Compression(prune_text=ratio), example_inputs(config.input_spec()))


def test_unknown_units_and_missing_taylor_batch_are_refused():
    config, model = tiny()
    inputs = example_inputs(config.input_spec())
    with pytest.raises(InputError, match="not a prunable unit"):
        prune(model, Compression(), inputs, unit_ratios={"text.layer9.ffn": 0.5})
    with pytest.raises(InputError, match="labelled batch"):
        prune(model, HALF, inputs, importance="taylor")


def test_taylor_importance_prunes_to_the_same_widths():
    config, model = tiny()
    inputs = example_inputs(config.input_spec(), batch=4)
    pruned, facts = prune(model, Compression(prune_text=0.5), inputs, importance="taylor", importance_batch=(inputs, torch.tensor([0, 1, 2, 3])))
    assert {u["unit"]: u["channels_after"] for u in facts["units"]}["text.layer0.ffn"] == 64
    assert all(p.grad is None and not p.requires_grad for p in pruned.parameters())
    assert prune_settings(Compression(prune_text=0.5), "taylor")["importance"] == "taylor"


def test_taylor_importance_takes_the_mean_gradient_of_a_batch_larger_than_one_chunk():
    config, model = tiny()
    inputs = example_inputs(config.input_spec(), batch=70)  # 64 + 6: two chunks of the gradient
    labels = torch.arange(70) % 9
    twice = (tuple(torch.cat([x, x]) for x in inputs), torch.cat([labels, labels]))  # 140: three chunks, the same mean gradient
    once_model, once = prune(model, Compression(prune_text=0.5), inputs, importance="taylor", importance_batch=(inputs, labels))
    twice_model, doubled = prune(model, Compression(prune_text=0.5), inputs, importance="taylor", importance_batch=twice)
    assert (once["settings"]["importance_samples"], doubled["settings"]["importance_samples"]) == (70, 140)
    assert once["units"] == doubled["units"]
    for (name, a), (_, b) in zip(once_model.state_dict().items(), twice_model.state_dict().items()):
        assert torch.equal(a, b), name  # the same channels kept, whatever the chunking
    magnitude = prune(model, Compression(prune_text=0.5), inputs)[1]
    assert "importance_samples" not in magnitude["settings"]  # magnitude takes no gradient


def test_trainable_scope_leaves_the_frozen_prefix_alone():
    config, model = tiny()
    model.text_encoder.split_at = 1  # layer 0 frozen, as in the pretrained model's prefix
    _, facts = prune(model, Compression(prune_text=0.5), example_inputs(config.input_spec()))
    assert {u["unit"] for u in facts["units"]} == {"text.layer1.heads", "text.layer1.ffn"}
    assert facts["recovery_split"] == {"text_layers": 1}
    _, facts = prune(model, Compression(prune_text=0.5), example_inputs(config.input_spec()), scope={"text": "all"})
    assert facts["recovery_split"] == {"text_layers": 2}
    set_trainable_split(model, **facts["recovery_split"])
    assert model.text_encoder.split_at == 0


# --- torch artifact round trip -------------------------------------------------


def test_compressed_model_round_trips_and_exports_with_a_dynamic_batch(pruned_tiny, tmp_path):
    import onnxruntime as ort

    config, _, pruned, _ = pruned_tiny
    factorized, facts = factorize(pruned, energy=0.5, embeddings=True)
    assert "text_encoder.embeddings.word_embeddings" in {layer["module"] for layer in facts["layers_factorized"]}
    save_torch_artifact(tmp_path / "torch", factorized, describe_registry_model(config))
    reloaded = load_torch_artifact(tmp_path / "torch")  # weights_only=True inside
    inputs = example_inputs(config.input_spec(), batch=5)
    torch.testing.assert_close(logits(reloaded, inputs), logits(factorized, inputs), rtol=0, atol=0)

    artifact = export_onnx(reloaded, config.input_spec(), tmp_path, simplifier="none")
    assert artifact.meta["inputs"]["image"][0] == "batch"
    session = ort.InferenceSession(str(artifact.path), providers=["CPUExecutionProvider"])
    out = session.run(None, {name: t.numpy() for name, t in zip(("image", "input_ids", "attention_mask"), inputs)})[0]
    np.testing.assert_allclose(out, logits(reloaded, inputs).numpy(), atol=1e-4)

    calibration = Encoded(ids=tuple(map(str, range(8))), inputs={n: t.numpy() for n, t in zip(("image", "input_ids", "attention_mask"), example_inputs(config.input_spec(), batch=8))}, labels=np.zeros(8, dtype=np.int64))
    int8 = quantize(artifact, calibration, Quantize(method="minmax"), tmp_path)
    int8_out = ort.InferenceSession(str(int8.path), providers=["CPUExecutionProvider"]).run(None, {n: a for n, a in calibration.inputs.items()})[0]
    assert int8_out.shape == (8, 9) and np.isfinite(int8_out).all()


# --- factorize -----------------------------------------------------------------


def test_a_factorized_linear_is_as_close_as_its_retained_energy_says():
    torch.manual_seed(0)
    layer = torch.nn.Linear(96, 64)
    with torch.no_grad():  # a decaying spectrum, as trained weights have
        u, _, vh = torch.linalg.svd(torch.randn(64, 96), full_matrices=False)
        layer.weight.copy_(u @ torch.diag(0.9 ** torch.arange(64.0)) @ vh)
    model = torch.nn.Sequential(layer)
    factorized, facts = factorize(model, energy=0.9, min_saving=0.0)
    (plan,) = facts["layers_factorized"]
    assert plan["rank"] % 8 == 0 and plan["energy_kept"] >= 0.9
    low_rank = factorized[0][1].weight @ factorized[0][0].weight
    relative_error = float((low_rank - layer.weight).detach().norm() ** 2 / layer.weight.detach().norm() ** 2)
    assert relative_error == pytest.approx(1 - plan["energy_kept"], abs=1e-5)  # Eckart-Young: the discarded energy
    x = torch.randn(32, 96)
    sigma_next = float(torch.linalg.svdvals(layer.weight.detach())[plan["rank"]])
    with torch.no_grad():
        error = (factorized(x) - model(x)).norm(dim=1)
    assert bool((error <= sigma_next * x.norm(dim=1) + 1e-5).all())  # ||(W - W_r) x|| <= sigma_{r+1} ||x||


def test_factorization_skips_layers_where_it_would_not_save():
    config, model = tiny()
    factorized, facts = factorize(model, energy=0.999)
    skipped = {s["module"]: s["reason"] for s in facts["skipped"]}
    assert "classifier" in skipped and "saves too little" in skipped["classifier"]
    assert facts["params_after"]["total"] <= facts["params_before"]["total"]
    with pytest.raises(InputError, match="retained spectral energy"):
        factorize(model, energy=1.5)


def test_rank_for_energy_rounds_up_to_multiples_of_eight():
    values = torch.tensor([10.0, 5, 1, 0.5] + [0.01] * 20)
    assert rank_for_energy(values, 0.5) == 8
    assert rank_for_energy(values, 1.0) == 24  # capped at full rank


# --- sensitivity and allocation ------------------------------------------------


def test_sensitivity_ranks_a_deliberately_fragile_unit_first():
    config, model = tiny()
    with torch.no_grad():  # layer 1's FFN now dominates its residual sum: halving it must hurt most
        model.text_encoder.encoder.layer[1].output.dense.weight.mul_(50)
    text_units = [u for u in prunable_units(model) if u.branch == "text"]
    results = prune_sensitivity(model, text_units, example_inputs(config.input_spec(), batch=16))
    assert max(results, key=lambda s: s.nmse).name == "text.layer1.ffn"
    allocation = allocate_ratios(results, {"text": 0.5})
    assert allocation["text.layer1.ffn"] == min(allocation.values())
    sizes = {s.name: s.size for s in results}
    assert sum(allocation[n] * sizes[n] for n in allocation) / sum(sizes.values()) == pytest.approx(0.5, abs=1e-3)


def test_simulated_pruning_equals_real_pruning():
    config, model = tiny()
    inputs = example_inputs(config.input_spec(), batch=4)
    unit = next(u for u in prunable_units(model) if u.name == "text.layer0.heads")
    graph = dependency_graph(model, inputs)
    keep = unit.channels // 2
    saved = _zero_group_outputs(unit_group(graph, model, unit, channels_to_remove(unit, unit_scores(graph, model, unit, importance_scorer("magnitude")), keep)))
    simulated = BranchRunner(model, inputs).logits("all")
    _restore(saved)
    pruned, _ = prune(model, Compression(), inputs, unit_ratios={unit.name: 0.5})
    torch.testing.assert_close(simulated, logits(pruned, inputs), atol=1e-5, rtol=1e-4)


def test_efficientnet_pointwise_convs_are_factorizable_and_depthwise_are_not():
    from pipeline.models.image import EfficientNetLiteEncoder
    from pipeline.compression.factorize import factorizable_layers

    names = {name for name, _ in factorizable_layers(EfficientNetLiteEncoder(pretrained=False, trainable_blocks=1))}
    assert "blocks.3._expand_conv" in names and "blocks.3._project_conv" in names and "head.0" in names
    assert not any("depthwise" in name for name in names) and "stem.0" not in names


def test_simulated_embedding_factorization_equals_real_factorization():
    from pipeline.compression.factorize import factorize_sensitivity
    from pipeline.compression.factorize import layers_with_energy

    config, model = tiny()
    inputs = example_inputs(config.input_spec(), batch=4)
    chosen = layers_with_energy(model, None, embeddings=True, embedding_energy=0.6)
    assert [name for name, _, _ in chosen] == ["text_encoder.embeddings.word_embeddings"]
    reference = logits(model, inputs)
    (result,) = factorize_sensitivity(model, inputs, chosen)
    factorized, _ = factorize(model, None, embeddings=True, embedding_energy=0.6, min_saving=0.0)
    real = logits(factorized, inputs)
    assert result.nmse == pytest.approx(float(((real - reference) ** 2).sum() / (reference ** 2).sum()), rel=1e-3)
    torch.testing.assert_close(logits(model, inputs), reference)  # the probe put the weight back


# --- BatchNorm recalibration ---------------------------------------------------


def test_recalibration_re_estimates_only_the_batchnorm_whose_conv_lost_inputs():
    from torch import nn

    from pipeline.compression.recalibrate import recalibrate_batchnorms, stale_batchnorms

    torch.manual_seed(0)
    original = nn.Sequential(nn.Conv2d(3, 8, 3, bias=False), nn.BatchNorm2d(8), nn.Conv2d(8, 16, 1, bias=False), nn.BatchNorm2d(16)).eval()
    pruned = nn.Sequential(nn.Conv2d(3, 4, 3, bias=False), nn.BatchNorm2d(4), nn.Conv2d(4, 16, 1, bias=False), nn.BatchNorm2d(16)).eval()
    with torch.no_grad():  # keep the first 4 channels, as a prune of the first conv's outputs would
        pruned[0].weight.copy_(original[0].weight[:4])
        pruned[2].weight.copy_(original[2].weight[:, :4])
    first_bn = pruned[1].running_mean.clone()
    assert stale_batchnorms(original, pruned) == ["3"]
    batches = [(torch.randn(8, 3, 6, 6),) for _ in range(3)]
    assert recalibrate_batchnorms(original, pruned, batches) == ["3"]
    with torch.no_grad():
        features = torch.cat([pruned[2](pruned[1](pruned[0](b[0]))) for b in batches])
    torch.testing.assert_close(pruned[3].running_mean, features.mean(dim=(0, 2, 3)), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(pruned[1].running_mean, first_bn)  # untouched: its inputs did not change
    assert not pruned.training and pruned[3].momentum == 0.1


def test_recovery_runs_to_a_plateau_and_keeps_the_checkpoint_closest_to_the_teacher():
    from pipeline.compression.recovery import Recovery, recover
    from pipeline.training import TrainSettings

    config, teacher = tiny("concat")
    data = random_samples(config.input_spec(), 16)
    student = copy.deepcopy(teacher)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    # a student that already answers exactly like its teacher (KL 0) cannot get closer: training stops at the plateau
    # and the model comes back as it went in, however many epochs the budget allowed
    _, facts = recover(student, Recovery(data, data, teacher, TrainSettings(epochs=6), patience=2), "t")
    assert (facts["epochs_run"], facts["best_epoch"], facts["stopped"]) == (2, 0, "plateau")
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())
    assert facts["val_best"]["kl"] == pytest.approx(0.0, abs=1e-9) and facts["val_best"]["agreement"] == 1.0
    # a perturbed student moves towards its teacher, and the kept checkpoint is the epoch with the lowest calib KL
    with torch.no_grad():
        for p in student.classifier.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    _, facts = recover(student, Recovery(data, data, teacher, TrainSettings(epochs=3), patience=3, mixed_share=0.5), "t")
    kls = [row[1] for row in facts["history"]]
    assert facts["epochs_run"] == 3 and facts["stopped"] == "budget"
    assert facts["val_best"]["kl"] == min([facts["val_before"]["kl"], *kls]) < facts["val_before"]["kl"]


def test_a_recovery_with_no_epochs_measures_the_model_as_it_came_and_leaves_it_alone():
    from pipeline.compression.recovery import Recovery, recover
    from pipeline.training import TrainSettings

    config, teacher = tiny("concat")
    data = random_samples(config.input_spec(), 16)
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.classifier.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    before = {k: v.clone() for k, v in student.state_dict().items()}
    _, facts = recover(student, Recovery(data, data, teacher, TrainSettings(epochs=0), patience=2, feature_weight=1.0), "t")
    assert (facts["epochs_run"], facts["best_epoch"], facts["history"], facts["feature_points"]) == (0, 0, [], [])
    assert facts["val_best"] == facts["val_before"] and facts["val_before"]["kl"] > 0
    assert all(torch.equal(before[k], v) for k, v in student.state_dict().items())


def test_mixed_pairs_pair_each_image_with_another_samples_text():
    from pipeline.training import _Features

    config, model = tiny("concat")
    data = random_samples(config.input_spec(), 6)
    features = _Features(model.eval(), data, 3, "t")
    images, texts = torch.tensor([0, 1]), torch.tensor([4, 5])
    swapped = {"image": data.inputs["image"][[0, 1]], "input_ids": data.inputs["input_ids"][[4, 5]],
               "attention_mask": data.inputs["attention_mask"][[4, 5]]}
    with torch.no_grad():
        expected = model(**{k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in swapped.items()})
        torch.testing.assert_close(features.logits(model, images, texts), expected, rtol=1e-5, atol=1e-5)


def test_a_macs_budget_scales_the_branch_ratios_until_it_fits():
    import dataclasses

    from pipeline.compression.measure import count_macs
    from pipeline.compression.prune import fit_macs_budget

    config, model = tiny()
    inputs = example_inputs(config.input_spec())
    reference = count_macs(model, inputs)
    wanted = dataclasses.replace(HALF, budget_macs=0.6)
    fitted, facts = fit_macs_budget(model, wanted, inputs, allocate=lambda c: None)
    pruned, _ = prune(model, fitted, inputs)
    assert count_macs(pruned, inputs) <= 0.6 * reference
    assert facts["macs_after"] <= 0.6 and facts["factor"] > 0
    assert fitted.prune_text / fitted.prune_image == pytest.approx(1.0)  # scaled together: the split between branches holds
    with pytest.raises(InputError, match="budget_macs = 0.01"):
        fit_macs_budget(model, dataclasses.replace(HALF, budget_macs=0.01), inputs, allocate=lambda c: None)


def test_token_weighted_embedding_factorization_keeps_the_rows_the_data_uses():
    from pipeline.compression.factorize import token_frequencies

    config, model = tiny()
    table = model.text_encoder.embeddings.word_embeddings.weight.detach()
    used = torch.tensor([101, 102, 2000, 2001, 2002])
    ids = used.repeat(8, 4)[:, :16].numpy()
    data = Encoded(ids=tuple(str(i) for i in range(8)), inputs={"input_ids": ids, "attention_mask": np.ones_like(ids)}, labels=np.zeros(8))
    weights = token_frequencies(data, table.shape[0])
    assert float(weights[used].sum()) == pytest.approx(0.8, abs=1e-3)  # the rest is the uniform share

    def row_error(token_weights):
        factorized, facts = factorize(model, None, embeddings=True, embedding_energy=0.5, min_saving=0.0, token_weights=token_weights)
        with torch.no_grad():
            rows = factorized.text_encoder.embeddings.word_embeddings(used)
        return float(((rows - table[used]) ** 2).sum() / (table[used] ** 2).sum()), facts["layers_factorized"][0]["rank"]

    weighted, weighted_rank = row_error(weights)
    plain, plain_rank = row_error(None)
    assert weighted < 1e-6  # five used tokens fit in the rank-8 subspace the weights choose
    assert weighted_rank <= plain_rank and plain > 100 * weighted


# --- depth ---------------------------------------------------------------------


def _silence_layer(model, index: int) -> None:
    """Zero a text layer's two residual writers: with unit LayerNorms the layer is then (almost) the identity."""
    layer = model.text_encoder.encoder.layer[index]
    with torch.no_grad():
        for dense in (layer.attention.output.dense, layer.output.dense):
            dense.weight.zero_()
            dense.bias.zero_()


@pytest.mark.parametrize("silenced", [0, 1])
def test_depth_pruning_drops_the_layer_that_matters_least(silenced):
    from pipeline.compression.depth import drop_text_layers

    config, model = tiny()
    _silence_layer(model, silenced)
    inputs = example_inputs(config.input_spec(), batch=8)
    before = logits(model, inputs)
    facts = drop_text_layers(model, 1, inputs)
    assert facts["dropped"] == [f"text.layer{silenced}"] and facts["kept"] == [1 - silenced]
    assert len(model.text_encoder.encoder.layer) == 1
    assert facts["rounds"][0][silenced]["nmse"] < 1e-6 < facts["rounds"][0][1 - silenced]["nmse"]
    torch.testing.assert_close(logits(model, inputs), before, rtol=0, atol=1e-4)  # the silenced layer did nothing


def test_a_depth_and_width_pruned_model_rebuilds_from_its_structure(tmp_path):
    from pipeline.compression.depth import drop_text_layers

    config, model = tiny()
    inputs = example_inputs(config.input_spec(), batch=4)
    drop_text_layers(model, 1, inputs)
    pruned, _ = prune(model, HALF, example_inputs(config.input_spec()))  # unit names follow the kept layers
    save_torch_artifact(tmp_path / "torch", pruned, describe_registry_model(config))
    reloaded = load_torch_artifact(tmp_path / "torch")
    assert len(reloaded.text_encoder.encoder.layer) == 1
    torch.testing.assert_close(logits(reloaded, inputs), logits(pruned, inputs), rtol=0, atol=0)
    artifact = export_onnx(reloaded, config.input_spec(), tmp_path, simplifier="none")
    assert artifact.meta["inputs"]["input_ids"][0] == "batch"


def test_depth_pruning_refuses_a_model_without_a_text_stack():
    from pipeline.compression.depth import drop_text_layers

    model = torch.nn.Sequential(torch.nn.Linear(4, 2))
    with pytest.raises(InputError, match="text_depth = 1.*no MiniLM layer stack"):
        drop_text_layers(model, 1, (torch.zeros(1, 4),))


def test_a_depth_the_model_already_has_changes_nothing():
    from pipeline.compression.depth import drop_text_layers
    from pipeline.compression.structure import structure_of

    config, model = tiny()
    facts = drop_text_layers(model, 2, example_inputs(config.input_spec(), batch=4))
    assert facts["dropped"] == [] and facts["kept"] == [0, 1] and len(model.text_encoder.encoder.layer) == 2
    assert structure_of(model) == []  # nothing to replay


def random_samples(spec, n: int) -> Encoded:
    """n labelled samples of random images and token ids in the model's input shapes."""
    rng = np.random.default_rng(0)
    return Encoded(ids=tuple(str(i) for i in range(n)),
                   inputs={"image": rng.random((n, 3, spec.image_size, spec.image_size), dtype=np.float32),
                           "input_ids": rng.integers(1, 100, (n, spec.max_tokens)), "attention_mask": np.ones((n, spec.max_tokens), np.int64)},
                   labels=np.arange(n) % 9)


def test_recoveries_of_one_build_share_the_frozen_prefix_outputs():
    from pipeline.compression.recovery import Recovery, recover
    from pipeline.training import PrefixCache, TrainSettings

    config, model = tiny("concat")
    data = random_samples(config.input_spec(), 16)
    model.text_encoder.split_at = 1  # text layer 0 is a frozen prefix
    cache = PrefixCache()
    val = data.subset(range(8))
    teacher = copy.deepcopy(model)
    run = lambda m, c: recover(m, Recovery(data, val, teacher, TrainSettings(epochs=2), patience=2, prefix_cache=c), "t")[0]
    uncached = run(copy.deepcopy(model), None)
    first = run(copy.deepcopy(model), cache)
    second = run(copy.deepcopy(model), cache)
    assert cache.hits == 6  # the teacher's train and val features in both runs, the student's in the second
    for trained in (first, second):
        assert all(torch.equal(a, b) for a, b in zip(uncached.state_dict().values(), trained.state_dict().values()))
    with torch.no_grad():  # a changed prefix layer is a different prefix: computed again
        model.text_encoder.encoder.layer[0].output.dense.bias.add_(1.0)
    run(copy.deepcopy(model), cache)
    assert cache.hits == 8  # the teacher's prefix is unchanged: only its features are reused


def test_a_deeper_prefix_keeps_its_outputs_at_the_compression_reach_on_the_way():
    from pipeline.build import prefix_waypoints
    from pipeline.compression.prune import widen_reach
    from pipeline.training import PrefixCache, prefix_outputs

    config = default_config("fused-effnet-minilm", 9)
    torch.manual_seed(0)
    model = build_model(config, pretrained=False).eval()  # the source: split after block 15 (one trainable block)
    compression = Compression(prune_image=0.5, image_blocks=10, text_layers=6)
    data = random_samples(config.input_spec(), 5)
    cache = PrefixCache(waypoints=prefix_waypoints(compression))
    deep = prefix_outputs(model, data, 4, cache)
    assert all(torch.equal(a, b) for a, b in zip(deep, prefix_outputs(model, data, 4)))
    assert model.image_encoder.split_at == 15 and model.text_encoder.split_at == 4  # the stop did not move the model's split
    reached = copy.deepcopy(model)
    widen_reach(reached, compression)  # where prune's recovery trains: after block 6, every text layer
    shallow = prefix_outputs(reached, data, 4, cache)
    assert cache.hits == 1  # kept on the way, not computed again
    assert all(torch.equal(a, b) for a, b in zip(shallow, prefix_outputs(reached, data, 4)))
    assert prefix_waypoints(Compression()) == ()  # nothing compresses: no stop


CHUNKED_PREFIX = """
from pipeline.kernels import pin_kernels
pin_kernels()  # the build's kernels, set before torch loads, as the CLI does
import torch
from test_compression import random_samples
from pipeline.models import build_model, default_config
from pipeline.training import IMAGE_PREFIX_CHUNK, prefix_outputs
config = default_config("fused-effnet-minilm", 9)
torch.manual_seed(0)
model = build_model(config, pretrained=False).eval()
data = random_samples(config.input_spec(), 2 * IMAGE_PREFIX_CHUNK + 3)
image, _ = prefix_outputs(model, data, len(data))  # one batch of 19: three chunks, the last short
with torch.inference_mode():
    whole = model.image_encoder.prefix(torch.from_numpy(data.inputs["image"]).contiguous(memory_format=torch.channels_last))
print("channels-last" if image.is_contiguous(memory_format=torch.channels_last) else "NCHW")
print("bitwise" if torch.equal(image, whole) else f"differs by {(image - whole).abs().max().item()}")
"""


def test_the_image_prefix_computed_in_chunks_is_bitwise_the_whole_batchs():
    """prefix_outputs runs the image prefix a few images at a time (memory that is not faulted in again): the build's bytes
    stay those of one pass over the batch, under the kernels the build pins; they come out channels-last, the layout the
    trained suffix runs fastest in."""
    import subprocess
    import sys
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    result = subprocess.run([sys.executable, "-c", CHUNKED_PREFIX], capture_output=True, text=True, timeout=300,
                            env={**os.environ, "PYTHONPATH": os.pathsep.join([str(repo), str(repo / "tests")])})
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-2:] == ["channels-last", "bitwise"]


def test_sensitivity_re_runs_from_the_frozen_prefix_with_the_same_logits():
    config, model = tiny()
    model.text_encoder.split_at = 1  # layer 0 is the frozen prefix
    inputs = example_inputs(config.input_spec(), batch=4)
    full, shortcut = BranchRunner(model, inputs), BranchRunner(model, inputs, frozen_prefix=True)
    assert shortcut.from_prefix and not full.from_prefix
    with torch.no_grad():
        model.text_encoder.encoder.layer[1].output.dense.weight.mul_(3)  # a suffix layer changes
    torch.testing.assert_close(shortcut.logits("text"), full.logits("text"), rtol=0, atol=0)
    assert not torch.equal(shortcut.logits("text"), shortcut.reference)


def test_batchnorm_recalibration_from_the_cached_prefix_equals_a_full_forward():
    from pipeline.compression.recalibrate import recalibrate_batchnorms
    from pipeline.compression.prune import recalibration_inputs
    from pipeline.compression.recovery import Recovery
    from pipeline.training import PrefixCache, TrainSettings, prefix_outputs

    config = default_config("fused-effnet-minilm", 9)
    torch.manual_seed(0)
    model = build_model(config, pretrained=False).eval()
    set_trainable_split(model, image_blocks=4)
    pruned, _ = prune(model, Compression(prune_image=0.5), example_inputs(config.input_spec()))
    data = random_samples(config.input_spec(), 8)
    recovery = lambda cache: Recovery(data, data, model, TrainSettings(batch_size=4), prefix_cache=cache)
    full, cached = copy.deepcopy(pruned), copy.deepcopy(pruned)
    batches, forward = recalibration_inputs(model, full, recovery(None))
    assert forward is None  # no cache: the whole model runs
    names = recalibrate_batchnorms(model, full, batches)
    cache = PrefixCache()
    batches, forward = recalibration_inputs(model, cached, recovery(cache))
    assert forward is not None
    prefix_outputs(cached, data, 4, cache)  # what recovery reads next: already there
    assert cache.hits == 1
    assert recalibrate_batchnorms(model, cached, batches, forward) == names and names
    states = full.state_dict(), cached.state_dict()
    for name in names:
        torch.testing.assert_close(states[1][f"{name}.running_mean"], states[0][f"{name}.running_mean"], rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(states[1][f"{name}.running_var"], states[0][f"{name}.running_var"], rtol=1e-5, atol=1e-6)

