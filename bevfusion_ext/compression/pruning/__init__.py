"""Framework-free structured pruning (channels, attention heads, whole blocks) of BEVFusion-shaped models.

See docs/pruning.md. No mmcv / mmdet import: the runner hook drives these functions.
"""

from .counting import count_params_flops, group_channels
from .depth import block_counts
from .engine import apply_pruning, plan_pruning, training_loss
from .heads import head_counts
from .protection import auto_protected
from .report import model_summary, prune_report
from .spec import MAX_RATIO, PruningSpec
from .target import scale_for_target

__all__ = ["MAX_RATIO", "PruningSpec", "apply_pruning", "auto_protected", "block_counts", "count_params_flops",
           "group_channels", "head_counts", "model_summary", "plan_pruning", "prune_report", "scale_for_target",
           "training_loss"]
