"""The consistency guard on a real 2-process gloo group: ranks whose architecture or quantizers differ after an
event stop with the rank and the first differing layer; identical ranks agree on one digest."""

import json
import socket
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from bevfusion_ext.compression.quantization import QuantSpec, calibrate, quantize_model
from bevfusion_ext.runner import RankMismatchError, check_ranks_agree


def small_model(rank: int, case: str) -> nn.Module:
    torch.manual_seed(0)
    width = 6 if case == "pruned differently" and rank == 1 else 8
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.Conv2d(8, width, 3), nn.ReLU(),
                          nn.Conv2d(width, 4, 1))
    if case == "quantizers differ":
        spec = QuantSpec(layers=("Conv2d",))
        quantize_model(model, spec)
        torch.manual_seed(1)
        batch = torch.randn(2, 3, 12, 12) * (1 + rank)  # calibrated without the cross-rank max: amax differs
        calibrate(model.eval(), spec, [batch], lambda m, b: m(b))
    return model


def worker(rank: int, port: int, case: str, out: str) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        result = {"digests": check_ranks_agree(small_model(rank, case), "pruning event 2")}
    except RankMismatchError as err:
        result = {"error": str(err)}
    finally:
        dist.destroy_process_group()
    Path(f"{out}.{rank}").write_text(json.dumps(result))


def run_two_ranks(case: str, tmp_path: Path) -> list[dict]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(worker, args=(port, case, str(tmp_path / "result")), nprocs=2, join=True)
    return [json.loads((tmp_path / f"result.{r}").read_text()) for r in range(2)]


@pytest.mark.parametrize(("case", "layer"), [("pruned differently", "'3.weight'"),
                                              ("quantizers differ", "'0.input_quantizer._amax'")])
def test_differing_rank_stops_every_rank_naming_rank_and_first_layer(case: str, layer: str, tmp_path: Path) -> None:
    results = run_two_ranks(case, tmp_path)
    for result in results:  # every rank stops, not only the odd one out
        assert "error" in result, result
        assert result["error"].startswith("pruning event 2: rank 1 differs from rank 0 first at " + layer)
        assert "resume from the last checkpoint" in result["error"]


def test_identical_ranks_agree_on_one_digest(tmp_path: Path) -> None:
    results = run_two_ranks("identical", tmp_path)
    assert [len(set(r["digests"])) for r in results] == [1, 1]
