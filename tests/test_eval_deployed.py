"""tools/eval_deployed.py on a quantized tiny bundle: FP32 and INT8 Q/DQ parts scored with the training evaluator next
to PyTorch, per-frame agreement, eval.json / eval.md linked from report.md, exit status 1 past the tolerance and 2
(one line) for a bundle from another config; and the agreement measures themselves."""

import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import ROOT, TINY, run_tool, warm_bn

from bevfusion_ext.compression import atomic_save
from bevfusion_ext.compression.quantization import QuantSpec, calibrate, quantize_model, quantizer_state
from bevfusion_ext.compression.state import empty_state
from bevfusion_ext.datasets import SyntheticBEVDataset, collate
from bevfusion_ext.deploy.agreement import agreement, mask_iou, match_boxes
from bevfusion_ext.export import accuracy
from bevfusion_ext.models import build_model, reference_config

pytestmark = [
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore::UserWarning"),
]
EVAL = [sys.executable, "tools/eval_deployed.py", TINY]
FEW = ["--data.val.num_samples", "3", "--threads", "1"]


@pytest.fixture(scope="module")
def bundle(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny model quantized (ModelOpt, BN folded), calibrated on two batches, saved and exported by the CLI."""
    dataset = SyntheticBEVDataset(4, seed=0, split="val")
    batches = [collate([dataset[i], dataset[i + 1]]) for i in (0, 2)]
    torch.manual_seed(0)
    model = warm_bn(build_model(reference_config("tiny")), batches)
    spec = QuantSpec(fold_bn=True)
    quantize_model(model, spec)
    calibrate(model, spec, batches, lambda m, batch: m(return_loss=False, **batch))
    root = tmp_path_factory.mktemp("eval")
    checkpoint = root / "quantized.pth"
    state = {**empty_state(), "quantization": quantizer_state(model)}
    atomic_save({"meta": {"compression": state}, "state_dict": model.state_dict()}, checkpoint)
    proc = run_tool([sys.executable, "tools/export_engine.py", TINY, str(checkpoint), "--out", str(root / "bundle"),
                     "--allow-dense"])
    assert proc.returncode == 0, proc.stderr
    return root / "bundle"


@pytest.fixture(scope="module")
def evaluated(bundle: Path) -> tuple[Path, object]:
    return bundle, run_tool([*EVAL, str(bundle), *FEW])


def test_fp32_and_int8_parts_are_scored_beside_pytorch(evaluated: tuple) -> None:
    bundle, proc = evaluated
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.count(" ok\n") == 2 and f"wrote {bundle / 'eval.json'}" in proc.stdout
    result = json.loads((bundle / "eval.json").read_text())
    assert result["frames"] == 3 and result["passed"] and list(result["flavours"]) == ["fp32", "qdq"]
    for flavour, artefact in (("fp32", ".onnx on"), ("qdq", ".qdq.onnx on")):
        entry = result["flavours"][flavour]
        assert set(entry["pytorch"]) == set(entry["deployed"]) == {"det/mAP", "det/NDS", "seg/mIoU"}
        assert all(artefact in what and what.endswith(f"[{flavour}]") for what in entry["parts"].values())
        assert entry["agreement"]["frames"] == 3 and entry["agreement"]["boxes"] == 3 * 32
    fp32 = result["flavours"]["fp32"]
    assert fp32["drop"] == {key: 0.0 for key in fp32["drop"]}  # the same detections and masks, to float noise
    assert fp32["agreement"]["box_match_rate"] == 1.0 and fp32["agreement"]["mask_iou_mean"] == 1.0
    assert fp32["agreement"]["matched_score_diff_max"] < 1e-5
    qdq = result["flavours"]["qdq"]["agreement"]
    assert qdq["matched_score_diff_max"] > fp32["agreement"]["matched_score_diff_max"]  # INT8 arithmetic differs
    text = (bundle / "eval.md").read_text()
    assert "| qdq | det/mAP |" in text and "| fp32 | 96 | 100.0 % |" in text
    assert "[eval.md](eval.md)" in (bundle / "report.md").read_text()


def test_a_drop_beyond_the_tolerance_exits_1(evaluated: tuple, monkeypatch: pytest.MonkeyPatch,
                                            capsys: pytest.CaptureFixture) -> None:
    bundle, _ = evaluated
    monkeypatch.setitem(accuracy.TOLERANCES, "fp32", accuracy.Tolerance(-1.0, "nothing passes"))
    monkeypatch.chdir(ROOT)
    monkeypatch.setattr(sys, "argv", ["eval_deployed.py", str(ROOT / TINY), str(bundle), "--flavours", "fp32", *FEW])
    sys.path.insert(0, str(ROOT / "tools"))
    try:
        import eval_deployed

        assert eval_deployed.main() == 1
    finally:
        sys.path.remove(str(ROOT / "tools"))
    assert "error: the deployed fp32 model falls below PyTorch beyond its tolerance" in capsys.readouterr().err
    assert "| fp32 | det/mAP | 0.0000 | 0.0000 | +0.0000 | -1.0 | FAIL |" in (bundle / "eval.md").read_text()


def test_a_bundle_from_another_config_is_one_line(evaluated: tuple) -> None:
    bundle, _ = evaluated
    proc = run_tool([sys.executable, "tools/eval_deployed.py", "configs/synthetic/multitask/full.yaml", str(bundle)])
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error: ")]
    assert proc.returncode == 2 and len(errors) == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert (f"error: bundle {bundle} was exported from another config: model.decoder.backbone.in_channels is 256 in "
            "configs/synthetic/multitask/full.yaml but 48 in") in proc.stderr


def result(boxes: list[list[float]], scores: list[float], labels: list[int], masks: np.ndarray) -> dict:
    full = np.zeros((len(boxes), 7))
    full[:, :2] = boxes
    return {"boxes_3d": full, "scores_3d": np.array(scores), "labels_3d": np.array(labels), "masks_bev": masks}


def test_agreement_matches_boxes_of_the_same_class_one_to_one_and_scores_masks() -> None:
    ref_masks, other_masks = np.zeros((2, 2, 2)), np.zeros((2, 2, 2))
    ref_masks[0, 0, :] = 1.0  # class 0: two cells against one -> IoU 0.5; class 1 empty in both -> 1
    other_masks[0, 0, 0] = 1.0
    ref = result([[0, 0], [0.2, 0], [10, 10]], [0.9, 0.5, 0.1], [0, 0, 1], ref_masks)
    other = result([[0.1, 0], [10.4, 10], [0, 0.3]], [0.8, 0.2, 0.4], [0, 0, 1], other_masks)
    assert match_boxes(ref, other) == [(0, 0)]  # the other boxes' only same-class candidates are 14 m away
    assert mask_iou(ref["masks_bev"], other["masks_bev"]).tolist() == [0.5, 1.0]
    out = agreement([ref], [other])
    assert out["box_match_rate"] == pytest.approx(1 / 3) and out["confident_box_match_rate"] == pytest.approx(1 / 2)
    assert out["matched_score_diff_max"] == pytest.approx(0.1) and out["mask_iou_mean"] == pytest.approx(0.75)
