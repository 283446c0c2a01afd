"""BEVFusion-style config loading (torchpack recursive YAML + `${...}` eval) with errors that name key and file."""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from mmcv import Config
from torchpack.utils.config import Config as TorchpackConfig


class ConfigError(ValueError):
    """A config value is missing, malformed or unknown; the message names the key and the file that set it."""


@dataclass
class ConfigSources:
    """Where each key of a loaded config came from, so errors can point at the right file."""

    chain: list[Path]
    cli_keys: set[str] = field(default_factory=set)
    layers: list[dict] = field(default_factory=list)

    def where(self, key: str) -> str:
        """Name the last file (or the command line) that set `key`, or every file that could have."""
        if any(key == k or key.startswith(k + ".") for k in self.cli_keys):
            return "the command line"
        for path, layer in zip(reversed(self.chain), reversed(self.layers), strict=True):
            if _has_key(layer, key):
                return str(path)
        return "none of " + ", ".join(str(p) for p in self.chain)

    def error(self, key: str, problem: str, fix: str) -> ConfigError:
        """Build a ConfigError for `key` that says where it was set, what is wrong and what to do."""
        return ConfigError(f"config key '{key}' (set in {self.where(key)}): {problem}. {fix}")


def _has_key(tree: Any, key: str) -> bool:
    for part in key.split("."):
        if not isinstance(tree, dict) or part not in tree:
            return False
        tree = tree[part]
    return True


def config_chain(path: str | Path) -> list[Path]:
    """The files torchpack's recursive load applies, root-most `default.yaml` first and `path` last."""
    path = Path(path)
    parents = [d / f"default{path.suffix}" for d in path.parents]
    return [p for p in reversed(parents) if p.is_file() and p != path] + [path]


def _read_yaml(path: Path) -> dict:
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ConfigError(
            f"config file {path}: not valid YAML ({err}). Fix the syntax at the position shown."
        ) from None
    if data is None:
        return {}
    if not isinstance(data, dict):
        raise ConfigError(f"config file {path}: top level is a {type(data).__name__}, expected a mapping of keys")
    return data


