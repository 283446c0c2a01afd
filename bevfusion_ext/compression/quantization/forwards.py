"""Quantized forwards of known model classes (attention, residual blocks), matched by qualified class name.

Both backends turn a module of such a class into a subclass whose methods come from a QuantForward (ModelOpt through
its per-type QuantModuleRegistry, pytorch-quantization by our in-place conversion). The methods are the model's own
math with fake quantizers where TensorRT runs INT8; with the quantizers disabled they compute exactly the original.
Matching by name keeps this package free of model imports (and with them mmcv), and an unknown subclass (which may
change the math) is never given a forward written for its parent.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

# Kinds of conversion besides plain layers: the four matmul operands of an attention; a forward replaced only so a
# child the original uses functionally (BEVFusion's out_proj) runs as a module, no quantizers of its own; the inputs
# of a residual Add.
ATTENTION, ROUTE, RESIDUAL = "attention", "route", "residual"
ATTENTION_QUANTIZERS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")
RESIDUAL_QUANTIZER = "residual_quantizer"
KIND_QUANTIZERS = {ATTENTION: ATTENTION_QUANTIZERS, ROUTE: (), RESIDUAL: (RESIDUAL_QUANTIZER,)}


@dataclass(frozen=True)
class QuantForward:
    """The methods a quantized class overrides, and what an instance must look like to use them."""

    kind: str  # ATTENTION or RESIDUAL
    methods: dict[str, Callable[..., object]]
    routes: tuple[str, ...] = ()  # children whose weights the original forward uses functionally
    unsupported: Callable[[nn.Module], str | None] = lambda module: None  # why this instance cannot use the methods


def bind_methods(qf: QuantForward, cls: type) -> dict[str, Callable[..., object]]:
    """The methods of a quantized subclass of `cls`; an instance they do not cover keeps running `cls`'s own.

    ModelOpt converts every instance of a registered class, also the ones the plan leaves out for a reason.
    """

    def dispatch(name: str, method: Callable[..., object]) -> Callable[..., object]:
        original = getattr(cls, name)

        @functools.wraps(method)
        def call(self: nn.Module, *args: object, **kwargs: object) -> object:
            return (original if qf.unsupported(self) else method)(self, *args, **kwargs)

        return call

    return {name: dispatch(name, method) for name, method in qf.methods.items()}


def class_key(cls: type) -> str:
    """Qualified class name, the key of every forward table."""
    return f"{cls.__module__}.{cls.__qualname__}"


def operand(module: nn.Module, attr: str, x: torch.Tensor) -> torch.Tensor:
    """`x` through the module's quantizer `attr`, or unchanged when the conversion has none (ROUTE)."""
    quantizer = module._modules.get(attr)
    return x if quantizer is None else quantizer(x)


def quantized_add(module: nn.Module, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a + b with both inputs through the module's one residual quantizer (CUDA-BEVFusion's QuantAdd): one amax."""
    quantizer = getattr(module, RESIDUAL_QUANTIZER)
    return quantizer(a) + quantizer(b)
