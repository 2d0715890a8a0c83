"""Generic structural pruning (issue 14, items 1-3): the units of models the pipeline did not write.

Each model here is small and built for one behaviour: a recurrent layer's
hidden size pruned with its gates in step, PyTorch's own attention losing whole
heads, a classifier that is never pruned, a pinned module, a group that
couples the two branches left whole with its reason, and a pruned model that
rebuilds from its recorded structure and exports.
"""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import torch
from torch import nn

from pipeline.compression.discover import discover_units, input_reach
from pipeline.compression.factorize import factorize
from pipeline.compression.prune import prune
from pipeline.compression.structure import apply_structure, dependency_graph, structure_of
from pipeline.errors import InputError
from pipeline.targets import Compression

HALF = Compression(prune_image=0.5, prune_text=0.5, prune_fusion=0.5)


def example(batch: int = 2, vocab: int = 200):
    generator = torch.Generator().manual_seed(0)
    mask = torch.ones(batch, 16, dtype=torch.long)
    mask[:, 10:] = 0
    return torch.randn(batch, 3, 32, 32, generator=generator), torch.randint(1, vocab, (batch, 16), generator=generator), mask


def masked_mean(tokens: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    weights = mask.unsqueeze(-1).to(tokens.dtype)
    return (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)


class Recurrent(nn.Module):
    def __init__(self, cell: type = nn.GRU, layers: int = 1, bidirectional: bool = False):
        super().__init__()
        self.embed = nn.Embedding(200, 32)
        self.rnn = cell(32, 48, num_layers=layers, batch_first=True, bidirectional=bidirectional)
        self.cnn = nn.Sequential(nn.Conv2d(3, 16, 3, 2, 1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, 2, 1), nn.BatchNorm2d(32), nn.ReLU())
        width = 48 * (2 if bidirectional else 1)
        self.mix = nn.Sequential(nn.Linear(32 + width, 64), nn.ReLU())
        self.out = nn.Linear(64, 2)

    def forward(self, image, input_ids, attention_mask):
        states, _ = self.rnn(self.embed(input_ids))
        return self.out(self.mix(torch.cat([self.cnn(image).mean((2, 3)), masked_mean(states, attention_mask)], 1)))


class Attention(nn.Module):
    """torch's own TransformerEncoder over the text, pooled, concatenated with a patch embedding."""

    def __init__(self, cross: bool = False):
        super().__init__()
        self.cross = cross
        self.embed = nn.Embedding(200, 64)
        self.position = nn.Parameter(torch.randn(1, 16, 64) * 0.02)
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(64, 4, 128, batch_first=True), 2, enable_nested_tensor=False)
        self.patches = nn.Conv2d(3, 64, 8, 8)
        self.attend = nn.MultiheadAttention(64, 4, batch_first=True)
        self.classify = nn.Sequential(nn.Linear(128 if not cross else 64, 32), nn.ReLU(), nn.Linear(32, 2))

    def forward(self, image, input_ids, attention_mask):
        text = self.encoder(self.embed(input_ids) + self.position, src_key_padding_mask=attention_mask == 0)
        patches = self.patches(image).flatten(2).transpose(1, 2)
        if self.cross:  # the pooled text asks the image patches: q from text, k/v from the image
            attended, _ = self.attend(masked_mean(text, attention_mask).unsqueeze(1), patches, patches)
            return self.classify(attended[:, 0])
        return self.classify(torch.cat([masked_mean(text, attention_mask), patches.mean(1)], 1))


def quiet(function, *args, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return function(*args, **kwargs)


# ---------------------------------------------------------------- recurrent layers


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM, nn.RNN])
def test_a_dead_hidden_unit_is_removed_from_every_gate_and_layer_without_changing_the_output(cell):
    """Hidden unit 5 reads nothing and is read by nobody: removing it must leave every other unit exactly as it was."""
    torch.manual_seed(0)
    rnn = cell(8, 12, num_layers=2, batch_first=True)
    gates = {nn.GRU: 3, nn.LSTM: 4, nn.RNN: 1}[cell]
    with torch.no_grad():
        for k in range(2):
            for name in (f"weight_ih_l{k}", f"weight_hh_l{k}", f"bias_ih_l{k}", f"bias_hh_l{k}"):
                getattr(rnn, name).view(gates, 12, -1)[:, 5] = 0  # unit 5's rows in every gate
            getattr(rnn, f"weight_hh_l{k}")[:, 5] = 0  # nobody reads unit 5's state
        rnn.weight_ih_l1[:, 5] = 0  # nor does the next layer
    inputs = torch.randn(2, 7, 8)
    before, _ = rnn(inputs)
    graph = quiet(dependency_graph, _Head(rnn), (inputs,))
    group = graph.get_pruning_group(rnn, graph.get_pruner_of_module(rnn).prune_out_channels, [5])
    group.prune()
    after, _ = rnn(inputs)
    assert rnn.hidden_size == 11 and rnn.weight_hh_l1.shape == (gates * 11, 11) and rnn.weight_ih_l1.shape == (gates * 11, 11)
    keep = [i for i in range(12) if i != 5]
    assert torch.allclose(after, before[..., keep], atol=1e-6)


