"""BEVFusion-shaped multi-task reference model (plain torch + mmcv 1.x registry), built from config dicts."""
from .bevfusion import BEVFusion
from .config import reference_config
from .decoders import SECOND, SECONDFPN
from .fusers import ConvFuser
from .lidar import DenseLidarEncoder, DenseVoxelization
from .necks import GeneralizedLSSFPN
from .registry import MODELS, build_model
from .segmentation import BEVSegmentationHead
from .swin import SwinTransformer
from .transfusion import TransFusionBBoxCoder, TransFusionHead
from .vtransforms import DepthLSSTransform, bev_pool

__all__ = [
    "MODELS", "build_model", "reference_config", "BEVFusion", "SwinTransformer", "GeneralizedLSSFPN",
    "DepthLSSTransform", "bev_pool", "DenseVoxelization", "DenseLidarEncoder", "ConvFuser", "SECOND", "SECONDFPN",
    "TransFusionHead", "TransFusionBBoxCoder", "BEVSegmentationHead",
]
