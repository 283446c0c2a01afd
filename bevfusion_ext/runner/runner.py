"""The epoch runner: mmcv's EpochBasedRunner with strict, atomic and clearly-failing checkpoint I/O."""

from __future__ import annotations

import os.path as osp
from typing import Any

import mmcv
from mmcv.runner import RUNNERS, EpochBasedRunner
from mmcv.runner.checkpoint import weights_to_cpu

from ..compression import atomic_save, atomic_symlink, checkpoint_weights, load_state_dict_strict, read_checkpoint


@RUNNERS.register_module()
class CompressionEpochBasedRunner(EpochBasedRunner):
    """BEVFusion's CustomEpochBasedRunner (dataset epoch hook) whose checkpoints load strictly and save atomically."""

    compression_state: dict | None = None  # pruning histories + quantizer state; saved as meta["compression"]

    def set_dataset(self, datasets: list) -> None:
        """Remember the training datasets so ones with a per-epoch schedule can be told the epoch."""
        self._datasets = datasets

    def train(self, data_loader: Any, **kwargs: Any) -> None:
        """Tell datasets the epoch (BEVFusion's augmentation schedule), then train one epoch."""
        for dataset in getattr(self, "_datasets", []):
            if hasattr(dataset, "set_epoch"):
                dataset.set_epoch(self.epoch)
        super().train(data_loader, **kwargs)

    @property
    def bare_model(self) -> Any:
        """The model inside the DDP wrapper."""
        return getattr(self.model, "module", self.model)

    def preload(self, filename: str, checkpoint: dict | None) -> None:
        """Hand over a checkpoint already read (to restore its architecture) so it is not read from disk twice."""
        self._preloaded = (filename, checkpoint)

    def load_checkpoint(
        self, filename: str, map_location: Any = "cpu", strict: bool = True, revise_keys: Any = None
    ) -> dict:
        """Load weights strictly; shape or key mismatches are errors that name the parameters (upstream only warns)."""
        name, preloaded = getattr(self, "_preloaded", (None, None))
        self._preloaded = (None, None)
        ckpt = preloaded if name == filename and preloaded is not None else read_checkpoint(filename)
        load_state_dict_strict(self.bare_model, checkpoint_weights(ckpt), filename)
        self.logger.info("loaded checkpoint %s (strict)", filename)
        return ckpt

    def resume(self, checkpoint: str, resume_optimizer: bool = True, map_location: Any = "cpu") -> None:
        """mmcv's resume; the compression state leaves `meta` (it holds tensors mmcv's JSON logger cannot dump)."""
        super().resume(checkpoint, resume_optimizer, map_location)
        self.compression_state = self.meta.pop("compression", self.compression_state)

    def save_checkpoint(
        self,
        out_dir: str,
        filename_tmpl: str = "epoch_{}.pth",
        save_optimizer: bool = True,
        meta: dict | None = None,
        create_symlink: bool = True,
    ) -> None:
        """Save like mmcv, but through a temporary file and a rename so a crash never leaves a broken checkpoint."""
        meta = dict(meta or {})
        meta.update(self.meta or {})
        meta.update(epoch=self.epoch + 1, iter=self.iter, world_size=self.world_size, mmcv_version=mmcv.__version__)
        if self.compression_state is not None:
            meta["compression"] = self.compression_state
        filename = filename_tmpl.format(self.epoch + 1)
        # torch's state_dict, not mmcv's get_state_dict: that one also saves non-persistent buffers (strict loads fail)
        ckpt = {"meta": meta, "state_dict": weights_to_cpu(self.bare_model.state_dict())}
        if save_optimizer and self.optimizer is not None:
            ckpt["optimizer"] = self.optimizer.state_dict()
        atomic_save(ckpt, osp.join(out_dir, filename))
        if create_symlink:
            atomic_symlink(filename, osp.join(out_dir, "latest.pth"))
