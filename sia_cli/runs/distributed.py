"""Running under `torchrun`: who this process is, its share of the work, and gathering results.

A process started by torchrun finds RANK/WORLD_SIZE in its environment; anything else is a
world of one and every function here is then a no-op, so the engine has one code path.
"""

from __future__ import annotations

import atexit
import os
from dataclasses import dataclass
from datetime import timedelta

import torch
import torch.distributed as dist

from sia_cli.errors import SiaError


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    def owns(self, index: int) -> bool:
        """Whether work item `index` is this rank's: round-robin, so shards differ by at most one."""
        return index % self.size == self.rank


def launched_rank() -> int:
    """This process's rank as torchrun set it (0 outside torchrun); readable before joining."""
    return int(os.environ.get("RANK", "0"))


def join(device: str) -> tuple[World, str]:
    """Join torchrun's process group (once) and return the world and this rank's device.

    `cuda` becomes `cuda:LOCAL_RANK`, so N processes on one node use N GPUs.
    """
    size = int(os.environ.get("WORLD_SIZE", "1"))
    if size == 1:
        return World(), device
    world = World(int(os.environ["RANK"]), size, int(os.environ.get("LOCAL_RANK", "0")))
    if device.startswith("cuda"):
        device = f"cuda:{world.local_rank}"
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        backend = "nccl" if device.startswith("cuda") else "gloo"
        # A rank stuck on a dead peer should give up well before a user gives up on it.
        dist.init_process_group(backend, timeout=timedelta(minutes=int(os.environ.get("SIA_DIST_TIMEOUT_MIN", "30"))))
        # Left to interpreter shutdown, gloo's threads can abort the process after its work is
        # done ("terminate called without an active exception"), failing a finished run.
        atexit.register(_leave)
    return world, device


def _leave() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def current() -> World:
    if not (dist.is_available() and dist.is_initialized()):
        return World()
    return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))


def all_gather(value, world: World) -> list:
    """Every rank's `value`, in rank order, on every rank."""
    if world.size == 1:
        return [value]
    out = [None] * world.size
    dist.all_gather_object(out, value)
    return out


def agree(step, world: World):
    """Run `step()` on every rank; if it fails on any rank, fail on all with that rank's message.

    Without this a check that fails on one rank (its folder is locked, its file unreadable)
    would leave the others waiting for it in the next collective.
    """
    try:
        result, problem = step(), None
    except SiaError as exc:
        result, problem = None, (str(exc), exc.exit_code)
    problems = [p for p in all_gather(problem, world) if p is not None]
    if problems:
        error = SiaError(problems[0][0], problems[0][1])
        error.shared = world.size > 1  # every rank has it: rank 0 alone need say it
        raise error
    return result


def barrier(world: World) -> None:
    if world.size > 1:
        dist.barrier()
