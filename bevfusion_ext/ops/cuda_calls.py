"""BEVFusion's Python calls `.cuda()` around a few compiled ops (box overlaps, NMS); with the CPU stand-ins installed
and no GPU present, those calls keep their tensors on the CPU, inside those functions only.

BEVFusion's own functions still run (nothing is copied or rewritten): each is wrapped so that `Tensor.cuda` is the
identity while it runs, and every name mmdet3d bound to the original is pointed at the wrapper.
"""

from __future__ import annotations

import functools
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch

# (module, qualified name) of BEVFusion functions that move tensors to CUDA around a compiled op
CUDA_CALLERS = (
    ("mmdet3d.core.bbox.structures.base_box3d", "BaseInstance3DBoxes.overlaps"),
    ("mmdet3d.ops.iou3d.iou3d_utils", "nms_gpu"),
    ("mmdet3d.ops.iou3d.iou3d_utils", "nms_normal_gpu"),
)


@contextmanager
def cuda_stays_on_cpu() -> Iterator[None]:
    """Make `Tensor.cuda` return the tensor itself for the duration (there is no CUDA device to move to)."""
    original = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *_, **__: self
    try:
        yield
    finally:
        torch.Tensor.cuda = original


def _on_cpu(func: Callable) -> Callable:
    @functools.wraps(func)
    def call(*args: Any, **kwargs: Any) -> Any:
        with cuda_stays_on_cpu():
            return func(*args, **kwargs)

    call.__bevfusion_ext_cpu__ = True
    return call


def _wrap(module_name: str, qualname: str) -> None:
    """Wrap one function (or classmethod) and rebind every mmdet3d module attribute that named the original."""
    owner: Any = sys.modules[module_name]
    *path, name = qualname.split(".")
    for part in path:
        owner = getattr(owner, part)
    raw = owner.__dict__[name] if isinstance(owner, type) else getattr(owner, name)
    if getattr(getattr(raw, "__func__", raw), "__bevfusion_ext_cpu__", False):
        return
    if isinstance(raw, classmethod):
        setattr(owner, name, classmethod(_on_cpu(raw.__func__)))
        return
    wrapped = _on_cpu(raw)
    for module in [m for key, m in sys.modules.items() if key.startswith("mmdet3d") and m is not None]:
        for attr, value in list(vars(module).items()):
            if value is raw:
                setattr(module, attr, wrapped)


def keep_cuda_calls_on_cpu() -> list[str]:
    """Wrap BEVFusion's CUDA-moving callers (after mmdet3d is imported) when the iou3d stand-in runs them and no GPU
    exists; returns what was wrapped."""
    stand_in = getattr(sys.modules.get("mmdet3d.ops.iou3d.iou3d_cuda"), "__bevfusion_ext_cpu__", False)
    if torch.cuda.is_available() or not stand_in:
        return []
    for module_name, qualname in CUDA_CALLERS:
        _wrap(module_name, qualname)
    return [f"{m}.{q}" for m, q in CUDA_CALLERS]
