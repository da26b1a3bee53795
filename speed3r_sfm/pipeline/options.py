"""The pipeline's settings: one dataclass per stage (each in its stage's module), gathered here."""

from __future__ import annotations

from dataclasses import dataclass, field

from .bundle import BundleOptions
from .checks import require_at_least, require_integer, require_positive
from .keypoints import KeypointOptions
from .loop_closure import LoopOptions
from .matching import MatchOptions
from .rescue import RescueOptions
from .token_poses import TokenPoseOptions


@dataclass
class PipelineOptions:
    """Settings of every stage (defaults are the documented ones).

    Attributes:
        keypoints: Keypoint detection settings (distances in model pixels unless stated).
        matching: Matching settings (distances in model pixels unless stated).
        bundle: Bundle adjustment settings (loss scales in work pixels, error thresholds in original pixels).
        token_poses: Token poses: camera poses from the model's own patch descriptors and depth.
        loops: Loop closure of ordered chunks (sequences that return to a place seen chunks before).
        rescue: Second chance for views that bundle adjustment de-registered as weakly linked.
        merge_radius: a match location this close (work pixels) to a keypoint of its view reuses that
            keypoint instead of adding a 2D point; 0: no merging.
        max_image_size: long side (pixels) of the work copies used for keypoints and matching; larger is
            more precise on big photos, and slower.
        min_work_scale: the work copies keep at least this fraction of the original resolution, whatever
            max_image_size says (0: max_image_size only).
        no_ba_max_reproj_error: without bundle adjustment (ba false), 3D points with a larger reprojection
            error (work pixels) are filtered out.
        max_models: most models written (sparse/0, sparse/1, ...): views left unregistered are
            reconstructed on their own as further models; 1: the first model only.
        min_model_views: a further model is tried only while at least this many views are unregistered,
            and kept only if it registers that many.
    """

    keypoints: KeypointOptions = field(default_factory=KeypointOptions)
    matching: MatchOptions = field(default_factory=MatchOptions)
    bundle: BundleOptions = field(default_factory=BundleOptions)
    token_poses: TokenPoseOptions = field(default_factory=TokenPoseOptions)
    loops: LoopOptions = field(default_factory=LoopOptions)
    rescue: RescueOptions = field(default_factory=RescueOptions)
    merge_radius: float = 1.0  # work pixels: match locations this close to a keypoint reuse it
    max_image_size: int = 1600  # long side of the work copies (keypoints, refinement)...
    # ...but at least this fraction of the original's: 0.45 px of sub-pixel error on the work copy stays
    # within 1 px of the original (a 4144 x 3136 photo: 1.1-1.4 px mean reprojection error at 1600)
    min_work_scale: float = 0.5
    no_ba_max_reproj_error: float = 16.0  # work pixels, point filter when ba=False
    # views that did not register are reconstructed on their own, as further models (sparse/1, sparse/2,
    # ...), while at least ``min_model_views`` of them are left and such a run registers that many, up to
    # ``max_models`` models in all, as COLMAP's mapper starts new models (its min_model_size is 10). A folder
    # of two scenes left the second one unregistered (mixed_scenes_cpu.jsonl). 1: the first model only
    max_models: int = 5
    min_model_views: int = 10

    def __post_init__(self) -> None:
        for name, kind in (
            ("keypoints", KeypointOptions),
            ("matching", MatchOptions),
            ("bundle", BundleOptions),
            ("token_poses", TokenPoseOptions),
            ("loops", LoopOptions),
            ("rescue", RescueOptions),
        ):
            if not isinstance(getattr(self, name), kind):
                got = type(getattr(self, name)).__name__
                raise TypeError(f"PipelineOptions.{name} must be a {kind.__name__}, got {got}")
        require_at_least(self, max_image_size=1, merge_radius=0.0)
        require_integer(self, max_models=1, min_model_views=2)
        require_positive(self, "no_ba_max_reproj_error")
        if not 0.0 <= self.min_work_scale <= 1.0:
            raise ValueError(f"min_work_scale must lie in [0, 1], got {self.min_work_scale}")
