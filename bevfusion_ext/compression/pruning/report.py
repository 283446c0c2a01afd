"""JSON-safe before/after reports of a pruning event, for logs and run metadata."""

from collections.abc import Mapping
from typing import Any

from torch import nn

from .counting import ForwardFn, count_params_flops, group_channels
from .spec import PruningSpec


def model_summary(model: nn.Module, example_inputs: Any, spec: PruningSpec,
                  forward_fn: ForwardFn | None = None) -> dict:
    """Params, FLOPs, channels per group and state-dict shapes: take it before apply_pruning to report after."""
    params, flops = count_params_flops(model, example_inputs, forward_fn)
    return {"params": params, "flops": flops, "channels": group_channels(model, spec),
            "shapes": {name: list(t.shape) for name, t in model.state_dict().items()}}


def _change(before: int, after: int) -> dict:
    """before / after / fraction removed."""
    return {"before": before, "after": after, "removed": round(1.0 - after / before, 4) if before else 0.0}


def prune_report(before: nn.Module | Mapping, after: nn.Module, example_inputs: Any, spec: PruningSpec,
                 forward_fn: ForwardFn | None = None) -> dict:
    """Params, FLOPs (2 x MACs) and per-group channels before/after, and every layer and tensor that changed.

    before is the unpruned model or its model_summary (apply_pruning works in place, so summarise first).
    """
    old = before if isinstance(before, Mapping) else model_summary(before, example_inputs, spec, forward_fn)
    new = model_summary(after, example_inputs, spec, forward_fn)
    tensors = {name: [shape, new["shapes"].get(name)] for name, shape in old["shapes"].items()
               if new["shapes"].get(name) != shape}
    return {
        "params": _change(old["params"], new["params"]),
        "flops": _change(old["flops"], new["flops"]),
        "groups": {group: _change(old["channels"].get(group, 0), channels)
                   for group, channels in new["channels"].items()},
        "layers": sorted({name.rpartition(".")[0] for name in tensors}),
        "tensors": tensors,
    }