class _Head(nn.Module):
    def __init__(self, rnn):
        super().__init__()
        self.rnn, self.read = rnn, nn.Linear(rnn.hidden_size, 3)

    def forward(self, x):
        return self.read(self.rnn(x)[0][:, -1])


@pytest.mark.parametrize("cell", [nn.GRU, nn.LSTM])
def test_a_recurrent_text_encoder_prunes_its_embedding_width_and_hidden_size(cell):
    model = Recurrent(cell).eval()
    pruned, facts = quiet(prune, model, HALF, example())
    names = {u["unit"] for u in facts["units"]}
    assert {"text.rnn", "text.embed", "image.cnn.0", "image.cnn.3", "fusion.mix.0"} <= names
    assert pruned.rnn.hidden_size == 24 and pruned.embed.embedding_dim == 16 and pruned.rnn.input_size == 16
    assert pruned.out.out_features == 2  # the classifier's outputs are the classes
    assert facts["params_after"]["total"] < 0.6 * facts["params_before"]["total"]
    assert pruned(*example()).shape == (2, 2)


def test_a_bidirectional_layer_keeps_its_hidden_size_and_says_why():
    model = Recurrent(nn.GRU, bidirectional=True).eval()
    discovery = quiet(discover_units, model, example())
    whole = {w.module: w.reason for w in discovery.left_whole}
    assert "bidirectional" in whole["rnn"]
    assert "text.embed" in {u.name for u in discovery.units}  # its input width still prunes
    pruned, _ = quiet(prune, model, HALF, example())
    assert pruned.rnn.hidden_size == 48 and pruned.rnn.input_size == 16


# ---------------------------------------------------------------- attention


def test_torch_transformer_layers_lose_whole_heads_and_still_run_and_export(tmp_path):
    import onnxruntime as ort

    model = Attention().eval()
    pruned, facts = quiet(prune, model, HALF, example())
    heads = [u for u in facts["units"] if u["unit"] == "text.encoder.layers.1.linear2"]
    assert heads and heads[0]["channels_after"] == 32  # the residual width: 4 heads of 16 -> 2 heads of 16
    for layer in pruned.encoder.layers:
        attention = layer.self_attn
        assert (attention.num_heads, attention.head_dim, attention.embed_dim) == (2, 16, 32)
        assert layer.linear1.out_features == 64  # FFN width 128 -> 64
    inputs = example()
    with torch.no_grad():
        expected = pruned(*inputs).numpy()
    path = tmp_path / "pruned.onnx"
    batch = torch.export.Dim("batch")
    quiet(torch.onnx.export, pruned, inputs, path, dynamo=True, dynamic_shapes=({0: batch}, {0: batch}, {0: batch}))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    got = session.run(None, {i.name: t.numpy() for i, t in zip(session.get_inputs(), inputs)})[0]
    assert np.abs(got - expected).max() < 1e-4


def test_a_width_both_branches_share_is_a_fusion_unit_pruned_in_whole_heads():
    """Cross-attention with one embed_dim: the text queries and the image keys share a width, which shrinks as one (fusion)."""
    model = Attention(cross=True).eval()
    discovery = quiet(discover_units, model, example())
    shared = [u for u in discovery.units if u.branch == "fusion" and u.kind == "heads"]
    assert len(shared) == 1 and shared[0].step == 16 and shared[0].channels == 64
    assert any(u.name.startswith("text.encoder.layers.") and u.kind == "channels" for u in discovery.units)  # the FFNs, text alone
    pruned, _ = quiet(prune, model, Compression(prune_fusion=0.5), example())
    assert (pruned.attend.embed_dim, pruned.attend.num_heads) == (32, 2) and pruned.patches.out_channels == 32
    assert pruned.encoder.layers[0].self_attn.num_heads == 2 and pruned(*example()).shape == (2, 2)


def test_a_group_whose_pruned_copy_fails_to_run_is_left_whole_with_the_error():
    class Stacked(Attention):  # a 3-D concat along the last axis: Torch-Pruning 1.6 does not map it
        def __init__(self):
            super().__init__(cross=True)
            self.norm = nn.LayerNorm(128)

        def forward(self, image, input_ids, attention_mask):
            text = self.encoder(self.embed(input_ids) + self.position, src_key_padding_mask=attention_mask == 0)
            query = masked_mean(text, attention_mask).unsqueeze(1)
            patches = self.patches(image).flatten(2).transpose(1, 2)
            attended, _ = self.attend(query, patches, patches)
            return self.classify[2](torch.relu(self.classify[0](self.norm(torch.cat([query, attended], dim=2)).squeeze(1)[:, :64])))

    discovery = quiet(discover_units, Stacked().eval(), example())
    assert any("no longer runs" in w.reason for w in discovery.left_whole)
    assert discovery.units  # the rest still prunes


# ---------------------------------------------------------------- the classifier, pins, reach


