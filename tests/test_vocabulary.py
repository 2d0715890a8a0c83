"""Vocabulary trimming (pipeline.compression.vocabulary): a from-scratch token table keeps the rows its train split reads.

The models are small and from scratch: a GRU over a 500-id table and a
learned position table. What is checked: which tables "auto" trims and which
it leaves whole with the reason, that kept ids answer exactly as before and
every other id reads one shared row, and that a trimmed model still prunes,
factorizes, rebuilds from its recorded structure and exports to ONNX Runtime
with the same outputs.
"""

from __future__ import annotations

import warnings

import numpy as np
import torch
from torch import nn

from pipeline.compression.factorize import factorize
from pipeline.compression.prune import prune
from pipeline.compression.structure import apply_structure, structure_of
from pipeline.compression.trimmed import TrimmedEmbedding
from pipeline.compression.vocabulary import trim_vocabulary
from pipeline.data.encode import Encoded
from pipeline.targets import Compression

VOCAB, TOKENS, WIDTH = 500, 8, 32
TRAIN_IDS = list(range(1, 40))  # what the train split reads (0 is padding, never in the data here)


class Words(nn.Module):
    def __init__(self, pretrained_positions: bool = False):
        super().__init__()
        self.words = nn.Embedding(VOCAB, WIDTH)
        self.positions = nn.Embedding(64, WIDTH)  # only the first TOKENS rows are read
        if pretrained_positions:  # as a factory that loads its table would: the same rows under any seed
            with torch.no_grad():
                self.positions.weight.copy_(torch.linspace(-1, 1, 64 * WIDTH).reshape(64, WIDTH))
        self.gru = nn.GRU(WIDTH, 32, batch_first=True)
        self.cnn = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.classifier = nn.Linear(48, 2)

    def forward(self, image, input_ids):
        positions = self.positions(torch.arange(input_ids.shape[1]).expand_as(input_ids))
        states, _ = self.gru(self.words(input_ids) + positions)
        return self.classifier(torch.cat([self.cnn(image), states.mean(1)], dim=1))


def encoded(ids: list[int], samples: int = 24, seed: int = 0) -> Encoded:
    generator = np.random.default_rng(seed)
    tokens = generator.choice(ids, size=(samples, TOKENS)).astype(np.int64)
    images = generator.standard_normal((samples, 3, 16, 16)).astype(np.float32)
    return Encoded(tuple(f"s{i}" for i in range(samples)), {"image": images, "input_ids": tokens}, np.zeros(samples, dtype=np.int64))


def batch(data: Encoded) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(array) for array in data.inputs.values())


def trimmed(mode: str = "auto", trained_here: bool = True, pretrained_positions: bool = False, keep: tuple[str, ...] = ()) -> tuple[nn.Module, nn.Module, dict]:
    torch.manual_seed(0)
    model = Words(pretrained_positions).eval()
    original = Words(pretrained_positions).eval()
    original.load_state_dict(model.state_dict())
    facts = trim_vocabulary(model, mode, trained_here, lambda: Words(pretrained_positions), encoded(TRAIN_IDS), encoded(list(range(1, 80)), seed=1),
                            keep)
    return original, model, facts


def test_a_random_start_table_keeps_the_rows_its_train_split_reads_and_answers_as_before_on_them():
    original, model, facts = trimmed()
    words = model.words
    assert isinstance(words, TrimmedEmbedding) and (words.vocabulary, words.num_embeddings) == (VOCAB, len(TRAIN_IDS) + 1)
    ids = torch.tensor([TRAIN_IDS[:TOKENS]])
    assert torch.equal(words(ids), original.words(ids))
    dropped = [i for i in range(VOCAB) if i not in TRAIN_IDS]
    expected = original.words.weight[dropped].mean(0)
    assert torch.allclose(words(torch.tensor([[0, 45, 499]])), expected.expand(1, 3, WIDTH))
    table = next(t for t in facts["trimmed"] if t["module"] == "words")
    assert table["rows_before"] == VOCAB and table["rows_after"] == len(TRAIN_IDS) + 1
    assert table["params_removed"] == (VOCAB - len(TRAIN_IDS) - 1) * WIDTH
    calib = set(encoded(list(range(1, 80)), seed=1).inputs["input_ids"].reshape(-1).tolist())
    assert (table["calib_ids"], table["calib_ids_with_own_row"]) == (len(calib), len(calib & set(TRAIN_IDS)))
    # the position table: the train split reads 8 of its 64 rows, the same 8 every model input reads
    assert isinstance(model.positions, TrimmedEmbedding) and model.positions.num_embeddings == TOKENS + 1
    data = batch(encoded(TRAIN_IDS, seed=3))
    with torch.no_grad():
        assert torch.allclose(model(*data), original(*data), atol=1e-6)


