"""Config + checkpoint -> the compressed model, for evaluation, analysis and export (no hand-editing)."""
from __future__ import annotations

from torch import nn

from ..compression import checkpoint_weights, load_state_dict_strict, read_checkpoint
from ..compression.state import is_quantized, restore_architecture
from .builder import build_dataset, build_model, example_batch
from .config import ConfigError
from .train import prepare_config


class MissingCompressionState(ConfigError):
    """The checkpoint records no compression although the caller requires a compressed one."""


def load_compressed_model(config: str, checkpoint: str, opts: list[str] = (), require_compression: bool = False,
                          ) -> tuple[nn.Module, dict, dict]:
    """Build the dense model from the config, replay the checkpoint's compression state, then load weights strictly.

    Returns (model in eval mode, config, an example batch of 2 validation samples).
    """
    cfg, sources = prepare_config(config, list(opts))
    ckpt = read_checkpoint(checkpoint)
    state = ckpt.get("meta", {}).get("compression")
    if require_compression and not ((state or {}).get("pruning", {}).get("applied") or is_quantized(state)):
        raise MissingCompressionState(f"checkpoint {checkpoint} carries no compression state (meta.compression); "
                                      "pass a checkpoint written by tools/train_compressed.py with a recipe")
    val_set = build_dataset(cfg.data.val, "data.val", sources)
    example = example_batch(val_set)
    model = build_model(cfg, sources, init_weights=False)  # every weight comes from the checkpoint
    restore_architecture(model, state, example, checkpoint)
    load_state_dict_strict(model, checkpoint_weights(ckpt), checkpoint)
    return model.eval(), cfg, example
