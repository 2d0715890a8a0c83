"""A user's FP32 ONNX file as the source model (`build --onnx FILE`): its inputs read from the graph, its outputs checked.

The graph says what the model takes, so nothing else has to:
- the image: the one 4-D float input, [N, 3, S, S] with S static (the image size the samples are resized to);
- the text: the 2-D int64 inputs [N, T], at most two. Named input_ids / attention_mask they are those; else the
  one whose name contains "mask" is the mask; else the first in graph order is the ids. T, when static, is the
  token length (else the default spec's); the tokenizer is --tokenizer DIR, else all-MiniLM-L6-v2's;
- normalization: the default spec's (mean = std = 0.5 per channel): the graph cannot say what it was trained with;
- the batch axis (the first of every input and of the output): dynamic, or static 1 (then every run is batch 1 and
  TensorRT's profile is min = opt = max = 1; see STATIC_BATCH_NOTE). A static batch above 1 is refused: the pipeline
  runs the calib and eval splits in batches of other sizes (a split's last batch is partial).
- the output: one, float, [N, classes] for the data set's classes (checked on a few calib samples in the source pass).

Everything refused is an InputError naming the flag and the file, raised before any stage made its artifact.
"""

from __future__ import annotations

import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Sequence

import numpy as np
import onnx

from pipeline.artifacts import Artifact
from pipeline.data.encode import TEXT_ROLES, Encoded, InputSpec, check_tokenizer
from pipeline.errors import InputError
from pipeline.export import SIMPLIFIERS, onnx_facts
from pipeline.onnx_compat import Lowering, lower
from pipeline.onnx_io import GraphIO, TensorSpec, graph_io
from pipeline.runners import OrtRunner, run_batches
from pipeline.store import sha256_file

SOURCE_FILE = "model.onnx"  # the user's file as the source stage's entry keeps it
EXPORT_FILE = "model.fp32.onnx"  # the simplified graph, named as the torch path's export is
CHECK_SAMPLES = 8  # calib samples the source pass runs the graph on before it accepts it
STATIC_BATCH_NOTE = "static batch 1: TensorRT profiles min=opt=max=1; the target's batch profile cannot apply"
INT_TYPES = frozenset({onnx.TensorProto.INT64, onnx.TensorProto.INT32})  # INT32 is read, to be refused by name


@dataclass(frozen=True)
class OnnxSource:
    """What the graph of an --onnx file says the model takes and gives."""

    path: Path
    spec: InputSpec
    batch: int | None  # the static batch (1), or None for a dynamic batch axis
    inputs: tuple[tuple[str, TensorSpec], ...]  # (role, the graph's input) in graph order
    output: TensorSpec

    @property
    def note(self) -> str | None:
        return STATIC_BATCH_NOTE if self.batch is not None else None

    def describe(self) -> list[str]:
        """The console's account of how the graph was read: each input's role, and the batch axis."""
        roles = ", ".join(f"{role} = {tensor.name} {tensor.type_name} {shape_text(tensor.dims)}" for role, tensor in self.inputs)
        lines = [f"[onnx] {self.path}: inputs {roles}; output {self.output.name} {shape_text(self.output.dims)}"]
        lines.append(f"[onnx] note: {self.note}" if self.note else "[onnx] dynamic batch axis: the target's batch profile applies")
        return lines


def batch_json(batch: int | None) -> str | int:
    return "dynamic" if batch is None else batch


def batch_facts(batch: int | None) -> dict[str, Any]:
    """The artifact meta that says how the graph's batch axis is: the quantize pass reads static_batch."""
    return {"batch": batch_json(batch)} if batch is None else {"batch": batch, "static_batch": batch, "note": STATIC_BATCH_NOTE}


def shape_text(dims: Sequence[int]) -> str:
    return "[" + ", ".join("?" if d < 0 else str(d) for d in dims) + "]"


def first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


# ------------------------------------------------------------------ reading the graph