def recursive_eval(obj: Any, scope: dict, sources: ConfigSources, key: str = "") -> Any:
    """Evaluate BEVFusion's `${expr}` strings as mmdet3d.utils.recursive_eval does: against one copy of the merged,
    unevaluated torchpack config, whose attribute access (`${augment2d.resize[0]}`) the expressions rely on."""
    if isinstance(obj, dict):
        return {k: recursive_eval(v, scope, sources, f"{key}.{k}" if key else str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [recursive_eval(v, scope, sources, f"{key}[{i}]") for i, v in enumerate(obj)]
    if isinstance(obj, str) and obj.startswith("${") and obj.endswith("}"):
        try:
            value = eval(obj[2:-1], scope)  # noqa: S307 - BEVFusion configs are code by design
        except Exception as err:  # noqa: BLE001 - any failure of a user expression is a config error
            raise sources.error(
                key.split("[")[0],
                f"cannot evaluate {obj!r} ({type(err).__name__}: {err})",
                "Fix the expression or define the names it uses.",
            ) from None
        return recursive_eval(value, scope, sources, key)
    return obj


def split_recipes(opts: list[str]) -> tuple[list[str], list[str]]:
    """Take the `--recipe FILE` options (YAML files merged over the config, in order) out of the overrides."""
    files, rest, i = [], [], 0
    while i < len(opts):
        if opts[i] == "--recipe" and i + 1 < len(opts):
            files.append(opts[i + 1])
            i += 2
            continue
        if opts[i].startswith("--recipe="):
            files.append(opts[i].split("=", 1)[1])
        else:
            rest.append(opts[i])
        i += 1
    return files, rest


def load_config(path: str | Path, opts: list[str] | None = None) -> tuple[Config, ConfigSources]:
    """Load a BEVFusion YAML config tree, merge `--recipe FILE`s (compression recipes, data/size overlays) and then
    `--a.b value` overrides, and evaluate it."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {path}: no such file. Pass a YAML file under configs/.")
    extra_files, opts = split_recipes(list(opts or []))
    chain = config_chain(path) + [Path(p) for p in extra_files]
    for extra in chain:
        if not extra.is_file():
            raise ConfigError(f"config file {extra}: no such file.")
    layers = [_read_yaml(p) for p in chain]
    merged = TorchpackConfig()
    for layer in layers:
        merged.update(layer)
    cli_keys = _cli_keys(opts)
    merged.update(opts)
    sources = ConfigSources(chain=chain, cli_keys=cli_keys, layers=layers)
    cfg = Config(recursive_eval(merged, copy.deepcopy(merged), sources), filename=str(path))
    return cfg, sources


def _cli_keys(opts: list[str]) -> set[str]:
    """Parse overrides the way torchpack does (`--k=v` or `--k v`) and reject a key without a value."""
    keys, i = set(), 0
    while i < len(opts):
        opt = opts[i].removeprefix("--")
        if "=" in opt:
            keys.add(opt.split("=", 1)[0])
            i += 1
        elif i + 1 < len(opts):
            keys.add(opt)
            i += 2
        else:
            raise ConfigError(
                f"command-line override '{opts[i]}' has no value: write '--{opt} VALUE' or '--{opt}=VALUE'"
            )
    return keys


_NONE = type(None)
# (dotted key, accepted types, required): the keys the training loop reads, checked before anything is built.
_SCHEMA: list[tuple[str, tuple[type, ...], bool]] = [
    ("model", (dict,), True),
    ("model.type", (str,), True),
    ("data", (dict,), True),
    ("data.samples_per_gpu", (int,), True),
    ("data.workers_per_gpu", (int,), True),
    ("data.train", (dict,), True),
    ("data.train.type", (str,), True),
    ("data.val", (dict,), True),
    ("data.val.type", (str,), True),
    ("optimizer", (dict,), True),
    ("optimizer.type", (str,), True),
    ("optimizer_config", (dict, _NONE), False),
    ("lr_config", (dict, _NONE), False),
    ("runner", (dict,), True),
    ("runner.max_epochs", (int,), True),
    ("checkpoint_config", (dict,), True),
    ("log_config", (dict,), True),
    ("log_config.interval", (int,), True),
    ("log_config.hooks", (list,), True),
    ("evaluation", (dict, _NONE), False),
    ("custom_hooks", (list, _NONE), False),
    ("seed", (int, _NONE), False),
    ("load_from", (str, _NONE), False),
    ("resume_from", (str, _NONE), False),
]
_POSITIVE = ("data.samples_per_gpu", "runner.max_epochs", "log_config.interval")


def _lookup(cfg: dict, key: str) -> tuple[bool, Any]:
    node: Any = cfg
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            return False, None
        node = node[part]
    return True, node


def validate_config(cfg: dict, sources: ConfigSources) -> None:
    """Check presence, types and ranges of the keys training needs, so bad configs fail before any work starts."""
    tree = cfg.to_dict() if isinstance(cfg, Config) else cfg
    for key, types, required in _SCHEMA:
        present, value = _lookup(tree, key)
        if not present:
            if required:
                raise sources.error(key, "is missing", f"Add '{key}' to the config or one of its default.yaml parents.")
            continue
        if isinstance(value, bool) and bool not in types or not isinstance(value, types):
            names = " or ".join("null" if t is _NONE else t.__name__ for t in types)
            raise sources.error(key, f"is {value!r} ({type(value).__name__}), expected {names}", "Fix its value.")
        if key in _POSITIVE and value < 1:
            raise sources.error(key, f"is {value}, must be at least 1", "Fix its value.")
    for key in ("load_from", "resume_from"):
        value = tree.get(key)
        if value and not Path(value).is_file():
            raise sources.error(key, f"file {value} does not exist", "Pass the path of an existing checkpoint.")
