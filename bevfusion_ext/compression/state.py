"""Compression "mode" state carried in checkpoints (like ModelOpt's modelopt_state): enough to rebuild the
compressed architecture from the dense config before loading weights strictly."""

from __future__ import annotations

import copy
from typing import Any

from torch import nn

from .pruning import apply_pruning
from .quantization import restore_quantizers

STATE_VERSION = 1


class CompressionStateError(RuntimeError):
    """The compression state in a checkpoint cannot be applied to the model built from the config."""


def empty_state() -> dict[str, Any]:
    """The state of an uncompressed model."""
    return {"version": STATE_VERSION, "pruning": {"applied": [], "events": []}}


def pruning_events(state: dict[str, Any] | None) -> list[dict[str, Any]]:
    """The recorded pruning events (empty for a dense model)."""
    return list((state or {}).get("pruning", {}).get("events", []))


def record_pruning(state: dict[str, Any], history: list, event: dict[str, Any]) -> dict[str, Any]:
    """A new state with one more applied pruning history and its event record."""
    new = copy.deepcopy(state)
    new["pruning"]["applied"].append(history)
    new["pruning"]["events"].append(event)
    return new


def restore_architecture(model: nn.Module, state: dict[str, Any] | None, example_inputs: Any, source: str) -> None:
    """Replay every recorded pruning history on a freshly built dense model, in order, then rebuild its quantizers."""
    if not state:
        return
    if state.get("version") != STATE_VERSION:
        raise CompressionStateError(
            f"{source}: compression state version {state.get('version')} is not "
            f"{STATE_VERSION}; it was written by another bevfusion-ext release"
        )
    for i, history in enumerate(state.get("pruning", {}).get("applied", [])):
        try:
            apply_pruning(model, example_inputs, history)
        except (KeyError, IndexError, ValueError, RuntimeError, AttributeError) as err:
            raise CompressionStateError(
                f"{source}: pruning event {i + 1} recorded in the checkpoint does not apply to the model built from "
                f"the config ({type(err).__name__}: {err}). Use the config the checkpoint was trained with."
            ) from None
    if state.get("quantization"):
        try:
            restore_quantizers(model, state["quantization"])
        except (KeyError, ValueError, RuntimeError, TypeError) as err:
            raise CompressionStateError(
                f"{source}: the quantizers recorded in the checkpoint do not fit the model built from the config "
                f"({type(err).__name__}: {err}). Use the config the checkpoint was trained with."
            ) from None


def is_quantized(state: dict[str, Any] | None) -> bool:
    """Whether a compression state carries quantizers (calibration already happened)."""
    return bool((state or {}).get("quantization"))
