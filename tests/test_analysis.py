"""Per-module complexity and latency profiles: exact on known layers, complete on the reference model."""
import pytest
import torch
from torch import nn

from bevfusion_ext.compression.analysis import module_complexity, module_latency
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.models import build_model, reference_config


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.ModuleDict({"a": nn.Linear(10, 20), "b": nn.Linear(20, 5)})  # a container never called

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks["b"](torch.relu(self.blocks["a"](x)))


def linear_forward(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model(x)


def test_flops_and_params_are_exact_and_roll_up_through_containers() -> None:
    rows = {r["module"]: r for r in module_complexity(Net(), torch.randn(4, 10), forward_fn=linear_forward)}
    assert rows["blocks.a"]["flops"] == 2 * 4 * 10 * 20 and rows["blocks.a"]["params"] == 10 * 20 + 20
    assert rows["blocks.b"]["flops"] == 2 * 4 * 20 * 5
    assert rows["blocks"]["flops"] == rows["blocks.a"]["flops"] + rows["blocks.b"]["flops"] == rows["(total)"]["flops"]
    assert rows["blocks"]["params"] == rows["(total)"]["params"] == 220 + 105


@pytest.fixture(scope="module")
def tiny() -> tuple[nn.Module, dict]:
    ds = SyntheticBEVDataset(2)
    return build_model(reference_config("tiny")), collate([ds[0], ds[1]])


def test_reference_model_complexity_covers_every_top_level_module(tiny: tuple[nn.Module, dict]) -> None:
    model, batch = tiny
    rows = module_complexity(model, batch, depth=2)
    top = [r for r in rows if r["depth"] == 1]
    assert {r["module"] for r in top} == {"encoders", "fuser", "decoder", "heads"}
    assert sum(r["params"] for r in top) == rows[0]["params"]
    assert sum(r["flops"] for r in top) == rows[0]["flops"] > 0
    by_name = {r["module"]: r for r in rows}
    assert by_name["encoders.camera"]["flops"] > 0 and by_name["encoders.lidar"]["flops"] > 0


def test_latency_profile_has_positive_times_that_fit_in_the_total(tiny: tuple[nn.Module, dict]) -> None:
    model, batch = tiny
    rows = module_latency(model, batch, depth=1, repeats=2)
    total, top = rows[0]["ms"], [r for r in rows if r["depth"] == 1]
    assert {r["module"] for r in top} == {"encoders", "fuser", "decoder", "heads"}
    assert all(r["ms"] > 0 for r in top)
    assert sum(r["ms"] for r in top) < 1.5 * total
