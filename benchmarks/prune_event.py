"""One pruning event on the `full` reference model at a channel-width multiplier, timed by phase as the
ProgressivePruningHook does it (1 rank, gloo): importance + plan, apply, DDP rebuild, optimizer surgery.

Prints one JSON line with the phase times and this process's peak RSS before and after the event; cost_scaling.py
runs it in a fresh process per width and repeat, so the peak memory is this event's alone.

    .venv/bin/python benchmarks/prune_event.py [--width 1.0] [--ratio 0.1] [--threads 1]
"""
import argparse
import gc
import json

import torch
import torch.distributed as dist
from common import full_at_width, peak_rss_mb, synthetic_batch, threads_option, timed

from bevfusion_ext.compression import pruning as core
from bevfusion_ext.compression.optimizer import param_names, transfer_state
from bevfusion_ext.models import build_model
from bevfusion_ext.runner.parallel import DistributedDataParallel

GROUPS = {"encoders.camera.backbone": 0.25, "encoders.camera.neck": 0.28, "decoder": 0.2, "heads": 0.12}


def trained(ddp: DistributedDataParallel, batch: dict) -> torch.optim.AdamW:
    """One AdamW step through DDP, so the event has optimizer moments to slice as in training."""
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    ddp.train_step(batch, optimizer)["loss"].backward()
    optimizer.step()
    return optimizer


def rebuild(model: torch.nn.Module, optimizer: torch.optim.Optimizer, batch: dict, history: list) -> dict[str, float]:
    """Seconds of the phases after the plan: apply it to the bare model, wrap it in DDP again, slice the moments."""
    names = param_names(optimizer, model)
    gc.collect()  # as the hook does: the old DDP reducer is gone before the new wrapper registers its hooks
    kept, apply_s = timed(lambda: core.apply_pruning(model, batch, history))
    ddp, ddp_s = timed(lambda: DistributedDataParallel(model, broadcast_buffers=False))

    def surgery() -> None:
        transfer_state(optimizer, names, torch.optim.AdamW(ddp.parameters(), lr=1e-4), model, kept)

    return {"apply": apply_s, "ddp_rebuild": ddp_s, "optimizer_surgery": timed(surgery)[1]}


def main() -> None:
    """Build the model at --width under DDP, take one training step, then run and measure one event."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--width", type=float, default=1.0, help="channel-width multiplier of the `full` model")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of each group's channels this event removes")
    threads_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    batch = synthetic_batch(1)
    model = build_model(full_at_width(args.width))
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = trained(ddp, batch)
    params_before, flops_before = core.count_params_flops(model, batch)
    rss_before = peak_rss_mb()
    spec, ratios = core.PruningSpec(groups=GROUPS, round_to=8), {g: args.ratio for g in GROUPS}
    history, plan_s = timed(lambda: core.plan_pruning(model, batch, spec, ratios))
    del ddp
    seconds = {"importance_and_plan": plan_s, **rebuild(model, optimizer, batch, history)}
    params_after, flops_after = core.count_params_flops(model, batch)
    print(json.dumps({"width": args.width, "ratio_per_group": args.ratio, "seconds": seconds,
                      "total_seconds": sum(seconds.values()), "peak_rss_mb_before_event": rss_before,
                      "peak_rss_mb_after_event": peak_rss_mb(), "params": [params_before, params_after],
                      "flops": [flops_before, flops_after]}))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
