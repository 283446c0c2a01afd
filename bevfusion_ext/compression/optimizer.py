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
    """Load `old`'s state into `new` (built on the pruned model), sliced to the kept flat indices of each parameter."""
    old_sd, new_sd = old.state_dict(), new.state_dict()
    index_of = {n: i for i, n in enumerate(old_names)}
    shapes = dict(new_model.named_parameters())
    state = {}
    for j, name in enumerate(param_names(new, new_model)):
        entry = old_sd["state"].get(index_of.get(name, -1))  # a new parameter (e.g. a folded conv bias) starts fresh
        if entry is not None:
            state[j] = {k: _slice(v, kept.get(name), shapes[name].shape) for k, v in entry.items()}
    if len(old_sd["param_groups"]) != len(new_sd["param_groups"]):
        raise ValueError("optimizer param groups changed across pruning; build both optimizers from the same config")
    groups = [
        {**g_old, "params": g_new["params"]}
        for g_old, g_new in zip(old_sd["param_groups"], new_sd["param_groups"], strict=True)
    ]
    new.load_state_dict({"state": state, "param_groups": groups})
