"""Find the common ratio scale that reaches a params or FLOPs reduction target in one shot."""

import gc
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from .counting import ForwardFn, count_flops, trainable_params
from .engine import pruned_copy
from .spec import MAX_RATIO, PruningSpec

TARGET_TOLERANCE = 0.01  # within one point of the requested reduction
MAX_BISECTIONS = 16


def _scaled(spec: PruningSpec, scale: float) -> dict[str, float]:
    """Ratios scale x spec.groups, each capped at MAX_RATIO."""
    return {group: min(scale * ratio, MAX_RATIO) for group, ratio in spec.groups.items()}


def scale_for_target(model: nn.Module, example_inputs: Any, spec: PruningSpec, params_reduction: float | None = None,
                     flops_reduction: float | None = None, *, forward_fn: ForwardFn | None = None,
                     depth: Mapping[str, int] | None = None, heads: Mapping[str, int] | None = None) -> float:
    """Common factor s such that one-shot pruning with ratios s x spec.groups (capped), after the final depth and
    heads removals, removes the requested fraction of trainable params (or FLOPs) within one point; bisection on
    pruned copies, model untouched.

    Raises ValueError if the target is unreachable (reporting the most that can be removed) or falls in a
    rounding gap (reporting the nearest reachable reductions).
    """
    if (params_reduction is None) == (flops_reduction is None):
        raise ValueError("give exactly one of params_reduction / flops_reduction")
    target = params_reduction if params_reduction is not None else flops_reduction
    if not 0.0 < target < 1.0:
        raise ValueError(f"target reduction must be in (0, 1), got {target!r}")
    spec.validate(model)
    if not any(spec.groups.values()):
        raise ValueError("every pruning group has ratio 0: nothing to scale")

    def measure(m: nn.Module) -> int:
        return trainable_params(m) if flops_reduction is None else count_flops(m, example_inputs, forward_fn)

    dense = measure(model)

    def reduction(scale: float) -> float:
        with torch.random.fork_rng(devices=[]):
            pruned, _ = pruned_copy(model, example_inputs, spec, _scaled(spec, scale), None, forward_fn, depth, heads)
        removed = 1.0 - measure(pruned) / dense
        del pruned
        gc.collect()  # the copy's DependencyGraph holds it in reference cycles: free it before the next probe
        return removed

    if depth or heads:
        floor = reduction(0.0)
        if floor > target + TARGET_TOLERANCE:
            raise ValueError(f"the depth and heads targets alone remove {floor:.3f}, more than the {target:.3f} "
                             "target; keep more blocks / heads or raise the target")
    low, high = 0.0, MAX_RATIO / min(r for r in spec.groups.values() if r > 0)
    scale, reached = high, []
    for _ in range(MAX_BISECTIONS):
        reached.append(reduction(scale))
        if abs(reached[-1] - target) <= TARGET_TOLERANCE:
            return scale
        if scale == high and reached[-1] < target:
            raise ValueError(f"a {target:.3f} reduction is unreachable with these groups: at most "
                             f"{reached[-1]:.3f} (every ratio at {MAX_RATIO}); add groups or lower the target")
        low, high = (scale, high) if reached[-1] < target else (low, scale)
        scale = (low + high) / 2
    nearest = sorted(reached, key=lambda r: abs(r - target))[:2]
    raise ValueError(f"no scale reaches a {target:.3f} reduction within {TARGET_TOLERANCE}: channel rounding "
                     f"(round_to={spec.round_to}) jumps over it; nearest reachable: {[round(r, 3) for r in nearest]}")
