"""Checkpoint files: atomic writes, clear errors for unreadable files, strict loading that names mismatches."""

from pathlib import Path

import pytest
import torch
from torch import nn

from bevfusion_ext.compression import (
    CheckpointError,
    atomic_save,
    atomic_symlink,
    first_difference,
    layer_digests,
    load_state_dict_strict,
    model_digest,
    read_checkpoint,
)


class Unpicklable:
    def __reduce__(self):
        raise RuntimeError("boom while writing")


def test_failed_write_keeps_previous_checkpoint_and_leaves_no_temp(tmp_path: Path) -> None:
    path = tmp_path / "epoch_1.pth"
    atomic_save({"state_dict": {"w": torch.ones(3)}}, path)
    with pytest.raises(RuntimeError, match="boom"):
        atomic_save({"state_dict": {"w": torch.zeros(3)}, "bad": Unpicklable()}, path)
    assert torch.equal(read_checkpoint(path)["state_dict"]["w"], torch.ones(3))
    assert [p.name for p in tmp_path.iterdir()] == ["epoch_1.pth"]


def test_next_write_removes_the_temp_file_of_a_writer_killed_mid_write(tmp_path: Path) -> None:
    stale = tmp_path / ".epoch_2.pth.tmp-4242"
    stale.write_bytes(b"PK\x03\x04 half a zip")  # what SIGKILL during torch.save leaves
    (tmp_path / ".epoch_3.pth.tmp-4242").write_bytes(b"another target's")
    atomic_save({"state_dict": {"w": torch.ones(3)}}, tmp_path / "epoch_2.pth")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".epoch_3.pth.tmp-4242", "epoch_2.pth"]


def test_symlink_is_replaced_in_place(tmp_path: Path) -> None:
    for name in ("epoch_1.pth", "epoch_2.pth"):
        atomic_save({"n": name}, tmp_path / name)
        atomic_symlink(name, tmp_path / "latest.pth")
    assert read_checkpoint(tmp_path / "latest.pth")["n"] == "epoch_2.pth"


@pytest.mark.parametrize("damage", ["truncate", "garbage", "missing"])
def test_unreadable_checkpoint_is_named(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "epoch_2.pth"
    atomic_save({"state_dict": {"w": torch.randn(1000)}}, path)
    if damage == "truncate":
        path.write_bytes(path.read_bytes()[:500])
    elif damage == "garbage":
        path.write_bytes(b"not a checkpoint at all" * 10)
    else:
        path.unlink()
    with pytest.raises(CheckpointError, match=str(path)):
        read_checkpoint(path)


def test_strict_load_names_the_first_mismatched_parameter() -> None:
    small, big = nn.Sequential(nn.Linear(4, 8), nn.Linear(8, 2)), nn.Sequential(nn.Linear(4, 16), nn.Linear(16, 2))
    with pytest.raises(CheckpointError, match=r"ckpt.pth .*\n  0.weight: checkpoint \(16, 4\) vs model \(8, 4\)"):
        load_state_dict_strict(small, big.state_dict(), "ckpt.pth")
    state = small.state_dict()
    state.pop("1.bias")
    with pytest.raises(CheckpointError, match="1.bias: missing from checkpoint"):
        load_state_dict_strict(small, state, "ckpt.pth")


def test_strict_load_copies_matching_weights() -> None:
    a, b = nn.Linear(3, 3), nn.Linear(3, 3)
    load_state_dict_strict(a, b.state_dict(), "x")
    assert torch.equal(a.weight, b.weight)


def test_digest_detects_and_names_a_changed_layer() -> None:
    torch.manual_seed(0)
    a = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    b = nn.Sequential(nn.Linear(4, 4), nn.BatchNorm1d(4))
    b.load_state_dict(a.state_dict())
    assert model_digest(a) == model_digest(b)
    with torch.no_grad():
        b[1].running_mean[2] += 1e-6
    assert model_digest(a) != model_digest(b)
    assert first_difference(layer_digests(a), layer_digests(b)) == "1.running_mean"
