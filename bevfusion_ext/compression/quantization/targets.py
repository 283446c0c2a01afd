"""Which modules get quantizers, and a per-type report of what was quantized and what was skipped and why.

Targets are configured layer types (subclasses included: mmcv's Linear / ConvTranspose2d wrappers), BEVFusion's
sparse convolutions, known attention modules (attention_matmuls) and known residual blocks (residual_adds), minus the
excluded names. Every module of those families that is not a target is reported with its reason; an attention-like
module whose matmuls the option cannot reach is also a warning.
"""

from __future__ import annotations

import fnmatch
import warnings
from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn

from .attention import ATTENTION_FORWARDS, attention_like
from .forwards import ATTENTION, ROUTE, QuantForward, class_key
from .residual import RESIDUAL_FORWARDS
from .sparse import layout_problem, sparse_conv_type
from .spec import LAYER_TYPES, SPARSE_LAYER_TYPES, TORCH_LAYER_TYPES, QuantSpec

LAYER, SPARSE_CONV = "layer", "sparse_conv"  # kinds besides ATTENTION / ROUTE / RESIDUAL (forwards.py)
FORWARDS: dict[str, QuantForward] = {**ATTENTION_FORWARDS, **RESIDUAL_FORWARDS}
TORCH_LAYERS = {getattr(nn, name): name for name in TORCH_LAYER_TYPES}
Report = dict[str, dict]


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


def excluding_pattern(name: str, patterns: list[str]) -> str | None:
    """The first pattern matching the module's name or an ancestor's (a pattern also excludes the children)."""
    parts = name.split(".")
    prefixes = [".".join(parts[:i]) for i in range(1, len(parts) + 1)] if name else [""]
    return next((p for p in patterns if any(fnmatch.fnmatchcase(prefix, p) for prefix in prefixes)), None)


def layer_type(cls: type) -> str | None:
    """The layer type a module class is (subclasses included; sparse convs by their spconv class), else None."""
    return sparse_conv_type(cls) or next((TORCH_LAYERS[base] for base in cls.__mro__ if base in TORCH_LAYERS), None)


def quant_forward(cls: type) -> QuantForward | None:
    """The quantized methods for exactly this class (a subclass may change the math), else None."""
    return FORWARDS.get(class_key(cls))


class _Planner:
    """Walks a float model once per family, collecting targets and the report (`{type: entry}`)."""

    def __init__(self, spec: QuantSpec) -> None:
        self.spec = spec
        self.targets: dict[str, str] = {}
        self.report: Report = {}
        self.unreached: dict[str, list[str]] = {}  # attention class -> modules attention_matmuls cannot reach

    def _entry(self, module: nn.Module, kind: str) -> dict:
        return self.report.setdefault(class_key(type(module)), {"kind": kind, "quantized": 0, "skipped": {}})

    def _take(self, name: str, module: nn.Module, kind: str) -> None:
        self.targets[name] = kind
        self._entry(module, kind)["quantized"] += 1

    def _skip(self, name: str, module: nn.Module, kind: str, reason: str) -> None:
        self._entry(module, kind)["skipped"].setdefault(reason, []).append(name)

    def layer(self, name: str, module: nn.Module) -> None:
        """A configured layer type (or subclass) becomes a LAYER / SPARSE_CONV target unless a reason says no."""
        layer = layer_type(type(module))
        if layer is None:
            return
        kind = LAYER if layer in TORCH_LAYER_TYPES else SPARSE_CONV
        pattern = excluding_pattern(name, self.spec.exclude)
        if layer not in LAYER_TYPES:
            reason = f"{layer} has no INT8 support (sparse convs: {list(SPARSE_LAYER_TYPES)})"
        elif layer not in self.spec.layers:
            reason = f"type not configured (add {layer!r} to QuantSpec.layers)"
        elif pattern is not None:
            reason = f"excluded by {pattern!r}"
        else:
            reason = layout_problem(module) if kind == SPARSE_CONV else None
        if reason is None:
            self._take(name, module, kind)
        else:
            self._skip(name, module, kind, reason)

    def forward(self, name: str, module: nn.Module, modules: dict[str, nn.Module]) -> None:
        """A known attention / residual class gets its quantized forward when its option is on."""
        qf = quant_forward(type(module))
        if qf is None:
            if attention_like(module):
                self._attention_unreached(name, module, "attention class without a quantized forward")
            return
        pattern = excluding_pattern(name, self.spec.exclude)
        if pattern is not None:
            self._skip(name, module, qf.kind, f"excluded by {pattern!r}")
            return
        problem = qf.unsupported(module)
        if problem is not None:
            self._unroute(name, qf, modules, problem)
            if qf.kind == ATTENTION:
                self._attention_unreached(name, module, f"its quantized forward does not cover {problem}")
            else:
                self._skip(name, module, qf.kind, problem)
        elif self.spec.attention_matmuls if qf.kind == ATTENTION else self.spec.residual_adds:
            self._take(name, module, qf.kind)
        else:
            reason = "attention_matmuls is off" if qf.kind == ATTENTION else "residual_adds is off"
            routed = [child for child in qf.routes if join(name, child) in self.targets]
            if routed:  # the original forward would bypass the routed child's quantizers
                self.targets[name] = ROUTE
                reason += f" (forward still replaced so {', '.join(routed)} runs as a module)"
            self._skip(name, module, qf.kind, reason)

    def _unroute(self, name: str, qf: QuantForward, modules: dict[str, nn.Module], problem: str) -> None:
        """Children the unconverted forward uses functionally would never run their quantizers: skip them."""
        for child in (join(name, c) for c in qf.routes):
            if self.targets.pop(child, None) is not None:
                entry = self._entry(modules[child], LAYER)
                entry["quantized"] -= 1
                entry["skipped"].setdefault(f"used functionally by its parent ({problem})", []).append(child)

    def _attention_unreached(self, name: str, module: nn.Module, reason: str) -> None:
        """Skipped (excluded, or with a reason); a warning too when attention_matmuls is on."""
        pattern = excluding_pattern(name, self.spec.exclude)
        if pattern is not None:
            self._skip(name, module, ATTENTION, f"excluded by {pattern!r}")
            return
        self._skip(name, module, ATTENTION, f"{reason}: its matmuls stay float")
        if self.spec.attention_matmuls:
            self.unreached.setdefault(f"{class_key(type(module))} ({reason})", []).append(name)


