"""The bad-input catalogue: every CLI rejects bad configs, recipes, checkpoints, paths and options with one `error:`
line that names the offending file / key / layer and says what to do, exit code 2, no traceback, nothing written."""
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import ROOT, TINY, run_tool

PRUNE = ["--recipe", "configs/compression/prune_seed.yaml"]
QAT = ["--recipe", "configs/compression/qat_int8.yaml"]
TRAIN = [sys.executable, "tools/train_compressed.py"]
EXPORT = [sys.executable, "tools/export_engine.py"]
ANALYZE = [sys.executable, "tools/analyze.py"]

# (tool + args with {placeholders}, what stderr must say)
CASES = {
    "config file missing": ([*TRAIN, "configs/synthetic/multitask/nope.yaml"], "nope.yaml: no such file"),
    "config not YAML": ([*TRAIN, "{bad_yaml}"], "bad.yaml: not valid YAML"),
    "unknown model type": ([*TRAIN, TINY, "--model.type", "BEVFusionX"], "'model.type' (set in the command line): unknown type 'BEVFusionX'"),
    "unknown dataset type": ([*TRAIN, TINY, "--data.val.type", "NuScenes"], "'data.val.type' (set in the command line): unknown type"),
    "wrong type": ([*TRAIN, TINY, "--runner.max_epochs", "'six'"], "'runner.max_epochs' (set in the command line): is 'six' (str), expected int"),
    "non-positive batch": ([*TRAIN, TINY, "--data.samples_per_gpu", "0"], "'data.samples_per_gpu' (set in the command line): is 0, must be at least 1"),
    "missing key": ([*TRAIN, TINY, "--optimizer", "None"], "'optimizer' (set in the command line): is None (NoneType), expected dict"),
    "bad expression": ([*TRAIN, TINY, "--image_size", "${undefined_name}"], "'image_size' (set in the command line): cannot evaluate"),
    "override without value": ([*TRAIN, TINY, "--load_from"], "'--load_from' has no value"),
    "load_from missing": ([*TRAIN, TINY, "--load_from", "runs/none/epoch_9.pth"], "'load_from' (set in the command line): file runs/none/epoch_9.pth does not exist"),
    "resume_from corrupted": ([*TRAIN, TINY, "--resume_from", "{corrupt}"], "cannot be read"),
    "checkpoint of another shape": ([*TRAIN, TINY, "--load_from", "{ckpt}", "--model.heads.object.hidden_channel", "48"], "does not fit the model built from the config"),
    "recipe file missing": ([*TRAIN, TINY, "--recipe", "configs/compression/nope.yaml"], "nope.yaml: no such file"),
    "recipe unknown key": ([*TRAIN, TINY, *PRUNE, "--compression.pruning.ratio", "0.5"], "'compression.pruning.ratio' (set in the command line): is not a known key"),
    "recipe group matches nothing": ([*TRAIN, TINY, *PRUNE, "--compression.pruning.groups", "{'decoderz': 0.2}"], "'compression.pruning.groups.decoderz' (set in the command line): matches no module"),
    "recipe ratio out of range": ([*TRAIN, TINY, *PRUNE, "--compression.pruning.groups.decoder", "0.95"], "'compression.pruning.groups.decoder' (set in the command line): is 0.95, must be in [0, 0.9)"),
    "recipe bad importance": ([*TRAIN, TINY, *PRUNE, "--compression.pruning.importance", "random"], "'compression.pruning.importance' (set in the command line): is 'random'"),
    "recipe bad schedule": ([*TRAIN, TINY, *PRUNE, "--compression.pruning.schedule.end_epoch", "0"], "'compression.pruning.schedule.end_epoch'"),
    "recipe two targets": ([*TRAIN, TINY, *PRUNE, "--compression.pruning.target.flops_reduction", "0.4"], "sets both params_reduction and flops_reduction"),
    "quant backend unknown": ([*TRAIN, TINY, *QAT, "--compression.quantization.backend", "tensorrt"], "QuantSpec.backend='tensorrt' is not supported"),
    "quantize before pruning ends": ([*TRAIN, TINY, *PRUNE, *QAT], "'compression.quantization.calibration.epoch'"),
    "export unknown part": ([*EXPORT, TINY, "{ckpt}", "--out", "{out}", "--allow-dense", "--parts", "head.bbox"], "head.bbox"),
    "export dense checkpoint": ([*EXPORT, TINY, "{ckpt}", "--out", "{out}"], "no compression state"),
    "export config mismatch": ([*EXPORT, "configs/synthetic/multitask/full.yaml", "{ckpt}", "--out", "{out}", "--allow-dense"], "does not fit the model built from the config"),
    "export out exists": ([*EXPORT, TINY, "{ckpt}", "--out", "{existing}", "--allow-dense"], "--force"),
    "analyze sensitivity without checkpoint": ([*ANALYZE, "sensitivity", TINY], "needs --checkpoint"),
    "analyze missing checkpoint": ([*ANALYZE, "complexity", TINY, "--checkpoint", "runs/none.pth"], "runs/none.pth: no such file"),
}


@pytest.fixture(scope="module")
def paths(two_rank_run: tuple[Path, subprocess.CompletedProcess], tmp_path_factory: pytest.TempPathFactory) -> dict:
    run_dir, proc = two_rank_run
    assert proc.returncode == 0, proc.stderr[-3000:]
    tmp = tmp_path_factory.mktemp("bad")
    shutil.copytree(ROOT / "configs", tmp / "configs")
    (tmp / "configs/synthetic/multitask/bad.yaml").write_text("model: [unclosed\n")
    corrupt = tmp / "corrupt.pth"
    corrupt.write_bytes((run_dir / "epoch_2.pth").read_bytes()[:4096])
    (tmp / "existing").mkdir()
    return {"ckpt": str(run_dir / "epoch_2.pth"), "corrupt": str(corrupt), "existing": str(tmp / "existing"),
            "bad_yaml": str(tmp / "configs/synthetic/multitask/bad.yaml"), "tmp": tmp}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_clear_error_and_writes_nothing(case: str, paths: dict, tmp_path: Path) -> None:
    args, message = CASES[case]
    out, run_dir = tmp_path / "out", tmp_path / "run"
    fill = {**paths, "out": str(out)}
    cmd = [a.format(**fill) if "{" in a and a.strip("{}") in fill else a for a in args]
    if cmd[1].endswith("train_compressed.py"):
        cmd += ["--run-dir", str(run_dir)]
    proc = run_tool(cmd, timeout=300)
    assert proc.returncode == 2, (case, proc.stdout[-1000:], proc.stderr[-2000:])
    assert "error:" in proc.stderr and message in proc.stderr, (case, proc.stderr[-2000:])
    assert "Traceback" not in proc.stderr, (case, proc.stderr[-3000:])
    assert not run_dir.exists() and not out.exists(), f"{case}: something was written"
    assert [p.name for p in Path(paths["existing"]).iterdir()] == []


def test_the_catalogue_has_at_least_25_distinct_cases() -> None:
    assert len(CASES) >= 25 and len({m for _, m in CASES.values()}) >= 20
