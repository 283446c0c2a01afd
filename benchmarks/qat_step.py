"""Training-step time with INT8 fake quantization (ModelOpt / pytorch-quantization) vs FP32 on the reference model.
Target (issue 4): <= 1.3x. Both measured in the same process, alternating, medians over repeats.

    .venv/bin/python benchmarks/qat_step.py [--size tiny] [--repeats 7] [--backend modelopt]
"""
import argparse
import copy

import torch
from common import median_seconds, save

from bevfusion_ext.compression.quantization import QuantSpec, calibrate, quantize_model
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.models import build_model, reference_config


def step_fn(model: torch.nn.Module, batch: dict) -> callable:
    """One AdamW training step on the summed losses."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad()
        sum(v for k, v in model(return_loss=True, **batch).items() if "loss" in k).backward()
        optimizer.step()

    return step


def main() -> None:
    """Measure FP32 and fake-quant steps alternately and report the ratio of medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backend", default="modelopt")
    args = parser.parse_args()
    torch.manual_seed(0)
    ds = SyntheticBEVDataset(args.batch)
    batch = collate([ds[i] for i in range(args.batch)])
    fp32 = build_model(reference_config(args.size)).train()
    qat = copy.deepcopy(fp32)
    spec = QuantSpec(backend=args.backend)
    quantize_model(qat, spec)
    calibrate(qat, spec, [batch], lambda m, b: m(return_loss=False, **b))
    qat.train()
    steps = {"fp32": step_fn(fp32, batch), "fake_quant": step_fn(qat, batch)}
    samples = {name: [] for name in steps}
    for _ in range(args.repeats):
        for name, fn in steps.items():
            samples[name].append(median_seconds(fn, repeats=1, warmup=0)[0])
    med = {name: sorted(v)[len(v) // 2] for name, v in samples.items()}
    result = {"size": args.size, "batch": args.batch, "backend": args.backend, "median_seconds": med,
              "samples": samples, "ratio": med["fake_quant"] / med["fp32"], "target_ratio": 1.3}
    print({k: v for k, v in result.items() if k != "samples"})
    print("saved", save(f"qat_step_{args.size}_{args.backend}", result))


if __name__ == "__main__":
    main()
