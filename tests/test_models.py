"""Reference models: the MiniLM re-implementation matches transformers, the default model runs, export keeps a dynamic batch."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.data.encode import Encoded, InputSpec, encode_texts
from pipeline.models import build_model, default_config
from pipeline.models.fusion import FUSIONS
from pipeline.models.text import TextConfig, TextEncoder, load_minilm_weights, minilm_dir
from pipeline.runners import OrtRunner, TorchRunner
from pipeline.export import example_inputs, export_onnx
from pipeline.training import PrefixCache, predict_logits


def test_text_encoder_reproduces_minilm_sentence_embeddings():
    from transformers import AutoModel

    reference = AutoModel.from_pretrained(str(minilm_dir()), local_files_only=True).eval()
    encoder = TextEncoder(TextConfig(), trainable_layers=2).eval()
    load_minilm_weights(encoder)
    ids, mask = (torch.from_numpy(a) for a in encode_texts(["grinning face", "flag: japan", "hot beverage"], InputSpec()))
    with torch.no_grad():
        hidden = reference(input_ids=ids, attention_mask=mask).last_hidden_state
        weights = mask.unsqueeze(-1).float()
        expected = (hidden * weights).sum(1) / weights.sum(1)
        assert torch.allclose(encoder(ids, mask), expected, atol=1e-5)


def test_prefix_then_suffix_is_the_whole_encoder():
    encoder = TextEncoder(TextConfig(hidden=32, layers=3, heads=4, intermediate=64, vocab_size=100, max_positions=16), trainable_layers=1).eval()
    ids = torch.randint(0, 100, (2, 8))
    mask = torch.ones(2, 8, dtype=torch.int64)
    assert torch.equal(encoder(ids, mask), encoder.suffix(encoder.prefix(ids, mask), mask))


def test_predict_logits_is_the_forward_and_reuses_cached_prefix_outputs():
    config = default_config("fused-tiny", 5)
    torch.manual_seed(0)
    model = build_model(config, pretrained=False).eval()
    model.text_encoder.split_at = 1  # embeddings and the first layer become a frozen prefix
    inputs = dict(zip(("image", "input_ids", "attention_mask"), example_inputs(config.input_spec(), batch=10)))
    data = Encoded(ids=tuple(map(str, range(10))), inputs={k: v.numpy() for k, v in inputs.items()}, labels=np.zeros(10, dtype=np.int64))
    cache = PrefixCache()
    logits = predict_logits(model, data, batch_size=4, cache=cache)
    with torch.inference_mode():
        expected = model(**inputs).numpy()
    np.testing.assert_allclose(logits, expected, rtol=1e-5, atol=1e-5)
    assert predict_logits(model, data, batch_size=4, cache=cache).tobytes() == logits.tobytes() and cache.hits == 1
    trained = {id(p) for module in model.text_encoder.suffix_modules() for p in module.parameters()}
    frozen = next(p for p in model.text_encoder.parameters() if id(p) not in trained)
    with torch.no_grad():
        frozen.mul_(2.0)  # a changed prefix is recomputed, never served stale
    assert not np.allclose(predict_logits(model, data, batch_size=4, cache=cache), logits) and cache.hits == 1


@pytest.mark.parametrize("fusion", FUSIONS)
def test_every_fusion_runs(fusion):
    config = default_config("fused-tiny", 5, fusion)
    model = build_model(config, pretrained=False).eval()
    image, ids, mask = example_inputs(config.input_spec(), batch=3)
    assert model(image, ids, mask).shape == (3, 5)


def test_default_model_is_pretrained_and_runs():
    config = default_config("fused-effnet-minilm", 9)
    model = build_model(config, pretrained=True).eval()
    image, ids, mask = example_inputs(config.input_spec(), batch=2)
    with torch.no_grad():
        assert model(image, ids, mask).shape == (2, 9)
    assert sum(p.numel() for p in model.parameters()) > 20_000_000


def test_export_keeps_a_dynamic_batch_and_matches_torch(tmp_path):
    config = default_config("fused-tiny", 9)
    torch.manual_seed(0)
    model = build_model(config, pretrained=False).eval()
    artifact = export_onnx(model, config.input_spec(), tmp_path)
    assert artifact.meta["inputs"]["image"][0] == "batch"
    onnx_runner, torch_runner = OrtRunner(artifact.path), TorchRunner(model)
    for batch in (1, 7):
        inputs = dict(zip(("image", "input_ids", "attention_mask"), (t.numpy() for t in example_inputs(config.input_spec(), batch))))
        got = onnx_runner.predict(inputs)
        assert got.shape == (batch, 9)
        np.testing.assert_allclose(got, torch_runner.predict(inputs), atol=1e-4)
