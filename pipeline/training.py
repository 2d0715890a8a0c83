"""Seeded supervised training (and distillation) of a fused model.

Pretrained encoders are frozen up to their split point, so their prefix
outputs are computed once and the epochs only run the trainable suffix: that
is what makes fine-tuning EfficientNet-Lite0 + MiniLM tails fit in a CPU
budget. A model without prefix/suffix (a user's own) is trained end to end.

Launched by torchrun (pipeline/distributed.py's world() has more than one process),
train() and distill() run data-parallel: every rank computes the prefix outputs of
every sample and evaluates the whole validation split itself, and the epochs are
sharded by a DistributedSampler, each optimizer step one DistributedDataParallel step
over the ranks' local batches. In one process none of it runs: no process group, no
sampler, no DDP, the same randperm batches and the same bytes as before.

How a run of N processes relates to a run of one (same seed, same settings):

- Global batch: each rank takes batch_size // N samples a step, so a step sees
  batch_size samples (N x (batch_size // N) when N does not divide it), and
  DDP's all-reduce averages the ranks' gradients: the gradient of the global
  batch's mean loss, up to float summation order. The one-cycle schedule spans
  the steps the ranks actually take.
- Order: the sampler shuffles each epoch with its own generator (seed + epoch)
  where one process draws torch.randperm from the training generator, so the
  batches differ from one process's (the results are not the same bytes, and
  not the same accuracies). Rank r takes every N-th index of the permutation,
  so each step's global batch is a contiguous run of it, as in one process;
  when N does not divide the split, the sampler repeats the permutation's first
  few samples to even the shards (one process has a short last batch instead).
- Per-rank randomness: dropout masks and the distillation's mixed pairs are
  drawn per rank (seeded seed + rank), as one process draws them independently
  for every sample of its batch; a mixed pair joins an image and a text of the
  same rank's local batch (one process pairs within the whole batch). Neither
  changes how many passes a rank runs, so the ranks' collectives stay in step,
  and the global RNG is restored afterwards, the same on every rank.
- BatchNorm: the trained parts of the default model hold none in train mode
  (EfficientNet's are frozen, MiniLM's norms are LayerNorms); fused-tiny's small
  CNN does. Its batch statistics are the local batch's (SyncBatchNorm reduces
  only GPU tensors); its running statistics are averaged over the ranks after
  every epoch, which, the running update being linear, equals averaging them
  after every step: the running mean follows the global batches' means, the
  running variance the mean of the local batches' variances (a little under the
  global batch's, which also counts the spread between the ranks' means).
- Agreement: after each DDP step the ranks hold the same weights; each rank
  measures the whole validation split and takes rank 0's measure, so all of
  them keep the same checkpoint and stop at the same epoch (a rank stopping
  alone would leave the others waiting in an all-reduce). The reported train
  loss is the mean over the ranks.
"""

from __future__ import annotations

import contextlib
import copy
import hashlib
from dataclasses import dataclass
from typing import Any, Callable, ContextManager, Iterable, Iterator, Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data.distributed import DistributedSampler

from pipeline import distributed
from pipeline.distributed import World
from pipeline.progress import ProgressStyle, progress_style, track

from pipeline.data.encode import Encoded
from pipeline.feature_distillation import TeacherStates, recording, stream_points
from pipeline.settings import TrainSettings


@dataclass(frozen=True)
class TrainReport:
    epochs_run: int
    best_epoch: int
    best_val_accuracy: float
    history: tuple[tuple[float, float], ...]  # (train loss, val accuracy) per epoch
    initial_val_accuracy: float = 0.0  # before the first epoch


def _has_split(model: nn.Module) -> bool:
    return all(hasattr(model, name) for name in ("image_encoder", "text_encoder", "head")) and all(
        hasattr(getattr(model, part), attr) for part in ("image_encoder", "text_encoder") for attr in ("prefix", "suffix", "suffix_modules")
    )


def _frozen_prefix_digest(encoder: nn.Module) -> str:
    """sha256 of everything an encoder's prefix() computes with: its state outside the trainable suffix."""
    trained = {id(t) for module in encoder.suffix_modules() for t in module.state_dict(keep_vars=True).values()}
    state = {name: t for name, t in encoder.state_dict(keep_vars=True).items() if id(t) not in trained}
    return _tensors_digest(f"{type(encoder).__name__}|{getattr(encoder, 'split_at', None)}", state)


def _state_digest(model: nn.Module) -> str:
    """sha256 of a model's whole state (names and bytes) and its class."""
    return _tensors_digest(type(model).__name__, model.state_dict())


