"""Process group set-up: one process, ``torchrun``, or torchx ``dist.ddp`` alike.

Under ``torchrun`` (and torchx, which launches it) the rank and world come
from the environment; a plain ``python -m trainer.main`` is a world of one.
gloo on CPU, nccl on CUDA.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Callable

import torch
import torch.distributed as dist

from trainer.errors import UserError


@dataclass(frozen=True)
class DistContext:
    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def all_reduce_sum(self, values: list[float]) -> list[float]:
        """Element-wise sum over ranks of a few numbers (one collective)."""
        tensor = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(tensor)
        return tensor.tolist()

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _elastic_attempt_store(world_size: int) -> dist.Store | None:
    """Under torchrun/torchx the workers share the elastic agent's TCPStore, and it outlives a
    restart: the restarted ranks would read the gloo/NCCL addresses the dead attempt left there
    and fail to connect (pytorch/pytorch#135712). Keys are kept apart per restart attempt,
    as torch itself did before the store was shared."""
    if os.environ.get("TORCHELASTIC_USE_AGENT_STORE") != str(True) or "TORCHELASTIC_RESTART_COUNT" not in os.environ:
        return None
    store = dist.TCPStore(
        os.environ["MASTER_ADDR"], int(os.environ["MASTER_PORT"]), world_size, is_master=False
    )
    return dist.PrefixStore(f"ctr_trainer/attempt_{os.environ['TORCHELASTIC_RESTART_COUNT']}", store)


def _local_world_size(world_size: int, use_cuda: bool) -> int:
    """The ranks on this host (torchrun/torchx: ``LOCAL_WORLD_SIZE``; per node, not the job's
    world: 2 nodes x 8 ranks give 8). It sets each process's CPU threads (the host's cores
    shared by its ranks) and the planner's hosts (world / local). A launcher that sets RANK
    but not LOCAL_WORLD_SIZE: one rank per GPU of this host on CUDA, else all on one host."""
    if "LOCAL_WORLD_SIZE" in os.environ:
        return int(os.environ["LOCAL_WORLD_SIZE"])
    if use_cuda:
        return max(1, min(world_size, torch.cuda.device_count()))
    return world_size


def init_distributed(device_choice: str = "auto") -> DistContext:
    """Join (or create) the process group; picks the device and backend."""
    if device_choice == "cuda" and not torch.cuda.is_available():
        raise UserError("run.device is 'cuda' but no CUDA device is available here; use 'cpu' or 'auto'")
    use_cuda = device_choice == "cuda" or (device_choice == "auto" and torch.cuda.is_available())
    backend = "nccl" if use_cuda else "gloo"
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:
        init_method = "env://"
        rank, world_size = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    else:
        init_method, rank, world_size = f"tcp://127.0.0.1:{_free_port()}", 0, 1
    if use_cuda and "LOCAL_RANK" not in os.environ:  # a launcher that sets RANK but not LOCAL_RANK
        local_rank = int(os.environ.get("RANK", 0)) % torch.cuda.device_count()
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        store = _elastic_attempt_store(world_size)
        if store is not None:
            dist.init_process_group(backend, store=store, rank=rank, world_size=world_size)
        else:
            dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size)
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=_local_world_size(world_size, use_cuda),
        device=device,
        backend=backend,
    )


def shutdown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def on_rank0(work: Callable[[], None]) -> None:
    """Run ``work`` on rank 0 and make every rank raise if it failed (collective): a failure
    on rank 0 alone must not leave the other ranks waiting in the next collective."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        work()
        return
    outcome: list[BaseException | None] = [None]
    if dist.get_rank() == 0:
        try:
            work()
        except Exception as e:  # handed to every rank below
            outcome[0] = e
    dist.broadcast_object_list(outcome, src=0)
    if outcome[0] is not None:
        if dist.get_rank() == 0:
            raise outcome[0]
        raise UserError(f"rank 0 failed: {type(outcome[0]).__name__}: {outcome[0]}")


def barrier() -> None:
    """Wait for every rank (a no-op without a process group of several ranks)."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()