def _check_patterns(names: list[str], patterns: list[str]) -> None:
    """An exclude pattern that matches nothing is a typo."""
    unused = [p for p in patterns if not any(excluding_pattern(name, [p]) for name in names)]
    if unused:
        raise ValueError(f"QuantSpec.exclude patterns {unused} match no module of the model; "
                         f"module names look like {names[1:4]}")


def plan_targets(model: nn.Module, spec: QuantSpec) -> tuple[dict[str, str], Report]:
    """({module name: kind} in model order, {module type: {kind, quantized, skipped: {reason: [names]}}})."""
    modules = dict(model.named_modules())
    _check_patterns(list(modules), spec.exclude)
    planner = _Planner(spec)
    for name, module in modules.items():
        planner.layer(name, module)
    for name, module in modules.items():
        planner.forward(name, module, modules)
    for attention, names in planner.unreached.items():
        warnings.warn(f"attention_matmuls cannot reach {attention}: the matmuls of {len(names)} modules "
                      f"(e.g. {names[0]}) stay float", stacklevel=3)
    targets = {name: planner.targets[name] for name in modules if name in planner.targets}
    return targets, dict(sorted(planner.report.items()))


def check_targets(model: nn.Module, targets: dict[str, str], spec: QuantSpec) -> Report:
    """The report of a model a saved quantizer layout fits; else fail with the first few mismatches."""
    planned, report = plan_targets(model, spec)
    modules = dict(model.named_modules())
    problems = [f"{name}: missing from the model" if name not in modules
                else f"{name}: {type(modules[name]).__name__} would get {planned.get(name)} quantizers, saved {kind}"
                for name, kind in targets.items() if planned.get(name) != kind]
    problems += [f"{name}: {kind} target not in the saved state" for name, kind in planned.items()
                 if name not in targets]
    if problems:
        raise ValueError(f"the quantizer state does not fit this model ({len(problems)} problems): {problems[:5]}; "
                         "build the same (pruned, BN-unfolded) float architecture the state was saved from")
    return report


def format_report(report: Report) -> str:
    """One line per module type: how many were quantized, and each skip reason with a few module names."""
    lines = []
    for cls, entry in report.items():
        skipped = [f"{len(names)} {reason} (e.g. {', '.join(n or '<model>' for n in names[:2])})"
                   for reason, names in entry["skipped"].items()]
        lines.append(f"{cls} [{entry['kind']}]: {entry['quantized']} quantized" + "".join(f"; {s}" for s in skipped))
    return "\n".join(lines)