def load_graph(path: Path) -> onnx.ModelProto:
    """The --onnx file parsed and checked, or an InputError saying what it is not."""
    path = Path(path)
    if not path.is_file():
        raise InputError(f"--onnx {path}: not a file (give an FP32 ONNX model, e.g. as torch.onnx.export writes it)")
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as error:  # noqa: BLE001 - protobuf's DecodeError and its kin: bytes that are not a model
        raise InputError(f"--onnx {path}: not an ONNX model ({first_line(error)})") from None
    if any(t.data_location == onnx.TensorProto.EXTERNAL for t in model.graph.initializer):
        raise InputError(f"--onnx {path}: its weights lie in external data files; save it as one file "
                         "(onnx.save(model, path, save_as_external_data=False), for models under 2 GB)")
    try:
        onnx.checker.check_model(model)  # garbage bytes can parse as an empty model: the checker refuses those
    except Exception as error:  # noqa: BLE001 - ValidationError, or the checker's own parse errors
        raise InputError(f"--onnx {path}: not a valid ONNX model ({first_line(error)})") from None
    quantized = sum(node.op_type in ("QuantizeLinear", "DequantizeLinear", "QLinearConv", "QLinearMatMul") for node in model.graph.node)
    if quantized:
        raise InputError(f"--onnx {path}: already quantized ({quantized} Q/DQ or QLinear nodes); give the FP32 model: "
                         "the pipeline quantizes it and gates the INT8 model against it")
    return model


def static_batch(path: Path) -> int | None:
    """The graph's static batch (1), or None when its batch axis is dynamic; InputError for a file that is not such a model."""
    load_graph(path)
    return _batch_of(Path(path), _graph_io(Path(path)))


def read_onnx_source(path: Path, classes: Sequence[str], tokenizer: str | Path | None = None) -> OnnxSource:
    """The model's inputs, spec, batch axis and output as the graph declares them (see the module's docstring)."""
    path = Path(path)
    load_graph(path)
    io = _graph_io(path)
    roles = _roles(path, io.inputs)
    output = _output(path, io, len(classes))
    spec = _spec(path, roles, tokenizer)
    check_tokenizer(spec)
    return OnnxSource(path, spec, _batch_of(path, io), tuple((role, roles[role]) for role in spec.roles), output)


def _graph_io(path: Path) -> GraphIO:
    try:
        return graph_io(path)
    except InputError as error:
        raise InputError(f"--onnx {error}") from None


def _described(tensors: Sequence[TensorSpec]) -> str:
    return ", ".join(f"{t.name} ({t.type_name} {shape_text(t.dims)})" for t in tensors)


def _roles(path: Path, inputs: Sequence[TensorSpec]) -> dict[str, TensorSpec]:
    """role -> the graph's input, in graph order: the image is the 4-D float input, the text the 2-D int ones."""
    images = [t for t in inputs if len(t.dims) == 4 and t.elem_type == onnx.TensorProto.FLOAT]
    texts = [t for t in inputs if len(t.dims) == 2 and t.elem_type in INT_TYPES]
    others = [t for t in inputs if t not in images and t not in texts]
    wanted = "an image [N, 3, S, S] FLOAT and token ids and mask [N, T] INT64"
    if others:
        raise InputError(f"--onnx {path}: input {_described(others)} is neither; the pipeline feeds {wanted}")
    if len(images) > 1 or len(texts) > 2:
        raise InputError(f"--onnx {path}: inputs {_described(inputs)}; the pipeline feeds one image and at most two text inputs ({wanted})")
    narrow = [t for t in texts if t.elem_type != onnx.TensorProto.INT64]
    if narrow:
        raise InputError(f"--onnx {path}: input {_described(narrow)}: the pipeline feeds token ids and masks as INT64 "
                         "(as torch exports them); export the model with int64 text inputs")
    found = {"image": images[0]} if images else {}
    found.update(_text_roles(texts))
    order = {t.name: i for i, t in enumerate(inputs)}
    return dict(sorted(found.items(), key=lambda item: order[item[1].name]))


def _text_roles(texts: Sequence[TensorSpec]) -> dict[str, TensorSpec]:
    """input_ids and attention_mask among the 2-D int inputs: by their standard names, else a name with "mask", else graph order."""
    if len(texts) < 2:
        return {"input_ids": texts[0]} if texts else {}
    by_name = {t.name: t for t in texts}
    if set(by_name) == set(TEXT_ROLES):
        return {role: by_name[role] for role in TEXT_ROLES}
    masks = [t for t in texts if "mask" in t.name.lower()]
    mask = masks[0] if len(masks) == 1 else texts[1]
    return {"input_ids": next(t for t in texts if t is not mask), "attention_mask": mask}


