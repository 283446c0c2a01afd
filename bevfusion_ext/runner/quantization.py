"""The quantization hook: sensitivity-driven FP16 exclusions, data-parallel calibration (PTQ), then QAT controls."""
from __future__ import annotations

import dataclasses
import math
import os.path as osp
import time
from collections.abc import Callable, Iterable
from itertools import islice
from typing import Any

from mmcv.runner import Hook
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from ..compression import quantization as quant
from ..compression.analysis import eval_forward
from ..compression.pruning import training_loss
from ..compression.recipe import QuantizationRecipe
from ..compression.state import is_quantized
from .hooks import append_jsonl, broadcast_bn_stats, check_ranks_agree
from .surgery import all_reduce_max, decide_on_rank0, rebuild_around


class NonFiniteAmaxError(RuntimeError):
    """Calibration produced an amax that is NaN, infinite or zero: the quantizer would break the model."""


class QuantizationHook(Hook):
    """At the configured epoch: pick FP16 layers by sensitivity, quantize, calibrate on every rank's shard with amax
    max-reduced, verify all ranks agree; later epochs freeze BN statistics and quantizers as configured (QAT)."""

    def __init__(self, recipe: QuantizationRecipe, calib_batches: Callable[[], Iterable[dict]],
                 rewrap: Callable[[nn.Module], nn.Module], new_optimizer: Callable[[nn.Module], Any]) -> None:
        self.recipe, self.calib_batches = recipe, calib_batches
        self.rewrap, self.new_optimizer = rewrap, new_optimizer

    def before_train_epoch(self, runner: Any) -> None:
        """Calibrate once when its epoch comes; apply QAT freezes from their epochs on (model.train() resets BN)."""
        if runner.epoch >= self.recipe.calibration_epoch and not is_quantized(runner.compression_state):
            self._calibrate(runner)
        model = runner.model.module
        if self.recipe.freeze_bn_epoch is not None and runner.epoch >= self.recipe.freeze_bn_epoch:
            for module in model.modules():
                if isinstance(module, _BatchNorm):
                    module.eval()
        if self.recipe.freeze_quantizers_epoch is not None and runner.epoch >= self.recipe.freeze_quantizers_epoch:
            quant.freeze_quantizers(model)

    def _sensitive_layers(self, runner: Any, model: nn.Module, batches: list[dict]) -> list[str]:
        """The k layers whose lone quantization raises the training loss most, decided on rank 0."""
        if not self.recipe.keep_fp16:
            return []

        def rank() -> list[str]:
            scored = quant.layer_sensitivity(model, self.recipe.spec, batches, eval_forward,
                                             lambda m: -sum(float(training_loss(m, b)) for b in batches))
            return [name for name, _ in scored[: self.recipe.keep_fp16]]

        layers = decide_on_rank0(rank)
        runner.logger.info("quantization: keeping the %d most sensitive layers in FP16: %s", len(layers), layers)
        return layers

    def _calibrate(self, runner: Any) -> None:
        tic = time.perf_counter()
        model = runner.model.module
        broadcast_bn_stats(model)
        batches = list(islice(self.calib_batches(), self.recipe.calibration_batches))
        runner.logger.info("quantization: calibrating on %d batches per rank", len(batches))
        fp16 = self._sensitive_layers(runner, model, batches[: self.recipe.sensitivity_batches])
        spec = dataclasses.replace(self.recipe.spec, exclude=[*self.recipe.spec.exclude, *fp16])
        model = rebuild_around(runner, lambda m: (quant.quantize_model(m, spec), {})[1], self.rewrap,
                               self.new_optimizer)
        amax = quant.calibrate(model, spec, batches, eval_forward, sync=all_reduce_max)
        bad = [name for name, value in amax.items() if not math.isfinite(value) or value <= 0]
        if bad:
            raise NonFiniteAmaxError(f"calibration gave amax {amax[bad[0]]} for quantizer '{bad[0]}' "
                                     f"({len(bad)} bad in all); exclude that layer or check the calibration data")
        digests = check_ranks_agree(model, "calibration")
        runner.compression_state["quantization"] = quant.quantizer_state(model)
        report = quant.quantization_report(model)
        runner.logger.info("quantization: modules by type\n%s", quant.format_report(report))
        record = {"epoch": runner.epoch, "iter": runner.iter, "backend": spec.backend, "calibrator": spec.calibrator,
                  "quantizers": len(amax), "fp16_layers": fp16, "batches_per_rank": len(batches),
                  "digest_per_rank": digests, "seconds": round(time.perf_counter() - tic, 3), "modules": report}
        runner.compression_state["quantization_event"] = record
        runner.logger.info("quantization: %d quantizers calibrated (%s, %s) in %.1f s", len(amax), spec.backend,
                           spec.calibrator, record["seconds"])
        if runner.rank == 0:
            append_jsonl(osp.join(runner.work_dir, "quantization_events.jsonl"), record)
