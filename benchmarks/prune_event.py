"""Time and peak memory of one pruning event on the `full` reference model: importance + plan, apply, optimizer
surgery and DDP rebuild, as the ProgressivePruningHook does them (1 rank, gloo).

    .venv/bin/python benchmarks/prune_event.py [--size full] [--ratio 0.1]
"""
import argparse
import gc
import os
import time

import torch
import torch.distributed as dist
from common import peak_rss_mb, save

from bevfusion_ext.compression import pruning as core
from bevfusion_ext.compression.optimizer import param_names, transfer_state
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.models import build_model, reference_config
from bevfusion_ext.runner.parallel import DistributedDataParallel

GROUPS = {"encoders.camera.backbone": 0.25, "encoders.camera.neck": 0.28, "decoder": 0.2, "heads": 0.12}


def main() -> None:
    """Build, take one optimizer step, then time each phase of one event."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="full")
    parser.add_argument("--ratio", type=float, default=0.1, help="fraction of each group's channels this event removes")
    args = parser.parse_args()
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29533")
    dist.init_process_group("gloo", rank=0, world_size=1)
    ds = SyntheticBEVDataset(1)
    batch = collate([ds[0]])
    model = build_model(reference_config(args.size))
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    ddp.train_step(batch, optimizer)["loss"].backward()
    optimizer.step()
    rss_before = peak_rss_mb()
    spec = core.PruningSpec(groups=GROUPS, round_to=8)
    params_before, flops_before = core.count_params_flops(model, batch)
    phases = {}
    tic = time.perf_counter()
    history = core.plan_pruning(model, batch, spec, {g: args.ratio for g in GROUPS})
    phases["importance_and_plan"] = time.perf_counter() - tic
    names = param_names(optimizer, model)
    del ddp
    gc.collect()
    tic = time.perf_counter()
    kept = core.apply_pruning(model, batch, history)
    phases["apply"] = time.perf_counter() - tic
    tic = time.perf_counter()
    ddp = DistributedDataParallel(model, broadcast_buffers=False)
    phases["ddp_rebuild"] = time.perf_counter() - tic
    tic = time.perf_counter()
    new_optimizer = torch.optim.AdamW(ddp.parameters(), lr=1e-4)
    transfer_state(optimizer, names, new_optimizer, model, kept)
    phases["optimizer_surgery"] = time.perf_counter() - tic
    params_after, flops_after = core.count_params_flops(model, batch)
    result = {"size": args.size, "ratio_per_group": args.ratio, "seconds": phases,
              "total_seconds": sum(phases.values()), "peak_rss_mb_before_event": rss_before,
              "peak_rss_mb_after_event": peak_rss_mb(), "params": [params_before, params_after],
              "flops": [flops_before, flops_after]}
    print(result)
    print("saved", save(f"prune_event_{args.size}", result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
