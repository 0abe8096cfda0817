"""Several processes, one run, on torchrun + DistributedDataParallel: the process group (nccl on CUDA,
gloo on the CPU), and the few collective steps a run needs besides DDP's gradient averaging: one run
directory, consistent BatchNorm statistics before evaluation and saving, rank 0's evaluation shared,
and a final check that every rank holds the same parameters."""

import gc
import os
import subprocess
import sys
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
import torch.distributed as dist
from torch import nn

from kit.device import resolve_device
from kit.errors import KitError

UNSHARED_STORE = "TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1"


@dataclass(frozen=True)
class Ranks:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def max_restarts() -> int:
    """torchrun's --max-restarts for this process (0 outside torchrun): how often a failed group starts again."""
    return int(os.environ.get("TORCHELASTIC_MAX_RESTARTS", 0))


def check_restartable() -> None:
    """Refuse, before any process group, a torchrun whose restarts cannot connect: with --max-restarts and the
    rendezvous store it shares with the processes (torchrun's default), a restarted group reads the addresses the
    failed one left in that store and fails to connect (pytorch/pytorch#135712; measured: gloo's "connectFullMesh
    failed ... Connection refused" on the first restart). TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 gives each
    rendezvous round a store of its own."""
    if max_restarts() and os.environ.get("TORCHELASTIC_USE_AGENT_STORE") == "True":
        raise KitError(f"torchrun --max-restarts {max_restarts()} cannot restart this group on the store it shares between "
                       f"restarts: start torchrun with {UNSHARED_STORE} in its environment (see the README's torchrun command)")


def start(device: str) -> tuple[Ranks, torch.device]:
    """The ranks torchrun set in the environment (one process: rank 0 of 1) and this rank's device."""
    ranks = Ranks(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0)))
    dev = resolve_device(device)
    if ranks.world_size == 1:
        return ranks, dev
    check_restartable()
    if dev.type == "cuda":
        dev = torch.device("cuda", ranks.local_rank)
        torch.cuda.set_device(dev)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo")
    return ranks, dev


def stop(finished: bool = True) -> None:
    """End the process group. After a finished run the ranks meet at a barrier first: destroying it while a peer
    is still in its last collective aborts gloo's worker threads at exit. After an error nobody waits.
    Then the run's objects are collected: they sit in reference cycles, and DistributedDataParallel's reducer keeps
    the group alive in them; left to the interpreter's exit, the group's threads ended there and aborted rank 0
    ("terminate called without an active exception", exit -6) in 6 of 16 two-node runs, 0 of 18 after collecting."""
    if not dist.is_initialized():
        return
    if finished:
        dist.barrier()
    dist.destroy_process_group()
    gc.collect()


@contextmanager
def process_group() -> Iterator[None]:
    """Around a command that trains: the process group (if a run started one) ends with it, after a barrier when
    the block finished and at once when it raised (see `stop`)."""
    try:
        yield
    except BaseException:
        stop(finished=False)
        raise
    stop()


def broadcast(value: Any, ranks: Ranks) -> Any:
    """Rank 0's value, on every rank."""
    if ranks.world_size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def any_rank(flag: bool, ranks: Ranks, device: torch.device) -> bool:
    """True on every rank when it is true on any (so that all ranks stop at the same update)."""
    if ranks.world_size == 1:
        return flag
    box = torch.tensor([int(flag)], device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MAX)
    return bool(box.item())


def gather(value: Any, ranks: Ranks) -> list:
    """Every rank's value, in rank order, on every rank."""
    if ranks.world_size == 1:
        return [value]
    values = [None] * ranks.world_size
    dist.all_gather_object(values, value)
    return values


@torch.no_grad()
def average_buffers(module: nn.Module | None, ranks: Ranks) -> None:
    """BatchNorm running statistics (each rank saw only its slice) averaged over ranks, in place."""
    if ranks.world_size == 1 or module is None:
        return
    for buffer in module.buffers():
        if buffer.is_floating_point():
            dist.all_reduce(buffer)
            buffer /= ranks.world_size


@torch.no_grad()
def parameters_agree(model: nn.Module, ranks: Ranks) -> bool:
    """True when every rank holds exactly the same parameters (DDP's promise, checked)."""
    if ranks.world_size == 1:
        return True
    flat = torch.cat([p.detach().float().flatten() for p in model.parameters()])
    high, low = flat.clone(), flat.clone()
    dist.all_reduce(high, op=dist.ReduceOp.MAX)
    dist.all_reduce(low, op=dist.ReduceOp.MIN)
    return bool(torch.equal(high, low))


def launch(processes: int, args: list[str]) -> int:
    """`kit train ... --gpus N`: the same command (`args`, from `train` on) under torchrun, N processes on this machine."""
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}",
               "-m", "kit.cli", *args]
    return subprocess.run(command).returncode
