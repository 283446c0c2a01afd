"""CPU stand-ins for BEVFusion's compiled extensions, installed explicitly when the compiled ones are absent.

BEVFusion's Python layers (`mmdet3d.ops.bev_pool`, `.voxel`, `.spconv`, `.iou3d`, ...) import their CUDA extension
modules by name (`from . import bev_pool_ext`). `install_cpu_ops()` puts a stand-in module under each of those names
in `sys.modules` before mmdet3d is imported, so BEVFusion's own Python code (and its weight layouts) runs unchanged
on top. An extension whose compiled file exists on disk is never replaced. Stand-ins for ops the supported configs
never call raise a clear error naming the op when called.
"""

from __future__ import annotations

import importlib.util
import sys
import types
from collections.abc import Callable
from pathlib import Path

# extension module -> the stand-in module that implements it (None: not needed by the supported configs)
EXTENSIONS: dict[str, str | None] = {
    "mmdet3d.ops.bev_pool.bev_pool_ext": "bevfusion_ext.ops.bev_pool",
    "mmdet3d.ops.voxel.voxel_layer": "bevfusion_ext.ops.voxel",
    "mmdet3d.ops.spconv.sparse_conv_ext": "bevfusion_ext.ops.sparse_conv",
    "mmdet3d.ops.iou3d.iou3d_cuda": "bevfusion_ext.ops.iou3d",
    "mmdet3d.ops.ball_query.ball_query_ext": None,
    "mmdet3d.ops.furthest_point_sample.furthest_point_sample_ext": None,
    "mmdet3d.ops.gather_points.gather_points_ext": None,
    "mmdet3d.ops.group_points.group_points_ext": None,
    "mmdet3d.ops.interpolate.interpolate_ext": None,
    "mmdet3d.ops.knn.knn_ext": None,
    "mmdet3d.ops.paconv.assign_score_withk_ext": None,
    "mmdet3d.ops.roiaware_pool3d.roiaware_pool3d_ext": None,
    "mmcv._ext": None,
}


class CPUOpUnavailable(NotImplementedError):
    """A compiled op the CPU stand-ins do not implement was called."""


def _unsupported(module: str, name: str) -> Callable[..., None]:
    def call(*_: object, **__: object) -> None:
        raise CPUOpUnavailable(
            f"{module}.{name} has no CPU stand-in in bevfusion_ext.ops (only the ops of BEVFusion's camera+lidar "
            "TransFusion and BEV-segmentation configs have one). Build BEVFusion's CUDA extensions "
            "(python setup.py develop in your BEVFusion checkout) to use it."
        )

    call.__name__ = name
    return call


def _raising_module(name: str) -> types.ModuleType:
    module = types.ModuleType(name, f"bevfusion_ext CPU stand-in for {name}: every op raises when called")
    module.__getattr__ = lambda attr: _unsupported(name, attr) if not attr.startswith("__") else _missing(attr)
    return module


def _missing(attr: str) -> None:
    raise AttributeError(attr)


def _compiled_exists(module: str) -> bool:
    """Whether the compiled extension file is on disk (checked without importing the package that loads it)."""
    parts = module.split(".")
    root = importlib.util.find_spec(parts[0])
    if root is None or root.submodule_search_locations is None:
        return False
    folder = Path(next(iter(root.submodule_search_locations))).joinpath(*parts[1:-1])
    return any(folder.glob(f"{parts[-1]}*.so")) or any(folder.glob(f"{parts[-1]}*.pyd"))


def install_cpu_ops() -> dict[str, str]:
    """Register a stand-in for every compiled extension that is absent; returns {extension: 'compiled'|'cpu'|...}."""
    status: dict[str, str] = {}
    for name, impl in EXTENSIONS.items():
        if name in sys.modules:
            status[name] = "cpu" if getattr(sys.modules[name], "__bevfusion_ext_cpu__", False) else "compiled"
            continue
        if _compiled_exists(name):
            status[name] = "compiled"
            continue
        module = importlib.import_module(impl) if impl else _raising_module(name)
        module.__bevfusion_ext_cpu__ = True
        sys.modules[name] = module
        status[name] = "cpu" if impl else "cpu (raises when called)"
    return status
