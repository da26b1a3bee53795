"""Prediction heads: DPT dense head, VGGT camera head, VGGT track head."""

from .camera import CameraHead, activate_pose
from .dpt import DPTHead, activate
from .track import FeatureTracker, TrackHead
from .tracker import BaseTrackerPredictor
from .update_former import EfficientUpdateFormer

__all__ = [
    "BaseTrackerPredictor",
    "CameraHead",
    "DPTHead",
    "EfficientUpdateFormer",
    "FeatureTracker",
    "TrackHead",
    "activate",
    "activate_pose",
]
