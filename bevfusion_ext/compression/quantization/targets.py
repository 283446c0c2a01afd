"""Which modules get quantizers: configured layer types and known attention modules, minus the excluded names."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .attention import attention_forward
from .spec import QuantSpec

LAYER, ATTENTION = "layer", "attention"


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside (Distributed)DataParallel wrappers (mmcv's MMDistributedDataParallel included)."""
    while isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
        model = model.module
    return model


def model_device(model: nn.Module) -> torch.device:
    """Where the model's parameters (and so its amax tensors) live."""
    return next((p.device for p in model.parameters()), torch.device("cpu"))


@contextmanager
def eval_mode(model: nn.Module) -> Iterator[None]:
    """Eval mode inside, then every sub-module's own train/eval flag back (frozen BNs stay frozen)."""
    flags = [(module, module.training) for module in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for module, training in flags:
            module.training = training


def join(prefix: str, name: str) -> str:
    """Dotted module path of `name` under `prefix` ('' is the root)."""
    return f"{prefix}.{name}" if prefix else name


def is_excluded(name: str, patterns: list[str]) -> bool:
    """A module is excluded when a pattern matches its name or the name of one of its ancestors."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]
    return any(fnmatch.fnmatchcase(prefix, pattern) for prefix in prefixes for pattern in patterns)


def target_kind(module: nn.Module, spec: QuantSpec) -> str | None:
    """LAYER for an exact configured layer type, ATTENTION for a known attention class when asked, else None."""
    if type(module) in {getattr(nn, name) for name in spec.layers}:
        return LAYER
    if spec.attention_matmuls and attention_forward(type(module)) is not None:
        return ATTENTION
    return None


def find_targets(model: nn.Module, spec: QuantSpec) -> dict[str, str]:
    """{module name: kind} of every module to quantize; an exclude pattern that matches nothing is an error."""
    names = [name for name, _ in model.named_modules()]
    unused = [p for p in spec.exclude if not any(is_excluded(name, [p]) for name in names)]
    if unused:
        raise ValueError(f"QuantSpec.exclude patterns {unused} match no module of the model; "
                         f"module names look like {names[1:4]}")
    targets = {name: target_kind(module, spec) for name, module in model.named_modules()}
    return {name: kind for name, kind in targets.items() if kind is not None and not is_excluded(name, spec.exclude)}


def check_targets(model: nn.Module, targets: dict[str, str], spec: QuantSpec) -> None:
    """Fail with the first few mismatches when a saved quantizer layout does not fit the model being restored."""
    modules = dict(model.named_modules())
    problems = [f"{name}: missing from the model" if name not in modules
                else f"{name}: {type(modules[name]).__name__} cannot take the saved {kind} quantizers"
                for name, kind in targets.items()
                if name not in modules or target_kind(modules[name], spec) != kind]
    if problems:
        raise ValueError(f"the quantizer state does not fit this model ({len(problems)} problems): {problems[:5]}; "
                         "build the same (pruned, BN-unfolded) float architecture the state was saved from")
