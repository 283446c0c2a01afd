"""BEVFusion's real models build from its own configs through our builders (snapshot at BEVFUSION_ROOT)."""

import pytest
from helpers import BEVFUSION_ROOT, ROOT, SWINT_DET, TINY, needs_bevfusion, use_bevfusion

pytestmark = needs_bevfusion

NO_DOWNLOAD = ["--model.encoders.camera.backbone.init_cfg", "None"]  # ImageNet weights need the network


@pytest.mark.parametrize(
    ("config", "params"),
    [(SWINT_DET, 40_800_087), ("configs/nuscenes/seg/fusion-bev256d2-lss.yaml", 43_102_335)],
    ids=["swint-camera+lidar-det", "fusion-bev-seg"],
)
def test_real_model_builds_from_its_config(config, params):
    use_bevfusion()
    from bevfusion_ext.runner.builder import build_model
    from bevfusion_ext.runner.config import load_config

    cfg, sources = load_config(BEVFUSION_ROOT / config, NO_DOWNLOAD)
    model = build_model(cfg, sources)
    assert type(model).__module__ == "mmdet3d.models.fusion_models.bevfusion"  # BEVFusion's class, not ours
    assert sum(p.numel() for p in model.parameters()) == params


def test_reference_model_is_reached_only_through_its_own_type():
    use_bevfusion()
    from bevfusion_ext.runner.builder import build_model
    from bevfusion_ext.runner.config import load_config

    cfg, sources = load_config(ROOT / TINY)
    assert type(build_model(cfg, sources)).__module__ == "bevfusion_ext.models.bevfusion"


def test_pretrained_download_failure_names_the_key():
    use_bevfusion()
    from bevfusion_ext.runner.builder import build_model
    from bevfusion_ext.runner.config import ConfigError, load_config

    cfg, sources = load_config(BEVFUSION_ROOT / SWINT_DET)
    with pytest.raises(ConfigError, match=r"config key 'model'.*building BEVFusion failed.*(urlopen|Name or service)"):
        build_model(cfg, sources)
