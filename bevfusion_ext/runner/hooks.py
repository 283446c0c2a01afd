"""mmcv hooks of bevfusion-ext: each does one thing at one point of the training loop."""

from __future__ import annotations

import json
import os.path as osp
from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from mmcv.runner import HOOKS, DistEvalHook, Hook
from torch.nn.modules.batchnorm import _BatchNorm

from ..compression import combine_digests, first_difference, gradient_digests, layer_digests
from .report import HEADLINE


def append_jsonl(path: str, record: dict) -> None:
    """Append one JSON record to a run-directory log that tools and tests read back."""
    with open(path, "a") as f:
        f.write(json.dumps(record) + "\n")


@HOOKS.register_module()
class MetricsEvalHook(DistEvalHook):
    """mmcv's distributed eval hook that also records every evaluation in `<run_dir>/metrics.jsonl`."""

    def before_train_epoch(self, runner: Any) -> None:
        """mmcv's evaluation before training (`start: 0`), then back to train mode: the runner switched the model to
        train mode before this hook, and BEVFusion's model would otherwise take the test path for the first epoch."""
        super().before_train_epoch(runner)
        runner.model.train()

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




class NonFiniteError(RuntimeError):
    """Training produced a NaN/inf loss or gradient; the run stops before the next checkpoint is written."""


def first_non_finite(model: Any) -> str | None:
    """Name of the first parameter whose value or gradient is not finite."""
    for name, p in model.named_parameters():
        if not torch.isfinite(p).all() or (p.grad is not None and not torch.isfinite(p.grad).all()):
            return name
    return None


@HOOKS.register_module()
class NonFiniteGuardHook(Hook):
    """After each step, stop every rank together if any rank saw a non-finite loss, gradient or updated weight,
    naming the layer, before the next forward (or checkpoint) uses it."""

    def after_train_iter(self, runner: Any) -> None:
        """Check the loss and the gradient and weight norms; all ranks agree before anyone raises (no hang)."""
        model = getattr(runner.model, "module", runner.model)
        tensors = [p.grad for p in model.parameters() if p.grad is not None] + list(model.parameters())
        norms = torch._foreach_norm([t.detach() for t in tensors if t.is_floating_point()])
        finite = bool(torch.isfinite(runner.outputs["loss"]).all()) and all(bool(torch.isfinite(n)) for n in norms)
        flag = torch.tensor([0.0 if finite else 1.0])
        if dist.is_initialized() and dist.get_world_size() > 1:
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        if flag.item():
            layer = first_non_finite(model)
            raise NonFiniteError(
                f"non-finite loss, gradient or weight at epoch {runner.epoch + 1} iter {runner.iter + 1}"
                + (f": first non-finite tensor in '{layer}'" if layer else " on another rank")
                + ". The last checkpoint is intact: resume from it with a lower LR, or exclude that layer from"
                " quantization."
            )


@HOOKS.register_module()
class GradientSyncHook(Hook):
    """On the first step after the model was rebuilt (pruning, quantization), prove DDP still all-reduces gradients:
    every rank must hold the same gradients, recorded in `<run_dir>/grad_sync.jsonl`."""

    def after_train_iter(self, runner: Any) -> None:
        """Compare gradient digests across ranks once after each rebuild."""
        if not getattr(runner, "gradient_check_pending", False):
            return
        runner.gradient_check_pending = False
        digests = check_ranks_agree(getattr(runner.model, "module", runner.model), "gradients after a model rebuild",
                                    gradient_digests)
        if runner.rank == 0:
            append_jsonl(osp.join(runner.work_dir, "grad_sync.jsonl"),
                         {"epoch": runner.epoch, "iter": runner.iter, "grad_digest_per_rank": digests})
