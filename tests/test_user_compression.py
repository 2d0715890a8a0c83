"""Four user-style models through the whole pipeline (issue 14, item 8), by the real CLI.

tests/user_models holds a GRU text encoder, torch's own TransformerEncoder with
cross-attention fusion, a residual CNN with BatchNorm and gated fusion, and an
image + ids-only model: none is written like the built-in models. The task is
image-text matching from the emoji data (tests/helpers.write_matching_folder),
not category classification. Each is built for the jetson target (its ratios
and gates; recovery shortened to keep the suite fast) and must run every stage
with compression applied, reach the issue's size budget (params <= 60%, MACs
<= 70% of its source), be judged by its gates, and ship a bundle that `verify --runtime
ort` passes. One of them reads its text through its own tokenizer; one FP32
export goes through again with --onnx. On this small folder the models stay
near chance (the full-data figures, with the jetson gates, are
benchmarks/user_models.py's): the assertions are about what the pipeline did to them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from helpers import write_matching_folder, write_target
from pipeline.cli import main

pytestmark = pytest.mark.slow
TESTS = Path(__file__).resolve().parent
STAGES = ["source", "prune", "factorize", "export", "quantize"]
SHORT_RECOVERY = {"recovery_epochs": 2, "factorize_epochs": 1}
# On 300 samples the models stay near chance, where an accuracy drop is noise: the accuracy gates are opened, and
# quantize keeps an agreement gate. benchmarks/user_models.py judges them with the jetson target's own gates.
GATES = {"prune": {"max_drop_pts": 100.0}, "factorize": {"max_drop_pts": 100.0}, "quantize": {"max_drop_pts": 100.0, "min_agreement": 0.9}}


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("user-compression")
    data = write_matching_folder(work / "data", images=150)
    write_target(work / "jetson.toml", compression=SHORT_RECOVERY, gates=GATES)
    from test_user_inputs import write_tokenizer

    write_tokenizer(work / "tokenizer", [json.loads(line)["text"] for line in (data / "samples.jsonl").read_text().splitlines()])
    sys.path.insert(0, str(TESTS))
    yield work
    sys.path.remove(str(TESTS))


def build(workspace: Path, out: Path, *source: str) -> dict:
    code = main(["build", *source, "--data", str(workspace / "data"), "--target", str(workspace / "jetson.toml"), "--epochs", "2",
                 "--out", str(out)])
    manifest = json.loads((out / "manifest.json").read_text())
    assert code == 0, manifest.get("error") or manifest.get("failure")
    assert main(["verify", "--bundle", str(out / "bundle"), "--runtime", "ort"]) == 0
    return manifest


def stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


def compressed_within_budget(manifest: dict) -> None:
    assert manifest["status"] == "ok" and [s["name"] for s in manifest["stages"]] == STAGES
    source, shipped = manifest["stages"][0]["footprint"], manifest["stages"][-1]["footprint"]
    assert shipped["params"]["total"] <= 0.6 * source["params"]["total"]
    assert shipped["macs"]["total"] <= 0.7 * source["macs"]["total"]
    for name in ("prune", "factorize", "quantize"):  # every compressing stage was judged
        assert stage(manifest, name)["gate"] is not None
    assert stage(manifest, "quantize")["parity"]["vs_previous"]["agreement"] >= 0.9


def pruned_units(manifest: dict) -> dict[str, dict]:
    return {u["unit"]: u for u in stage(manifest, "prune")["facts"]["units"]}


def test_a_gru_text_encoder_with_its_own_tokenizer_is_pruned_to_the_user_budget_and_no_further(workspace, tmp_path):
    manifest = build(workspace, tmp_path / "out", "--model", "user_models.recurrent:build", "--tokenizer", str(workspace / "tokenizer"))
    compressed_within_budget(manifest)
    facts, units = stage(manifest, "prune")["facts"], pruned_units(manifest)
    budget = facts["budget"]
    assert budget["params_after"] <= 0.5 and budget["macs_after"] <= 0.7 and 0 < budget["factor"] <= 1
    assert units and all(u["channels_after"] < u["channels_before"] for u in units.values()) and not set(units) & set(budget["spared"])
    for name in ("text.gru", "text.words"):  # each one is either pruned, or left whole because the budget did not need it
        assert name in units or name in budget["spared"]
    assert stage(manifest, "prune")["facts"]["discovered"]["output_layer"] == "classifier"
    assert manifest["stages"][0]["facts"]["input_spec"]["tokenizer"].endswith("tokenizer")


def test_torch_transformer_layers_with_cross_attention_prune_what_they_can_and_name_what_they_cannot(workspace, tmp_path):
    manifest = build(workspace, tmp_path / "out", "--model", "user_models.transformer:build")
    compressed_within_budget(manifest)
    discovered = stage(manifest, "prune")["facts"]["discovered"]["units"]
    assert any(name.startswith("text.encoder.layers.") for name in discovered)  # the feed-forward widths, pruned as far as the budget needs
    facts = stage(manifest, "prune")["facts"]
    (table,) = facts["vocabulary"]["trimmed"]  # trained from scratch here: the rows of MiniLM's ids the train split never reads go
    assert table["module"] == "token_embedding.0" and table["rows_before"] == 30522 and table["rows_after"] < 1000
    assert 0 < table["calib_ids_with_own_row"] < table["calib_ids"]
    assert facts["budget"]["user_budget"] == {"params": 0.5, "macs": 0.7, "prune_image": 0.6, "prune_text": 0.75, "prune_fusion": 0.5,
                                              "allocate": False, "importance": "magnitude"}  # a user's model's caps, not the built-in model's
    report = (tmp_path / "out" / "report.md").read_text()
    assert f"vocabulary: token_embedding.0 30522 -> {table['rows_after']} rows" in report and "budget (params <= 0.5, macs <= 0.7)" in report
    assert facts["budget"]["params_after"] <= 0.5 and ("out_of_reach" in facts["budget"] or facts["budget"]["macs_after"] <= 0.7)
    whole = facts["discovered"]["left_whole"]
    # the width the text queries and image keys share meets a 3-D torch.cat Torch-Pruning 1.6 does not map: a pruned copy fails, so it stays
    assert any(w["module"] == "patchify.2" and "no longer runs" in w["reason"] for w in whole)


def test_a_residual_cnn_with_batchnorm_and_gated_fusion_recalibrates_its_batchnorms(workspace, tmp_path):
    manifest = build(workspace, tmp_path / "out", "--model", "user_models.residual:build")
    compressed_within_budget(manifest)
    facts = stage(manifest, "prune")["facts"]
    assert {name.split(".", 1)[0] for name in facts["discovered"]["units"]} == {"image", "text", "fusion"}
    assert facts["units"]
    assert facts["recalibrated_batchnorms"]


def test_an_ids_only_gated_model_and_its_fp32_export_through_onnx(workspace, tmp_path):
    manifest = build(workspace, tmp_path / "torch", "--model", "user_models.gated:build")
    compressed_within_budget(manifest)
    assert list(stage(manifest, "export")["artifact"]["meta"]["inputs"]) == ["image", "input_ids"]
    fp32 = tmp_path / "torch" / stage(manifest, "export")["artifact"]["path"]
    again = build(workspace, tmp_path / "onnx", "--onnx", str(fp32))
    assert [s["name"] for s in again["stages"]] == ["source", "export", "quantize"]
    assert stage(again, "quantize")["parity"]["vs_previous"]["agreement"] >= 0.9


def test_pinned_modules_and_an_untrimmed_vocabulary_stay_whole_and_an_unknown_module_is_refused_by_name(workspace, tmp_path, capsys):
    manifest = build(workspace, tmp_path / "out", "--model", "user_models.gated:build", "--keep", "pixels,lookup", "--vocabulary", "whole")
    facts = stage(manifest, "prune")["facts"]
    assert facts["settings"]["keep"] == ["pixels", "lookup"]
    assert facts["vocabulary"]["trimmed"] == [] and facts["vocabulary"]["whole"] == {"lookup": 'compression.vocabulary = "whole"'}
    assert not any(u["unit"].split(".", 1)[1].startswith(("pixels", "lookup")) for u in facts["units"])
    factorized = {layer["module"] for layer in stage(manifest, "factorize")["facts"]["layers_factorized"]}
    assert not any(name.startswith(("pixels", "lookup")) for name in factorized)
    capsys.readouterr()
    args = ["build", "--model", "user_models.gated:build", "--data", str(workspace / "data"), "--target", str(workspace / "jetson.toml"),
            "--epochs", "2", "--out", str(tmp_path / "bad")]
    assert main([*args, "--keep", "pixels,nowhere"]) == 2
    err = capsys.readouterr().err
    assert "compression.keep names 'nowhere'" in err and "Traceback" not in err
    assert main([*args, "--keep", "pixels,"]) == 2
    assert "--keep 'pixels,': an empty module name" in capsys.readouterr().err


def test_taylor_importance_on_a_users_model_takes_its_gradient_on_the_calib_samples_it_has(workspace, tmp_path):
    # the shipped targets rank a user's model by magnitude; a user who asks for Taylor gets it, on at most importance_samples
    target = write_target(tmp_path / "taylor.toml", compression={**SHORT_RECOVERY, "importance_samples": 1000,
                                                                 "user_budget": {"importance": "taylor"}}, gates=GATES)
    out = tmp_path / "out"
    assert main(["build", "--model", "user_models.residual:build", "--data", str(workspace / "data"), "--target", str(target),
                 "--epochs", "2", "--out", str(out)]) == 0
    manifest = json.loads((out / "manifest.json").read_text())
    compressed_within_budget(manifest)
    settings = stage(manifest, "prune")["facts"]["settings"]
    calib = sum(json.loads(line)["split"] == "calib" for line in (workspace / "data" / "samples.jsonl").read_text().splitlines())
    assert settings["importance"] == "taylor" and settings["importance_samples"] == calib < 1000
