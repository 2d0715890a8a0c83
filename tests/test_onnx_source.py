"""Start from the user's ONNX (issue 14, item 5): `build --onnx model.onnx --data DIR`, through the real CLI.

The test exports a small fused model to FP32 ONNX itself (pipeline.export's exporter, dynamic batch axis,
no simplification: the build's export stage does that), then builds from the file alone: the source is the
file, measured with ONNX Runtime and the reference of every stage; prune and factorize are skipped with the
reason; the bundle verifies. A static batch 1 is taken and said; bad files and flags exit 2 naming them.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import jsonschema
import numpy as np
import onnx
import pytest
import torch
from torch import nn

from helpers import write_emoji_folder, write_target
from pipeline.cli import main
from pipeline.data import load_dataset
from pipeline.data.encode import Encoded, InputSpec
from pipeline.errors import InputError
from pipeline.export import export_onnx
from pipeline.models.onnx_source import STATIC_BATCH_NOTE, FixedBatches, in_batches_of, read_onnx_source
from pipeline.runners import OrtRunner
from pipeline.stages.recovery import ONNX_SOURCE

LENIENT = {"quantize": {"max_drop_pts": 100.0, "min_agreement": 0.0}, "prune": {"max_drop_pts": 100.0},
           "factorize": {"max_drop_pts": 100.0}}
IMAGE_SIZE, TOKENS = 24, 12
SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "manifest.schema.json").read_text())


class Fused(nn.Module):
    """A small fused model: a conv over the image, a pooled embedding over MiniLM's ids, a linear head."""

    def __init__(self, num_classes: int):
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, stride=2, padding=1)
        self.embed = nn.Embedding(30522, 8)
        self.head = nn.Linear(16, num_classes)

    def fuse(self, image, ids, mask):
        picture = torch.relu(self.conv(image)).mean(dim=(2, 3))
        weights = mask.to(picture.dtype).unsqueeze(-1)
        text = (self.embed(ids) * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(torch.cat([picture, text], dim=1))

    def forward(self, image, input_ids, attention_mask):
        return self.fuse(image, input_ids, attention_mask)


class Renamed(Fused):
    """The same model with its own input names, and the mask before the ids."""

    def forward(self, pixels, tok_mask, tokens):
        return self.fuse(pixels, tokens, tok_mask)


def export(model: nn.Module, spec: InputSpec, directory: Path) -> Path:
    torch.manual_seed(0)
    directory.mkdir(parents=True, exist_ok=True)
    return export_onnx(model.eval(), spec, directory, simplifier="none").path


def with_static_batch(path: Path, batch: int, out: Path) -> Path:
    """A copy of an ONNX file whose inputs' and output's batch axis is fixed at batch."""
    model = onnx.load(str(path))
    for value in (*model.graph.input, *model.graph.output):
        value.type.tensor_type.shape.dim[0].dim_value = batch
    onnx.save(model, str(out))
    return out


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    work = tmp_path_factory.mktemp("onnx-source")
    data = write_emoji_folder(work / "data", per_class=4)
    write_target(work / "lenient.toml", gates=LENIENT)
    classes = len(load_dataset(str(data)).classes)
    torch.manual_seed(0)
    spec = InputSpec(image_size=IMAGE_SIZE, max_tokens=TOKENS)
    export(Fused(classes), spec, work / "fused")
    export(Fused(classes + 1), spec, work / "wide")
    renamed = InputSpec(image_size=IMAGE_SIZE, max_tokens=TOKENS, inputs=("image", "attention_mask", "input_ids"),
                        names={"image": "pixels", "attention_mask": "tok_mask", "input_ids": "tokens"})
    export(Renamed(classes), renamed, work / "renamed")
    return work


def build_args(workspace: Path, onnx_file: Path, out: Path, *extra: str) -> list[str]:
    return ["build", "--onnx", str(onnx_file), "--data", str(workspace / "data"), "--target", str(workspace / "lenient.toml"),
            "--out", str(out), *extra]


def manifest_of(out: Path) -> dict:
    return json.loads((out / "manifest.json").read_text())


def stage(manifest: dict, name: str) -> dict:
    return next(s for s in manifest["stages"] if s["name"] == name)


@pytest.fixture(scope="module")
def built(workspace) -> Path:
    out = workspace / "out"
    code = main(build_args(workspace, workspace / "fused" / "model.fp32.onnx", out))
    manifest = manifest_of(out)
    assert code == 0, manifest.get("error") or manifest.get("failure")
    return out


def test_the_onnx_file_is_the_source_and_the_torch_stages_are_skipped(workspace, built):
    given = workspace / "fused" / "model.fp32.onnx"
    manifest = manifest_of(built)
    assert manifest["status"] == "ok"
    assert [s["name"] for s in manifest["stages"]] == ["source", "export", "quantize"]
    assert manifest["skipped"] == {"prune": ONNX_SOURCE, "factorize": ONNX_SOURCE}
    assert manifest["compression"]["skipped"] == ONNX_SOURCE  # the jetson target asks for both
    assert manifest["config"]["onnx"] == {"path": str(given), "sha256": sha256(given), "batch": "dynamic"}
    source = stage(manifest, "source")
    assert source["artifact"]["kind"] == "onnx" and source["artifact"]["sha256"] == sha256(given)  # the file, as given
    assert source["settings"]["mode"] == "onnx" and source["settings"]["batch"] == "dynamic"
    assert source["facts"]["input_spec"] == {"image_size": IMAGE_SIZE, "mean": [0.5] * 3, "std": [0.5] * 3, "max_tokens": TOKENS}
    export_stage = stage(manifest, "export")
    assert export_stage["artifact"]["kind"] == "onnx" and export_stage["settings"]["source"] == "onnx"
    assert export_stage["facts"]["inputs"]["image"][0] == "batch"  # the dynamic batch axis, kept by the simplifier
    assert export_stage["parity"]["vs_reference"]["agreement"] == 1.0 and export_stage["gate"] is not None
    quantize = stage(manifest, "quantize")
    assert quantize["gate"] is not None and quantize["parity"]["vs_reference"] is not None  # gated against the given ONNX, and held
    assert manifest["engine"]["status"] == "deferred" and (built / "bundle" / "SHA256SUMS").is_file()
    jsonschema.validate(manifest, SCHEMA)  # MACs not counted (no torch model to trace): the schema allows that
    params = stage(manifest, "source")["footprint"]["params"]["total"]  # the file's float initializers
    assert params > 1000 and stage(manifest, "quantize")["footprint"]["params"]["total"] == params
    assert stage(manifest, "source")["footprint"]["macs"] == {}


def test_the_reference_is_the_given_onnx_run_by_onnx_runtime(workspace, built):
    with np.load(built / "bundle" / "golden.npz") as golden:
        inputs = {name: golden[name] for name in ("image", "input_ids", "attention_mask")}
        reference = golden["reference_logits"]
    ours = OrtRunner(workspace / "fused" / "model.fp32.onnx").predict(inputs)
    np.testing.assert_allclose(reference, ours, rtol=1e-5, atol=1e-5)


def test_the_bundle_verifies_with_onnx_runtime(built):
    assert main(["verify", "--bundle", str(built / "bundle"), "--runtime", "ort"]) == 0


def test_a_second_build_is_served_from_the_cache(workspace, built):
    assert main(build_args(workspace, workspace / "fused" / "model.fp32.onnx", built)) == 0
    assert all(s["cached"] for s in manifest_of(built)["stages"])


def test_a_static_batch_1_is_taken_and_said(workspace, tmp_path, capsys):
    static = with_static_batch(workspace / "fused" / "model.fp32.onnx", 1, tmp_path / "static.onnx")
    code = main(build_args(workspace, static, tmp_path / "out"))
    manifest = manifest_of(tmp_path / "out")
    assert code == 0, manifest.get("error") or manifest.get("failure")
    assert STATIC_BATCH_NOTE in capsys.readouterr().out
    assert manifest["config"]["onnx"]["batch"] == 1 and manifest["config"]["onnx"]["note"] == STATIC_BATCH_NOTE
    assert manifest["config"]["eval_batch"] == 1 and manifest["target"]["builder"]["batch"] == {"min": 1, "opt": 1, "max": 1}
    assert stage(manifest, "export")["facts"]["inputs"]["image"] == [1, 3, IMAGE_SIZE, IMAGE_SIZE]
    assert stage(manifest, "quantize")["parity"] is not None
    jsonschema.validate(manifest, SCHEMA)
    assert main(["verify", "--bundle", str(tmp_path / "out" / "bundle"), "--runtime", "ort"]) == 0  # golden batches of the graph's 1


def test_inputs_are_read_from_the_graph_by_type_shape_and_name(workspace):
    classes = load_dataset(str(workspace / "data")).classes
    source = read_onnx_source(workspace / "renamed" / "model.fp32.onnx", classes)
    spec = source.spec
    # the 4-D float input is the image; of the 2-D int ones, the one named like a mask is the mask, whatever the order
    assert spec.roles == ("image", "attention_mask", "input_ids")
    assert dict(spec.names) == {"image": "pixels", "attention_mask": "tok_mask", "input_ids": "tokens"}
    assert (spec.image_size, spec.max_tokens, spec.tokenizer, source.batch) == (IMAGE_SIZE, TOKENS, None, None)
    assert "image = pixels" in source.describe()[0] and "dynamic batch axis" in source.describe()[1]


def test_a_static_batch_runs_in_batches_of_that_size():
    data = Encoded(ids=tuple("abcde"), inputs={"x": np.arange(5)}, labels=np.zeros(5, dtype=np.int64))
    fixed = in_batches_of(data, 1)
    assert [len(b["x"]) for b in fixed.batches(16)] == [1] * 5
    assert isinstance(fixed.subset([0, 2]), FixedBatches) and isinstance(fixed.select_ids(["b"]), FixedBatches)
    assert in_batches_of(data, None) is data


def garbage(tmp_path: Path, workspace: Path) -> Path:
    path = tmp_path / "garbage.onnx"
    path.write_bytes(b"\x00\x01 this is not a model \xff\xfe" * 10)
    return path


def static_two(tmp_path: Path, workspace: Path) -> Path:
    return with_static_batch(workspace / "fused" / "model.fp32.onnx", 2, tmp_path / "static2.onnx")


@pytest.mark.parametrize("make, extra, says", [
    (lambda tmp, work: tmp / "missing.onnx", (), "not a file"),
    (lambda tmp, work: tmp, (), "not a file"),
    (garbage, (), "ONNX model"),
    (lambda tmp, work: work / "wide" / "model.fp32.onnx", (), "one logit per class"),
    (static_two, (), "static batch 2"),
    (lambda tmp, work: work / "fused" / "model.fp32.onnx", ("--model", "fused-tiny"), "with --model"),
    (lambda tmp, work: work / "fused" / "model.fp32.onnx", ("--weights", "{weights}"), "with --weights"),
])
def test_a_bad_onnx_source_is_refused_before_anything_is_written(workspace, tmp_path, capsys, make, extra, says):
    onnx_file = make(tmp_path, workspace)
    weights = tmp_path / "w.pt"
    weights.write_bytes(b"")
    out = tmp_path / "out"
    code = main(build_args(workspace, onnx_file, out, *(e.format(weights=weights) for e in extra)))
    err = capsys.readouterr().err
    assert code == 2, err
    message = err.strip().splitlines()[-1]
    assert message.startswith("error: --onnx ") and str(onnx_file) in message and says in message, message
    assert "Traceback" not in err and not (out / "manifest.json").exists()


def test_a_wrong_output_width_is_named_before_any_stage(workspace):
    classes = load_dataset(str(workspace / "data")).classes
    with pytest.raises(InputError, match=rf"expected FLOAT \[N, {len(classes)}\]"):
        read_onnx_source(workspace / "wide" / "model.fp32.onnx", classes)


def test_a_pipeline_export_of_a_built_in_model_builds_and_verifies(workspace, tmp_path):
    """The issue's case: an FP32 export this pipeline wrote (fused-tiny: attention, LayerNorm, GELU) as the --onnx source."""
    torch_build = tmp_path / "torch"
    assert main(["build", "--model", "fused-tiny", "--epochs", "1", "--no-compression", "--data", str(workspace / "data"),
                 "--target", str(workspace / "lenient.toml"), "--out", str(torch_build), "--quiet"]) == 0
    exported = torch_build / stage(manifest_of(torch_build), "export")["artifact"]["path"]
    out = tmp_path / "onnx"
    assert main(build_args(workspace, exported, out, "--quiet")) == 0
    manifest = manifest_of(out)
    assert manifest["status"] == "ok" and [s["name"] for s in manifest["stages"]] == ["source", "export", "quantize"]
    assert stage(manifest, "source")["artifact"]["sha256"] == sha256(exported)
    assert stage(manifest, "source")["facts"]["input_spec"] == stage(manifest_of(torch_build), "source")["facts"]["input_spec"]
    assert main(["verify", "--bundle", str(out / "bundle"), "--runtime", "ort"]) == 0
