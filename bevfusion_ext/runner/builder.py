"""Config-driven construction of models, datasets and loaders: our registries, or mmdet3d's when installed."""

from __future__ import annotations

from functools import partial

import torch
from mmcv.parallel import collate as mmcv_collate
from mmcv.utils import Registry, build_from_cfg
from torch import nn
from torch.utils.data import DataLoader, Dataset, DistributedSampler

from ..datasets import SyntheticBEVDataset, collate
from ..models import MODELS
from .config import ConfigSources

DATASETS = Registry("bevfusion_ext_datasets")


@DATASETS.register_module(name="SyntheticBEVDataset")
class RegisteredSyntheticBEVDataset(SyntheticBEVDataset):
    """The synthetic dataset with its collate function attached, so loaders batch it per the data contract."""

    collate = staticmethod(collate)


def _mmdet3d_registries() -> tuple[Registry | None, Registry | None]:
    """BEVFusion's own model and dataset registries when its mmdet3d fork is importable."""
    try:
        from mmdet3d.datasets.builder import DATASETS as MMDET3D_DATASETS
        from mmdet3d.models.builder import FUSIONMODELS
    except ImportError:
        return None, None
    return FUSIONMODELS, MMDET3D_DATASETS


def _pick_registry(cfg: dict, key: str, ours: Registry, theirs: Registry | None, sources: ConfigSources) -> Registry:
    kind = cfg["type"]
    for registry in (ours, theirs):
        if registry is not None and registry.get(kind) is not None:
            return registry
    known = sorted(ours.module_dict) + (sorted(theirs.module_dict) if theirs is not None else [])
    raise sources.error(f"{key}.type", f"unknown type '{kind}'", f"Use one of: {', '.join(known)}.")


def check_registered(cfg: dict, sources: ConfigSources) -> None:
    """Fail before training when the model or a dataset names a type no registry knows."""
    models, datasets = _mmdet3d_registries()
    _pick_registry(cfg["model"], "model", MODELS, models, sources)
    for split in ("train", "val"):
        _pick_registry(cfg["data"][split], f"data.{split}", DATASETS, datasets, sources)


def build_model(cfg: dict, sources: ConfigSources, init_weights: bool = True) -> nn.Module:
    """Build the model from `cfg['model']` and (for training) run its weight init, as BEVFusion's train.py does."""
    registry = _pick_registry(cfg["model"], "model", MODELS, _mmdet3d_registries()[0], sources)
    model = build_from_cfg(dict(cfg["model"]), registry)
    if init_weights and hasattr(model, "init_weights"):
        model.init_weights()
    return model


def build_dataset(cfg: dict, key: str, sources: ConfigSources) -> Dataset:
    """Build one dataset split from its config dict."""
    registry = _pick_registry(cfg, key, DATASETS, _mmdet3d_registries()[1], sources)
    return build_from_cfg(dict(cfg), registry)


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


def example_batch(dataset: Dataset, n: int) -> dict:
    """The first `n` samples collated: identical on every rank, used to trace the model for pruning."""
    collate_fn = getattr(dataset, "collate", mmcv_collate)
    return collate_fn([dataset[i] for i in range(n)])
