"""Evaluation split over the processes of a DDP run: each process takes every world-th batch, and the
outputs are gathered back in order, so N GPUs score a test set about N times faster.

Only inside `sharded(accelerator)`, which run.py opens around the calls every process makes (the frozen
score, model selection, the test score). Anywhere else (one process, FSDP, whose forward is itself
collective, or a call only the main process makes) evaluation runs whole, as before.
"""
from contextlib import contextmanager
from contextvars import ContextVar

import torch

_SHARD: ContextVar[tuple[int, int]] = ContextVar("reftbench_eval_shard", default=(0, 1))


@contextmanager
def sharded(accelerator):
    from accelerate.utils import DistributedType
    """Yields (this process's index, how many processes share each evaluation)."""
    world = accelerator.num_processes
    if world == 1 or accelerator.distributed_type == DistributedType.FSDP:
        yield _SHARD.get()
        return
    token = _SHARD.set((accelerator.process_index, world))
    try:
        yield _SHARD.get()
    finally:
        _SHARD.reset(token)


def shard() -> tuple[int, int]:
    """(this process's index, the number of processes sharing the evaluation): (0, 1) when unsharded."""
    return _SHARD.get()


def my_batches(n: int, batch_size: int) -> range:
    """The start offsets of the batches of n items this process evaluates: every world-th batch, whole,
    so each is the batch one process would run."""
    rank, world = _SHARD.get()
    return range(rank * batch_size, n, world * batch_size)


def gather(values: dict, keys) -> list:
    """Every process's {key: value} merged, on every process, as a list in the order of `keys`."""
    rank, world = _SHARD.get()
    if world > 1:
        parts = [None] * world
        torch.distributed.all_gather_object(parts, values)
        values = {k: v for part in parts for k, v in part.items()}
    return [values[k] for k in keys]


def from_first(value):
    """The first process's `value`, on every process (so every process takes the same branch)."""
    rank, world = _SHARD.get()
    if world == 1:
        return value
    box = [value if rank == 0 else None]
    torch.distributed.broadcast_object_list(box, src=0)
    return box[0]
