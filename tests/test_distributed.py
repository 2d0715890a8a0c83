"""Data-parallel training under torchrun: the process group's world, 2 gloo ranks training and distilling in step, one process unchanged.

The two-rank checks run this file as torchrun's script (see _worker at the bottom): one launch trains and
distills fused-tiny on a learnable toy task and each rank writes what it saw; the tests compare the ranks.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import socket
import subprocess
import sys
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data.encode import Encoded
from pipeline.settings import TrainSettings

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT", "GROUP_RANK")
SETTINGS = TrainSettings(epochs=4, batch_size=8, lr=3e-3, seed=0)
TRAIN_SAMPLES = 45  # odd: the sampler pads one rank's shard, one process has a short last batch
CLASSES = 5


def toy_data(spec, n: int, seed: int) -> Encoded:
    """Random images, and random tokens from the label's own 8 words: a task the tiny model learns in a few epochs."""
    rng = np.random.default_rng(seed)
    labels = np.arange(n) % CLASSES
    ids = 10 + 8 * labels[:, None] + rng.integers(0, 8, (n, spec.max_tokens))
    return Encoded(ids=tuple(map(str, range(n))), labels=labels,
                   inputs={"image": rng.random((n, 3, spec.image_size, spec.image_size), dtype=np.float32),
                           "input_ids": ids, "attention_mask": np.ones((n, spec.max_tokens), np.int64)})


def tiny_model_and_data():
    from pipeline.models import build_model, default_config

    config = default_config("fused-tiny", CLASSES)  # its small CNN's BatchNorms train in train mode
    torch.manual_seed(0)
    model = build_model(config, pretrained=False)
    return model, toy_data(config.input_spec(), TRAIN_SAMPLES, 0), toy_data(config.input_spec(), 20, 1)


END_TO_END = TrainSettings(epochs=2, batch_size=8, lr=1e-2)


class EndToEnd(torch.nn.Module):
    """A user's model without prefix/suffix: trained whole, with a parameter its loss never reaches; no dropout, no BatchNorm."""

    def __init__(self):
        super().__init__()
        self.words = torch.nn.EmbeddingBag(64, 16)
        self.conv = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, stride=2), torch.nn.ReLU())
        self.classifier = torch.nn.Linear(20, CLASSES)
        self.unused = torch.nn.Linear(4, 4)

    def forward(self, image, input_ids, attention_mask):
        return self.classifier(torch.cat([self.words(input_ids), self.conv(image).mean((2, 3))], 1))


def parameters_digest(model: torch.nn.Module) -> str:
    digest = hashlib.sha256()
    for name, p in model.named_parameters():
        digest.update(name.encode())
        digest.update(p.detach().contiguous().numpy().tobytes())
    return digest.hexdigest()


def rng_digest() -> str:
    return hashlib.sha256(torch.random.get_rng_state().numpy().tobytes()).hexdigest()


@pytest.fixture
def one_process(monkeypatch):
    for name in LAUNCH_VARIABLES:
        monkeypatch.delenv(name, raising=False)


# ---------------------------------------------------------------- one process: no group, no DDP, the old code path


def test_without_torchrun_the_world_is_one_process_and_nothing_is_joined(one_process):
    from pipeline import distributed

    assert distributed.world() == distributed.World(rank=0, size=1, local_rank=0, backend=None)
    assert distributed.world().is_writer and not distributed.world().active
    assert distributed.init_from_env() == distributed.World()
    distributed.barrier()
    token = object()
    assert distributed.broadcast_object(token) is token
    distributed.shutdown()
    assert not torch.distributed.is_initialized()


def test_the_world_reads_torchruns_environment_before_joining(monkeypatch):
    from pipeline import distributed

    for name, value in {"RANK": "1", "WORLD_SIZE": "2", "LOCAL_RANK": "1"}.items():
        monkeypatch.setenv(name, value)
    assert distributed.world() == distributed.World(rank=1, size=2, local_rank=1, backend=None)
    assert distributed.world().active and not distributed.world().is_writer
    assert distributed.backend_for("cpu") == "gloo" and distributed.backend_for("cuda:1") == "nccl"


