"""What to prune: per-module-prefix ratios, importance criterion, channel rounding and protected layers."""

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field

from torch import nn

IMPORTANCES = ("magnitude", "bn_scale", "taylor")
MAX_RATIO = 0.9  # removing more than 90% of a group's channels in one go is never what a recipe means


@dataclass
class PruningSpec:
    """Pruning targets by module-path prefix; ratios are fractions of the dense model's prunable channels."""

    groups: dict[str, float]
    importance: str = "magnitude"
    round_to: int = 8
    protected: list[str] = field(default_factory=list)

    def validate(self, model: nn.Module) -> None:
        """Raise ValueError naming the first bad key, so a typo in a recipe fails before anything is pruned."""
        if self.importance not in IMPORTANCES:
            raise ValueError(f"importance {self.importance!r} is not one of {IMPORTANCES}")
        if not isinstance(self.round_to, int) or self.round_to < 1:
            raise ValueError(f"round_to must be a positive int, got {self.round_to!r}")
        check_ratios(self.groups, self.groups)
        names = [name for name, _ in model.named_modules()]
        for prefix in self.groups:
            if not any(under(name, prefix) for name in names):
                raise ValueError(f"pruning group {prefix!r} matches no module of {type(model).__name__}")


def check_ratios(ratios: Mapping[str, float], groups: Iterable[str]) -> None:
    """Raise ValueError naming a ratio key that is not a group or a value outside [0, MAX_RATIO]."""
    groups = set(groups)
    for key, ratio in ratios.items():
        if key not in groups:
            raise ValueError(f"ratio for {key!r}, which is not a pruning group ({sorted(groups)})")
        if not isinstance(ratio, (int, float)) or not 0.0 <= ratio <= MAX_RATIO:
            raise ValueError(f"pruning ratio of {key!r} must be in [0, {MAX_RATIO}], got {ratio!r}")


def under(name: str, prefix: str) -> bool:
    """Whether module path name lies under prefix ("" is the whole model)."""
    return not prefix or name == prefix or name.startswith(prefix + ".")


def owner(name: str, prefixes: Iterable[str]) -> str | None:
    """The longest prefix that name lies under, or None: nested groups let a sub-module get its own ratio."""
    matches = [p for p in prefixes if under(name, p)]
    return max(matches, key=len) if matches else None
