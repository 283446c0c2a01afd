"""What quantize_model did to a model (backend, spec, targets, folds, shared groups), kept on the model itself."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from .backend import QuantBackend, get_backend
from .spec import QuantSpec
from .targets import Report, unwrap

META_ATTR = "_bevfusion_ext_quant"


@dataclass
class QuantMeta:
    """Everything needed to find, describe and rebuild the quantizers this package inserted."""

    backend: str
    spec: QuantSpec
    targets: dict[str, str]  # module name -> kind (targets.py, forwards.py)
    folded_bn: list[list[str]] = field(default_factory=list)
    shared_groups: list[list[str]] = field(default_factory=list)
    report: Report = field(default_factory=dict)  # per module type: quantized count, skipped names by reason

    @property
    def impl(self) -> QuantBackend:
        """The backend object."""
        return get_backend(self.backend)

    def roles(self) -> dict[str, str]:
        """{quantizer name: role} in model order, the same on every rank."""
        return self.impl.quantizer_names(self.targets)


def attach_meta(model: nn.Module, meta: QuantMeta) -> None:
    """Remember `meta` on the model as a plain attribute (not a sub-module, not in the state dict)."""
    setattr(model, META_ATTR, meta)


def get_meta(model: nn.Module) -> QuantMeta:
    """The meta of a model quantized by quantize_model / restore_quantizers (DDP wrappers are looked through)."""
    meta = getattr(unwrap(model), META_ATTR, None)
    if meta is None:
        raise ValueError(f"{type(unwrap(model)).__name__} has no bevfusion_ext quantizers; "
                         "call quantize_model() or restore_quantizers() first")
    return meta


def quantizers(model: nn.Module) -> dict[str, tuple[nn.Module, str]]:
    """{quantizer name: (TensorQuantizer, role)} of the quantizers this package inserted."""
    root = unwrap(model)
    return {name: (root.get_submodule(name), role) for name, role in get_meta(root).roles().items()}


def load_amax(quantizer: nn.Module, amax: torch.Tensor) -> None:
    """Set a quantizer's `_amax` buffer (both libraries keep amax there), replacing it if the shape changed."""
    amax = amax.detach().to(torch.float32)
    current = quantizer._buffers.get("_amax")
    if current is not None and current.shape == amax.shape:
        current.copy_(amax)
    else:
        quantizer._buffers.pop("_amax", None)
        quantizer.register_buffer("_amax", amax.clone())
