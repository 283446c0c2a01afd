"""mmcv hooks of bevfusion-ext: each does one thing at one point of the training loop."""

from __future__ import annotations

import json
import os.path as osp
from collections.abc import Callable
from typing import Any

import torch.distributed as dist
from mmcv.runner import HOOKS, DistEvalHook, Hook
from torch.nn.modules.batchnorm import _BatchNorm

from ..compression import combine_digests, first_difference, layer_digests
from .report import HEADLINE


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON record to a run-directory log that tools and tests read back."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@HOOKS.register_module()
class MetricsEvalHook(DistEvalHook):
    """mmcv's distributed eval hook that also records every evaluation in `<run_dir>/metrics.jsonl`."""

    def evaluate(self, runner: Any, results: list) -> float | None:
        """Score results, log them, keep them on disk and return the key score for `save_best`."""
        metrics = self.dataloader.dataset.evaluate(results, logger=runner.logger, **self.eval_kwargs)
        epochs_done = runner.iter // max(1, len(runner.data_loader))
        runner.logger.info(
            "evaluation after %d epochs: %s",
            epochs_done,
            ", ".join(f"{k}={metrics[k]:.4f}" for k in HEADLINE if k in metrics),
        )
        for name, value in metrics.items():
            runner.log_buffer.output[name] = value
        runner.log_buffer.ready = True
        append_jsonl(osp.join(runner.work_dir, "metrics.jsonl"), {"epoch": epochs_done, "iter": runner.iter, **metrics})
        if self.save_best is None or not metrics:
            return None
        if self.key_indicator == "auto":
            self._init_rule(self.rule, next(iter(metrics)))
        return metrics[self.key_indicator]


class RankMismatchError(RuntimeError):
    """Ranks hold different models: continuing would train (and save) a silently inconsistent model."""


def broadcast_bn_stats(model: Any) -> None:
    """Give every rank rank 0's BatchNorm statistics (BEVFusion trains with broadcast_buffers=False)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return
    for module in model.modules():
        if isinstance(module, _BatchNorm) and module.track_running_stats:
            for buf in (module.running_mean, module.running_var, module.num_batches_tracked):
                dist.broadcast(buf, 0)


def check_ranks_agree(model: Any, where: str, digests: Callable[[Any], dict[str, str]] = layer_digests) -> list[str]:
    """Gather per-tensor digests from every rank; raise naming the rank and first differing tensor if any differ."""
    mine = digests(model)
    world = dist.get_world_size() if dist.is_initialized() else 1
    gathered: list[dict[str, str]] = [mine] * world
    if world > 1:
        gathered = [None] * world  # type: ignore[list-item]
        dist.all_gather_object(gathered, mine)
    for rank, other in enumerate(gathered[1:], start=1):
        layer = first_difference(gathered[0], other)
        if layer is not None:
            raise RankMismatchError(
                f"{where}: rank {rank} differs from rank 0 first at '{layer}'. "
                "Stop and resume from the last checkpoint; report this if it repeats."
            )
    return [combine_digests(d) for d in gathered]


@HOOKS.register_module()
class RankConsistencyHook(Hook):
    """After every epoch (before the checkpoint), align BN statistics and prove all ranks hold the same model."""

    def after_train_epoch(self, runner: Any) -> None:
        """Broadcast BN stats, compare digests across ranks and append them to `<run_dir>/consistency.jsonl`."""
        model = getattr(runner.model, "module", runner.model)
        broadcast_bn_stats(model)
        digests = check_ranks_agree(model, f"epoch {runner.epoch + 1}")
        if runner.rank == 0:
            append_jsonl(
                osp.join(runner.work_dir, "consistency.jsonl"),
                {"epoch": runner.epoch + 1, "iter": runner.iter, "digest_per_rank": digests},
            )


__all__ = ["MetricsEvalHook", "RankConsistencyHook", "RankMismatchError", "check_ranks_agree"]
