"""The pycolmap pipeline: images -> feed-forward prediction with GSA -> keypoints, matches and tracks ->
bundle adjustment -> COLMAP project. Start at :func:`reconstruct` (``reconstruct.py`` reads top to bottom);
the command-line entry point is :func:`speed3r_sfm.pipeline.cli.reconstruct_command`."""

from .backbone import Backbone, ModelNotAvailableError, load_backbone
from .bundle import BundleOptions
from .colmap_model import CAMERA_MODELS
from .database import mapper_options
from .export import OutputExistsError, OutputPathError
from .inputs import InputError, Preprocessing
from .keypoints import KeypointOptions
from .loop_closure import LoopOptions
from .matching import MatchOptions
from .reconstruct import PipelineOptions, PipelineResult, ReconstructionError, reconstruct, run_pipeline
from .refine import RefineOptions
from .rescue import RescueOptions
from .token_poses import TokenPoseOptions

__all__ = [
    "CAMERA_MODELS",
    "Backbone",
    "BundleOptions",
    "InputError",
    "KeypointOptions",
    "LoopOptions",
    "MatchOptions",
    "ModelNotAvailableError",
    "OutputExistsError",
    "OutputPathError",
    "PipelineOptions",
    "PipelineResult",
    "Preprocessing",
    "ReconstructionError",
    "RefineOptions",
    "RescueOptions",
    "TokenPoseOptions",
    "load_backbone",
    "mapper_options",
    "reconstruct",
    "run_pipeline",
]
