"""Framework-free compression core: recipes, pruning, quantization and checkpoint state on plain torch."""

from .checkpoint import (
    CheckpointError,
    atomic_save,
    atomic_symlink,
    checkpoint_weights,
    load_state_dict_strict,
    read_checkpoint,
    state_dict_mismatches,
)
from .digest import combine_digests, first_difference, gradient_digests, layer_digests, model_digest

__all__ = [
    "CheckpointError",
    "atomic_save",
    "atomic_symlink",
    "checkpoint_weights",
    "combine_digests",
    "first_difference",
    "gradient_digests",
    "layer_digests",
    "load_state_dict_strict",
    "model_digest",
    "read_checkpoint",
    "state_dict_mismatches",
]
