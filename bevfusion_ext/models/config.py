"""The two reference model sizes as plain BEVFusion-style config dicts (the YAML configs carry the same values)."""
import copy
from typing import Any

# Scene knobs shared by both sizes; they match SyntheticBEVDataset's defaults and docs/contract.md.
SCENE = dict(
    image_size=(96, 160),
    point_cloud_range=(-25.6, -25.6, -1.0, 25.6, 25.6, 3.0),
    lidar_voxel_size=(0.4, 0.4, 1.0),
    camera_bev_resolution=0.4,
    bev_resolution=0.8,
    object_classes=("car", "pedestrian", "barrier"),
    map_classes=("drivable_area", "walkway"),
    map_bound=(-25.6, 25.6, 0.8),
    score_threshold=0.0,
    loss_scale=None,
)

# Architecture knobs. "full" is BEVFusion's Swin-T camera+lidar TransFusion model (lidar encoder dense, see lidar.py).
SIZES = dict(
    tiny=dict(
        embed_dims=16, depths=(1, 1, 2, 1), num_heads=(1, 2, 4, 8), window_size=4, drop_path_rate=0.1,
        neck_channels=32, dtransform_channels=(4, 8, 16), camera_channels=24, dbound=(1.0, 30.0, 1.0),
        lidar_base_channels=16, lidar_encoder_channels=((16,), (32, 32)), lidar_encoder_strides=(1, 2),
        lidar_channels=48, fuser_channels=48, second_channels=(32, 64), second_layer_nums=(1, 1),
        fpn_channels=(32, 32), hidden_channel=32, attention_heads=4, ffn_channel=64, head_conv=32,
        num_proposals=32, max_num=32,
    ),
    full=dict(
        embed_dims=96, depths=(2, 2, 6, 2), num_heads=(3, 6, 12, 24), window_size=7, drop_path_rate=0.2,
        neck_channels=256, dtransform_channels=(8, 32, 64), camera_channels=80, dbound=(1.0, 30.0, 0.5),
        lidar_base_channels=32, lidar_encoder_channels=((32, 32), (64, 64), (128, 128), (256, 256)),
        lidar_encoder_strides=(1, 2, 1, 1), lidar_channels=256, fuser_channels=256, second_channels=(128, 256),
        second_layer_nums=(5, 5), fpn_channels=(256, 256), hidden_channel=128, attention_heads=8, ffn_channel=256,
        head_conv=64, num_proposals=200, max_num=200,
    ),
)

BN_CFG = dict(type="BN", eps=1.0e-3, momentum=0.01)


def reference_config(size: str, **overrides: Any) -> dict:
    """Model config dict for ``size`` ("tiny" / "full"); overrides replace SCENE or SIZES knobs by name.

    ``map_classes=()`` gives the det-only model (heads.map = None).
    """
    knobs = {**SCENE, **SIZES[size]}
    unknown = set(overrides) - set(knobs)
    if unknown:
        raise KeyError(f"unknown reference_config knobs {sorted(unknown)}; known: {sorted(knobs)}")
    knobs.update(overrides)
    return copy.deepcopy(_model_config(knobs))


def _bounds(knobs: dict, resolution: float) -> tuple[list[float], list[float]]:
    """(start, stop, step) x and y bounds of the point cloud range at a BEV resolution."""
    r = knobs["point_cloud_range"]
    return [r[0], r[3], resolution], [r[1], r[4], resolution]


