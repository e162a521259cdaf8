"""all_gather across ranks: with gradient for the loss, padded for variable-size evaluation shards, and
summed counters.

Identity (offset 0) when torch.distributed is not initialized, so single-process runs use the same code.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_nn


def rank_and_world() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather_with_grad(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Concatenate ``x`` from all ranks (rank order); gradients flow back to the rank that owns each row.

    Returns the gathered tensor and this rank's row offset into it. Every rank must pass the same shape.
    """
    rank, world = rank_and_world()
    if world == 1:
        return x, 0
    # the backward of this all_gather sums the incoming gradients over ranks (reduce-scatter), which is
    # what makes DDP's gradient average equal the single-process gradient of the global batch
    return torch.cat(dist_nn.all_gather(x.contiguous()), dim=0), rank * x.shape[0]


@torch.no_grad()
def gather_variable(x: torch.Tensor) -> torch.Tensor:
    """Concatenate tensors whose first dimension differs across ranks (evaluation shards); no gradient.

    A rank may hold nothing (fewer shards than ranks) and then cannot know the others' trailing shape or
    dtype: its ``x`` may be any empty tensor, and takes them from a rank that has rows.
    """
    _, world = rank_and_world()
    if world == 1:
        return x
    shapes: list = [None] * world
    dist.all_gather_object(shapes, (tuple(x.shape), x.dtype))
    holders = [(shape, dtype) for shape, dtype in shapes if shape[0] > 0]
    if not holders:
        return x
    trailing, dtype = holders[0][0][1:], holders[0][1]
    if x.shape[0] == 0:
        x = torch.empty((0, *trailing), dtype=dtype, device=x.device)
    sizes = [shape[0] for shape, _ in shapes]
    longest = max(sizes)
    padded = x.new_zeros((longest, *trailing))
    padded[: x.shape[0]] = x
    chunks = [torch.zeros_like(padded) for _ in range(world)]
    dist.all_gather(chunks, padded)
    return torch.cat([c[:size] for c, size in zip(chunks, sizes, strict=True)], dim=0)


def sum_counts(counts: dict[str, int]) -> dict[str, int]:
    """Adds up per-rank counters (each rank may hold other keys); every rank gets the totals."""
    totals: dict[str, int] = {}
    for part in gather_objects(dict(counts)):
        for key, value in part.items():
            totals[key] = totals.get(key, 0) + value
    return totals


def any_rank(flags: list[bool], device: torch.device | str = "cpu") -> list[bool]:
    """Per flag: whether any rank raised it. One small all-reduce, so every rank must call it at the same
    point of its step; ranks then act on the same answer (stop, skip, checkpoint) and none is left waiting."""
    _, world = rank_and_world()
    if world == 1:
        return list(flags)
    raised = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(raised, op=dist.ReduceOp.MAX)
    return [bool(v) for v in raised.tolist()]


def gather_objects(obj) -> list:
    """``obj`` from every rank, in rank order (a pickling collective: small objects, every rank calls)."""
    _, world = rank_and_world()
    if world == 1:
        return [obj]
    gathered: list = [None] * world
    dist.all_gather_object(gathered, obj)
    return gathered
