"""Find activation quantizers that TensorRT wants on one INT8 scale, by watching one calibration forward.

TensorRT moves the quantize node that follows a Concat onto each Concat input, and runs an INT8 elementwise Add
(the only kind DLA supports) only when both inputs have the same range. So quantizers that read
  * the same tensor (also through views), or
  * a Concat output or any of its inputs, or
  * either input of an Add
must share one amax, else the producer has to emit several INT8 versions of a tensor (extra reformat layers).
The tracer records those relations with a TorchFunctionMode (torch.cat / add) and forward pre-hooks on the
quantizers (what each one reads); tensors are identified by (storage, offset, numel), so views count as the same
tensor and slices do not. Traced tensors are kept alive until the trace ends so their storage is not reused.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode

CAT_FUNCS = {torch.cat, torch.concat, torch.concatenate}
ADD_FUNCS = {torch.add, torch.Tensor.add, torch.Tensor.add_, torch.Tensor.__add__, torch.Tensor.__radd__,
             torch.Tensor.__iadd__}

Key = tuple[int, int, int]


def _tensors(values: Iterable[Any]) -> list[torch.Tensor]:
    """The non-empty tensors among `values`."""
    return [v for v in values if isinstance(v, torch.Tensor) and v.numel() > 0]


class SharedInputTracer(TorchFunctionMode):
    """Context manager around one forward; `groups()` afterwards lists quantizers that must share an amax."""

    def __init__(self, quantizers: dict[str, nn.Module]) -> None:
        super().__init__()
        self.quantizers = quantizers
        self.parent: dict[Key, Key] = {}
        self.reads: dict[str, list[Key]] = {}
        self.keep: list[torch.Tensor] = []
        self.inside_quantizer = 0
        self.handles: list[Any] = []

    def __enter__(self) -> SharedInputTracer:
        for name, quantizer in self.quantizers.items():
            self.handles.append(quantizer.register_forward_pre_hook(self._reader(name)))
            self.handles.append(quantizer.register_forward_hook(self._leave))
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        super().__exit__(*exc)
        for handle in self.handles:
            handle.remove()
        self.keep.clear()

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if not self.inside_quantizer:
            if func in CAT_FUNCS:
                self._join(_tensors([*(args[0] if args else kwargs["tensors"]), out]))
            elif func in ADD_FUNCS:
                self._join(_tensors(args[:2]))
        return out

    def _key(self, tensor: torch.Tensor) -> Key:
        """Identity of the data a tensor shows; the tensor is kept alive so the identity stays unique."""
        self.keep.append(tensor)
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tensor.numel())
        self.parent.setdefault(key, key)
        return key

    def _root(self, key: Key) -> Key:
        """Union-find root with path halving."""
        while self.parent[key] != key:
            self.parent[key] = self.parent[self.parent[key]]
            key = self.parent[key]
        return key

    def _join(self, tensors: list[torch.Tensor]) -> None:
        """Put all `tensors` in one sharing set."""
        roots = [self._root(self._key(t)) for t in tensors]
        for root in roots[1:]:
            self.parent[root] = roots[0]

    def _reader(self, name: str) -> Any:
        """Pre-hook recording what quantizer `name` reads; ops inside the quantizer are not traced."""
        def hook(module: nn.Module, args: tuple) -> None:
            self.reads.setdefault(name, []).extend(self._key(t) for t in _tensors(args[:1]))
            self.inside_quantizer += 1
        return hook

    def _leave(self, module: nn.Module, args: tuple, output: Any) -> None:
        """Forward hook: back outside the quantizer."""
        self.inside_quantizer -= 1

    def groups(self) -> list[list[str]]:
        """Sets of two or more quantizer names (in model order) that read tensors of one sharing set."""
        by_root: dict[Key, list[str]] = {}
        for name in self.quantizers:
            roots = {self._root(key) for key in self.reads.get(name, [])}
            for root in roots:
                by_root.setdefault(root, []).append(name)
        merged = _merge([set(names) for names in by_root.values()])
        order = {name: i for i, name in enumerate(self.quantizers)}
        return sorted((sorted(group, key=order.get) for group in merged if len(group) > 1), key=lambda g: order[g[0]])


def _merge(sets: list[set[str]]) -> list[set[str]]:
    """Merge overlapping sets (a quantizer called on several tensors links their sharing sets)."""
    merged: list[set[str]] = []
    for current in sets:
        overlapping = [m for m in merged if m & current]
        for m in overlapping:
            merged.remove(m)
            current |= m
        merged.append(current)
    return merged
