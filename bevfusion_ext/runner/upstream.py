"""Find the user's BEVFusion checkout (its mmdet3d fork) and import it, optionally over CPU stand-ins for its ops.

Search order, first hit wins:
1. `$BEVFUSION_ROOT`;
2. a BEVFusion checkout that holds the config file (`<root>/configs/...`);
3. the current directory, when it is a BEVFusion checkout (running from the checkout, as BEVFusion's README does);
4. an installed `mmdet3d` (`python setup.py develop` in the checkout), used as it is.
A checkout found by 1-3 goes first on `sys.path`. The importable mmdet3d must be BEVFusion's fork (it has
`mmdet3d.models.builder.FUSIONMODELS`); OpenMMLab's own mmdet3d is refused with a message.
"""

from __future__ import annotations

import importlib
import os
import sys
import warnings
from pathlib import Path
from types import ModuleType

from .config import ConfigError

_MARKER = Path("mmdet3d/models/fusion_models")
CPU_OPS_HELP = ("run BEVFusion's compiled ops (bev_pool, voxelization, spconv, iou3d) on bevfusion_ext's CPU "
                "stand-ins; ops that are built are never replaced")


def is_checkout(path: Path) -> bool:
    """Whether `path` is the root of a BEVFusion checkout (its mmdet3d fork with fusion models)."""
    return (path / _MARKER).is_dir()


def find_checkout(config_path: str | Path | None = None) -> Path | None:
    """The BEVFusion checkout to import: $BEVFUSION_ROOT, else one holding the config, else the current directory."""
    env = os.environ.get("BEVFUSION_ROOT")
    if env:
        root = Path(env).expanduser().resolve()
        if not is_checkout(root):
            raise ConfigError(
                f"BEVFUSION_ROOT={env}: not a BEVFusion checkout (no {_MARKER}). Point it at the directory that "
                "holds BEVFusion's mmdet3d/ and configs/, or unset it."
            )
        return root
    candidates = list(Path(config_path).resolve().parents) if config_path else []
    for path in [*candidates, Path.cwd().resolve()]:
        if is_checkout(path):
            return path
    return None


def prepare_bevfusion(config_path: str | Path | None = None, cpu_ops: bool = False) -> Path | None:
    """Put the user's checkout first on sys.path and, if asked, install the CPU op stand-ins (before any import)."""
    root = find_checkout(config_path)
    if root is not None and str(root) not in sys.path:
        sys.path.insert(0, str(root))
    if cpu_ops:
        from ..ops import install_cpu_ops

        install_cpu_ops()
    return root


def import_bevfusion() -> ModuleType | None:
    """Import BEVFusion's mmdet3d (models and datasets) and register our synthetic data in its registries.

    Returns None when no mmdet3d is importable at all; raises ConfigError when one is there but unusable.
    """
    if importlib.util.find_spec("mmdet3d") is None:
        return None
    try:
        with warnings.catch_warnings():  # its torch.cuda.amp / numba deprecations say nothing a user can act on
            warnings.simplefilter("ignore", (FutureWarning, DeprecationWarning))
            mmdet3d = importlib.import_module("mmdet3d")
            importlib.import_module("mmdet3d.models")
            importlib.import_module("mmdet3d.datasets")
    except ImportError as err:
        where = Path(mmdet3d.__file__).parent if "mmdet3d" in sys.modules else "mmdet3d"
        missing = getattr(err, "name", None) or str(err)
        mmcv_lite = "mmcv._ext" not in sys.modules and importlib.util.find_spec("mmcv._ext") is None
        if mmcv_lite or any(name in str(missing) for name in ("_ext", "_cuda", "voxel_layer")):
            raise ConfigError(
                f"BEVFusion's compiled ops (or mmcv's) are not built ({where}: cannot import {missing}). Build them "
                "(mmcv-full, and 'python setup.py develop' in your BEVFusion checkout), or pass --cpu-ops to run on "
                "bevfusion_ext's CPU stand-ins (bevfusion_ext/ops/README.md)."
            ) from None
        raise ConfigError(f"cannot import BEVFusion's mmdet3d from {where}: {err}. Install what it names.") from None
    builder = sys.modules["mmdet3d.models.builder"]
    if not hasattr(builder, "FUSIONMODELS"):
        raise ConfigError(
            f"the importable mmdet3d ({Path(mmdet3d.__file__).parent}) is not BEVFusion's fork (no FUSIONMODELS). "
            "Set BEVFUSION_ROOT to your BEVFusion checkout."
        )
    from ..datasets.bevfusion_format import register_bevfusion_datasets
    from ..ops.cuda_calls import keep_cuda_calls_on_cpu

    keep_cuda_calls_on_cpu()
    register_bevfusion_datasets()
    return mmdet3d
