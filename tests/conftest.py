"""Shared fixtures: one 2-rank training run reused by the tests that inspect its run directory."""

import subprocess
from pathlib import Path

import pytest
from helpers import run_tool, train_cmd


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-rank, 2-epoch training of the tiny model, shared by the tests that inspect its run directory."""
    run_dir = tmp_path_factory.mktemp("two_rank") / "run"
    proc = run_tool(train_cmd(run_dir, "--max_epochs", "2", np=2))
    return run_dir, proc
