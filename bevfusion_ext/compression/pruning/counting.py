"""Model size measures shared by planning, target search and reports: params, FLOPs, channels per group."""

import copy
import inspect
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.dropout import _DropoutNd
from torch.utils.flop_counter import FlopCounterMode

from .protection import auto_protected, protected_modules
from .pruners import block_pruners
from .spec import PruningSpec, owner

ForwardFn = Callable[[nn.Module, Any], Any]


def _accepts_return_loss(model: nn.Module) -> bool:
    """Whether forward follows mmdet's ``return_loss`` contract."""
    return "return_loss" in inspect.signature(model.forward).parameters


@contextmanager
def loss_mode(model: nn.Module) -> Iterator[None]:
    """Training control flow with deterministic layers (BN on running statistics, no dropout or drop-path), for
    models that return losses only when `training` is set, as BEVFusion's own fusion model and heads do."""
    with preserved_modes(model):
        model.train()
        for module in model.modules():
            if isinstance(module, (_BatchNorm, _DropoutNd)) or hasattr(module, "drop_prob"):
                module.eval()
        yield


def call_model(model: nn.Module, inputs: Any, return_loss: bool) -> Any:
    """Run model on example inputs: mmdet models with return_loss (or, without it, BEVFusion's: losses in loss_mode,
    results in eval mode), else dict -> kwargs, sequence -> args.

    The model gets a copy: BEVFusion's LSS transform shifts the caller's points in place (``cur_coords =
    points[b][:, :3]; cur_coords -= ...``), and plan / apply / the target search reuse one example batch for many
    forwards, which would drift the point cloud out of the voxel grid.
    """
    inputs = copy.deepcopy(inputs)
    if isinstance(inputs, Mapping):
        if _accepts_return_loss(model):
            return model(return_loss=return_loss, **inputs)
        if hasattr(model, "train_step"):
            with loss_mode(model) if return_loss else preserved_modes(model):
                return model(**inputs) if return_loss else model.eval()(**inputs)
        return model(**inputs)
    if isinstance(inputs, (list, tuple)):
        return model(*inputs)
    return model(inputs)


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every module's train/eval flag afterwards (tracing switches the whole model to eval)."""
    modes = [(module, module.training) for module in model.modules()]
    try:
        yield
    finally:
        for module, training in modes:
            module.training = training


def trainable_params(model: nn.Module) -> int:
    """Number of parameters that train (frozen LSS geometry Parameters excluded)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def count_flops(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None) -> int:
    """FLOPs (2 x MACs of conv / matmul / attention ops, torch.utils.flop_counter) of one inference forward."""
    with preserved_modes(model), torch.no_grad(), FlopCounterMode(display=False) as counter:
        model.eval()
        if forward_fn is None:
            call_model(model, example_inputs, return_loss=False)
        else:
            forward_fn(model, example_inputs)
    return int(counter.get_total_flops())


def count_params_flops(model: nn.Module, example_inputs: Any, forward_fn: ForwardFn | None = None) -> tuple[int, int]:
    """(trainable params, FLOPs of one eval-mode inference forward); FLOPs = 2 x MACs, as torch counts them."""
    return trainable_params(model), count_flops(model, example_inputs, forward_fn)


def channel_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module, int]]:
    """(name, module, out channels) of every layer that owns prunable output channels.

    Conv and Linear layers, except those inside a recognised block (attention, patch merging), which counts once
    by its output projection: the same units the planner prunes.
    """
    pruners = block_pruners(model)
    inside_block: set[int] = set()
    for name, module in model.named_modules():
        if id(module) in inside_block:
            continue
        pruner = pruners.get(type(module))
        if pruner is not None:
            inside_block.update(id(sub) for sub in module.modules())
            yield name, module, pruner.get_out_channels(module)
        elif isinstance(module, nn.modules.conv._ConvNd):
            yield name, module, module.out_channels
        elif isinstance(module, nn.Linear):
            yield name, module, module.out_features


def group_channels(model: nn.Module, spec: PruningSpec) -> dict[str, int]:
    """Per group prefix: total out channels of its unprotected channel layers (see channel_layers)."""
    protected = {id(m) for m in protected_modules(model, [*auto_protected(model), *spec.protected])}
    totals = dict.fromkeys(spec.groups, 0)
    for name, module, channels in channel_layers(model):
        group = owner(name, spec.groups)
        if group is not None and id(module) not in protected:
            totals[group] += channels
    return totals