def _spec(path: Path, roles: dict[str, TensorSpec], tokenizer: str | Path | None) -> InputSpec:
    defaults = InputSpec()
    fields: dict[str, Any] = {"inputs": tuple(roles), "names": {role: t.name for role, t in roles.items()}}
    if "image" in roles:
        fields["image_size"] = _image_size(path, roles["image"])
    lengths = {t.dims[1] for role, t in roles.items() if role != "image" and t.dims[1] > 0}
    if len(lengths) > 1:
        raise InputError(f"--onnx {path}: the text inputs have different lengths ({_described([roles[r] for r in roles if r != 'image'])})")
    fields["max_tokens"] = lengths.pop() if lengths else defaults.max_tokens
    if tokenizer is not None:
        fields["tokenizer"] = str(tokenizer)
    try:
        return InputSpec(**fields)
    except InputError as error:  # e.g. an input named like a golden file's key
        raise InputError(f"--onnx {path}: {error}") from None


def _image_size(path: Path, image: TensorSpec) -> int:
    _, channels, height, width = image.dims
    if channels != 3 or height < 1 or height != width:
        raise InputError(f"--onnx {path}: image input {_described([image])}; the pipeline feeds RGB images [N, 3, S, S] "
                         "of one static size S: export the model with a fixed square image size")
    return height


def _batch_of(path: Path, io: GraphIO) -> int | None:
    """None for a dynamic batch axis (the first of every input, and of the output), 1 for a static batch 1; else refused."""
    batches = {t.dims[0] for t in io.inputs}
    if batches == {-1}:
        if any(t.dims[0] != -1 for t in io.outputs):
            raise InputError(f"--onnx {path}: its inputs have a dynamic batch axis but its output does not "
                             f"({_described(io.outputs)}): export the output with the same dynamic batch axis")
        return None
    if batches == {1}:
        return 1
    if len(batches) == 1:
        raise InputError(f"--onnx {path}: static batch {io.inputs[0].dims[0]} ({_described(io.inputs)}): the pipeline runs the calib "
                         "and eval splits in batches of other sizes (a split's last batch is partial); export with a dynamic "
                         "batch axis (torch.onnx.export(..., dynamic_shapes=...)), or with batch 1")
    raise InputError(f"--onnx {path}: the first axes of its inputs are not one batch axis ({_described(io.inputs)}): "
                     "make it dynamic on every input, or 1 on all")


def _output(path: Path, io: GraphIO, classes: int) -> TensorSpec:
    if len(io.outputs) != 1:
        raise InputError(f"--onnx {path}: {len(io.outputs)} outputs ({_described(io.outputs)}); the pipeline gates one, "
                         f"the logits [N, {classes}]: export the model with its logits alone")
    (output,) = io.outputs
    if output.elem_type != onnx.TensorProto.FLOAT or len(output.dims) != 2 or output.dims[1] not in (-1, classes):
        raise InputError(f"--onnx {path}: output {_described([output])}; expected FLOAT [N, {classes}]: one logit per class "
                         "of the data set")
    return output


# ------------------------------------------------------------------ the source pass: run it, keep it


def take_onnx_source(source: OnnxSource, check: Encoded, classes: Sequence[str], workdir: Path) -> Artifact:
    """The user's file, checked on a few calib samples and copied into the stage's entry: the reference of every stage."""
    check_onnx_outputs(source, check, classes)
    path = workdir / SOURCE_FILE
    shutil.copyfile(source.path, path)
    meta = {"onnx_source": str(source.path), "input_spec": source.spec.to_json(), **batch_facts(source.batch), **onnx_facts(path)}
    return Artifact("onnx", path, sha256_file(path), meta)


