"""Training-step time with INT8 fake quantization vs FP32: the step helpers cost_scaling.py uses on the `full` model,
and (as a script) the ModelOpt vs pytorch-quantization comparison on one model, all stepped in turn in one process.
Target (issue 4): <= 1.3x.

    .venv/bin/python benchmarks/qat_step.py [--size tiny] [--batch 2] [--repeats 7] [--backends ...] [--threads 1]
"""
import argparse
import copy
import statistics
from collections.abc import Callable

import torch
from common import save, synthetic_batch, threads_option, timed, write_section

from bevfusion_ext.compression.quantization import BACKENDS, QuantSpec, calibrate, quantize_model
from bevfusion_ext.models import build_model, reference_config

TARGET_RATIO = 1.3


def train_step(model: torch.nn.Module, batch: dict) -> Callable[[], None]:
    """One AdamW training step on the summed losses: the unit of cost of a QAT epoch."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5)

    def step() -> None:
        optimizer.zero_grad()
        sum(v for k, v in model(return_loss=True, **batch).items() if "loss" in k).backward()
        optimizer.step()

    return step


def fake_quant_copy(model: torch.nn.Module, batch: dict, backend: str) -> torch.nn.Module:
    """A copy of model with INT8 fake quantizers calibrated on batch, in training mode as QAT trains it."""
    qat = copy.deepcopy(model)
    spec = QuantSpec(backend=backend)
    quantize_model(qat, spec)
    calibrate(qat, spec, [batch], lambda m, b: m(return_loss=False, **b))
    return qat.train()


def alternate(models: dict[str, torch.nn.Module], batch: dict, repeats: int) -> dict[str, list[float]]:
    """Seconds of each model's training step per repeat, the models in turn so load drifts hit all of them alike."""
    steps = {name: train_step(model.train(), batch) for name, model in models.items()}
    for step in steps.values():
        step()  # warmup: AdamW state and first-call allocations
    samples: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, step in steps.items():
            samples[name].append(timed(step)[1])
    return samples


def section(result: dict) -> str:
    """The README section: one row per backend, ratios to the FP32 step of the same process."""
    med, fp32 = result["median_seconds"], result["median_seconds"]["fp32"]
    rows = "\n".join(f"| {b} | {fp32:.3f} s | {med[b]:.3f} s | {med[b] / fp32:.2f}x |" for b in result["backends"])
    return f"""## Fake-quant training step by backend (`qat_step.py`), target <= {TARGET_RATIO}x

`{result['size']}` reference model ({result['params'] / 1e6:.2f} M params), batch {result['batch']},
{result['threads']} torch thread(s): the FP32 model and one calibrated fake-quant copy per backend take AdamW steps
in turn in one process, after one warmup step each; medians of {result['repeats']} steps. The `full` model at several
widths is in the cost-scaling section.

| backend | FP32 step | fake-quant step | ratio |
|---|---|---|---|
{rows}
"""


def main() -> None:
    """Measure the FP32 and each backend's fake-quant step alternately and report the ratios of medians."""
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--size", default="tiny")
    parser.add_argument("--batch", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--backends", nargs="+", default=list(BACKENDS), choices=BACKENDS)
    threads_option(parser)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    batch = synthetic_batch(args.batch)
    fp32 = build_model(reference_config(args.size))
    models = {"fp32": fp32, **{b: fake_quant_copy(fp32, batch, b) for b in args.backends}}
    samples = alternate(models, batch, args.repeats)
    med = {name: statistics.median(v) for name, v in samples.items()}
    result = {"size": args.size, "params": sum(p.numel() for p in fp32.parameters()), "batch": args.batch,
              "threads": args.threads, "backends": args.backends, "repeats": args.repeats, "median_seconds": med,
              "samples": samples, "ratio": {b: med[b] / med["fp32"] for b in args.backends},
              "target_ratio": TARGET_RATIO}
    print({k: v for k, v in result.items() if k != "samples"})
    print("saved", save("qat_step", result), write_section("qat_step", section(result)))


if __name__ == "__main__":
    main()