def test_the_module_imports_without_torch():
    code = "import sys, pipeline.distributed as d; assert d.world().size == 1; assert 'torch' not in sys.modules"
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=60)


def test_one_process_trains_without_ddp_or_sampler_and_is_deterministic(one_process, monkeypatch):
    import pipeline.training as training

    def refuse(*args, **kwargs):
        raise AssertionError("one process must train without DDP or a DistributedSampler")

    monkeypatch.setattr(training, "DistributedDataParallel", refuse)
    monkeypatch.setattr(training, "DistributedSampler", refuse)
    runs = []
    for _ in range(2):
        model, train_data, val_data = tiny_model_and_data()
        model, report = training.train(model, train_data, val_data, TrainSettings(epochs=2, batch_size=8, lr=3e-3), desc="t")
        runs.append((training._state_digest(model), report, rng_digest()))
    assert runs[0] == runs[1]


def test_each_rank_takes_its_share_of_every_global_batch():
    from pipeline.distributed import World
    from pipeline.training import _DataParallel

    plans = [_DataParallel(World(rank=r, size=2), TRAIN_SAMPLES, SETTINGS) for r in range(2)]
    assert plans[0].batch_size == plans[1].batch_size == SETTINGS.batch_size // 2
    assert plans[0].steps_per_epoch == plans[1].steps_per_epoch == 6  # ceil(23 / 4): both ranks take as many steps
    epochs = []
    for epoch in (1, 2):
        local = [list(plan.batches(epoch, "t")) for plan in plans]
        assert len(local[0]) == len(local[1]) == 6
        order = torch.cat([torch.stack([a, b], 1).flatten() for a, b in zip(*local)])  # rank r holds every 2nd index
        assert sorted(set(order.tolist())) == list(range(TRAIN_SAMPLES)) and len(order) == TRAIN_SAMPLES + 1  # one padded
        epochs.append(order)
    assert not torch.equal(epochs[0], epochs[1])  # set_epoch reshuffles
    with pytest.raises(ValueError, match="smaller than"):
        _DataParallel(World(rank=0, size=16), TRAIN_SAMPLES, SETTINGS)


# ---------------------------------------------------------------- two gloo ranks under torchrun


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> list[dict]:
    """What each of 2 torchrun ranks reported after training and distilling (see _worker)."""
    out = tmp_path_factory.mktemp("ranks")
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARIABLES} | {"OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
               "--master-port", str(_free_port()), __file__, str(out)]
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=180)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-6000:]
    return [json.loads((out / f"rank{rank}.json").read_text()) | {"out": out} for rank in range(2)]


def test_ranks_join_one_gloo_group_and_rank_zero_is_the_writer(two_ranks):
    assert [r["world"] for r in two_ranks] == [{"rank": r, "size": 2, "local_rank": r, "backend": "gloo"} for r in range(2)]
    assert [r["broadcast"] for r in two_ranks] == [{"from": 0}, {"from": 0}]


def test_two_ranks_hold_the_same_weights_after_every_step_and_at_the_end(two_ranks):
    zero, one = two_ranks
    for stage in ("train", "distill", "end_to_end"):
        assert len(zero[stage]["steps"]) == {"train": SETTINGS.epochs, "distill": 2, "end_to_end": 2}[stage] * 6
        assert zero[stage]["steps"] == one[stage]["steps"] and len(set(zero[stage]["steps"])) > 1
        assert zero[stage]["state"] == one[stage]["state"]  # buffers too: BatchNorm running statistics averaged
        assert zero[stage]["report"] == one[stage]["report"]  # same measures, same checkpoint, same stop
    assert zero["rng"] == one["rng"]  # dropout drew per rank, the global RNG is the same again after


def test_two_ranks_learn_the_toy_task(two_ranks):
    report = two_ranks[0]["train"]["report"]
    assert report["best_val_accuracy"] >= report["initial_val_accuracy"] + 0.3
    losses = [loss for loss, _ in report["history"]]
    assert losses[-1] < losses[0]


