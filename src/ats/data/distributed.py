"""Data over the processes of a ``torchrun``: the process group torchrun's environment describes, each
process's share of the batches, and the gathering of what every process measured, so that a run on N
processes gives the results a run on one gives.

A batch of a run on N processes is the same batch as on one process (the same images, in the same order):
process r takes batches r, r + N, r + 2N, ..., so every image is evaluated exactly once, nothing is padded,
and ``interleave`` puts the gathered per-batch results back in the one-process order.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator, List, Sequence

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset

from .skipped import collate_usable


@dataclass(frozen=True)
class Processes:
    """This process's place in the run: its rank, how many there are, and the device it computes on."""

    rank: int = 0
    world_size: int = 1
    device: str = "cpu"

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def main(self) -> bool:
        """Whether this process prints the run's output (rank 0)."""
        return self.rank == 0

    def share(self, items: Sequence) -> List:
        """This process's items of ``items`` (batches): r, r + N, r + 2N, ..."""
        return list(items[self.rank::self.world_size])

    def gather(self, value: Any) -> List[Any]:
        """Every process's ``value`` (picklable), in rank order; ``[value]`` on one process."""
        if not self.distributed:
            return [value]
        values: List[Any] = [None] * self.world_size
        dist.all_gather_object(values, value)
        return values


#: A run on one process, the default of every function that takes ``processes``.
ONE_PROCESS = Processes()


def make_loader(dataset: Dataset, batch_size: int, workers: int, processes: Processes = ONE_PROCESS) -> DataLoader:
    """This process's batches of ``dataset`` in order (all of them on one process); unusable images are left
    out and named (``collate_usable``). ``len(loader.dataset)`` is the whole data set's size."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    if workers < 0:
        raise ValueError(f"--workers must be >= 0, got {workers}")
    size = len(dataset)
    batches = [list(range(start, min(start + batch_size, size))) for start in range(0, size, batch_size)]
    return DataLoader(dataset, batch_sampler=processes.share(batches), num_workers=workers, collate_fn=collate_usable)


def interleave(shares: Sequence[Sequence]) -> List:
    """The per-batch items of every process's share (``Processes.share``, gathered in rank order) in the order
    one process would have made them."""
    merged = []
    for index in range(max((len(share) for share in shares), default=0)):
        merged += [share[index] for share in shares if index < len(share)]
    return merged


@contextmanager
def torchrun_processes(device: str) -> Iterator[Processes]:
    """The processes of this run: under ``torchrun`` (WORLD_SIZE > 1) a process group, gloo on the CPU or
    nccl with one GPU per process from LOCAL_RANK (``device`` "cuda"), destroyed on exit; else one process."""
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    if world_size <= 1:
        yield Processes(device=device)
        return
    cuda = device.startswith("cuda") and torch.cuda.is_available()
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    if cuda:
        local_rank = int(os.environ["LOCAL_RANK"])
        torch.cuda.set_device(local_rank)
        device = f"cuda:{local_rank}"
    try:
        yield Processes(dist.get_rank(), dist.get_world_size(), device)
    finally:
        dist.destroy_process_group()


def refuse_torchrun(command: str) -> None:
    """A ValueError for a command that runs on one process only, when started under torchrun."""
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        raise ValueError(f"ats {command} runs on one process; start it with `ats {command}` (or python -m ats "
                         f"{command}), not torchrun (eval, compare, calibrate and train spread over processes)")