def _tensors_digest(label: str, tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256(label.encode())
    for name, tensor in tensors.items():
        digest.update(name.encode())
        digest.update(tensor.detach().contiguous().cpu().numpy().tobytes())
    return digest.hexdigest()


class PrefixCache:
    """Frozen-prefix outputs kept across the trainings of one build.

    The prune and factorize stages both recover a model whose frozen prefix
    (EfficientNet's stem and early blocks) neither of them touches, on the same
    train and calib splits: computing those outputs once saves each later
    recovery a quarter of its time. Entries are keyed by the prefix weights'
    digest, the data (the same Encoded object, held by the entry) and the batch
    size, so a changed prefix is recomputed and a reused one is bitwise the same.

    The teacher's answers (its encodings and logits on train and calib) are kept
    the same way: both recoveries distill from the same source model, split at
    the same point, so the second reads the first's (a cold default build ran
    the teacher over train and calib twice, about 35 s each time).
    """

    def __init__(self, waypoints: Sequence[Callable[[nn.Module], None]] = ()) -> None:
        self._entries: dict[tuple[str, str, int, int], tuple[Encoded, Any]] = {}
        self._teachers: dict[tuple, tuple[Encoded, Any]] = {}
        self.hits = 0
        # Where later trainings of the build will split (each moves a model's split in place, e.g. set_trainable_split
        # with the compression's reach). A prefix computed deeper than a waypoint passes through it, so its outputs
        # there are kept on the way: the source's training (EfficientNet split after block 15) hands prune's
        # recovery (split after block 6) its train, calib and eval prefixes (24 s for train alone in a cold default build).
        self.waypoints = tuple(waypoints)

    def teacher(self, teacher: nn.Module, data: Encoded, batch_size: int, what: str, compute: Callable[[], Any]) -> Any:
        """A frozen teacher's `what` on data, computed once per teacher state, split point, data and batch size."""
        splits = tuple(getattr(getattr(teacher, part, None), "split_at", None) for part in ("image_encoder", "text_encoder"))
        key = (what, _state_digest(teacher), splits, id(data), batch_size)
        if key in self._teachers:
            self.hits += 1
            return self._teachers[key][1]
        value = compute()
        self._teachers[key] = (data, value)
        return value

    def get(self, model: nn.Module, data: Encoded, batch_size: int, compute: Callable[[], Any]) -> Any:
        key = self._key(model, data, batch_size)
        if key in self._entries:
            self.hits += 1
            return self._entries[key][1]
        value = compute()
        self.put(key, data, value)
        return value

    def _key(self, model: nn.Module, data: Encoded, batch_size: int) -> tuple[str, str, int, int]:
        return (_frozen_prefix_digest(model.image_encoder), _frozen_prefix_digest(model.text_encoder), id(data), batch_size)

    def put(self, key: tuple[str, str, int, int], data: Encoded, value: Any) -> None:
        self._entries[key] = (data, value)  # holding data keeps id(data) from being reused

    def stops_on_the_way(self, model: nn.Module, data: Encoded, batch_size: int) -> list["_Stop"]:
        """The waypoints a prefix computation of model passes through (image split shallower than its own), not yet cached."""
        image, text = model.image_encoder, model.text_encoder
        if not hasattr(image, "prefix_stops"):
            return []
        stops: dict[tuple, _Stop] = {}
        for waypoint in self.waypoints:
            with _split_kept(image, text):
                waypoint(model)
                at = _Stop(image.split_at, text.split_at, self._key(model, data, batch_size))
            if at.image < image.split_at and at.key not in self._entries:
                stops.setdefault(at.key, at)
        return sorted(stops.values(), key=lambda stop: stop.image)


@dataclass(frozen=True)
class _Stop:
    image: int  # the image encoder's split there
    text: int  # the text encoder's
    key: tuple[str, str, int, int]


@contextlib.contextmanager
def _split_kept(*encoders: nn.Module) -> Iterator[None]:
    """Restore the encoders' split_at after the block, whatever it did to them."""
    kept = [encoder.split_at for encoder in encoders]
    try:
        yield
    finally:
        for encoder, split_at in zip(encoders, kept):
            encoder.split_at = split_at


# Images per pass through a frozen image prefix. EfficientNet-Lite0's largest activation at 192 px is 3.5 MB a
# sample (96 channels at 96 x 96): 64 of them are 226 MB, which glibc maps fresh and unmaps on every pass (its
# mmap threshold tops out at 32 MiB), so every pass had its pages faulted in again; 8 samples (28 MB) come from the
# kept heap: the train split's prefix took 35 s against 77 s (benchmarks/prefix_chunk.py). Eval-mode convolutions
# compute each sample alone, so the outputs are bitwise the whole batch's (the build's five sha256 unchanged, BENCHMARKS.md).
IMAGE_PREFIX_CHUNK = 8


def _image_prefix(encoder: nn.Module, image: torch.Tensor, stops: list[int]) -> list[torch.Tensor]:
    """The hidden state at each stop, then at the split, IMAGE_PREFIX_CHUNK images at a time (one pass through the blocks per chunk).

    The images go in channels-last, so the states come out so and every later pass over them (the trained suffix,
    forward and backward) runs oneDNN's NHWC convolutions: on the default model the prefix takes 24% less time and a
    suffix training step 31% less than in NCHW under the build's AVX2 kernels (benchmarks/channels_last.py)."""
    image = image.contiguous(memory_format=torch.channels_last)
    size = len(image) if encoder.training else IMAGE_PREFIX_CHUNK  # in train mode BatchNorm would see each chunk's statistics
    parts = [encoder.prefix_stops(chunk, stops) if stops else [encoder.prefix(chunk)] for chunk in image.split(max(size, 1))]
    return [torch.cat(states) for states in zip(*parts)]


def prefix_outputs(model: nn.Module, data: Encoded, batch_size: int, cache: PrefixCache | None = None,
                   desc: str = "encoding") -> tuple[torch.Tensor, torch.Tensor]:
    """The image and text encoders' frozen-prefix outputs for every sample of data, in order (from cache when it has them)."""
    image_encoder, text_encoder = model.image_encoder, model.text_encoder
    stops = cache.stops_on_the_way(model, data, batch_size) if cache is not None else []

    def text_prefix(batch: dict[str, np.ndarray], split_at: int) -> torch.Tensor:
        with _split_kept(text_encoder):
            text_encoder.split_at = split_at
            return text_encoder.prefix(torch.from_numpy(batch["input_ids"]), torch.from_numpy(batch["attention_mask"]))

    def compute() -> tuple[torch.Tensor, torch.Tensor]:
        images: list[list[torch.Tensor]] = [[] for _ in range(len(stops) + 1)]  # per stop, then at the model's own split
        texts: list[list[torch.Tensor]] = [[] for _ in range(len(stops) + 1)]
        with torch.inference_mode():
            for batch in track(list(data.batches(batch_size)), desc=desc, unit="batch", leave=False, samples_per_step=batch_size):
                hidden = _image_prefix(image_encoder, torch.from_numpy(batch["image"]), [stop.image for stop in stops])
                for index, stop in enumerate([*stops, None]):
                    images[index].append(hidden[index])
                    texts[index].append(text_prefix(batch, text_encoder.split_at if stop is None else stop.text))
        for index, stop in enumerate(stops):
            cache.put(stop.key, data, (torch.cat(images[index]), torch.cat(texts[index])))
        return torch.cat(images[-1]), torch.cat(texts[-1])

    return cache.get(model, data, batch_size, compute) if cache is not None else compute()


class _Features:
    """Inputs as the trainable part of the model sees them (prefix outputs when the model splits)."""

    def __init__(self, model: nn.Module, data: Encoded, batch_size: int, desc: str, cache: PrefixCache | None = None):
        self.split = _has_split(model)
        self.labels = torch.from_numpy(data.labels)
        # only a split model (the built-in ones) reads the mask apart; a user's model may take none
        self.mask = torch.from_numpy(data.inputs["attention_mask"]) if self.split else None
        if not self.split:
            self.tensors = {k: torch.from_numpy(v) for k, v in data.inputs.items()}
            return
        self.image, self.text = prefix_outputs(model, data, batch_size, cache, desc)

    def __len__(self) -> int:
        return len(self.labels)

    def logits(self, model: nn.Module, index: torch.Tensor, text_index: torch.Tensor | None = None) -> torch.Tensor:
        """Logits of the samples at index; with text_index, each image is paired with another sample's text."""
        text_index = index if text_index is None else text_index
        if not self.split:
            return model(**{k: v[index if k == "image" else text_index] for k, v in self.tensors.items()})
        image = model.image_encoder.suffix(self.image[index])
        text = model.text_encoder.suffix(self.text[text_index], self.mask[text_index])
        return model.head(image, text)


def _trainable_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """(encoder-tail parameters, head parameters); everything else is frozen."""
    if not _has_split(model):
        return [], [p for p in model.parameters()]
    tail_ids: set[int] = set()
    tail: list[nn.Parameter] = []
    for encoder in (model.image_encoder, model.text_encoder):
        for module in encoder.suffix_modules():
            for p in module.parameters():
                if id(p) not in tail_ids:
                    tail_ids.add(id(p))
                    tail.append(p)
    encoder_ids = {id(p) for e in (model.image_encoder, model.text_encoder) for p in e.parameters()}
    head = [p for p in model.parameters() if id(p) not in encoder_ids]
    return tail, head


def _optimizer(model: nn.Module, steps_per_epoch: int, settings: TrainSettings) -> tuple[torch.optim.Optimizer, Any]:
    """AdamW over the trainable parameters (head at settings.lr, encoder tails at encoder_lr), one-cycle over the budget."""
    tail, head = _trainable_parameters(model)
    for p in tail + head:
        p.requires_grad_(True)
    groups = [{"params": head, "lr": settings.lr}] + ([{"params": tail, "lr": settings.encoder_lr}] if tail else [])
    optimizer = torch.optim.AdamW(groups, weight_decay=settings.weight_decay)
    steps = settings.epochs * steps_per_epoch
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=[g["lr"] for g in groups], total_steps=max(steps, 1), pct_start=0.15)
    return optimizer, schedule


