"""The progressive pruning hook: runs the recipe's pruning events inside the mmcv runner, identically on every rank."""

from __future__ import annotations

import os.path as osp
import time
from collections.abc import Callable
from typing import Any

from mmcv.runner import Hook
from torch import nn

from ..compression import pruning as core
from ..compression.pruning.depth import block_list
from ..compression.pruning.sparsity import SparsityPenalty
from ..compression.recipe import PruningRecipe
from ..compression.state import record_pruning
from .hooks import append_jsonl, broadcast_bn_stats, check_ranks_agree
from .surgery import decide_on_rank0, rebuild_around


class ProgressivePruningHook(Hook):
    """Before the scheduled iterations, prune the bare model, re-wrap DDP and carry the optimizer state over."""

    def __init__(
        self,
        recipe: PruningRecipe,
        example_batch: dict,
        rewrap: Callable[[nn.Module], nn.Module],
        new_optimizer: Callable[[nn.Module], Any],
    ) -> None:
        self.recipe, self.example, self.rewrap, self.new_optimizer = recipe, example_batch, rewrap, new_optimizer
        self.spec = recipe.spec()

    def _schedule_state(self, runner: Any) -> dict:
        return runner.compression_state.setdefault("schedule", {"events_done": 0})

    def before_train_iter(self, runner: Any) -> None:
        """Run the next event when its iteration has come (several in a row if a resume skipped past them)."""
        event_iters = self.recipe.schedule.event_iters(len(runner.data_loader))
        while (done := self._schedule_state(runner)["events_done"]) < len(event_iters) and runner.iter >= event_iters[
            done
        ]:
            self._prune_event(runner)

    def _start(self, runner: Any, model: nn.Module) -> dict:
        """On the first event of a run: measure the starting model (params, FLOPs, block and head counts) and find
        the scale that meets the target with the final block and head counts."""
        schedule = self._schedule_state(runner)
        if "scale" not in schedule:
            params, flops = core.count_params_flops(model, self.example)
            target = dict(params_reduction=self.recipe.params_reduction, flops_reduction=self.recipe.flops_reduction,
                          depth=self.recipe.depth, heads=self.recipe.heads)
            searched = target["params_reduction"] is not None or target["flops_reduction"] is not None
            scale = (
                decide_on_rank0(lambda: core.scale_for_target(model, self.example, self.spec, **target))
                if searched
                else 1.0
            )
            schedule.update(scale=scale, start_params=params, start_flops=flops,
                            start_blocks=core.block_counts(model, list(self.recipe.depth)),
                            start_heads=core.head_counts(model, list(self.recipe.heads)))
            runner.logger.info("pruning: start %d params, %d FLOPs, group scale %.3f, blocks %s, heads %s", params,
                               flops, scale, schedule["start_blocks"], schedule["start_heads"])
        return schedule

    def _counts(self, model: nn.Module, schedule: dict, events_done: int) -> tuple[dict[str, int], dict[str, int]]:
        """Block and head counts to have after `events_done` events (SECOND stages: their target at once)."""
        depth = self.recipe.counts_after(events_done, self.recipe.depth, schedule.get("start_blocks", {}))
        depth = {p: n if block_list(model, p).scheduled else self.recipe.depth[p] for p, n in depth.items()}
        return depth, self.recipe.counts_after(events_done, self.recipe.heads, schedule.get("start_heads", {}))

    def _prune_event(self, runner: Any) -> None:
        """One event: plan on rank 0, apply everywhere, rebuild DDP + optimizer, verify and record."""
        tic = time.perf_counter()
        model = runner.model.module
        broadcast_bn_stats(model)
        schedule = self._start(runner, model)
        done = schedule["events_done"]
        step = self.recipe.step_ratios(done, schedule["scale"])
        depth, heads = self._counts(model, schedule, done + 1)
        before = self._structure(model)
        history = decide_on_rank0(lambda: core.plan_pruning(model, self.example, self.spec, step, depth=depth,
                                                            heads=heads))
        rebuild_around(runner, lambda m: core.apply_pruning(m, self.example, history), self.rewrap, self.new_optimizer)
        digests = check_ranks_agree(model, f"pruning event {done + 1}")
        self._record(runner, model, history, step, digests, time.perf_counter() - tic, before)

    def _structure(self, model: nn.Module) -> dict[str, dict[str, int]]:
        """Current block counts of the recipe's depth paths and head counts of its heads paths."""
        return {"blocks": core.block_counts(model, list(self.recipe.depth)),
                "heads": core.head_counts(model, list(self.recipe.heads))}

    def _record(self, runner: Any, model: nn.Module, history: list, step: dict, digests: list, seconds: float,
                before: dict[str, dict[str, int]]) -> None:
        schedule = self._schedule_state(runner)
        params, flops = core.count_params_flops(model, self.example)
        after = self._structure(model)
        event = {
            "event": schedule["events_done"] + 1,
            "epoch": runner.epoch,
            "iter": runner.iter,
            "step_ratios": step,
            "cumulative_ratios": self.recipe.cumulative_ratios(schedule["events_done"] + 1, schedule["scale"]),
            "params": params,
            "flops": flops,
            "params_reduction": 1.0 - params / schedule["start_params"],
            "flops_reduction": 1.0 - flops / schedule["start_flops"],
            "group_channels": core.group_channels(model, self.spec),
            **{kind: {path: [before[kind][path], count] for path, count in after[kind].items()} for kind in after},
            "digest_per_rank": digests,
            "seconds": round(seconds, 3),
        }
        runner.compression_state = record_pruning(runner.compression_state, history, event)
        runner.compression_state["schedule"]["events_done"] += 1
        runner.logger.info(
            "pruning event %d at epoch %d iter %d: params %d (-%.1f%%), FLOPs %d (-%.1f%%), %.2f s",
            event["event"],
            runner.epoch,
            runner.iter,
            params,
            100 * event["params_reduction"],
            flops,
            100 * event["flops_reduction"],
            seconds,
        )
        if runner.rank == 0:
            append_jsonl(osp.join(runner.work_dir, "pruning_events.jsonl"), event)


class SparsityHook(Hook):
    """Add the recipe's sparsity penalty to every iteration's loss until the last pruning event; register it above
    the optimizer hook, whose backward then carries its gradient (all-reduced by DDP like the rest)."""

    def __init__(self, recipe: PruningRecipe, example_batch: dict) -> None:
        self.recipe, self.example = recipe, example_batch
        self.penalty: SparsityPenalty | None = None
        self.built_after = -1  # events done when the penalty's groups were found

    def after_train_iter(self, runner: Any) -> None:
        """Add the penalty to runner.outputs['loss'] (log: loss_sparsity); rebuild its groups after an event."""
        done = runner.compression_state.get("schedule", {}).get("events_done", 0)
        if done >= self.recipe.schedule.num_events:
            self.penalty = None
            return
        if self.penalty is None or self.built_after != done:
            sparsity = self.recipe.sparsity
            self.penalty = SparsityPenalty(runner.model.module, self.example, self.recipe.spec(), sparsity.kind,
                                           sparsity.strength)
            self.built_after = done
        penalty = self.penalty()
        runner.outputs["loss"] = runner.outputs["loss"] + penalty
        runner.log_buffer.update({"loss_sparsity": float(penalty.detach())}, runner.outputs.get("num_samples", 1))
