"""The training data stream: a prefetched batch is the batch the loop would have taken, and
the position a checkpoint records counts only batches taken."""

from __future__ import annotations

from dataclasses import replace

import torch

from softprompt.training.loop import TrainState
from softprompt.training.order import BatchStream, epoch_batches
from softprompt.transfer import tensor_on, to_device

EXAMPLES = [{"text": "x" * (n % 37), "id": n} for n in range(23)]


def ids(examples):
    return [e["id"] for e in examples]


def stream(state, rank=0, world=1, calls=None):
    def collate(examples):
        if calls is not None:
            calls.append(ids(examples))
        return ids(examples)
    return BatchStream(EXAMPLES, 4, seed=3, bucket=True, state=state, collate=collate, rank=rank, world=world)


def test_prefetching_takes_the_same_batches_across_epochs():
    expected = [ids([EXAMPLES[i] for i in b]) for epoch in range(3) for b in epoch_batches(EXAMPLES, 4, epoch, 3, True)]
    plain = stream(TrainState(epoch=0, batch_in_epoch=0))
    ahead = stream(TrainState(epoch=0, batch_in_epoch=0))
    taken_plain, taken_ahead = [], []
    for i in range(len(expected)):
        taken_plain.append(plain.take())
        if i % 2:
            ahead.prefetch()
            ahead.prefetch()  # twice: still one batch ahead
        taken_ahead.append(ahead.take())
    assert taken_plain == taken_ahead == expected
    assert plain.state == ahead.state == TrainState(epoch=2, batch_in_epoch=6)  # 6 batches of 4 per epoch of 23


def test_position_counts_batches_taken_not_prefetched():
    state = TrainState(epoch=0, batch_in_epoch=5)
    calls = []
    s = stream(state, calls=calls)
    s.take()  # the epoch's last batch (6 per epoch)
    assert state == TrainState(epoch=0, batch_in_epoch=6)
    s.prefetch()  # the next epoch's first, built now ...
    assert state == TrainState(epoch=0, batch_in_epoch=6) and len(calls) == 2
    # ... and a run resumed from this state takes exactly that batch
    resumed = stream(replace(state)).take()
    assert s.take() == resumed and len(calls) == 2
    assert state == TrainState(epoch=1, batch_in_epoch=1)


def test_processes_share_each_global_batch():
    for position in range(6):  # one of them is the epoch's short batch (23 = 5 x 4 + 3)
        state = TrainState(epoch=0, batch_in_epoch=position)
        shares = [stream(replace(state), rank=r, world=2).take() for r in range(2)]
        whole = stream(replace(state)).take()
        assert shares[0] + shares[1] == whole and abs(len(shares[0]) - len(shares[1])) <= 1


def test_host_copies_keep_values():
    t = torch.arange(6).reshape(2, 3)
    assert torch.equal(to_device(t, "cpu"), t)
    on = tensor_on([[1, 2], [3, 4]], torch.device("cpu"))
    assert on.dtype == torch.long and on.tolist() == [[1, 2], [3, 4]]
