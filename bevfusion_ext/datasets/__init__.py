"""Framework-free synthetic BEV data (numpy + torch only) and its nuScenes-style evaluator."""

from .evaluation import evaluate_detection, evaluate_segmentation
from .synthetic import CameraRig, Scene, SyntheticBEVDataset, collate, make_camera_rig

__all__ = ["CameraRig", "Scene", "SyntheticBEVDataset", "collate", "evaluate_detection", "evaluate_segmentation",
           "make_camera_rig"]
