"""Changing a model in the middle of distributed training: one decision for all ranks, and DDP + optimizer rebuilt."""
from __future__ import annotations

import gc
from collections.abc import Callable, Mapping
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..compression.optimizer import param_names, transfer_state


def from_rank0(value: Any) -> Any:
    """Rank 0's value on every rank, so a decision is made once and applied everywhere."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def decide_on_rank0(fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 only and give its result to every rank."""
    rank = dist.get_rank() if dist.is_initialized() else 0
    return from_rank0(fn() if rank == 0 else None)


def all_reduce_max(tensor: torch.Tensor) -> None:
    """In-place max over ranks (calibration amax), a no-op in a world of one."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


def rebuild_around(runner: Any, mutate: Callable[[nn.Module], Mapping[str, torch.Tensor]],
                   rewrap: Callable[[nn.Module], nn.Module], new_optimizer: Callable[[nn.Module], Any]) -> nn.Module:
    """Drop the DDP wrapper, change the bare model with `mutate` (returns kept flat indices per changed tensor),
    then wrap it again and move the optimizer state over (LR, moments) onto the surviving elements."""
    model = runner.model.module
    old_optimizer, old_names = runner.optimizer, param_names(runner.optimizer, model)
    runner.model = None
    gc.collect()  # the old DDP reducer must be gone before the new wrapper registers its hooks
    kept = mutate(model)
    runner.model = rewrap(model)
    runner.optimizer = new_optimizer(runner.model)
    transfer_state(old_optimizer, old_names, runner.optimizer, model, kept)
    runner.gradient_check_pending = True  # GradientSyncHook verifies the next step's all-reduce
    return model