def _camera(k: dict) -> dict:
    """Swin -> GeneralizedLSSFPN -> DepthLSSTransform encoder config."""
    image_size = list(k["image_size"])
    xbound, ybound = _bounds(k, k["camera_bev_resolution"])
    widths = [k["embed_dims"] * 2 ** i for i in range(len(k["depths"]))]
    return dict(
        backbone=dict(type="SwinTransformer", embed_dims=k["embed_dims"], depths=list(k["depths"]),
                      num_heads=list(k["num_heads"]), window_size=k["window_size"], mlp_ratio=4, qkv_bias=True,
                      qk_scale=None, drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=k["drop_path_rate"],
                      patch_norm=True, out_indices=[1, 2, 3], with_cp=False),
        neck=dict(type="GeneralizedLSSFPN", in_channels=widths[1:], out_channels=k["neck_channels"], start_level=0,
                  num_outs=3, norm_cfg=dict(type="BN2d"), upsample_cfg=dict(mode="bilinear", align_corners=False)),
        vtransform=dict(type="DepthLSSTransform", in_channels=k["neck_channels"], out_channels=k["camera_channels"],
                        image_size=image_size, feature_size=[image_size[0] // 8, image_size[1] // 8],
                        xbound=xbound, ybound=ybound, zbound=[-10.0, 10.0, 20.0], dbound=list(k["dbound"]),
                        downsample=round(k["bev_resolution"] / k["camera_bev_resolution"]),
                        dtransform_channels=list(k["dtransform_channels"])),
    )


def _lidar(k: dict) -> dict:
    """Dense voxelization -> DenseLidarEncoder config; z slices x (4 point dims + count) input channels."""
    r, v = k["point_cloud_range"], k["lidar_voxel_size"]
    num_z = round((r[5] - r[2]) / v[2])
    return dict(
        voxelize=dict(type="DenseVoxelization", point_cloud_range=list(r), voxel_size=list(v), point_dims=4),
        backbone=dict(type="DenseLidarEncoder", in_channels=num_z * 5, base_channels=k["lidar_base_channels"],
                      output_channels=k["lidar_channels"],
                      encoder_channels=[list(c) for c in k["lidar_encoder_channels"]],
                      encoder_strides=list(k["lidar_encoder_strides"])),
    )


def _heads(k: dict) -> dict:
    """TransFusionHead and (unless map_classes is empty) BEVSegmentationHead configs."""
    in_channels = sum(k["fpn_channels"])
    r = k["point_cloud_range"]
    factor = round(k["bev_resolution"] / k["lidar_voxel_size"][0])
    obj = dict(
        type="TransFusionHead", in_channels=in_channels, num_classes=len(k["object_classes"]),
        num_proposals=k["num_proposals"], hidden_channel=k["hidden_channel"], num_decoder_layers=1,
        num_heads=k["attention_heads"], nms_kernel_size=3, ffn_channel=k["ffn_channel"], dropout=0.1,
        bn_momentum=0.1, activation="relu", head_conv=k["head_conv"], num_heatmap_convs=2,
        common_heads=dict(center=[2, 2], height=[1, 2], dim=[3, 2], rot=[2, 2], vel=[2, 2]),
        train_cfg=dict(gaussian_overlap=0.1, min_radius=2, code_weights=[1.0] * 8 + [0.2] * 2),
        test_cfg=dict(max_num=k["max_num"]),
        bbox_coder=dict(type="TransFusionBBoxCoder", pc_range=list(r[:2]), voxel_size=list(k["lidar_voxel_size"][:2]),
                        out_size_factor=factor, score_threshold=k["score_threshold"]),
    )
    seg = None
    if k["map_classes"]:
        xbound, ybound = _bounds(k, k["bev_resolution"])
        seg = dict(type="BEVSegmentationHead", in_channels=in_channels, classes=list(k["map_classes"]), loss="focal",
                   grid_transform=dict(input_scope=[xbound, ybound], output_scope=[list(k["map_bound"])] * 2))
    return dict(object=obj, map=seg)


def _model_config(k: dict) -> dict:
    """Assemble the BEVFusion config from resolved knobs."""
    second = list(k["second_channels"])
    return dict(
        type="ReferenceBEVFusion",
        encoders=dict(camera=_camera(k), lidar=_lidar(k)),
        fuser=dict(type="ConvFuser", in_channels=[k["camera_channels"], k["lidar_channels"]],
                   out_channels=k["fuser_channels"]),
        decoder=dict(
            backbone=dict(type="SECOND", in_channels=k["fuser_channels"], out_channels=second,
                          layer_nums=list(k["second_layer_nums"]), layer_strides=[1, 2], norm_cfg=BN_CFG),
            neck=dict(type="SECONDFPN", in_channels=second, out_channels=list(k["fpn_channels"]),
                      upsample_strides=[1, 2], norm_cfg=BN_CFG, use_conv_for_no_stride=True),
        ),
        heads=_heads(k),
        loss_scale=k["loss_scale"],
    )
