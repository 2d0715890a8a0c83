"""Target profiles: every shipped file loads, and bad files fail naming the file and the key."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from pipeline.errors import InputError
from pipeline.trt.engine import LocalTensorRT, target_mismatches, uses_weak_typing, version_matches
from pipeline.targets import TARGETS_DIR, available_targets, load_target_file, resolve_target, with_overrides

SHIPPED = {
    "cpu", "jetson-orin-nano", "jetson-orin-nx", "jetson-agx-orin", "jetson-xavier-nx", "jetson-thor",
    "gpu-ampere", "gpu-ada", "gpu-hopper",
}

VALID = """
name = "{name}"
description = "a test target"
precision = "int8"

[device]
name = "Test GPU"
kind = "jetson"
compute_capability = "8.7"
dla_cores = {dla_cores}

[software]
runtime = "tensorrt"
tensorrt = "10.3"

[builder]
use_dla = {use_dla}
batch = {{ min = 4, opt = 4, max = 4 }}
{extra}
"""


def write_target(tmp_path: Path, name: str = "t", dla_cores: int = 0, use_dla: str = "false", extra: str = "") -> Path:
    path = tmp_path / f"{name}.toml"
    path.write_text(VALID.format(name=name, dla_cores=dla_cores, use_dla=use_dla, extra=extra))
    return path


def test_every_shipped_target_loads():
    targets = available_targets()
    assert SHIPPED <= set(targets)
    for name, target in targets.items():
        assert target.source.endswith(f"{name}.toml")
        if target.software.runtime == "tensorrt":
            assert target.software.tensorrt and target.device.compute_capability, name


def test_jetson_alias_is_the_orin_nano():
    assert resolve_target("jetson").name == "jetson-orin-nano"


@pytest.mark.parametrize("name, capability, tensorrt, dla_cores", [
    ("jetson-orin-nano", "8.7", "10.3", 0),
    ("jetson-agx-orin", "8.7", "10.3", 2),
    ("jetson-xavier-nx", "7.2", "8.5", 2),
    ("jetson-thor", "11.0", "10.13", 0),
    ("gpu-ampere", "8.6", "10.13", 0),
    ("gpu-ada", "8.9", "10.13", 0),
    ("gpu-hopper", "9.0", "10.13", 0),
])
def test_target_facts(name, capability, tensorrt, dla_cores):
    target = resolve_target(name)
    assert (target.device.compute_capability, target.software.tensorrt, target.device.dla_cores) == (capability, tensorrt, dla_cores)


def test_agx_orin_uses_dla_with_static_batch():
    target = resolve_target("jetson-agx-orin")
    batch = target.builder.batch
    assert target.builder.use_dla and target.builder.gpu_fallback
    assert batch.min == batch.opt == batch.max


def test_a_valid_file_loads(tmp_path):
    target = load_target_file(write_target(tmp_path))
    assert target.builder.batch.opt == 4 and target.builder.network_typing == "auto"


def test_unknown_key_names_file_and_key(tmp_path):
    path = write_target(tmp_path, extra="workspace_gb = 2")
    with pytest.raises(InputError, match=r"t\.toml.*builder.*unknown key 'workspace_gb'"):
        load_target_file(path)


def test_wrong_type_names_file_and_key(tmp_path):
    write_target(tmp_path, extra='workspace_mb = "lots"')
    with pytest.raises(InputError, match=r"t\.toml.*builder\.workspace_mb: expected an integer"):
        available_targets(tmp_path)


def test_dla_on_a_device_without_dla_names_file_and_key(tmp_path):
    path = write_target(tmp_path, dla_cores=0, use_dla="true")
    with pytest.raises(InputError, match=r"t\.toml.*builder\.use_dla.*device\.dla_cores = 0"):
        load_target_file(path)


def test_dla_core_beyond_the_device(tmp_path):
    path = write_target(tmp_path, dla_cores=1, use_dla="true", extra="dla_core = 1")
    with pytest.raises(InputError, match=r"builder\.dla_core = 1"):
        load_target_file(path)


def test_dla_needs_static_shapes(tmp_path):
    path = tmp_path / "t.toml"
    path.write_text(VALID.format(name="t", dla_cores=2, use_dla="true", extra="").replace(
        "{ min = 4, opt = 4, max = 4 }", "{ min = 1, opt = 4, max = 8 }"))
    with pytest.raises(InputError, match="static shapes"):
        load_target_file(path)


def test_weak_typing_on_tensorrt_11_is_rejected(tmp_path):
    path = write_target(tmp_path, extra='network_typing = "weak"')
    path.write_text(path.read_text().replace('tensorrt = "10.3"', 'tensorrt = "11.0"'))
    with pytest.raises(InputError, match="removed weak typing"):
        load_target_file(path)


def test_dla_on_tensorrt_11_before_11_4_1_is_rejected(tmp_path):
    path = write_target(tmp_path, dla_cores=2, use_dla="true")
    path.write_text(path.read_text().replace('tensorrt = "10.3"', 'tensorrt = "11.2"'))
    with pytest.raises(InputError, match="no DLA support"):
        load_target_file(path)


def test_malformed_compute_capability(tmp_path):
    path = write_target(tmp_path)
    path.write_text(path.read_text().replace('"8.7"', '"sm_87"'))
    with pytest.raises(InputError, match="compute_capability"):
        load_target_file(path)


def test_file_name_must_match_target_name(tmp_path):
    write_target(tmp_path, name="t")
    (tmp_path / "t.toml").rename(tmp_path / "other.toml")
    with pytest.raises(InputError, match="other.toml.*must match"):
        available_targets(tmp_path)


@pytest.mark.parametrize("setting, message", [
    ("prune_text = 1.0", r"compression\.prune_text = 1\.0 must be in \[0, 1\)"),
    ("embedding_energy = 0.0", r"compression\.embedding_energy = 0\.0 must be in \(0, 1\]"),
    ("image_blocks = 0", r"compression\.image_blocks = 0 must be >= 1"),
    ("text_depth = 0", r"compression\.text_depth = 0 must be >= 1"),
    ("recovery_lr = 0.0", r"compression\.recovery_lr = 0\.0 must be > 0"),
    ('importance = "random"', r"compression\.importance"),
    ("importance_samples = 0", r"compression\.importance_samples = 0 must be >= 1"),
    ("recovery_features = -1.0", r"compression\.recovery_features = -1\.0 must be in \[0, 100\]"),
    ("user_budget = { params = 0.5, prune_fusion = 1.0 }", r"compression\.user_budget\.prune_fusion = 1\.0 must be in \[0, 1\)"),
    ('user_budget = { params = 0.5, importance = "random" }', r"compression\.user_budget\.importance"),
])
def test_bad_compression_settings_name_file_and_key(tmp_path, setting, message):
    path = write_target(tmp_path, extra=f"[compression]\n{setting}")
    with pytest.raises(InputError, match=r"t\.toml.*" + message):
        load_target_file(path)


def test_the_jetson_budget_prunes_and_factorizes_and_the_cli_can_turn_it_off():
    compression = resolve_target("jetson").compression
    assert compression.prunes() and compression.factorizes()
    assert not with_overrides(resolve_target("jetson"), **{"compression.prune_text": 0.0, "compression.prune_image": 0.0,
                                                          "compression.prune_fusion": 0.0}).compression.prunes()
    with pytest.raises(InputError, match="prune_image"):
        with_overrides(resolve_target("jetson"), **{"compression.prune_image": 1.5})


def test_a_users_model_is_pruned_under_the_user_budgets_caps_and_a_flag_sets_both(tmp_path):
    from pipeline.cli import _build_config, _build_parser
    from pipeline.compression.prune import user_caps

    compression = resolve_target("jetson").compression
    mine = user_caps(compression)  # the built-in model's choices (fusion whole, allocation) are not a user's model's
    assert (compression.prune_fusion, compression.allocate, compression.importance, compression.importance_samples) == (0.0, True, "taylor", 256)
    assert (mine.prune_image, mine.prune_text, mine.prune_fusion, mine.allocate, mine.importance) == (0.6, 0.75, 0.5, False, "magnitude")
    assert mine.recovery_epochs == compression.recovery_epochs and mine.user_budget == compression.user_budget
    args = _build_parser().parse_args(["build", "--target", "jetson", "--prune-fusion", "0.25"])
    flagged = _build_config(args, resolve_target("jetson"), tmp_path / "out", None).target.compression
    assert flagged.prune_fusion == 0.25 and user_caps(flagged).prune_fusion == 0.25


def test_overrides_are_validated_too():
    with pytest.raises(InputError, match="use_dla"):
        with_overrides(resolve_target("jetson"), **{"builder.use_dla": True})


# ------------------------------------------------- local machine vs target


def test_version_matching_is_by_prefix():
    assert version_matches("10.3.0.30", "10.3")
    assert not version_matches("10.13.0.35", "10.3")
    assert not version_matches("8.5.2", "10.3")


def test_mismatch_messages_name_both_sides():
    target = resolve_target("jetson")
    local = LocalTensorRT(tensorrt_version="10.13.0.35", device_name="NVIDIA H100", compute_capability="9.0")
    problems = target_mismatches(target, local)
    assert len(problems) == 2
    assert "10.13.0.35" in problems[0] and "expects 10.3" in problems[0] and "JetPack 6.2" in problems[0]
    assert "NVIDIA H100" in problems[1] and "9.0" in problems[1] and "8.7" in problems[1]


def test_matching_machine_has_no_mismatch():
    local = LocalTensorRT(tensorrt_version="10.3.0.30", device_name="Orin", compute_capability="8.7")
    assert target_mismatches(resolve_target("jetson"), local) == []


def test_typing_by_major_version():
    target = resolve_target("jetson")
    assert uses_weak_typing(target, 8) and uses_weak_typing(target, 10)
    assert not uses_weak_typing(target, 11)
    strong = dataclasses.replace(target, builder=dataclasses.replace(target.builder, network_typing="strong"))
    assert not uses_weak_typing(strong, 10)


def test_shipped_targets_are_in_the_package_directory():
    assert TARGETS_DIR.is_dir() and (TARGETS_DIR / "jetson-orin-nano.toml").is_file()


def test_summary_rows_for_the_targets_listing():
    from pipeline.targets import target_summary

    rows = {row["name"]: row for row in map(target_summary, available_targets().values())}
    assert rows["jetson-agx-orin"]["dla_cores"] == 2 and rows["jetson-agx-orin"]["uses_dla"] is True
    assert rows["jetson-orin-nano"]["aliases"] == "jetson" and rows["jetson-orin-nano"]["tensorrt"] == "10.3"
    assert rows["cpu"]["tensorrt"] == "-" and rows["cpu"]["compute_capability"] == "-"


def target_with_passes(tmp_path: Path, passes: str) -> Path:
    path = write_target(tmp_path)
    path.write_text(f"passes = {passes}\n" + path.read_text())
    return path


def test_a_target_lists_the_passes_it_runs(tmp_path):
    assert load_target_file(write_target(tmp_path)).passes == ("source", "prune", "factorize", "export", "quantize")
    assert load_target_file(target_with_passes(tmp_path, '["source", "export", "quantize"]')).passes == ("source", "export", "quantize")


@pytest.mark.parametrize("passes, message", [
    ('["source", "distill", "export", "quantize"]', "unknown pass 'distill'"),
    ('["source", "export", "prune", "quantize"]', "in the order source, prune"),
    ('["source", "prune", "quantize"]', "with source, export, quantize among them"),
    ('["source", "export", "export", "quantize"]', "list each pass once"),
])
def test_a_bad_pass_list_names_the_file_and_what_is_wrong(tmp_path, passes, message):
    with pytest.raises(InputError, match=rf"t\.toml.*passes.*{message}"):
        load_target_file(target_with_passes(tmp_path, passes))
