"""Config-driven construction of models, datasets and loaders: our registries, or mmdet3d's when installed."""

from __future__ import annotations

import copy
import difflib
from functools import partial
from urllib.error import URLError

import torch
from mmcv.parallel import collate as mmcv_collate
from mmcv.utils import Registry, build_from_cfg
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..datasets import SyntheticBEVDataset, collate
from ..models import MODELS
from .config import ConfigError, ConfigSources
from .parallel import unwrap_batch
from .upstream import import_bevfusion

DATASETS = Registry("bevfusion_ext_datasets")


@DATASETS.register_module(name="SyntheticBEVDataset")
class RegisteredSyntheticBEVDataset(SyntheticBEVDataset):
    """The synthetic dataset with its collate function attached, so loaders batch it per the data contract."""

    collate = staticmethod(collate)


# mmdet3d's dataset wrappers: built by mmdet3d.datasets.build_dataset itself, the real type sits in `dataset`
_WRAPPERS = {"CBGSDataset": "dataset", "RepeatDataset": "dataset", "ClassBalancedDataset": "dataset",
             "ConcatDataset": "datasets"}


def _mmdet3d_registries() -> tuple[Registry | None, Registry | None]:
    """BEVFusion's own model and dataset registries when its mmdet3d fork is importable (imported on first use)."""
    if import_bevfusion() is None:
        return None, None
    from mmdet3d.datasets.builder import DATASETS as MMDET3D_DATASETS
    from mmdet3d.models.builder import FUSIONMODELS

    return FUSIONMODELS, MMDET3D_DATASETS


def _pick_registry(cfg: dict, key: str, ours: Registry, which: int, sources: ConfigSources) -> Registry:
    """Our registry when it knows the type (reference model, synthetic data), else BEVFusion's mmdet3d's."""
    kind = cfg["type"]
    if ours.get(kind) is not None:
        return ours
    try:
        theirs = _mmdet3d_registries()[which]
    except ConfigError as err:  # e.g. $BEVFUSION_ROOT set, its compiled ops not built and no --cpu-ops
        raise sources.error(f"{key}.type", f"unknown type '{kind}' to bevfusion_ext, and BEVFusion's mmdet3d could "
                            "not be imported to look it up", str(err)) from None
    if theirs is not None and theirs.get(kind) is not None:
        return theirs
    known = sorted(ours.module_dict) + (sorted(theirs.module_dict) if theirs is not None else [])
    hint = "" if theirs is not None else " (no BEVFusion mmdet3d found: set BEVFUSION_ROOT to your checkout)"
    close = difflib.get_close_matches(kind, known, n=3, cutoff=0.5)
    advice = f"Did you mean {' or '.join(close)}?" if close else f"None of the {len(known)} registered types is close."
    raise sources.error(f"{key}.type", f"unknown type '{kind}'{hint}", advice)


def _dataset_leaf(cfg: dict, key: str) -> tuple[dict, str]:
    """The innermost dataset config under mmdet3d's wrappers (CBGSDataset etc.) and its dotted key."""
    while cfg.get("type") in _WRAPPERS:
        field = _WRAPPERS[cfg["type"]]
        cfg, key = (cfg[field][0], f"{key}.{field}[0]") if field == "datasets" else (cfg[field], f"{key}.{field}")
    return cfg, key


def check_registered(cfg: dict, sources: ConfigSources) -> None:
    """Fail before training when the model or a dataset names a type no registry knows."""
    _pick_registry(cfg["model"], "model", MODELS, 0, sources)
    for split in ("train", "val"):
        leaf, key = _dataset_leaf(cfg["data"][split], f"data.{split}")
        _pick_registry(leaf, key, DATASETS, 1, sources)


def build_model(cfg: dict, sources: ConfigSources, init_weights: bool = True) -> nn.Module:
    """Build the model from `cfg['model']` and (for training) run its weight init, as BEVFusion's train.py does."""
    registry = _pick_registry(cfg["model"], "model", MODELS, 0, sources)
    try:
        if registry is MODELS:
            model = build_from_cfg(dict(cfg["model"]), registry)
        else:
            from mmdet3d.models import build_model as build_bevfusion_model

            model = build_bevfusion_model(copy.deepcopy(cfg["model"]))
    except (TypeError, KeyError, ValueError, AssertionError, URLError) as err:
        raise sources.error("model", f"building {cfg['model']['type']} failed: {err}",
                            "Fix the module's arguments (a download needs a local file or null).") from None
    if init_weights and hasattr(model, "init_weights"):
        model.init_weights()
    return model


def build_dataset(cfg: dict, key: str, sources: ConfigSources) -> Dataset:
    """Build one dataset split from its config dict (mmdet3d's build_dataset for BEVFusion's types and wrappers;
    splits other than data.train in test mode, as BEVFusion's train_model builds data.val)."""
    leaf, leaf_key = _dataset_leaf(cfg, key)
    registry = _pick_registry(leaf, leaf_key, DATASETS, 1, sources)
    if registry is DATASETS:
        return build_from_cfg(dict(cfg), registry)
    from mmdet3d.datasets import build_dataset as build_bevfusion_dataset

    cfg = copy.deepcopy(cfg)
    cfg.pop("samples_per_gpu", None)  # BEVFusion's train_model pops it from data.val
    try:
        return build_bevfusion_dataset(cfg, None if key.startswith("data.train") else dict(test_mode=True))
    except ZeroDivisionError:
        raise sources.error(key, "CBGSDataset found an object class with no sample in this split (it divides by "
                            "every class's count)", "Use a split with every class of object_classes, or fewer "
                            "classes.") from None
    except (FileNotFoundError, KeyError, TypeError, ValueError) as err:
        raise sources.error(key, f"building the dataset failed: {err}",
                            "Check dataset_root / ann_file and the dataset arguments.") from None


def build_dataloader(
    dataset: Dataset, samples_per_gpu: int, workers_per_gpu: int, shuffle: bool, seed: int | None
) -> DataLoader:
    """A per-rank loader over a DistributedSampler, as mmdet's build_dataloader makes for BEVFusion."""
    rank = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
    world = torch.distributed.get_world_size() if torch.distributed.is_initialized() else 1
    sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=shuffle, seed=seed or 0)
    collate_fn = getattr(dataset, "collate", partial(mmcv_collate, samples_per_gpu=samples_per_gpu))
    return DataLoader(
        dataset,
        batch_size=samples_per_gpu,
        sampler=sampler,
        num_workers=workers_per_gpu,
        collate_fn=collate_fn,
        pin_memory=False,
        persistent_workers=workers_per_gpu > 0,
    )


def eval_batch_size(cfg: dict, dataset: Dataset) -> int:
    """Samples per inference batch: data.val.samples_per_gpu, else BEVFusion's default of 1 for its datasets (its
    heads decode one sample per GPU) and data.samples_per_gpu for ours."""
    default = cfg["data"]["samples_per_gpu"] if hasattr(dataset, "collate") else 1
    return cfg["data"]["val"].get("samples_per_gpu", default)


def example_batch(dataset: Dataset) -> dict:
    """The first samples collated and unwrapped, identical on every rank, to trace and measure the model: two of our
    datasets', one of BEVFusion's (its TransFusionHead.get_bboxes takes one sample per GPU, as its val loader has)."""
    n = min(2 if hasattr(dataset, "collate") else 1, len(dataset))
    collate_fn = getattr(dataset, "collate", partial(mmcv_collate, samples_per_gpu=n))
    return unwrap_batch(collate_fn([dataset[i] for i in range(n)]))
