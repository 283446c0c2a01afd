"""Sparsity-regularised training: a penalty on the prunable channel groups, added to the training loss until the
last pruning event, pushes the channels an event would remove toward zero first (Network Slimming).

- ``bn_scale``: the L1 norm of the BatchNorm / LayerNorm scales of every prunable group (Liu et al. 2017;
  Torch-Pruning's ``BNScalePruner.regularize``): gradient ``strength * sign(gamma)``.
- ``group_norm``: group lasso, the sum over a group's channels of the L2 norm of every weight that channel owns (conv /
  linear rows and columns, norm scales and biases; Torch-Pruning's ``GroupNormPruner`` without its adaptive alpha).

The groups are the planner's own (``engine._candidates`` on our traced graph): unprotected channels of the spec's
groups that an event can remove (more channels than their rounding multiple). Torch-Pruning's ``regularize()`` seam
writes into ``.grad`` between backward and the optimizer step, which mmcv's OptimizerHook runs in one call, and its
pruners build their own DependencyGraph with Torch-Pruning's default tracing (which mis-groups BEVFusion's LSS
concat, see docs/pruning.md); so the same penalties are a differentiable loss term over our graph's groups. Weights
inside our opaque blocks (attention, patch merging) are left out, as the planner's importance leaves them out.
"""

from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import Any

import torch
import torch_pruning as tp
from torch import Tensor, nn

from .counting import ForwardFn
from .engine import _candidates
from .spec import PruningSpec
from .tracing import build_graph

KINDS = ("bn_scale", "group_norm")
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm)
_EPS = 1e-12  # keeps the group-lasso gradient finite at an all-zero channel


@dataclass(frozen=True)
class _Slice:
    """Positions `idxs` along `dim` of `param` belong to group channels `channels`."""

    param: nn.Parameter
    dim: int
    idxs: Tensor
    channels: Tensor


def _layer_slices(layer: nn.Module, is_out: bool) -> Iterator[tuple[nn.Parameter, int]]:
    """(parameter, channel dim) of a traced layer's out (or in) channels; grouped convs' inputs are left out."""
    if isinstance(layer, _NORMS):
        yield from ((p, 0) for p in (layer.weight, layer.bias) if is_out and p is not None)
    elif isinstance(layer, (nn.modules.conv._ConvNd, nn.Linear)):
        transposed = getattr(layer, "transposed", False)
        if is_out:
            yield layer.weight, 1 if transposed else 0
            if layer.bias is not None:
                yield layer.bias, 0
        elif getattr(layer, "groups", 1) == 1:
            yield layer.weight, 0 if transposed else 1


def _group_slices(graph: tp.DependencyGraph, group: tp.Group, kind: str) -> list[_Slice]:
    """The parameter slices of a Torch-Pruning group the penalty of `kind` reads (bn_scale: norm scales only)."""
    found = []
    for item in group.items:
        layer, is_out = item.dep.target.module, graph.is_out_channel_pruning_fn(item.dep.handler)
        if kind == "bn_scale":
            pairs = [(layer.weight, 0)] if is_out and isinstance(layer, _NORMS) and layer.weight is not None else []
        else:
            pairs = list(_layer_slices(layer, is_out))
        found += [_Slice(param, dim, torch.as_tensor(item.idxs, device=param.device),
                         torch.as_tensor(item.root_idxs, device=param.device))
                  for param, dim in pairs if param.requires_grad]
    return found


class SparsityPenalty:
    """The penalty of one kind over a model's prunable groups; build it again after every pruning event."""

    def __init__(self, model: nn.Module, example_inputs: Any, spec: PruningSpec, kind: str, strength: float,
                 forward_fn: ForwardFn | None = None) -> None:
        if kind not in KINDS or strength <= 0:
            raise ValueError(f"sparsity needs kind in {KINDS} and strength > 0, got {kind!r}, {strength!r}")
        self.kind, self.strength = kind, strength
        with torch.random.fork_rng(devices=[]):
            graph = build_graph(model, example_inputs, forward_fn)
        ratios = {g: 1.0 for g, r in spec.groups.items() if r > 0}  # every group the recipe prunes
        candidates = _candidates(model, graph, replace(spec, importance="magnitude"), ratios)
        self.groups = [(cand.channels, _group_slices(graph, cand.group, kind)) for cand in candidates
                       if cand.channels > cand.multiple]  # rounding leaves a group of <= round_to channels whole

    def __call__(self) -> Tensor:
        """The penalty (a scalar that carries gradient to every regularised weight)."""
        terms = [self._group_term(channels, slices) for channels, slices in self.groups if slices]
        return self.strength * torch.stack(terms).sum() if terms else torch.zeros(())

    def _group_term(self, channels: int, slices: list[_Slice]) -> Tensor:
        if self.kind == "bn_scale":
            return torch.stack([s.param.index_select(0, s.idxs).abs().sum() for s in slices]).sum()
        squares = slices[0].param.new_zeros(channels)
        for s in slices:
            values = s.param.index_select(s.dim, s.idxs).movedim(s.dim, 0).reshape(len(s.idxs), -1)
            squares = squares.index_add(0, s.channels, values.pow(2).sum(1))
        return (squares + _EPS).sqrt().sum()