def test_pretrained_pinned_and_elsewhere_trained_tables_keep_every_row_and_say_why():
    _, model, facts = trimmed(pretrained_positions=True)
    assert isinstance(model.words, TrimmedEmbedding) and type(model.positions) is nn.Embedding
    assert "same rows under two seeds" in facts["whole"]["positions"]
    _, model, facts = trimmed(trained_here=False)
    assert facts["trimmed"] == [] and "--weights" in facts["whole"]["words"]
    assert type(model.words) is nn.Embedding
    _, model, facts = trimmed("train", pretrained_positions=True)  # "train" trims a pretrained table too
    assert {t["module"] for t in facts["trimmed"]} == {"words", "positions"}
    _, model, facts = trimmed(keep=("words",))  # a pinned table keeps every row
    assert [t["module"] for t in facts["trimmed"]] == ["positions"] and facts["whole"]["words"] == "pinned (compression.keep)"
    torch.manual_seed(0)
    built_in = Words().eval()  # as a built-in model's tables: "auto" leaves them whole
    facts = trim_vocabulary(built_in, "auto", True, Words, encoded(TRAIN_IDS), encoded(TRAIN_IDS), built_in=True)
    assert facts["trimmed"] == [] and "a built-in model" in facts["whole"]["words"] and type(built_in.words) is nn.Embedding
    _, model, facts = trimmed("whole")
    assert facts["trimmed"] == [] and not any(isinstance(m, TrimmedEmbedding) for m in model.modules())


def test_trimming_leaves_the_global_random_state_as_it_was():
    torch.manual_seed(0)
    model = Words().eval()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    facts = trim_vocabulary(model, "auto", True, Words, encoded(TRAIN_IDS), encoded(TRAIN_IDS))  # builds Words under seeds 0 and 1
    assert facts["trimmed"] and torch.equal(torch.rand(3), expected)


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


def test_a_trimmed_model_prunes_factorizes_rebuilds_and_exports_with_the_same_outputs(tmp_path):
    import onnxruntime as ort

    _, model, _ = trimmed()
    example = batch(encoded(TRAIN_IDS, samples=2, seed=4))
    pruned, facts = quiet(prune, model, Compression(prune_text=0.5, prune_image=0.5), example,
                          importance_batch=(batch(encoded(TRAIN_IDS, seed=5)), torch.zeros(24, dtype=torch.long)))
    assert pruned.words.embedding_dim == WIDTH // 2 and isinstance(pruned.words, TrimmedEmbedding)
    factorized, facts = factorize(pruned, 0.5, min_saving=0.0, example_inputs=example, embeddings=True,
                                  called={"words", "positions", "classifier"})
    assert "words" in {layer["module"] for layer in facts["layers_factorized"]}
    assert isinstance(factorized.words[0], TrimmedEmbedding) and factorized.words[0].vocabulary == VOCAB

    rebuilt = quiet(apply_structure, Words().eval(), structure_of(factorized), example)
    rebuilt.load_state_dict(factorized.state_dict())
    probe = batch(encoded(list(range(VOCAB)), samples=4, seed=6))  # ids the train split never read among them
    with torch.no_grad():
        expected = factorized.eval()(*probe)
        assert torch.equal(rebuilt.eval()(*probe), expected)
    path = tmp_path / "trimmed.onnx"
    quiet(torch.onnx.export, rebuilt, example, str(path), input_names=["image", "input_ids"],
          dynamic_axes={"image": {0: "batch"}, "input_ids": {0: "batch"}})
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    (logits,) = session.run(None, {"image": probe[0].numpy(), "input_ids": probe[1].numpy()})
    np.testing.assert_allclose(logits, expected.numpy(), atol=1e-4)
