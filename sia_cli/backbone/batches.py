"""Where `sia train-gan` draws its batches: a DataLoader (drawn ahead in a thread on CUDA), images
decoded once into memory, or faces with their true counterfactuals (sia_cli.backbone.counterfactuals)."""

from __future__ import annotations

import itertools
import queue
import threading

import torch
from torch.utils.data import DataLoader, DistributedSampler

from sia_cli.backbone.counterfactuals import (
    one_attribute_edits,
)
from sia_cli.inputs.images import LabelledImages
from sia_cli.runs.distributed import World


def loader_batches(dataset: LabelledImages, batch_size: int, workers: int, world: World, seed: int,
                    device: torch.device = torch.device("cpu")):
    """Shuffled batches, each rank drawing from its own share of every epoch. The shuffle draws
    from its own seeded generator, never the global one, so drawing in another thread
    (`Prefetched`) changes neither the batches nor the training's random numbers."""
    generator = torch.Generator().manual_seed(seed)
    sampler = None
    if world.size > 1:
        sampler = DistributedSampler(dataset, world.size, world.rank, shuffle=True, seed=seed, drop_last=True)
    loader = DataLoader(
        dataset, batch_size=batch_size, shuffle=sampler is None, sampler=sampler, drop_last=True,
        num_workers=workers, generator=generator, persistent_workers=workers > 0,
        pin_memory=device.type == "cuda",  # page-locked, so the copy to the GPU (non_blocking) overlaps the step
    )
    for epoch in itertools.count():
        if sampler is not None:
            sampler.set_epoch(epoch)
        yield from loader


def draws_ahead(device: torch.device) -> bool:
    """Whether the DataLoader's batches are drawn in a thread (`Prefetched`). On CUDA the host
    is idle while the GPU runs a step, and decoding between steps would leave the GPU idle in
    turn. On a CPU the step already uses every core: there the thread only took cores from it
    (bench/RESULTS.md: 0.79 of the floor with it, 1.02 without, --workers 0 on 2 cores)."""
    return device.type == "cuda"


class Prefetched:
    """A batch source drawn one batch ahead in a thread, so decoding the next batch overlaps the
    step that runs. Batches come out in the source's order, so seeded runs are unchanged. An
    error in the source (an image that no longer decodes) is raised by the `next` that would
    have returned its batch."""

    DEPTH = 2  # batches held ready: a step draws up to one per critic step, back to back

    def __init__(self, source, device: torch.device = torch.device("cpu")):
        self._ready: queue.Queue = queue.Queue(maxsize=self.DEPTH)
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._fill, args=(source, device), name="sia-prefetch", daemon=True)
        self._thread.start()

    def _fill(self, source, device: torch.device) -> None:
        try:
            if device.type == "cuda" and device.index is not None:
                # Pinning memory in this thread would otherwise open a context on GPU 0 for every rank.
                torch.cuda.set_device(device)
            for batch in source:
                if not self._hand_over(("batch", batch)):
                    return
            self._hand_over(("end", None))
        except BaseException as exc:  # raised in the training thread instead
            self._hand_over(("error", exc))
        finally:
            if hasattr(source, "close"):
                source.close()  # a DataLoader's worker processes end with the run, not at exit

    def _hand_over(self, item) -> bool:
        while not self._closed.is_set():
            try:
                self._ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def __iter__(self) -> "Prefetched":
        return self

    def __next__(self):
        tag, value = self._ready.get()
        if tag == "error":
            raise value
        if tag == "end":
            raise StopIteration
        return value

    def close(self) -> None:
        self._closed.set()
        self._thread.join(timeout=10)


def pair_batches(dataset: LabelledImages, pairs: torch.Tensor, batch_size: int, device: torch.device,
                  world: World, seed: int):
    """Shuffled batches from memory, each face with one of its one-attribute edits drawn at
    random and that edit's true counterfactual: (images, attributes, edited attributes, truth,
    the attribute each row edits), images in [0, 1]. Every rank draws the same permutation and
    takes its own stride of it."""
    names = list(dataset.table.names)
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).mul_(255).round_().to(torch.uint8).to(device)
    attrs = torch.stack([dataset[i][1] for i in range(len(dataset))]).float().to(device)
    pairs = pairs.to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    while True:
        order = torch.randperm(len(dataset), generator=generator, device=device)[world.rank::world.size]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            ks = torch.randint(len(names), (len(index),), generator=generator, device=device)
            a = attrs[index]
            yield (images[index].float().div_(255), a, one_attribute_edits(a, ks, names),
                   pairs[index, ks].float().div_(255), ks)


def memory_batches(dataset: LabelledImages, batch_size: int, device: torch.device, world: World, seed: int):
    """Shuffled batches from images decoded once: for small data sets the decoding dominates.
    Every rank draws the same permutation and takes its own stride of it."""
    images = torch.stack([dataset[i][0] for i in range(len(dataset))]).mul_(255).round_().to(torch.uint8).to(device)
    attrs = torch.stack([dataset[i][1] for i in range(len(dataset))]).to(device)
    generator = torch.Generator(device=device).manual_seed(seed)
    while True:
        order = torch.randperm(len(dataset), generator=generator, device=device)[world.rank::world.size]
        for start in range(0, len(order) - batch_size + 1, batch_size):
            index = order[start : start + batch_size]
            yield images[index].float().div_(255), attrs[index]


def draw(batches, device) -> tuple:
    """A batch in [-1, 1], its attributes, and target attributes: shuffled across the batch, or
    with counterfactuals the one-attribute edits and their true images (in [-1, 1])."""
    images, attrs, *pairs = next(batches)
    images = images.to(device, non_blocking=True) * 2 - 1
    attrs = attrs.to(device, non_blocking=True)
    if pairs:
        target, truth, edited = pairs
        return images, attrs, target, truth * 2 - 1, edited
    target = attrs[torch.randperm(attrs.size(0), device=device)]
    return images, attrs, target