def _set_train_mode(model: nn.Module) -> None:
    model.train()
    for encoder_name in ("image_encoder", "text_encoder"):
        encoder = getattr(model, encoder_name, None)
        if encoder is not None and getattr(encoder, "freeze_norm_stats", False):
            for module in encoder.modules():
                if isinstance(module, nn.modules.batchnorm._BatchNorm):
                    module.eval()


def _batches(n: int, size: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    order = torch.randperm(n, generator=generator)
    for start in range(0, n, size):
        yield order[start:start + size]


def _epoch_batches(n: int, size: int, generator: torch.Generator, desc: str) -> Any:
    """One epoch's shuffled batches, tracked: a CI log hears from an epoch longer than the progress interval while it runs."""
    return track(_batches(n, size, generator), desc=desc, unit="batch", total=-(-n // size), leave=False, samples_per_step=size)


class _BatchLoss(nn.Module):
    """A batch's loss as a module's forward, for DDP to wrap.

    The trained part of a split model is called through the model's own
    methods (the encoders' suffix(), head()) on precomputed prefix outputs,
    never through its forward, and DDP prepares its gradient all-reduce in the
    forward of the module it wraps: so it wraps this, which owns the model
    (its trainable parameters are the ones DDP reduces; frozen ones, with
    requires_grad False, it leaves alone) and whose forward is the loss.
    """

    def __init__(self, model: nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor]):
        super().__init__()
        self.model = model
        self.loss_of = loss_of

    def forward(self, index: torch.Tensor) -> torch.Tensor:
        return self.loss_of(index)


class _OneProcess:
    """The epochs of a process training alone: the shared generator's randperm batches, the loss called directly (as always)."""

    def __init__(self, samples: int, settings: TrainSettings, generator: torch.Generator):
        self.samples, self.batch_size, self.generator = samples, settings.batch_size, generator
        self.steps_per_epoch = max(1, -(-samples // settings.batch_size))
        self.mixed_generator = generator  # distill's mixed pairs draw from the batches' generator, between batches

    def batches(self, epoch: int, desc: str) -> Any:
        return _epoch_batches(self.samples, self.batch_size, self.generator, desc)

    def parallel(self, model: nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        return loss_of

    def own_randomness(self) -> ContextManager[Any]:
        return contextlib.nullcontext()

    def epoch_loss(self, losses: list[float]) -> float:
        return float(np.mean(losses))

    def settle(self, model: nn.Module) -> None:
        """Nothing to agree on alone."""

    def agreed(self, value: Any) -> Any:
        return value


class _DataParallel:
    """One rank's epochs: its shard of each epoch, DDP steps, and what the ranks agree on after an epoch (see the module docstring)."""

    def __init__(self, world: World, samples: int, settings: TrainSettings):
        if settings.batch_size < world.size:
            raise ValueError(f"batch_size {settings.batch_size} is smaller than the {world.size} processes: each needs a sample a step")
        self.world, self.seed = world, settings.seed
        self.batch_size = settings.batch_size // world.size  # the global batch is the one-process batch
        # only len() of the data set is read: the sampler deals out indices into the features
        self.sampler = DistributedSampler(range(samples), num_replicas=world.size, rank=world.rank, shuffle=True, seed=settings.seed)
        self.steps_per_epoch = max(1, -(-self.sampler.num_samples // self.batch_size))  # every rank's shard is num_samples long
        # per rank by design: the draws only pick pairs within the local batch, never how many passes a rank runs
        self.mixed_generator = torch.Generator().manual_seed(settings.seed + world.rank)

    def batches(self, epoch: int, desc: str) -> Any:
        self.sampler.set_epoch(epoch)
        shard = torch.tensor(list(self.sampler), dtype=torch.int64)
        local = [shard[start:start + self.batch_size] for start in range(0, len(shard), self.batch_size)]
        return track(local, desc=desc, unit="batch", total=len(local), leave=False, samples_per_step=self.batch_size * self.world.size)

    def parallel(self, model: nn.Module, loss_of: Callable[[torch.Tensor], torch.Tensor]) -> Callable[[torch.Tensor], torch.Tensor]:
        # find_unused_parameters for a model trained end to end (a user's) only: it may hold parameters its loss
        # never reaches, which DDP would wait for forever (globally unused ones keep grad None, as in one process).
        # A split model's loss reaches every trained parameter (the suffixes run whole, the head is fusion +
        # classifier), and the flag would cost a graph traversal a step and a warning from DDP.
        # forward_sync_buffers off: each rank's BatchNorm running statistics follow its own batches until settle().
        return DistributedDataParallel(_BatchLoss(model, loss_of), find_unused_parameters=not _has_split(model), forward_sync_buffers=False)

    @contextlib.contextmanager
    def own_randomness(self) -> Iterator[None]:
        """Dropout draws its own masks on each rank; the global RNG is the same on every rank again afterwards."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed + self.world.rank)
            yield

    def epoch_loss(self, losses: list[float]) -> float:
        mean = torch.tensor([float(np.mean(losses))], dtype=torch.float64)
        distributed.average_in_place([mean])
        return float(mean)

    def settle(self, model: nn.Module) -> None:
        """Average the BatchNorm running statistics the ranks' local batches moved apart (the weights agree already)."""
        norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        stats = [s for m in norms for s in (m.running_mean, m.running_var) if s is not None]
        if not stats:
            return
        # in float64 the mean of N equal float32 values is exactly that value: a statistic no rank moved
        # (a BatchNorm the loss never runs) keeps its bytes
        mean = torch.cat([s.detach().flatten().double() for s in stats])
        distributed.average_in_place([mean])
        for s, part in zip(stats, mean.split([s.numel() for s in stats])):
            s.copy_(part.view_as(s))

    def agreed(self, value: Any) -> Any:
        return distributed.broadcast_object(value)


def _epochs_plan(world: World, samples: int, settings: TrainSettings, generator: torch.Generator) -> _OneProcess | _DataParallel:
    return _DataParallel(world, samples, settings) if world.active else _OneProcess(samples, settings, generator)


def _shown_here(world: World) -> ContextManager[Any]:
    """Progress from rank 0 alone: the other ranks run the same loops, quietly."""
    return contextlib.nullcontext() if world.is_writer else progress_style(ProgressStyle(form="quiet"))


def _logits_in_order(model: nn.Module, features: _Features, batch_size: int) -> torch.Tensor:
    model.eval()
    starts = track(range(0, len(features), batch_size), desc="computing logits", unit="batch", leave=False, samples_per_step=batch_size)
    with torch.inference_mode():
        return torch.cat([features.logits(model, torch.arange(start, min(start + batch_size, len(features)))) for start in starts])


def evaluate_accuracy(model: nn.Module, features: _Features, batch_size: int) -> float:
    logits = _logits_in_order(model, features, batch_size)
    return int((logits.argmax(1) == features.labels).sum()) / max(len(features), 1)


def predict_logits(model: nn.Module, data: Encoded, batch_size: int, cache: PrefixCache | None = None,
                   desc: str = "predicting") -> np.ndarray:
    """The model's logits on every sample of data, in order, as float32.

    A model with a frozen prefix runs its suffix on the prefix outputs, from
    cache when a training or an earlier stage of the same build computed them
    for this data and batch size: the model's own forward, split in two, without
    running the early high-resolution blocks again for every stage and split.
    """
    return _logits_in_order(model, _Features(model, data, batch_size, desc, cache), batch_size).float().numpy()


def _distill_kl(logits: torch.Tensor, teacher: torch.Tensor, temperature: float) -> torch.Tensor:
    """KL(teacher || student) of the temperature-softened distributions, scaled by T^2 (Hinton et al.)."""
    t = temperature
    return F.kl_div(F.log_softmax(logits / t, dim=1), F.softmax(teacher / t, dim=1), reduction="batchmean") * t * t


def _loss(logits: torch.Tensor, labels: torch.Tensor, teacher: torch.Tensor | None, settings: TrainSettings) -> torch.Tensor:
    ce = F.cross_entropy(logits, labels, label_smoothing=settings.label_smoothing)
    if teacher is None:
        return ce
    return settings.distill_weight * _distill_kl(logits, teacher, settings.distill_temperature) + (1 - settings.distill_weight) * ce


def _train_epoch(model: nn.Module, plan: "_OneProcess | _DataParallel", step_loss: Callable[[torch.Tensor], torch.Tensor], optimizer: torch.optim.Optimizer,
                 schedule: Any, epoch: int, desc: str) -> float:
    """One epoch of optimizer steps over the plan's batches (train and distill alike); the epoch's mean loss."""
    _set_train_mode(model)
    losses = []
    for index in plan.batches(epoch, f"{desc}: epoch {epoch}"):
        loss = step_loss(index)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(float(loss.detach()))
    plan.settle(model)
    return plan.epoch_loss(losses)


def train(
    model: nn.Module,
    train_data: Encoded,
    val_data: Encoded,
    settings: TrainSettings,
    teacher_logits: np.ndarray | None = None,
    stop_when: Callable[[float], bool] | None = None,
    desc: str = "train",
    prefix_cache: PrefixCache | None = None,
) -> tuple[nn.Module, TrainReport]:
    """Train model in place; return the best checkpoint (by validation accuracy) and a report.

    teacher_logits (aligned with train_data) switch the loss to distillation;
    stop_when(val_accuracy) ends training early once it returns True (before
    the first epoch too: a model already good enough is not trained);
    prefix_cache reuses frozen-prefix outputs an earlier training of the same build computed.
    Under torchrun it trains data-parallel (see the module docstring); every rank returns the same model.
    """
    world = distributed.init_from_env()
    with _shown_here(world):
        return _train(world, model, train_data, val_data, settings, teacher_logits, stop_when, desc, prefix_cache)


def _train(world: World, model: nn.Module, train_data: Encoded, val_data: Encoded, settings: TrainSettings,
           teacher_logits: np.ndarray | None, stop_when: Callable[[float], bool] | None, desc: str,
           prefix_cache: PrefixCache | None) -> tuple[nn.Module, TrainReport]:
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    model.eval()
    for p in model.parameters():
        p.requires_grad_(False)
    train_features = _Features(model, train_data, settings.batch_size, f"{desc}: encoding train", prefix_cache)
    val_features = _Features(model, val_data, settings.batch_size, f"{desc}: encoding val", prefix_cache)
    plan = _epochs_plan(world, len(train_features), settings, generator)
    optimizer, schedule = _optimizer(model, plan.steps_per_epoch, settings)
    teacher = torch.from_numpy(teacher_logits).float() if teacher_logits is not None else None

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        return _loss(train_features.logits(model, index), train_features.labels[index], teacher[index] if teacher is not None else None, settings)

    step_loss = plan.parallel(model, batch_loss)
    best_state = copy.deepcopy(model.state_dict())
    best_acc, best_epoch, history = plan.agreed(evaluate_accuracy(model, val_features, settings.batch_size)), 0, []
    initial_acc = best_acc
    already_there = stop_when is not None and stop_when(initial_acc)
    bar = track(range(1, 0 if already_there else settings.epochs + 1), desc=desc, unit="epoch", samples_per_step=len(train_features))
    with plan.own_randomness():
        for epoch in bar:
            epoch_loss = _train_epoch(model, plan, step_loss, optimizer, schedule, epoch, desc)
            val_acc = plan.agreed(evaluate_accuracy(model, val_features, settings.batch_size))
            history.append((epoch_loss, val_acc))
            bar.set_postfix(loss=f"{history[-1][0]:.3f}", val_acc=f"{val_acc:.3f}")
            if val_acc > best_acc:
                best_acc, best_epoch, best_state = val_acc, epoch, copy.deepcopy(model.state_dict())
            if stop_when is not None and stop_when(val_acc):
                break
    model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, TrainReport(len(history), best_epoch, best_acc, tuple(history), initial_acc)


# ---------------------------------------------------------------- distillation: a compressed model learns to answer like its teacher


@dataclass(frozen=True)
class Fidelity:
    """How closely a student follows its teacher on a split (the recovery's checkpoint is chosen by kl)."""

    kl: float  # mean KL(teacher || student) at T = 1, nats
    agreement: float  # top-1 agreement with the teacher
    accuracy: float

    def to_json(self) -> dict[str, float]:
        return {"kl": round(self.kl, 6), "agreement": round(self.agreement, 6), "accuracy": round(self.accuracy, 6)}


def fidelity(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor) -> Fidelity:
    kl = F.kl_div(F.log_softmax(student.double(), dim=1), F.log_softmax(teacher.double(), dim=1), reduction="batchmean", log_target=True)
    return Fidelity(float(kl), float((student.argmax(1) == teacher.argmax(1)).double().mean()),
                    float((student.argmax(1) == labels).double().mean()))


@dataclass(frozen=True)
class DistillReport:
    epochs_run: int
    best_epoch: int  # 0: the model as it came in was the closest to its teacher
    initial: Fidelity  # on the validation split, before the first epoch
    best: Fidelity
    history: tuple[tuple[float, Fidelity], ...]  # (train loss, validation fidelity) per epoch
    stopped: str  # "budget" or "plateau"
    feature_points: tuple[str, ...] = ()  # the hidden states matched to the teacher's (feature distillation)


class _TeacherAnswers:
    """The frozen teacher's answers on the train pairs and on any mixed pair, computed once.

    A split teacher's encoder outputs are cached per sample, so its logits on
    the pair (image of i, text of j) cost one run of its head; a teacher
    without a split is run whole on each mixed pair.
    """

    def __init__(self, teacher: nn.Module, features: _Features, batch_size: int, record_states: bool = False):
        self.teacher, self.features = teacher, features
        self.states: TeacherStates | None = None  # its hidden states at its points (feature distillation), when asked
        starts = track(range(0, len(features), batch_size), desc="teacher: encoding train", unit="batch", leave=False,
                       samples_per_step=batch_size)  # a minute of a cold build on 2 cores: a CI log hears from it
        with torch.inference_mode():
            if features.split:
                parts = self._batches(starts, batch_size, self._encoded, record_states)
                self.image, self.text = torch.cat([p[0] for p in parts]), torch.cat([p[1] for p in parts])
                # the head on those encodings, batch by batch as _logits_in_order runs it: the same numbers,
                # without running the teacher's encoder tails over train a second time (19 s of a cold build)
                self.own = torch.cat([teacher.head(image, text) for image, text in parts])
            else:  # run whole, batch by batch as _logits_in_order runs it
                self.own = torch.cat(self._batches(starts, batch_size, lambda index: features.logits(teacher, index), record_states))

    def _batches(self, starts: Iterable[int], batch_size: int, run: Callable[[torch.Tensor], Any], record_states: bool) -> list[Any]:
        """run() on each batch of the train split, in order; with record_states, the teacher's states at its points kept on the way."""
        outputs, states = [], []
        with recording(stream_points(self.teacher) if record_states else {}) as recorded:
            for start in starts:
                outputs.append(run(torch.arange(start, min(start + batch_size, len(self.features)))))
                states.append(dict(recorded))
        if record_states:
            self.states = TeacherStates.collect(states, self.features.mask)
        return outputs

    def _encoded(self, index: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        f = self.features
        return self.teacher.image_encoder.suffix(f.image[index]), self.teacher.text_encoder.suffix(f.text[index], f.mask[index])

    def mixed(self, images: torch.Tensor, texts: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            if self.features.split:
                return self.teacher.head(self.image[images], self.text[texts]).clone()
            return self.features.logits(self.teacher, images, texts).clone()


def _mixed_pairs(size: int, share: float, generator: torch.Generator) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Positions (image, text) within a batch for round(share x size) mixed pairs: texts moved by a random permutation."""
    pairs, left = [], int(round(share * size))
    while left > 0 and size > 1:
        count = min(left, size)
        images = torch.randperm(size, generator=generator)[:count]
        texts = (images + torch.randint(1, size, (count,), generator=generator)) % size  # never an image's own text
        pairs.append((images, texts))
        left -= count
    return pairs


@dataclass(frozen=True)
class _FeatureMatch:
    """Which of the student's hidden states are matched to the teacher's, and how much that term weighs."""

    weight: float
    points: dict[str, nn.Module]  # the student's modules, by the name they share with the teacher's


def _feature_match(model: nn.Module, features: _Features, teacher: _TeacherAnswers, weight: float) -> _FeatureMatch | None:
    """The student's points whose outputs have the teacher's shape, found by running it on two samples.

    An output shaped like the logits is left out: the logits have their own term.
    """
    if weight <= 0 or teacher.states is None:
        return None
    points = stream_points(model)
    index = torch.arange(min(2, len(features)))
    with torch.inference_mode(), recording(points) as recorded:
        logits = features.logits(model, index)
    matched = tuple(name for name in teacher.states.matched(recorded) if recorded[name].shape != logits.shape)
    return _FeatureMatch(weight, {name: points[name] for name in matched}) if matched else None


def _student_loss(model: nn.Module, features: _Features, index: torch.Tensor, teacher: _TeacherAnswers, settings: TrainSettings,
                  mixed_share: float, generator: torch.Generator, match: _FeatureMatch | None = None) -> torch.Tensor:
    """Distillation loss on the batch's own pairs plus its mixed pairs (teacher's answers only), plus the feature term when asked.

    A split student encodes each image and text of the batch once; its mixed
    pairs reuse those encodings and cost one run of its head each.
    """
    labels, own_target = features.labels[index], teacher.own[index]
    pairs = _mixed_pairs(len(index), mixed_share, generator)
    if features.split:
        with recording(match.points if match else {}) as states:
            image = model.image_encoder.suffix(features.image[index])
            text = model.text_encoder.suffix(features.text[index], features.mask[index])
        loss = _loss(model.head(image, text), labels, own_target, settings)
        if match is not None:
            loss = loss + match.weight * teacher.states.loss(states, index, tuple(match.points), features.mask[index])
        mixed = [(model.head(image[i], text[t]), teacher.mixed(index[i], index[t])) for i, t in pairs]
    else:
        with recording(match.points if match else {}) as states:
            logits = features.logits(model, index)
        loss = _loss(logits, labels, own_target, settings)
        if match is not None:
            loss = loss + match.weight * teacher.states.loss(states, index, tuple(match.points), features.mask)
        mixed = [(features.logits(model, index[i], index[t]), teacher.mixed(index[i], index[t])) for i, t in pairs]
    for logits, target in mixed:
        loss = loss + len(logits) / len(index) * _distill_kl(logits, target, settings.distill_temperature)
    return loss


def distill(
    model: nn.Module,
    teacher: nn.Module,
    train_data: Encoded,
    val_data: Encoded,
    settings: TrainSettings,
    patience: int,
    mixed_share: float = 0.0,
    desc: str = "distill",
    prefix_cache: PrefixCache | None = None,
    feature_weight: float = 0.0,
) -> tuple[nn.Module, DistillReport]:
    """Train model (in place) to answer like teacher; return the checkpoint closest to the teacher on val_data.

    The loss is settings.distill_weight x KL to the teacher at
    settings.distill_temperature plus the rest x label cross-entropy on the
    train pairs, plus, per batch, mixed_share x batch pairs of one sample's
    image with another sample's text, with the teacher's answers as the only
    target: the teacher is right on nearly every train sample, so on the train
    pairs alone its logits say little more than the labels; on pairs it has
    never seen they show how it weighs one modality against the other, which
    is where a compressed model's answers drift on unseen samples. With
    feature_weight > 0 the student also matches the teacher's hidden states
    at every point whose shape it kept (pipeline.feature_distillation: the
    blocks of a split model's suffixes, a model's own top-level modules
    otherwise), weighted so; the points are in the report.

    There is no early stop at an accuracy line (a line crossed on a small
    split is crossed by noise): training runs the epoch budget, or ends when
    the validation KL to the teacher has not improved for `patience` epochs,
    and the checkpoint with the lowest validation KL is kept.

    Under torchrun it trains data-parallel (see the module docstring); every rank returns the same model.
    """
    world = distributed.init_from_env()
    with _shown_here(world):
        return _distill(world, model, teacher, train_data, val_data, settings, patience, mixed_share, desc, prefix_cache, feature_weight)


def _distill(world: World, model: nn.Module, teacher: nn.Module, train_data: Encoded, val_data: Encoded, settings: TrainSettings,
             patience: int, mixed_share: float, desc: str, prefix_cache: PrefixCache | None,
             feature_weight: float) -> tuple[nn.Module, DistillReport]:
    torch.manual_seed(settings.seed)
    generator = torch.Generator().manual_seed(settings.seed)
    for network in (model, teacher):
        network.eval()
        for p in network.parameters():
            p.requires_grad_(False)
    student_val = _Features(model, val_data, settings.batch_size, f"{desc}: encoding val", prefix_cache)
    def teacher_answers() -> _TeacherAnswers:
        features = _Features(teacher, train_data, settings.batch_size, f"{desc}: encoding train (teacher)", prefix_cache)
        return _TeacherAnswers(teacher, features, settings.batch_size, record_states=feature_weight > 0)

    def teacher_logits() -> torch.Tensor:
        features = _Features(teacher, val_data, settings.batch_size, f"{desc}: encoding val (teacher)", prefix_cache)
        return _logits_in_order(teacher, features, settings.batch_size)

    teacher_val = teacher_logits() if prefix_cache is None else prefix_cache.teacher(teacher, val_data, settings.batch_size, "logits",
                                                                                      teacher_logits)
    def fidelity_now() -> Fidelity:
        return fidelity(_logits_in_order(model, student_val, settings.batch_size), teacher_val, student_val.labels)

    if settings.epochs == 0:  # nothing to train: the model as it came, measured, without the teacher's answers on train (22 s)
        initial = fidelity_now()
        return model, DistillReport(0, 0, initial, initial, (), "budget")
    student_train = _Features(model, train_data, settings.batch_size, f"{desc}: encoding train", prefix_cache)
    if prefix_cache is None:
        answers = teacher_answers()
    else:
        answers = prefix_cache.teacher(teacher, train_data, settings.batch_size, "answers+states" if feature_weight > 0 else "answers",
                                       teacher_answers)
    if answers.features.split != student_train.split:
        raise ValueError("distill needs a teacher and a student that both split into prefix and suffix, or neither")
    match = _feature_match(model, student_train, answers, feature_weight)
    plan = _epochs_plan(world, len(student_train), settings, generator)
    optimizer, schedule = _optimizer(model, plan.steps_per_epoch, settings)

    def measure() -> Fidelity:
        return plan.agreed(fidelity_now())

    def batch_loss(index: torch.Tensor) -> torch.Tensor:
        return _student_loss(model, student_train, index, answers, settings, mixed_share, plan.mixed_generator, match)

    step_loss = plan.parallel(model, batch_loss)
    best_state, best_epoch = copy.deepcopy(model.state_dict()), 0
    initial = best = measure()
    history: list[tuple[float, Fidelity]] = []
    stopped = "budget"
    bar = track(range(1, settings.epochs + 1), desc=desc, unit="epoch", samples_per_step=len(student_train))
    with plan.own_randomness():
        for epoch in bar:
            epoch_loss = _train_epoch(model, plan, step_loss, optimizer, schedule, epoch, desc)
            current = measure()
            history.append((epoch_loss, current))
            bar.set_postfix(loss=f"{history[-1][0]:.3f}", val_kl=f"{current.kl:.4f}", val_agree=f"{current.agreement:.3f}")
            if current.kl < best.kl:
                best, best_epoch, best_state = current, epoch, copy.deepcopy(model.state_dict())
            if epoch - best_epoch >= patience:
                stopped = "plateau"
                break
    model.load_state_dict(best_state)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return model, DistillReport(len(history), best_epoch, initial, best, tuple(history), stopped, tuple(match.points) if match else ())
