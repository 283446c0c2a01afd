"""Digests of a model's architecture and weights, to prove every rank holds the same model."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import nn


def tensor_digests(named: Iterable[tuple[str, torch.Tensor]]) -> dict[str, str]:
    """One short hash per named tensor (name, dtype, shape, bytes), so a mismatch can be named."""
    out = {}
    for name, tensor in named:
        h = hashlib.sha256(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
        out[name] = h.hexdigest()[:16]
    return out


def layer_digests(model: nn.Module) -> dict[str, str]:
    """Digests of every parameter and buffer: the architecture and the weights."""
    return tensor_digests(model.state_dict().items())


def gradient_digests(model: nn.Module) -> dict[str, str]:
    """Digests of every parameter's gradient (missing gradients hash as empty), to prove DDP still all-reduces."""
    empty = torch.empty(0)
    return tensor_digests((n, p.grad if p.grad is not None else empty) for n, p in model.named_parameters())


def combine_digests(digests: dict[str, str]) -> str:
    """A single hash from per-layer digests, so ranks can exchange the details and still compare one value."""
    h = hashlib.sha256()
    for name, digest in digests.items():
        h.update(f"{name}:{digest};".encode())
    return h.hexdigest()[:16]


def model_digest(model: nn.Module) -> str:
    """A single hash of the whole architecture and all weights."""
    return combine_digests(layer_digests(model))


def first_difference(a: dict[str, str], b: dict[str, str]) -> str | None:
    """The first tensor name whose digest (or presence) differs between two `layer_digests` results."""
    for name in list(a) + [n for n in b if n not in a]:
        if a.get(name) != b.get(name):
            return name
    return None