def test_the_logits_layer_is_found_and_pinned_modules_stay_whole():
    model = Recurrent().eval()
    discovery = quiet(discover_units, model, example(), keep=("cnn",))
    assert discovery.output_layer == "out"
    assert not any(u.root.startswith("cnn") for u in discovery.units)
    assert all(u.root != "out" for u in discovery.units)
    compression = Compression(prune_image=0.5, prune_text=0.5, prune_fusion=0.5, keep=("cnn",))
    pruned, facts = quiet(prune, model, compression, example())
    assert pruned.cnn[0].out_channels == 16 and pruned.cnn[3].out_channels == 32
    assert facts["settings"]["keep"] == ["cnn"]
    with pytest.raises(InputError, match="compression.keep names 'nowhere'"):
        quiet(discover_units, model, example(), keep=("nowhere",))


def test_branches_are_assigned_by_which_inputs_reach_a_layer():
    reach = input_reach(Attention().eval(), example())
    assert reach["patches"] == {"image"} and reach["embed"] == {"text"} and reach["encoder.layers.0.linear1"] == {"text"}
    assert reach["classify.0"] == {"image", "text"}


def test_an_image_only_model_prunes_its_image_branch_and_ignores_the_other_ratios():
    model = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
                          nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 4)).eval()
    pruned, facts = quiet(prune, model, HALF, example()[:1])
    assert facts["discovered"]["branches_without_units"] == ["fusion", "text"]
    assert pruned[0].out_channels == 8 and pruned[7].out_features == 4


# ---------------------------------------------------------------- rebuild and factorize


def test_a_pruned_user_model_rebuilds_from_its_recorded_structure():
    model = Attention().eval()
    pruned, _ = quiet(prune, model, HALF, example())
    rebuilt = quiet(apply_structure, Attention().eval(), structure_of(pruned), example())
    rebuilt.load_state_dict(pruned.state_dict())
    with torch.no_grad():
        assert torch.equal(rebuilt.eval()(*example()), pruned.eval()(*example()))


def test_factorize_takes_any_linear_and_embedding_but_not_the_layers_torch_attention_reads_by_weight():
    model = Attention().eval()
    called = {"embed", "patches", "classify.0", "classify.2"}
    factorized, facts = factorize(model, 0.5, min_saving=0.0, example_inputs=example(), embeddings=True, called=called)
    done = {layer["module"] for layer in facts["layers_factorized"]}
    skipped = {s["module"]: s["reason"] for s in facts["skipped"]}
    assert "embed" in done and "classify.0" in done
    assert "reads its out_proj.weight directly" in skipped["attend.out_proj"]
    assert "reads its linear1.weight directly" in skipped["encoder.layers.0.linear1"]
    assert factorized(*example()).shape == (2, 2)


# ---------------------------------------------------------------- a user's budget


def test_a_user_budget_prunes_no_further_than_it_needs_and_says_when_the_ratios_cannot_reach_it():
    from pipeline.compression.measure import count_macs
    from pipeline.compression.prune import fit_user_budget, model_units, scaled
    from pipeline.targets import Budget

    model = Recurrent().eval()
    found = quiet(model_units, model, example())
    source_params, macs = sum(p.numel() for p in model.parameters()), count_macs(model, example())
    at = lambda compression, ratios=None: count_macs(quiet(prune, model, compression, example(), unit_ratios=ratios, found=found)[0], example()) / macs
    fitted, ratios, facts = quiet(fit_user_budget, model, HALF, example(), Budget(macs=0.8), source_params, lambda c: None, found)
    assert 0 < facts["factor"] < 1 and fitted.prune_text == pytest.approx(HALF.prune_text * facts["factor"], abs=1e-4)
    assert at(fitted, ratios) <= 0.8 < at(scaled(HALF, facts["factor"] / 2))  # fits, and half as much pruning would not
    assert at(HALF) < at(fitted, ratios)  # the target's ratios would have pruned more than the budget asks
    fitted, ratios, facts = quiet(fit_user_budget, model, HALF, example(), Budget(macs=0.01), source_params, lambda c: None, found)
    assert fitted == HALF and facts["factor"] == 1.0 and "pruned at those ratios" in facts["out_of_reach"]


def test_under_a_user_budget_a_sensitive_unit_the_budget_does_not_need_pruned_stays_whole():
    from pipeline.compression.measure import count_macs
    from pipeline.compression.prune import fit_user_budget, model_units
    from pipeline.targets import Budget

    model = Recurrent().eval()
    found = quiet(model_units, model, example())
    names = [u.name for u in found[0]]
    embedding = next(n for n in names if n.endswith("embed"))  # lookups are no MACs: a MACs budget never needs its width
    source_params, macs = sum(p.numel() for p in model.parameters()), count_macs(model, example())
    fitted, ratios, facts = quiet(fit_user_budget, model, HALF, example(), Budget(macs=0.9), source_params, lambda c: None, found,
                                  [embedding, *[n for n in names if n != embedding]])
    assert embedding in facts["spared"] and ratios[embedding] == 0.0
    pruned, prune_facts = quiet(prune, model, fitted, example(), unit_ratios=ratios, found=found)
    assert pruned.embed.embedding_dim == 32 and count_macs(pruned, example()) <= 0.9 * macs
    assert prune_facts["groups_pruned"] >= 1
