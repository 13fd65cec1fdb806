"""What a training run needs to resume exactly where it stopped: the random states of every process,
the data order from a given step, and when to write the next checkpoint.

With ``--workers 0`` (data loading in the training process) a run killed at any moment and resumed
from its last checkpoint ends with the same weights as a run never interrupted: the sampler's order
depends on the seed and the epoch alone, the DataLoader draws no global random numbers, and the
random states (torch, CUDA, Python, NumPy) of every process are saved with each checkpoint.
"""
from __future__ import annotations

import itertools
import random
import time
from typing import Iterator, List

import numpy as np
import torch
import torch.distributed as dist
from torch.utils.data import DistributedSampler, Sampler


class ResumableSampler(Sampler):
    """A DistributedSampler (the order of an epoch depends on the seed and the epoch alone) that can
    start an epoch after its first ``skip`` samples."""

    def __init__(self, base: DistributedSampler) -> None:
        self.base = base
        self.skip = 0

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.base.set_epoch(epoch)
        self.skip = skip

    def __iter__(self) -> Iterator[int]:
        return itertools.islice(iter(self.base), self.skip, None)

    def __len__(self) -> int:
        return max(len(self.base) - self.skip, 0)


def rng_states(world_size: int) -> List[dict]:
    """The random states of every process (gathered to each), rank by rank."""
    local = dict(torch=torch.get_rng_state(), python=random.getstate(), numpy=np.random.get_state(),
                 cuda=torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [])
    if world_size == 1:
        return [local]
    states: List[dict] = [{} for _ in range(world_size)]
    dist.all_gather_object(states, local)
    return states


def restore_rng_states(states: List[dict], rank: int, world_size: int) -> None:
    """Set this process's random states from ``rng_states``'s list (written by as many processes)."""
    if len(states) != world_size:
        raise ValueError(f"this checkpoint was written by {len(states)} training process(es) and this run has "
                         f"{world_size}; resume with as many (torchrun --nproc_per_node {len(states)}) to continue "
                         "it exactly")
    state = states[rank]
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


class CheckpointClock:
    """When to write a checkpoint inside an epoch: every ``every`` steps (0: never by count), and when
    ``minutes`` have passed since the last one (0: never by time). With several processes rank 0's
    clock decides for all of them."""

    def __init__(self, every: int, minutes: float, world_size: int, device: torch.device) -> None:
        self.every, self.seconds, self.world_size, self.device = every, minutes * 60, world_size, device
        self.last = time.monotonic()

    def due(self, step: int) -> bool:
        due = bool(self.every) and step % self.every == 0
        if self.seconds:
            late = torch.tensor([int(time.monotonic() - self.last >= self.seconds)], device=self.device)
            if self.world_size > 1:
                dist.broadcast(late, 0)
            due = due or bool(late.item())
        return due

    def saved(self) -> None:
        """A checkpoint was just written; the minutes count from now."""
        self.last = time.monotonic()
