"""Where a model's parameters, FLOPs and time go, per module: what to prune first and what it buys."""
from __future__ import annotations

import statistics
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from .pruning.counting import trainable_params

ForwardFn = Callable[[nn.Module, Any], Any]


def eval_forward(model: nn.Module, batch: Any) -> Any:
    """mmdet-style inference call on a collated batch."""
    return model(return_loss=False, **batch)


def _rollup(model: nn.Module, measured: dict[str, float], depth: int) -> dict[str, float]:
    """Per module up to `depth`: its own measurement if it was called, else the sum of its children's (containers)."""
    children: dict[str, list[str]] = defaultdict(list)
    for name, _ in model.named_modules():
        if name:
            children[name.rpartition(".")[0]].append(name)

    def value(name: str) -> float:
        return measured[name] if name in measured else sum(value(c) for c in children[name])

    return {n: value(n) for n, _ in model.named_modules() if n and n.count(".") < depth}


def module_complexity(
    model: nn.Module, batch: Any, depth: int = 3, forward_fn: ForwardFn = eval_forward
) -> list[dict[str, Any]]:
    """Trainable params and FLOPs (torch's FlopCounterMode: 2 per multiply-add) per module path up to `depth`."""
    with FlopCounterMode(display=False, depth=64) as counter, torch.no_grad():
        forward_fn(model.eval(), batch)
    root = type(model).__name__
    counts = {k.removeprefix(root + "."): sum(v.values()) for k, v in counter.get_flop_counts().items()}
    flops = _rollup(model, counts, depth)
    rows = [{"module": "(total)", "depth": 0, "params": trainable_params(model), "flops": int(counts.get("Global", 0))}]
    for name, module in model.named_modules():
        if name in flops:
            rows.append({"module": name, "depth": name.count(".") + 1, "params": trainable_params(module),
                         "flops": int(flops[name])})
    return rows


def module_latency(
    model: nn.Module,
    batch: Any,
    depth: int = 2,
    repeats: int = 5,
    warmup: int = 1,
    forward_fn: ForwardFn = eval_forward,
) -> list[dict[str, Any]]:
    """Mean wall time per forward of every module up to `depth` (forward hooks; total is the median of `repeats`)."""
    model.eval()
    starts: dict[str, float] = {}
    samples: dict[str, list[float]] = defaultdict(list)
    handles = []
    for name, module in model.named_modules():
        if name:
            start = module.register_forward_pre_hook(lambda m, a, n=name: starts.update({n: time.perf_counter()}))
            stop = module.register_forward_hook(
                lambda m, a, o, n=name: samples[n].append(time.perf_counter() - starts[n])
            )
            handles += [start, stop]
    totals = []
    try:
        with torch.no_grad():
            for _ in range(warmup):
                forward_fn(model, batch)
            samples.clear()
            for _ in range(repeats):
                tic = time.perf_counter()
                forward_fn(model, batch)
                totals.append(time.perf_counter() - tic)
    finally:
        for handle in handles:
            handle.remove()
    per_forward = {n: 1000 * sum(t) / repeats for n, t in samples.items()}
    rows = [{"module": n, "depth": n.count(".") + 1, "ms": ms} for n, ms in _rollup(model, per_forward, depth).items()]
    return [{"module": "(total)", "depth": 0, "ms": 1000 * statistics.median(totals)}, *rows]
