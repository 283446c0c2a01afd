"""Checkpoint files that are written atomically, read with clear errors and loaded strictly."""

from __future__ import annotations

import os
import pickle
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import nn


class CheckpointError(RuntimeError):
    """A checkpoint is missing, unreadable or does not fit the model; the message says which and what to do."""


def atomic_save(obj: Any, path: str | os.PathLike) -> None:
    """Write `obj` next to `path` and rename it into place, so a crash never leaves a half-written checkpoint."""
    path = Path(path)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a writer that was killed mid-write
        stale.unlink(missing_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "wb") as f:
            torch.save(obj, f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def atomic_symlink(target: str, link: str | os.PathLike) -> None:
    """Point `link` at `target` in one rename, so `latest.pth` always names a complete checkpoint."""
    link = Path(link)
    tmp = link.with_name(f".{link.name}.tmp-{os.getpid()}")
    tmp.unlink(missing_ok=True)
    os.symlink(target, tmp)
    os.replace(tmp, link)


def read_checkpoint(path: str | os.PathLike) -> dict:
    """Load a checkpoint dict on the CPU with only plain types allowed, naming the file when it is unusable."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path}: no such file; pass the path of an existing .pth file")
    try:
        ckpt = torch.load(path, map_location="cpu", weights_only=True)
    except (EOFError, RuntimeError, zipfile.BadZipFile, pickle.UnpicklingError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {path}: cannot be read ({type(err).__name__}: {str(err).splitlines()[0]}); "
            "the file is truncated, corrupted or not a PyTorch checkpoint - use the previous checkpoint of the run"
        ) from None
    if not isinstance(ckpt, Mapping):
        raise CheckpointError(f"checkpoint {path}: holds a {type(ckpt).__name__}, expected a dict with 'state_dict'")
    return dict(ckpt)


def checkpoint_weights(ckpt: Mapping) -> dict[str, torch.Tensor]:
    """The model weights of a checkpoint dict, without a DDP `module.` prefix (mmcv saves either form)."""
    state = ckpt.get("state_dict", ckpt)
    return {k.removeprefix("module."): v for k, v in state.items()}


def state_dict_mismatches(expected: Mapping[str, torch.Tensor], given: Mapping[str, torch.Tensor]) -> list[str]:
    """List every way `given` fails to fit `expected`: shape mismatches first, then missing and unexpected keys."""
    shape = [
        f"{k}: checkpoint {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and tuple(given[k].shape) != tuple(v.shape)
    ]
    missing = [f"{k}: missing from checkpoint" for k in expected if k not in given]
    unexpected = [f"{k}: not in model" for k in given if k not in expected]
    return shape + missing + unexpected


def load_state_dict_strict(model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str) -> None:
    """Load weights only if every key and shape matches, so a wrong checkpoint never loads silently."""
    problems = state_dict_mismatches(model.state_dict(), state_dict)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise CheckpointError(
            f"checkpoint {source} does not fit the model built from the config "
            f"({len(problems)} problems):\n  {shown}{more}\n"
            "Use the config the checkpoint was trained with, or a checkpoint of this architecture."
        )
    model.load_state_dict(state_dict, strict=True)
