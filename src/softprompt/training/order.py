"""The order of the training data: seeded epochs of (optionally length-bucketed) batches, and
the stream the loop takes them from, one micro-batch collated ahead.

The order is a pure function of (seed, epoch), and the loop's position in it is two
integers (epoch, batch in epoch) stored in every checkpoint: a resumed run sees exactly the
batches the uninterrupted one would have.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch


def example_length(example: dict[str, Any]) -> int:
    """A cheap proxy of an example's token count: characters of its text fields."""
    total = 0
    for value in example.values():
        if isinstance(value, str):
            total += len(value)
        elif isinstance(value, list):
            total += sum(len(str(v)) + 1 for v in value)
    return total


def epoch_batches(examples: Sequence[dict], batch_size: int, epoch: int, seed: int, bucket: bool) -> list[list[int]]:
    """The batches (lists of example indices) of one epoch, a pure function of its arguments.

    With `bucket`, each window of 50 batches is sorted by length before it is cut, and the
    batches are shuffled again, so batches hold similar lengths in a random order.
    """
    generator = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
    order = torch.randperm(len(examples), generator=generator).tolist()
    if not bucket:
        return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    window = batch_size * 50
    batches = []
    for start in range(0, len(order), window):
        chunk = sorted(order[start : start + window], key=lambda i: example_length(examples[i]))
        batches += [chunk[i : i + batch_size] for i in range(0, len(chunk), batch_size)]
    shuffle = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in shuffle]


class BatchStream:
    """This process's micro-batches, in the run's order, collated one ahead on request.

    `prefetch` builds the next micro-batch (tokenization, tensors, the asynchronous copy to
    the device) while the device still runs the current step: the loop calls it after
    queueing the backward and before it waits for the step's loss, so the host work of the
    next step overlaps the device work of this one instead of following it.

    The position (``state.epoch``, ``state.batch_in_epoch``) counts only batches
    *taken*, so a checkpoint written while a batch is prefetched still resumes at that batch.

    Args:
        examples: the training examples.
        batch_size / seed / bucket: as in `epoch_batches` (batch_size over all processes).
        state: the loop's `TrainState` (any object with ``epoch`` and ``batch_in_epoch``);
            both are read and advanced.
        collate: examples -> (batch, targets) on the model's device.
        rank / world: this process's share of each global batch.
    """

    def __init__(self, examples: Sequence[dict], batch_size: int, seed: int, bucket: bool, state: Any,
                 collate: Callable[[list[dict]], tuple[Any, Any]], rank: int = 0, world: int = 1):
        self.examples, self.batch_size, self.seed, self.bucket = examples, batch_size, seed, bucket
        self.state, self.collate, self.rank, self.world = state, collate, rank, world
        self._epoch = -1
        self._order: list[list[int]] = []
        self._ahead: tuple[tuple[int, int], Any] | None = None  # (position after it, collated micro-batch)

    def _batches(self, epoch: int) -> list[list[int]]:
        if epoch != self._epoch:
            self._order, self._epoch = epoch_batches(self.examples, self.batch_size, epoch, self.seed, self.bucket), epoch
        return self._order

    def _next(self) -> tuple[tuple[int, int], Any]:
        epoch, index = self.state.epoch, self.state.batch_in_epoch
        if index >= len(self._batches(epoch)):
            epoch, index = epoch + 1, 0
        indices = self._batches(epoch)[index]
        share = indices[self.rank * len(indices) // self.world : (self.rank + 1) * len(indices) // self.world]
        return (epoch, index + 1), self.collate([self.examples[i] for i in share])

    def prefetch(self) -> None:
        """Collate the next micro-batch now (once); `take` returns it."""
        if self._ahead is None:
            self._ahead = self._next()

    def take(self) -> tuple[Any, Any]:
        """The next micro-batch (batch, targets); advances the position."""
        (epoch, index), collated = self._ahead if self._ahead is not None else self._next()
        self._ahead = None
        self.state.epoch, self.state.batch_in_epoch = epoch, index
        return collated


__all__ = ["BatchStream", "epoch_batches", "example_length"]
