"""The `compression:` section of a config: parsed and validated up front, with errors that name the key."""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from torch import nn

from .pruning.depth import check_depth_target
from .pruning.heads import check_head_target
from .pruning.sparsity import KINDS as SPARSITY_KINDS
from .pruning.spec import IMPORTANCES, MAX_RATIO, PruningSpec
from .quantization.spec import QuantSpec

SHAPES = ("linear", "cubic")


class RecipeError(ValueError):
    """A recipe value is missing, malformed or out of range; `key` is its dotted path in the config."""

    def __init__(self, key: str, problem: str, fix: str) -> None:
        super().__init__(f"recipe key '{key}': {problem}. {fix}")
        self.key, self.problem, self.fix = key, problem, fix


@dataclass(frozen=True)
class PruningSchedule:
    """When pruning events happen (epochs, or iterations when given) and how the removed fraction grows."""

    start_epoch: int = 0
    end_epoch: int = 1
    start_iter: int | None = None
    end_iter: int | None = None
    num_events: int = 1
    shape: str = "cubic"

    def event_iters(self, iters_per_epoch: int) -> list[int]:
        """The training iteration before which each event runs, evenly spread over [start, end)."""
        start = self.start_iter if self.start_iter is not None else self.start_epoch * iters_per_epoch
        end = self.end_iter if self.end_iter is not None else self.end_epoch * iters_per_epoch
        return [start + (end - start) * k // self.num_events for k in range(self.num_events)]

    def fraction_after(self, events_done: int) -> float:
        """Fraction of the final pruning reached after `events_done` events (cubic: most of it early, Zhu & Gupta)."""
        t = min(events_done, self.num_events) / self.num_events
        return t if self.shape == "linear" else 1.0 - (1.0 - t) ** 3


@dataclass(frozen=True)
class Sparsity:
    """A sparsity penalty added to the training loss until the last pruning event (pruning/sparsity.py)."""

    kind: str
    strength: float


@dataclass(frozen=True)
class PruningRecipe:
    """What to prune (channel ratios, block and head counts), how much, how to rank channels and when."""

    groups: dict[str, float]
    schedule: PruningSchedule
    importance: str = "magnitude"
    round_to: int = 8
    protected: tuple[str, ...] = ()
    params_reduction: float | None = None
    flops_reduction: float | None = None
    depth: dict[str, int] = field(default_factory=dict)  # block list path -> blocks left at the end
    heads: dict[str, int] = field(default_factory=dict)  # attention blocks' path -> heads left at the end
    sparsity: Sparsity | None = None

    def spec(self) -> PruningSpec:
        """The core pruning spec this recipe prunes with (groups, importance, round_to, protected layers)."""
        return PruningSpec(groups=dict(self.groups), importance=self.importance, round_to=self.round_to,
                           protected=list(self.protected))

    def cumulative_ratios(self, events_done: int, scale: float) -> dict[str, float]:
        """Per-group fraction of the starting channels removed once `events_done` events have run."""
        f = self.schedule.fraction_after(events_done)
        return {g: min(MAX_RATIO, scale * r) * f for g, r in self.groups.items()}

    def step_ratios(self, events_done: int, scale: float) -> dict[str, float]:
        """Per-group fraction of the CURRENT channels the next event removes, so events compose to the plan."""
        before, after = self.cumulative_ratios(events_done, scale), self.cumulative_ratios(events_done + 1, scale)
        return {g: 1.0 - (1.0 - after[g]) / (1.0 - before[g]) for g in self.groups}

    def counts_after(self, events_done: int, targets: Mapping[str, int], start: Mapping[str, int]) -> dict[str, int]:
        """Block or head counts to have once `events_done` events ran: the schedule's fraction of start - target
        removed (rounded half up, so a small step still removes one)."""
        f = self.schedule.fraction_after(events_done)
        return {p: start[p] - math.floor((start[p] - t) * f + 0.5) for p, t in targets.items()}


@dataclass(frozen=True)
class QuantizationRecipe:
    """What to quantize (a QuantSpec), when to calibrate, how many sensitive layers stay FP16, and QAT controls."""

    spec: QuantSpec
    calibration_epoch: int = 0
    calibration_batches: int = 8
    keep_fp16: int = 0
    sensitivity_batches: int = 2
    freeze_bn_epoch: int | None = None
    freeze_quantizers_epoch: int | None = None


@dataclass(frozen=True)
class CompressionRecipe:
    """The whole `compression:` section: pruning first, then quantization (quantize -> prune does not work)."""

    pruning: PruningRecipe | None = None
    quantization: QuantizationRecipe | None = None
    raw: dict[str, Any] = field(default_factory=dict)


def _expect(value: Any, types: type | tuple[type, ...], key: str) -> Any:
    types = types if isinstance(types, tuple) else (types,)
    if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
        names = " or ".join(t.__name__ for t in types)
        raise RecipeError(key, f"is {value!r} ({type(value).__name__}), expected {names}", "Fix its value.")
    return value


def _unknown_keys(section: dict, allowed: tuple[str, ...], key: str) -> None:
    extra = sorted(set(section) - set(allowed))
    if extra:
        raise RecipeError(f"{key}.{extra[0]}", "is not a known key", f"Known keys: {', '.join(allowed)}.")


def _fraction(value: Any, key: str, upper: float) -> float:
    value = float(_expect(value, (int, float), key))
    if not 0.0 <= value < upper:
        raise RecipeError(key, f"is {value}, must be in [0, {upper})", "Use a fraction such as 0.25.")
    return value


def _parse_schedule(section: dict, key: str) -> PruningSchedule:
    allowed = ("start_epoch", "end_epoch", "start_iter", "end_iter", "num_events", "shape")
    _unknown_keys(section, allowed, key)
    values = {k: _expect(v, int, f"{key}.{k}") for k, v in section.items() if k != "shape"}
    shape = _expect(section.get("shape", "cubic"), str, f"{key}.shape")
    if shape not in SHAPES:
        raise RecipeError(f"{key}.shape", f"is '{shape}'", f"Use one of: {', '.join(SHAPES)}.")
    schedule = PruningSchedule(shape=shape, **values)
    if schedule.num_events < 1:
        raise RecipeError(f"{key}.num_events", f"is {schedule.num_events}, must be at least 1", "Fix its value.")
    by_iter = schedule.start_iter is not None or schedule.end_iter is not None
    start, end, unit = (
        (schedule.start_iter or 0, schedule.end_iter, "iter")
        if by_iter
        else (schedule.start_epoch, schedule.end_epoch, "epoch")
    )
    if end is None or start < 0 or end <= start:
        raise RecipeError(
            f"{key}.end_{unit}",
            f"start {start} / end {end} is not a range with end > start >= 0",
            f"Set start_{unit} and end_{unit} with end_{unit} > start_{unit}.",
        )
    return schedule


def _counts(section: dict, name: str, key: str, minimum: int, example: str) -> dict[str, int]:
    """A {module path: count} mapping (depth / heads targets), every count an int >= minimum."""
    counts = _expect(section.get(name, {}) or {}, dict, f"{key}.{name}")
    for path, count in counts.items():
        if _expect(count, int, f"{key}.{name}.{path}") < minimum:
            raise RecipeError(f"{key}.{name}.{path}", f"is {count}, must be at least {minimum}", f"Use e.g. {example}.")
    return {str(p): c for p, c in counts.items()}


def parse_pruning(section: dict, key: str = "compression.pruning") -> PruningRecipe:
    """Validate a `compression.pruning` mapping into a PruningRecipe."""
    _expect(section, dict, key)
    allowed = ("groups", "schedule", "importance", "round_to", "protected", "target", "depth", "heads", "sparsity")
    _unknown_keys(section, allowed, key)
    depth = _counts(section, "depth", key, 0, "'encoders.camera.backbone.stages.2: 4'")
    heads = _counts(section, "heads", key, 1, "'heads.object: 6'")
    groups = _expect(section.get("groups", {} if depth or heads else None), dict, f"{key}.groups")
    if not groups and not (depth or heads):
        raise RecipeError(f"{key}.groups", "is empty", "Map module path prefixes to fractions, e.g. 'decoder: 0.2'.")
    ratios = {str(g): _fraction(r, f"{key}.groups.{g}", MAX_RATIO) for g, r in groups.items()}
    importance = _expect(section.get("importance", "magnitude"), str, f"{key}.importance")
    if importance not in IMPORTANCES:
        raise RecipeError(f"{key}.importance", f"is '{importance}'", f"Use one of: {', '.join(IMPORTANCES)}.")
    round_to = _expect(section.get("round_to", 8), int, f"{key}.round_to")
    if round_to < 1:
        raise RecipeError(f"{key}.round_to", f"is {round_to}, must be at least 1", "Use e.g. 8 (INT8 on TensorRT).")
    protected = _expect(section.get("protected", []), list, f"{key}.protected")
    for i, pattern in enumerate(protected):
        _expect(pattern, str, f"{key}.protected[{i}]")
    target = _expect(section.get("target", {}) or {}, dict, f"{key}.target")
    _unknown_keys(target, ("params_reduction", "flops_reduction"), f"{key}.target")
    if len(target) > 1:
        raise RecipeError(
            f"{key}.target",
            "sets both params_reduction and flops_reduction",
            "One common scale is searched for: give one target and read the other in the report.",
        )
    reductions = {k: _fraction(v, f"{key}.target.{k}", 0.95) for k, v in target.items()}
    if reductions and not groups:
        raise RecipeError(f"{key}.target", "needs channel groups: the target is met by scaling their ratios",
                          "Add groups, or drop the target (depth and heads are counts, not searched).")
    schedule = _parse_schedule(_expect(section.get("schedule", {}), dict, f"{key}.schedule"), f"{key}.schedule")
    sparsity = _parse_sparsity(section.get("sparsity"), groups, f"{key}.sparsity")
    return PruningRecipe(
        groups=ratios,
        schedule=schedule,
        importance=importance,
        round_to=round_to,
        protected=tuple(protected),
        depth=depth,
        heads=heads,
        sparsity=sparsity,
        **reductions,
    )


def _parse_sparsity(section: dict | None, groups: dict, key: str) -> Sparsity | None:
    """The optional sparsity penalty: a kind and a positive strength, on the recipe's channel groups."""
    if not section:
        return None
    _expect(section, dict, key)
    _unknown_keys(section, ("kind", "strength"), key)
    kind = _expect(section.get("kind", "bn_scale"), str, f"{key}.kind")
    if kind not in SPARSITY_KINDS:
        raise RecipeError(f"{key}.kind", f"is '{kind}'", f"Use one of: {', '.join(SPARSITY_KINDS)}.")
    strength = float(_expect(section.get("strength"), (int, float), f"{key}.strength"))
    if not strength > 0:
        raise RecipeError(f"{key}.strength", f"is {strength}, must be > 0", "Use e.g. 1.0e-4.")
    if not groups:
        raise RecipeError(key, "acts on the channel groups, and there are none", "Add groups or drop sparsity.")
    return Sparsity(kind, strength)


def check_structure(recipe: PruningRecipe, model: nn.Module, key: str = "compression.pruning") -> None:
    """Every depth path must name a block list and every heads path attention blocks, with reachable targets."""
    checks = [("depth", recipe.depth, check_depth_target, "Name a Swin stage, a TransFusion head or a SECOND stage"),
              ("heads", recipe.heads, check_head_target, "Name a module path holding attention blocks")]
    for name, targets, check, fix in checks:
        for path, target in targets.items():
            try:
                check(model, path, target)
            except ValueError as err:
                raise RecipeError(f"{key}.{name}.{path}", str(err), f"{fix} (docs/pruning.md).") from None


def check_groups(recipe: PruningRecipe, module_names: list[str], key: str = "compression.pruning") -> None:
    """Every group prefix and protected pattern must name a module of the model, or the recipe is a typo."""
    for group in recipe.groups:
        if not any(n == group or n.startswith(group + ".") for n in module_names):
            raise RecipeError(
                f"{key}.groups.{group}",
                "matches no module of the model",
                "Use a module path prefix such as encoders.camera.backbone, decoder or heads.",
            )


_QAT_KEYS = {"calibration": ("epoch", "num_batches"), "sensitivity": ("keep_fp16", "num_batches"),
             "qat": ("freeze_bn_epoch", "freeze_quantizers_epoch")}


def _count(section: dict, name: str, key: str, default: int | None, minimum: int) -> int | None:
    value = section.get(name, default)
    if value is None:
        return None
    if _expect(value, int, f"{key}.{name}") < minimum:
        raise RecipeError(f"{key}.{name}", f"is {value}, must be at least {minimum}", "Fix its value.")
    return value


def parse_quantization(section: dict, key: str = "compression.quantization") -> QuantizationRecipe:
    """Validate a `compression.quantization` mapping: QuantSpec fields plus calibration / sensitivity / qat phases."""
    _expect(section, dict, key)
    spec_keys = tuple(f.name for f in fields(QuantSpec))
    _unknown_keys(section, spec_keys + tuple(_QAT_KEYS), key)
    phases = {}
    for phase, allowed in _QAT_KEYS.items():
        phases[phase] = _expect(section.get(phase, {}) or {}, dict, f"{key}.{phase}")
        _unknown_keys(phases[phase], allowed, f"{key}.{phase}")
    for listed in ("layers", "exclude"):
        if listed in section:
            _expect(section[listed], list, f"{key}.{listed}")
    try:
        spec = QuantSpec(**{k: v for k, v in section.items() if k in spec_keys})
    except (ValueError, TypeError) as err:
        raise RecipeError(key, str(err), "See docs/quantization.md for the allowed values.") from None
    cal, sens, qat = (phases[p] for p in _QAT_KEYS)
    return QuantizationRecipe(
        spec=spec,
        calibration_epoch=_count(cal, "epoch", f"{key}.calibration", 0, 0),
        calibration_batches=_count(cal, "num_batches", f"{key}.calibration", 8, 1),
        keep_fp16=_count(sens, "keep_fp16", f"{key}.sensitivity", 0, 0),
        sensitivity_batches=_count(sens, "num_batches", f"{key}.sensitivity", 2, 1),
        freeze_bn_epoch=_count(qat, "freeze_bn_epoch", f"{key}.qat", None, 0),
        freeze_quantizers_epoch=_count(qat, "freeze_quantizers_epoch", f"{key}.qat", None, 0),
    )


def parse_recipe(compression: dict | None, key: str = "compression") -> CompressionRecipe:
    """Validate the whole `compression:` section (absent or empty = no compression)."""
    if not compression:
        return CompressionRecipe()
    _expect(compression, dict, key)
    _unknown_keys(compression, ("pruning", "quantization"), key)
    pruning = parse_pruning(compression["pruning"], f"{key}.pruning") if compression.get("pruning") else None
    quant = compression.get("quantization")
    quantization = parse_quantization(quant, f"{key}.quantization") if quant else None
    if pruning and quantization:
        end = pruning.schedule.end_epoch if pruning.schedule.end_iter is None else None
        if end is not None and quantization.calibration_epoch < end:
            raise RecipeError(f"{key}.quantization.calibration.epoch",
                              f"is {quantization.calibration_epoch}, before pruning ends (epoch {end})",
                              "Quantize after the last pruning event: quantize -> prune does not work.")
    return CompressionRecipe(pruning=pruning, quantization=quantization, raw=dict(compression))