def test_two_ranks_train_a_model_end_to_end_and_leave_its_unused_parameter_alone(two_ranks):
    report = two_ranks[0]["end_to_end"]["report"]
    assert report["best_val_accuracy"] > report["initial_val_accuracy"]
    assert all(r["end_to_end"]["unused_kept"] for r in two_ranks)  # grad None, as alone: no weight decay on it either


def test_two_ranks_are_one_process_on_the_same_global_batches_up_to_float_order(two_ranks, one_process, monkeypatch):
    """Without dropout or BatchNorm, only the batch order differs from one process: fed the sampler's batches, it agrees."""
    import pipeline.training as training
    from pipeline.distributed import World

    def sampler_batches(self, epoch, desc):
        local = [list(training._DataParallel(World(rank=r, size=2), self.samples, END_TO_END).batches(epoch, desc)) for r in range(2)]
        return [torch.cat(step) for step in zip(*local)]

    monkeypatch.setattr(training._OneProcess, "batches", sampler_batches)
    _, train_data, val_data = tiny_model_and_data()
    torch.manual_seed(0)
    alone, report = training.train(EndToEnd(), train_data, val_data, END_TO_END, desc="alone")
    ranks = torch.load(two_ranks[0]["out"] / "rank0_end_to_end.pt")
    for name, tensor in alone.state_dict().items():
        torch.testing.assert_close(tensor, ranks[name], rtol=0, atol=1e-5)
    assert [round(a, 6) for _, a in report.history] == [round(a, 6) for _, a in two_ranks[0]["end_to_end"]["report"]["history"]]


def test_two_ranks_distill_towards_the_teacher(two_ranks):
    report = two_ranks[0]["distill"]["report"]
    assert report["epochs_run"] == 2 and report["best"]["kl"] < report["initial"]["kl"]


def _worker(out: Path) -> None:
    """One torchrun rank: train, then distill a perturbed copy back towards the trained model; write what it saw."""
    import pipeline.training as training
    from pipeline import distributed

    world = distributed.init_from_env()
    steps: list[str] = []
    trained: list[torch.nn.Module] = []
    real_loss = training._loss

    def loss(*args, **kwargs):  # called once per optimizer step, before it: the weights the previous step left
        steps.append(parameters_digest(trained[-1]))
        return real_loss(*args, **kwargs)

    training._loss = loss
    model, train_data, val_data = tiny_model_and_data()
    trained.append(model)
    model, report = training.train(model, train_data, val_data, SETTINGS, desc="train")
    result = {"world": asdict(world), "broadcast": distributed.broadcast_object({"from": world.rank}),
              "train": {"steps": list(steps), "state": training._state_digest(model), "report": asdict(report)}}

    steps.clear()
    student = copy.deepcopy(model)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # the same draws on both ranks: the global RNG is in step
    trained.append(student)
    student, distilled = training.distill(student, model, train_data, val_data, TrainSettings(epochs=2, batch_size=8, lr=1e-3),
                                          patience=2, mixed_share=0.5, desc="distill")
    result["distill"] = {"steps": list(steps), "state": training._state_digest(student), "report": asdict(distilled)}

    steps.clear()
    torch.manual_seed(0)
    own = EndToEnd()
    unused_before = parameters_digest(own.unused)
    trained.append(own)
    own, own_report = training.train(own, train_data, val_data, END_TO_END, desc="own")
    torch.save(own.state_dict(), out / f"rank{world.rank}_end_to_end.pt")
    result["end_to_end"] = {"steps": list(steps), "state": training._state_digest(own), "report": asdict(own_report),
                            "unused_kept": parameters_digest(own.unused) == unused_before}
    result["rng"] = rng_digest()
    distributed.barrier()
    distributed.shutdown()
    (out / f"rank{world.rank}.json").write_text(json.dumps(result))


if __name__ == "__main__":
    _worker(Path(sys.argv[1]))
