"""Config loading: torchpack's recursive default.yaml merge, overrides, ${} eval, and errors that name key and file."""

from pathlib import Path

import pytest

from bevfusion_ext.runner.config import ConfigError, config_chain, load_config, validate_config

VALID = """
model: {type: BEVFusion}
data:
  samples_per_gpu: 2
  workers_per_gpu: 0
  train: {type: SyntheticBEVDataset}
  val: {type: SyntheticBEVDataset}
optimizer: {type: AdamW, lr: 0.001}
runner: {type: CustomEpochBasedRunner, max_epochs: 2}
checkpoint_config: {interval: 1}
log_config: {interval: 5, hooks: [{type: TextLoggerHook}]}
"""


def write_tree(root: Path, files: dict[str, str]) -> None:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    write_tree(
        tmp_path,
        {
            "configs/default.yaml": VALID + "image_size: [32, 64]\nlist: [1, 2, 3]\n",
            "configs/a/default.yaml": "model: {width: 8, depth: 2}\nlist: [9]\n",
            "configs/a/leaf.yaml": "model: {width: 16}\nfeature: ${[image_size[0] // 8, image_size[1] // 8]}\n",
        },
    )
    return tmp_path / "configs/a/leaf.yaml"


def test_chain_is_root_first_leaf_last(tree: Path) -> None:
    names = [str(p.relative_to(tree.parents[2])) for p in config_chain(tree)]
    assert names == ["configs/default.yaml", "configs/a/default.yaml", "configs/a/leaf.yaml"]


def test_dicts_merge_lists_replace_leaf_wins_and_exprs_eval(tree: Path) -> None:
    cfg, _ = load_config(tree)
    assert cfg.model.width == 16 and cfg.model.depth == 2 and cfg.model.type == "BEVFusion"
    assert cfg.list == [9]
    assert cfg.feature == [4, 8]


def test_command_line_overrides_win_and_are_literal_evaluated(tree: Path) -> None:
    cfg, sources = load_config(tree, ["--model.width", "32", "--optimizer.lr=0.5", "--load_from", "x.pth"])
    assert cfg.model.width == 32 and cfg.optimizer.lr == 0.5 and cfg.load_from == "x.pth"
    assert sources.where("model.width") == "the command line"


def test_where_names_the_last_file_that_set_a_key(tree: Path) -> None:
    _, sources = load_config(tree)
    assert sources.where("model.depth").endswith("configs/a/default.yaml")
    assert sources.where("model.width").endswith("configs/a/leaf.yaml")
    assert sources.where("optimizer.lr").endswith("configs/default.yaml")


def test_valid_config_passes(tree: Path) -> None:
    cfg, sources = load_config(tree)
    validate_config(cfg, sources)


@pytest.mark.parametrize(
    "opts, key, where",
    [
        (["--runner.max_epochs", "'six'"], "runner.max_epochs", "the command line"),
        (["--data.samples_per_gpu", "0"], "data.samples_per_gpu", "the command line"),
        (["--data.samples_per_gpu", "True"], "data.samples_per_gpu", "the command line"),
        (["--log_config.hooks", "{}"], "log_config.hooks", "the command line"),
    ],
)
def test_wrong_types_and_ranges_name_key_and_origin(tree: Path, opts: list[str], key: str, where: str) -> None:
    cfg, sources = load_config(tree, opts)
    with pytest.raises(ConfigError, match=rf"'{key}' \(set in {where}\)"):
        validate_config(cfg, sources)


def test_wrong_type_in_a_file_names_that_file(tmp_path: Path) -> None:
    write_tree(tmp_path, {"c/default.yaml": VALID, "c/x.yaml": "optimizer: adamw\n"})
    cfg, sources = load_config(tmp_path / "c/x.yaml")
    with pytest.raises(ConfigError, match=r"'optimizer' \(set in .*c/x.yaml\).*expected dict"):
        validate_config(cfg, sources)


def test_missing_key_lists_the_files_searched(tmp_path: Path) -> None:
    write_tree(
        tmp_path,
        {"c/default.yaml": VALID.replace("optimizer: {type: AdamW, lr: 0.001}\n", ""), "c/x.yaml": "seed: 1\n"},
    )
    cfg, sources = load_config(tmp_path / "c/x.yaml")
    with pytest.raises(ConfigError, match=r"'optimizer' \(set in none of .*c/default.yaml, .*c/x.yaml\): is missing"):
        validate_config(cfg, sources)


def test_bad_expression_names_key_and_file(tmp_path: Path) -> None:
    write_tree(tmp_path, {"c/default.yaml": VALID, "c/x.yaml": "feature: ${undefined_name * 2}\n"})
    with pytest.raises(ConfigError, match=r"'feature' \(set in .*c/x.yaml\): cannot evaluate .*NameError"):
        load_config(tmp_path / "c/x.yaml")


def test_invalid_yaml_names_the_file(tmp_path: Path) -> None:
    write_tree(tmp_path, {"c/default.yaml": VALID, "c/x.yaml": "model: [unclosed\n"})
    with pytest.raises(ConfigError, match=r"config file .*c/x.yaml: not valid YAML"):
        load_config(tmp_path / "c/x.yaml")


def test_missing_file_and_dangling_override(tree: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tree.parent / "nope.yaml")
    with pytest.raises(ConfigError, match="'--load_from' has no value"):
        load_config(tree, ["--load_from"])


def test_missing_checkpoint_path_is_named(tree: Path) -> None:
    cfg, sources = load_config(tree, ["--load_from", "runs/none/epoch_3.pth"])
    with pytest.raises(ConfigError, match=r"'load_from' \(set in the command line\): file runs/none/epoch_3.pth"):
        validate_config(cfg, sources)