def check_onnx_outputs(source: OnnxSource, data: Encoded, classes: Sequence[str]) -> None:
    """InputError unless the graph runs on the first calib samples and gives finite logits [n, classes].

    A dynamic batch axis is run at two sizes (1 and the rest), so a graph that only claims one is caught here.
    """
    part = data.subset(range(min(CHECK_SAMPLES, len(data))))
    try:
        logits = run_batches(OrtRunner(source.path), _check_batches(part, source.batch))
    except Exception as error:  # noqa: BLE001 - whatever ONNX Runtime says of this graph and these inputs
        hint = ("; if the model has its own vocabulary, give its tokenizer with --tokenizer DIR"
                if source.spec.takes_text and source.spec.tokenizer is None else "")
        raise InputError(f"--onnx {source.path}: fails with ONNX Runtime on the calib split's inputs ({', '.join(part.inputs)}): "
                         f"{first_line(error)}{hint}") from None
    expected = (len(part), len(classes))
    if logits.shape != expected:
        raise InputError(f"--onnx {source.path}: gives logits of shape {tuple(logits.shape)} for {len(part)} calib samples; expected "
                         f"{expected}: one logit per class of the data set ({', '.join(classes[:6])}{', ...' if len(classes) > 6 else ''})")
    finite = np.isfinite(logits).all(axis=1)
    if not finite.all():
        raise InputError(f"--onnx {source.path}: gives NaN or infinite logits on {int((~finite).sum())} of {len(part)} calib samples "
                         f"(first: sample '{part.ids[int(np.argmin(finite))]}')")


def _check_batches(data: Encoded, batch: int | None) -> Iterator[dict[str, np.ndarray]]:
    """Batches of the static size; for a dynamic batch axis, two of other sizes (the first sample, then the rest)."""
    if batch is not None:
        yield from data.batches(batch)
        return
    for part in (slice(0, 1), slice(1, len(data))):
        if part.stop > part.start:
            yield {name: array[part] for name, array in data.inputs.items()}


# ------------------------------------------------------------------ the export pass: simplify, keep the batch axis


def simplify_onnx_source(source: Artifact, workdir: Path, simplifier: str, lowering: Lowering | None = None,
                         target: str = "") -> Artifact:
    """The source graph simplified as the torch path's export is (and lowered where target's parser needs it).

    The batch axis must come out as it went in: a simplifier that fixed it would hand TensorRT another model.
    """
    batch, given = source.meta.get("static_batch"), source.meta.get("onnx_source", source.path)
    simplify: Callable[[onnx.ModelProto], onnx.ModelProto] = SIMPLIFIERS[simplifier]
    try:
        graph = simplify(onnx.load(str(source.path)))
    except Exception as error:  # noqa: BLE001 - the simplifier's own failure on a graph it was not written for
        raise InputError(f"--onnx {given}: {simplifier} cannot simplify it ({first_line(error)}); rerun with --simplifier none") from None
    if lowering is not None:
        try:
            graph = lower(graph, lowering)
        except InputError as error:  # an op the target's parser lacks: name the target that refuses it
            raise InputError(f"--onnx {given}: target '{target}' cannot take this model: {error}") from None
    onnx.checker.check_model(graph)
    path = workdir / EXPORT_FILE
    onnx.save(graph, str(path))
    after = _batch_of(path, graph_io(path))
    if after != batch:
        raise InputError(f"--onnx {given}: {simplifier} turned the batch axis from {batch_json(batch)} into {batch_json(after)}; "
                         "rerun with --simplifier none")
    meta = {"from": "the --onnx file, simplified (not exported from torch)", **batch_facts(batch), **onnx_facts(path)}
    return Artifact("onnx", path, sha256_file(path), meta)


# ------------------------------------------------------------------ a static batch: every run one batch of that size


@dataclass(frozen=True)
class FixedBatches(Encoded):
    """Encoded samples that run in batches of one size whatever size a caller asks for: a static-batch graph takes no other."""

    batch: int = 1

    def batches(self, size: int) -> Iterator[dict[str, np.ndarray]]:
        del size
        return super().batches(self.batch)

    def subset(self, indices: Sequence[int]) -> "FixedBatches":
        part = super().subset(indices)
        return FixedBatches(part.ids, part.inputs, part.labels, self.batch)


def in_batches_of(data: Encoded, batch: int | None) -> Encoded:
    """data as it is for a dynamic batch axis; else run in batches of the graph's static batch."""
    return data if batch is None else FixedBatches(data.ids, data.inputs, data.labels, batch)


def onnx_config_json(path: Path) -> dict[str, Any]:
    """The manifest's config entry of --onnx: the file, its sha256, and its batch axis (with what it means for TensorRT)."""
    path = Path(path)
    entry: dict[str, Any] = {"path": str(path), "sha256": sha256_file(path) if path.is_file() else None}
    try:
        entry.update(batch_facts(static_batch(path)))
    except InputError as error:  # the file changed or went away since the build read it: say so, do not fail the manifest
        entry["batch"] = None
        entry["unreadable"] = str(error)
    entry.pop("static_batch", None)
    return entry
