"""Optimizer surgery after pruning: carry AdamW moments / SGD momentum over to the surviving channels."""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn


def param_names(optimizer: torch.optim.Optimizer, model: nn.Module) -> list[str]:
    """Names of the optimizer's parameters in its state_dict index order (groups concatenated)."""
    name_of = {id(p): n for n, p in model.named_parameters()}
    return [name_of[id(p)] for group in optimizer.param_groups for p in group["params"]]


def _slice(value: object, kept: torch.Tensor | None, new_shape: torch.Size) -> object:
    """One state entry on the surviving elements (per-element tensors only; step counters pass through)."""
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or kept is None:
        return value
    return value.reshape(-1)[kept].reshape(new_shape).clone()


def transfer_state(
    old: torch.optim.Optimizer,
    old_names: list[str],
    new: torch.optim.Optimizer,
    new_model: nn.Module,
    kept: Mapping[str, torch.Tensor],
) -> None:
    """Load `old`'s state into `new` (built on the pruned model), sliced to the kept flat indices of each parameter.

    Parameters of removed blocks are dropped with their state; a renumbered parameter reads the state of its old
    name (``kept.sources``, see apply_pruning). Each new param group takes the hyperparameters (LR, ...) of the old
    group its parameters came from, so per-parameter groups (mmcv paramwise_cfg) survive removals too.
    """
    old_sd = old.state_dict()
    sources = getattr(kept, "sources", {})
    index_of = {n: i for i, n in enumerate(old_names)}
    shapes = dict(new_model.named_parameters())
    new_names = param_names(new, new_model)
    state = {}
    for j, name in enumerate(new_names):
        entry = old_sd["state"].get(index_of.get(sources.get(name, name), -1))  # a new parameter starts fresh
        if entry is not None:
            state[j] = {k: _slice(v, kept.get(name), shapes[name].shape) for k, v in entry.items()}
    group_of = {i: g for g, group in enumerate(old_sd["param_groups"]) for i in group["params"]}
    groups, start = [], 0
    for group in new.param_groups:
        names = new_names[start:start + len(group["params"])]
        origins = {group_of.get(index_of.get(sources.get(n, n), -1)) for n in names} - {None}
        if len(origins) != 1:
            raise ValueError(f"optimizer param group of {names[:3]} came from old groups {sorted(origins)}; build "
                             "both optimizers from the same config")
        groups.append({**old_sd["param_groups"][origins.pop()], "params": list(range(start, start + len(names)))})
        start += len(names)
    new.load_state_dict({"state": state, "param_groups": groups})
