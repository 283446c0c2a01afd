"""Single-process evaluation of a model on a dataset split, with a progress bar (analysis tools, benchmarks)."""

from __future__ import annotations

import mmcv
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset


def evaluate_model(model: nn.Module, dataset: Dataset, batch_size: int = 4, progress: bool = True) -> dict[str, float]:
    """Run inference over the whole split in order and score it with the dataset's evaluator."""
    loader = DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=dataset.collate)
    bar = mmcv.ProgressBar(len(dataset)) if progress else None
    results: list[dict] = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            out = model(return_loss=False, **batch)
            results.extend(out)
            for _ in out:
                if bar is not None:
                    bar.update()
    return dataset.evaluate(results)
