"""Feature distillation: the hidden-state term by hand, which points are matched, and that it pulls a student's states in."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from pipeline.compression.prune import prune
from pipeline.data.encode import Encoded
from pipeline.export import example_inputs
from pipeline.feature_distillation import TeacherStates, recording, stream_points
from pipeline.models import build_model, default_config
from pipeline.targets import Compression
from pipeline.training import TrainSettings, _Features, _TeacherAnswers, distill


def tiny():
    config = default_config("fused-tiny", 9, "concat")
    torch.manual_seed(0)
    return config, build_model(config, pretrained=False).eval()


def samples(spec, n: int, seed: int = 0) -> Encoded:
    rng = np.random.default_rng(seed)
    mask = np.ones((n, spec.max_tokens), np.int64)
    mask[:, spec.max_tokens // 2:] = rng.integers(0, 2, (n, spec.max_tokens - spec.max_tokens // 2))  # some padding
    return Encoded(ids=tuple(str(i) for i in range(n)), labels=np.arange(n) % 9,
                   inputs={"image": rng.random((n, 3, spec.image_size, spec.image_size), dtype=np.float32),
                           "input_ids": rng.integers(1, 100, (n, spec.max_tokens)), "attention_mask": mask})


def test_the_term_is_each_points_error_over_the_teachers_variance_on_real_tokens_only():
    teacher = torch.tensor([[[1.0, 2.0], [3.0, 4.0], [9.0, 9.0]],
                            [[5.0, 0.0], [7.0, 7.0], [7.0, 7.0]]])  # [samples, tokens, width]
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])  # three real tokens
    image = torch.tensor([[[[1.0]], [[2.0]]], [[[3.0]], [[6.0]]]])  # [samples, channels, 1, 1]
    states = TeacherStates.collect([{"text": teacher, "image": image}], mask)
    # the teacher's variance over the real tokens: values (1, 2), (3, 4), (5, 0), per width around means 3 and 2
    assert states.scale["text"] == pytest.approx(((4 + 0 + 4) + (0 + 4 + 4)) / 6)
    assert states.scale["image"] == pytest.approx(((1 + 1) + (4 + 4)) / 4)  # around the per-position means 2 and 4
    student = teacher.clone()
    student[0, 0] += torch.tensor([1.0, -1.0])  # a real token off by 1 in both widths
    student[0, 2] += 100.0  # padding: whatever the student puts there does not count
    student[1, 1:] -= 50.0
    index = torch.tensor([0, 1])
    text_only = states.loss({"text": student, "image": image}, index, ("text",), mask)
    assert float(text_only) == pytest.approx((2 / 6) / states.scale["text"])
    both = states.loss({"text": student, "image": image + 1.0}, index, ("text", "image"), mask)
    assert float(both) == pytest.approx(((2 / 6) / states.scale["text"] + 1.0 / states.scale["image"]) / 2)
    assert float(states.loss({"text": teacher, "image": image}, index, ("text", "image"), mask)) == 0.0


def test_only_the_points_whose_shape_the_student_kept_are_matched():
    config, teacher = tiny()
    data = samples(config.input_spec(), 6)
    student, _ = prune(teacher, Compression(prune_image=0.5, prune_text=0.5, prune_fusion=0.5), example_inputs(config.input_spec()))
    answers = _TeacherAnswers(teacher, _Features(teacher, data, 3, "t"), 3, record_states=True)
    assert set(answers.states.states) == set(stream_points(teacher))
    features = _Features(student, data, 3, "t")
    with torch.inference_mode(), recording(stream_points(student)) as recorded:
        student.image_encoder.suffix(features.image[:2])
        student.text_encoder.suffix(features.text[:2], features.mask[:2])
    matched = answers.states.matched(recorded)
    # MiniLM-style layers keep their hidden width when heads and FFN widths go; the small CNN's output channels do not
    assert matched and all(name.startswith("text_encoder.") for name in matched)
    assert "image_encoder.features" in answers.states.states and "image_encoder.features" not in matched


def test_the_term_brings_a_students_hidden_states_closer_to_its_teachers_than_logits_alone():
    config, teacher = tiny()
    data = samples(config.input_spec(), 24)
    torch.manual_seed(1)
    perturbed = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in perturbed.text_encoder.parameters():
            p.add_(torch.randn_like(p) * 0.2)
    settings = TrainSettings(epochs=3, batch_size=8, lr=1e-3, encoder_lr=3e-3)
    errors, reports = {}, {}
    for weight in (0.0, 1.0):
        student, reports[weight] = distill(copy.deepcopy(perturbed), teacher, data, data, settings, patience=3, feature_weight=weight)
        answers = _TeacherAnswers(teacher, _Features(teacher, data, 8, "t"), 8, record_states=True)
        features = _Features(student, data, 8, "t")
        index = torch.arange(len(data.labels))
        with torch.inference_mode(), recording(stream_points(student)) as recorded:
            student.text_encoder.suffix(features.text[index], features.mask[index])
        points = tuple(name for name in answers.states.matched(recorded) if name.startswith("text_encoder."))
        errors[weight] = float(answers.states.loss(recorded, index, points, features.mask[index]))
    assert reports[0.0].feature_points == () and reports[1.0].feature_points
    assert errors[1.0] < 0.8 * errors[0.0]


class UserStyle(torch.nn.Module):
    """A model without the built-in prefix/suffix split, as a user writes one (an unused module, a logits layer at the top)."""

    def __init__(self):
        super().__init__()
        self.words = torch.nn.EmbeddingBag(100, 16)
        self.pixels = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, stride=2), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten())
        self.mix = torch.nn.Sequential(torch.nn.Linear(24, 32), torch.nn.ReLU())
        self.classifier = torch.nn.Linear(32, 9)
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, image, input_ids, attention_mask):
        return self.classifier(self.mix(torch.cat([self.words(input_ids), self.pixels(image)], 1)))


def test_a_users_model_is_matched_at_its_own_top_level_modules_and_the_term_pulls_them_in():
    config, _ = tiny()
    data = samples(config.input_spec(), 24)
    torch.manual_seed(0)
    teacher = UserStyle().eval()
    torch.manual_seed(1)
    perturbed = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in perturbed.parameters():
            p.add_(torch.randn_like(p) * 0.3)
    settings = TrainSettings(epochs=3, batch_size=8, lr=3e-3)
    errors, reports = {}, {}
    for weight in (0.0, 1.0):
        student, reports[weight] = distill(copy.deepcopy(perturbed), teacher, data, data, settings, patience=3, feature_weight=weight)
        answers = _TeacherAnswers(teacher, _Features(teacher, data, 8, "t"), 8, record_states=True)
        features = _Features(student, data, 8, "t")
        with torch.inference_mode(), recording(stream_points(student)) as recorded:
            features.logits(student, torch.arange(len(data.labels)))
        errors[weight] = float(answers.states.loss(recorded, torch.arange(len(data.labels)), ("words", "pixels", "mix"), None))
    # the logits layer has its own term and the unused module never runs: neither is a point
    assert reports[0.0].feature_points == () and set(reports[1.0].feature_points) == {"words", "pixels", "mix"}
    assert errors[1.0] < 0.8 * errors[0.0]
