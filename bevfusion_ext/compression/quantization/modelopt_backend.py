"""ModelOpt backend: `mtq.quantize` with an explicit per-quantizer config, attention via `mtq.register`."""

from __future__ import annotations

from functools import cache

import modelopt.torch.opt as mto
import modelopt.torch.quantization as mtq
from modelopt.torch.quantization import calib
from modelopt.torch.quantization.nn import QuantModule, QuantModuleRegistry, TensorQuantizer
from torch import nn

from .attention import ATTENTION_FORWARDS, ATTENTION_QUANTIZERS, attention_forward, class_key
from .backend import WEIGHT, QuantBackend
from .spec import QuantSpec


@cache
def _quant_attention_class(cls: type) -> type:
    """ModelOpt quantized class for attention class `cls`: its forward with quantized matmul operands."""

    class QuantAttention(QuantModule):
        forward = attention_forward(cls)

        def _setup(self) -> None:
            """Called by ModelOpt on conversion: one per-tensor quantizer per matmul operand."""
            for attr in ATTENTION_QUANTIZERS:
                self._register_temp_attribute(attr, TensorQuantizer())

    QuantAttention.__name__ = QuantAttention.__qualname__ = f"Quant{cls.__name__}"
    return QuantAttention


def _sync_attention_registry(model: nn.Module, enabled: bool) -> None:
    """Register our attention classes found in `model` iff attention matmuls are quantized.

    ModelOpt converts every registered type in the model, so the registry decides which quantizers exist; making it
    follow the spec keeps quantize and restore (possibly in another process) inserting the same quantizers.
    """
    classes = {type(m) for m in model.modules() if class_key(type(m)) in ATTENTION_FORWARDS}
    for cls in classes:
        if enabled and cls not in QuantModuleRegistry:
            mtq.register(original_cls=cls, quantized_cls=_quant_attention_class(cls))
        elif not enabled and cls in QuantModuleRegistry:
            mtq.unregister(cls)


class ModeloptBackend(QuantBackend):
    """NVIDIA ModelOpt (`modelopt.torch.quantization`); state is `mto.modelopt_state`."""

    name = "modelopt"
    input_attr = "input_quantizer"
    weight_attr = "weight_quantizer"
    calib = calib

    def insert(self, model: nn.Module, targets: dict[str, str], spec: QuantSpec) -> None:
        """`mtq.quantize` with every quantizer off except ours, and no calibration yet (algorithm None)."""
        _sync_attention_registry(model, spec.attention_matmuls)
        weight_axis = 0 if spec.weight == "per_channel" else None
        entries = [{"quantizer_name": "*", "enable": False}]
        entries += [{"quantizer_name": name, "cfg": {"num_bits": 8, "axis": weight_axis if role == WEIGHT else None}}
                    for name, role in self.quantizer_names(targets).items()]
        mtq.quantize(model, {"quant_cfg": entries, "algorithm": None}, forward_loop=None)

    def restore(self, model: nn.Module, targets: dict[str, str], spec: QuantSpec, backend_state: dict) -> None:
        """`mto.restore_from_modelopt_state` after putting the attention registry in the state the model had."""
        _sync_attention_registry(model, spec.attention_matmuls)
        mto.restore_from_modelopt_state(model, backend_state)

    def backend_state(self, model: nn.Module) -> dict:
        """`mto.modelopt_state`: the quantize config and every quantizer's properties (weights_only loadable)."""
        return mto.modelopt_state(model)
