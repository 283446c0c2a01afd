"""mmcv / torchpack integration: config loading, builders, runner, hooks and the training entry point."""

from .config import ConfigError, ConfigSources, load_config, validate_config
from .hooks import MetricsEvalHook, RankConsistencyHook, RankMismatchError, check_ranks_agree
from .runner import CompressionEpochBasedRunner
from .train import init_distributed, prepare_config, train

__all__ = [
    "CompressionEpochBasedRunner",
    "ConfigError",
    "ConfigSources",
    "MetricsEvalHook",
    "RankConsistencyHook",
    "RankMismatchError",
    "check_ranks_agree",
    "init_distributed",
    "load_config",
    "prepare_config",
    "train",
    "validate_config",
]
