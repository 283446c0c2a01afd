"""Shared fixtures: the tiny model's example batch, one 2-rank training run reused by the tests that inspect its run
directory."""

import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from helpers import run_tool, train_cmd

from bevfusion_ext.datasets import SyntheticBEVDataset, collate


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One intra-op thread for a module: on a shared 2-core machine two spinning OpenMP threads per process make small
    torch ops (the tiny model, BEVFusion's image normalisation and CPU sparse convs) up to 10x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def batch() -> dict:
    """Two synthetic scenes collated: the example batch the tiny reference model's core tests plan and count on."""
    dataset = SyntheticBEVDataset(2)
    return collate([dataset[0], dataset[1]])


@pytest.fixture(scope="session")
def two_rank_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, subprocess.CompletedProcess]:
    """One 2-rank, 2-epoch training of the tiny model, shared by the tests that inspect its run directory."""
    run_dir = tmp_path_factory.mktemp("two_rank") / "run"
    proc = run_tool(train_cmd(run_dir, "--max_epochs", "2", np=2))
    return run_dir, proc


@pytest.fixture(scope="session")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny model trained single-process long enough (96 iterations) that its metrics respond to compression."""
    run_dir = tmp_path_factory.mktemp("trained") / "run"
    opts = ["--max_epochs", "6", "--data.train.num_samples", "32", "--data.samples_per_gpu", "2",
            "--data.val.split", "train", "--evaluation.interval", "6", "--lr_config.warmup_iters", "10"]
    proc = run_tool(train_cmd(run_dir, *opts))
    assert proc.returncode == 0, proc.stderr[-3000:]
    return run_dir
