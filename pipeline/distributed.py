"""The process group a build runs in: who this process is among the ones torchrun started, and how they meet.

`torchrun --nproc-per-node N -m pipeline build ...` starts N copies of the build, each with RANK,
WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in its environment. world() reads them (or the
process group, once one is initialised); init_from_env() joins the default process group; barrier()
and broadcast_object() are the two meetings the build needs (wait for rank 0's commit, take rank 0's
answer). Rank 0 is the writer: only it writes artifacts, the manifest and the cache.

Without those variables (a plain `python -m pipeline build`) world() is one process: nothing is
initialised, and barrier() and broadcast_object() return at once, so a one-process build runs the
code it always ran. torch is imported only inside the functions that need a process group: the
module can be imported (say, to ask world().is_writer before printing) without loading torch.

Backend: gloo. This project trains on the CPU (prefix outputs, optimizers and checkpoints are CPU
tensors), and NCCL reduces only CUDA tensors; init_from_env(device="cuda") picks nccl, for a caller
whose model trains on a GPU, and pins each process to its LOCAL_RANK's GPU.

The state is torch.distributed's own (is_initialized(), the default group) and the environment;
this module keeps none. How the results of N processes relate to one process's: see
pipeline/training.py.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass
from typing import Any, Iterable, TypeVar

T = TypeVar("T")

LAUNCH_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")  # what torchrun sets for each process


@dataclass(frozen=True)
class World:
    """This process's place among the processes of one run."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0  # the process's index on its own machine (its GPU, when it trains on one)
    backend: str | None = None  # None: no process group (one process, or launched but not joined yet)

    @property
    def is_writer(self) -> bool:
        """Rank 0 writes the artifacts, the manifest and the cache; the others read them."""
        return self.rank == 0

    @property
    def active(self) -> bool:
        """More than one process: training is data-parallel and the stages meet at barriers."""
        return self.size > 1


def _launched() -> World:
    """The world torchrun's environment describes (one process when it has no WORLD_SIZE)."""
    if "WORLD_SIZE" not in os.environ:
        return World()
    return World(rank=int(os.environ.get("RANK", "0")), size=int(os.environ["WORLD_SIZE"]),
                 local_rank=int(os.environ.get("LOCAL_RANK", "0")))


def _initialised_group() -> Any | None:
    """torch.distributed when a default process group exists; None otherwise (without importing torch)."""
    dist = sys.modules.get("torch.distributed")  # a process that never imported torch has no group
    if dist is None or not dist.is_available() or not dist.is_initialized():
        return None
    return dist


def world() -> World:
    """The current world: the process group's when one is initialised, else torchrun's environment, else one process."""
    launched = _launched()
    dist = _initialised_group()
    if dist is None:
        return launched
    return World(rank=dist.get_rank(), size=dist.get_world_size(), local_rank=launched.local_rank, backend=str(dist.get_backend()))


def backend_for(device: str) -> str:
    """nccl for a model trained on CUDA, gloo for one trained on the CPU (this project's)."""
    return "nccl" if device.split(":")[0] == "cuda" else "gloo"


def init_from_env(device: str = "cpu") -> World:
    """Join the default process group torchrun's environment describes; the world after.

    Idempotent: once joined (or when the environment describes one process) it returns world() and
    does nothing else. Rendezvous is torch's env:// method (MASTER_ADDR, MASTER_PORT, RANK, WORLD_SIZE).
    """
    current = world()
    if not current.active or current.backend is not None:
        return current
    import torch
    import torch.distributed as dist

    backend = backend_for(device)
    if backend == "nccl":
        torch.cuda.set_device(current.local_rank)  # one GPU per process: NCCL's collectives run on the current device
    dist.init_process_group(backend=backend, init_method="env://")
    return world()


def barrier() -> None:
    """Wait until every process gets here (joining the group first if needed); returns at once for one process."""
    if not init_from_env().active:
        return
    import torch.distributed as dist

    dist.barrier()


def broadcast_object(obj: T) -> T:
    """Rank 0's obj (picklable), on every process; obj itself for one process."""
    if not init_from_env().active:
        return obj
    import torch.distributed as dist

    box = [obj]  # the others' entries are replaced by rank 0's
    dist.broadcast_object_list(box, src=0)
    return box[0]


def average_in_place(tensors: Iterable[Any]) -> None:
    """Replace each (floating-point) tensor by its mean over the processes; nothing for one process."""
    current = init_from_env()
    if not current.active:
        return
    import torch.distributed as dist

    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
        tensor.div_(current.size)


def shutdown() -> None:
    """Leave the process group (at the end of a command), when there is one."""
    dist = _initialised_group()
    if dist is not None:
        dist.destroy_process_group()
