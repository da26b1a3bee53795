"""VGGT (Wang et al., CVPR 2025): cameras, depth, point maps and tracks from a set of views, in one pass.

Clean-room implementation whose ``state_dict`` equals the official checkpoint's (``facebook/VGGT-1B``).
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ...attention import AttentionConfig, is_gsa_parameter
from ..checkpoint import load_state_dict_checked, read_state_dict, resolve_checkpoint
from ..cpu_features import cpu_has_native_bf16
from ..heads import CameraHead, DPTHead, FeatureTracker, TrackHead
from ..intrinsics import image_center
from ..prediction import Prediction
from .aggregator import Aggregator
from .config import VGGTConfig
from .pose_encoding import pose_encoding_to_extrinsics_intrinsics

HUB_REPO = "facebook/VGGT-1B"
HUB_FILENAMES = ("model.safetensors", "model.pt")


class VGGT(nn.Module):
    """Aggregator + camera, depth, point and track heads (each can be disabled in the config).

    ``forward`` returns the official output dict; ``predict`` returns the common :class:`Prediction`.
    """

    def __init__(self, config: VGGTConfig | None = None) -> None:
        super().__init__()
        self.config = config = config or VGGTConfig()
        dim_in = config.head_dim_in
        self.aggregator = Aggregator(config)
        self.camera_head = (
            CameraHead(
                dim_in,
                trunk_depth=config.camera_trunk_depth,
                num_heads=config.camera_num_heads,
                num_iterations=config.camera_iterations,
            )
            if config.enable_camera
            else None
        )
        self.point_head = self._dpt_head(4, "inv_log") if config.enable_point else None
        self.depth_head = self._dpt_head(2, "exp") if config.enable_depth else None
        self.track_head = (
            TrackHead(
                dim_in,
                config.patch_size,
                features=config.track_features,
                out_channels=config.dpt_out_channels,
                layer_indices=config.dpt_layers,
                iterations=config.track_iterations,
                stride=config.track_stride,
                corr_levels=config.track_corr_levels,
                corr_radius=config.track_corr_radius,
                hidden_size=config.track_hidden_size,
                depth=config.track_depth,
                num_heads=config.track_num_heads,
                num_virtual_tracks=config.track_num_virtual,
                max_scale=config.img_size,
            )
            if config.enable_track
            else None
        )

    def _dpt_head(self, output_dim: int, activation: str) -> DPTHead:
        c = self.config
        return DPTHead(
            c.head_dim_in,
            c.patch_size,
            output_dim=output_dim,
            activation=activation,
            conf_activation="expp1",
            features=c.dpt_features,
            out_channels=c.dpt_out_channels,
            layer_indices=c.dpt_layers,
        )

    @property
    def gradient_checkpointing(self) -> bool:
        return self.aggregator.gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        self.aggregator.gradient_checkpointing = enabled

    def layers_needed(self, with_tracks: bool = False) -> set[int]:
        """Aggregator layers that the enabled heads read (only these are kept in memory); ``with_tracks``:
        the track head runs too."""
        depth = self.config.depth
        needed = set()
        if self.camera_head is not None:
            needed.add(depth - 1)
        if self.depth_head is not None or self.point_head is not None or with_tracks:
            needed.update(i % depth for i in self.config.dpt_layers)
        if self.config.descriptor_layer is not None:
            needed.add(self.config.descriptor_layer % depth)
        return needed

    def forward(
        self,
        images: torch.Tensor,
        query_points: torch.Tensor | None = None,
        return_attention: bool = False,
        with_track_features: bool = False,
        bf16_heads: bool = False,
        bf16_aggregator: bool = False,
    ) -> dict[str, Any]:
        """images: (S, 3, H, W) or (B, S, 3, H, W) in [0, 1], H and W multiples of the patch size;
        query_points: optional (N, 2) or (B, N, 2) pixel (x, y) in frame 0, for the track head;
        ``with_track_features``: also return the track head's feature maps (``track_features``, see
        ``TrackHead.features``) to track points of any frame later (``TrackHead.track``). ``bf16_heads``: run
        the DPT heads' convolutions in bf16 whatever the caller's autocast (``predict`` on a CPU with native
        bf16, see ``VGGTConfig.cpu_bf16_heads``); ``bf16_aggregator``: the aggregator under bf16 autocast on
        the images' device (``VGGTConfig.cpu_bf16_aggregator``).

        Returns the official keys: ``pose_enc`` (B, S, 9) and ``pose_enc_list``, ``depth`` (B, S, H, W, 1),
        ``depth_conf`` (B, S, H, W), ``world_points`` (B, S, H, W, 3), ``world_points_conf`` (B, S, H, W),
        with query points ``track`` (B, S, N, 2), ``vis`` and ``conf`` (B, S, N), and ``images`` in eval mode;
        plus ``attention`` (the global attention's records) when ``return_attention``.
        """
        images = self._check_images(images)
        if query_points is not None and query_points.dim() == 2:
            query_points = query_points.unsqueeze(0)
        with_tracks = query_points is not None and self.track_head is not None
        with_track_features = with_track_features and self.track_head is not None
        records: list | None = [] if return_attention else None
        # without bf16_aggregator the caller's autocast, if any, stays in effect (autocast(enabled=False)
        # would switch it off: the aggregator ran in float32 under predict's CUDA autocast)
        aggregator_autocast = (
            torch.autocast(images.device.type, dtype=torch.bfloat16)
            if bf16_aggregator
            else contextlib.nullcontext()
        )
        with aggregator_autocast:
            outputs, patch_start_idx = self.aggregator(
                images, keep=self.layers_needed(with_tracks or with_track_features), records=records
            )
        image_size = (images.shape[-2], images.shape[-1])
        chunk = self.config.frames_chunk_size

        predictions: dict[str, Any] = {}

        def float32_heads() -> contextlib.AbstractContextManager:
            return torch.autocast(device_type=images.device.type, enabled=False)

        with float32_heads():
            if self.camera_head is not None:
                pose_enc_list = self.camera_head(outputs[-1])
                predictions["pose_enc"] = pose_enc_list[-1]
                predictions["pose_enc_list"] = pose_enc_list
        if bf16_heads:
            dense_heads = torch.autocast(images.device.type, dtype=torch.bfloat16)
        elif self.config.dense_heads_autocast:
            dense_heads = contextlib.nullcontext()
        else:
            dense_heads = float32_heads()
        with dense_heads:
            if self.depth_head is not None:
                depth, depth_conf = self.depth_head(outputs, image_size, patch_start_idx, chunk)
                predictions["depth"], predictions["depth_conf"] = depth, depth_conf
            if self.point_head is not None:
                points, points_conf = self.point_head(outputs, image_size, patch_start_idx, chunk)
                predictions["world_points"], predictions["world_points_conf"] = points, points_conf
        if with_tracks or with_track_features:
            feature_maps = self.track_head.features(outputs, image_size, patch_start_idx, chunk)
            if with_track_features:
                predictions["track_features"] = feature_maps
            if with_tracks:
                tracks, vis, conf = self.track_head.track(feature_maps, query_points)
                predictions["track"], predictions["vis"], predictions["conf"] = tracks[-1], vis, conf
        if not self.training:
            predictions["images"] = images
            if self.config.descriptor_layer is not None:
                tokens = outputs[self.config.descriptor_layer][:, :, patch_start_idx:]
                predictions["descriptors"] = F.normalize(tokens.float(), dim=-1).half()
        else:  # for losses on the tokens (training/correspondence.py); None for layers not kept
            predictions["aggregated_tokens_list"] = outputs
            predictions["patch_start_idx"] = patch_start_idx
            predictions["patch_size"] = self.config.patch_size
        if return_attention:
            predictions["attention"] = records
        return predictions

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"images must be (S, 3, H, W) or (B, S, 3, H, W), got {tuple(images.shape)}")
        patch = self.config.patch_size
        height, width = images.shape[-2:]
        if height % patch or width % patch:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {patch}; "
                "preprocess with speed3r_sfm.data.images.preprocess_images"
            )
        return images

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, return_attention: bool = False, with_tracker: bool = False
    ) -> Prediction:
        """Cameras and geometry as a :class:`Prediction` (no autograd; call ``eval()`` first for inference).

        cam_from_world and K come from the pose encoding (principal point (W/2, H/2), as upstream). Without a
        point head, world points are unprojected from depth; without a depth head, depth is the camera-frame
        z of the world points. Pixel (u, v) is taken at its integer coordinates, the convention of
        ``Prediction``. ``with_tracker`` (and a track head): ``extras["tracker"]`` is a
        :class:`~speed3r_sfm.models.heads.FeatureTracker` that tracks points of any view through all views.
        """
        if self.camera_head is None:
            raise ValueError("predict() needs the camera head: build the model with enable_camera=True")
        if self.depth_head is None and self.point_head is None:
            raise ValueError("predict() needs the depth head or the point head")
        height, width = self._check_images(images).shape[-2:]
        with_tracker = with_tracker and self.track_head is not None
        native_bf16 = images.device.type == "cpu" and cpu_has_native_bf16()
        bf16_heads = native_bf16 and self.config.cpu_bf16_heads
        float32 = self.aggregator.camera_token.dtype == torch.float32  # not a float64 reference model
        bf16_aggregator = native_bf16 and self.config.cpu_bf16_aggregator and float32
        out = self.forward(
            images,
            return_attention=return_attention,
            with_track_features=with_tracker,
            bf16_heads=bf16_heads,
            bf16_aggregator=bf16_aggregator,
        )
        pose_enc = out["pose_enc"].float()
        cam_from_world, intrinsics = pose_encoding_to_extrinsics_intrinsics(pose_enc, (height, width))
        # upstream's principal point (W/2, H/2) is the image centre with pixel centres at integer + 0.5;
        # a Prediction's pixel centres are at integers, where the centre is ((W - 1)/2, (H - 1)/2)
        intrinsics[..., 0, 2], intrinsics[..., 1, 2] = image_center(height, width)
        if self.depth_head is not None:
            depth, depth_conf = out["depth"][..., 0], out["depth_conf"]
        else:
            depth, depth_conf = _camera_depth(out["world_points"], cam_from_world), out["world_points_conf"]
        if self.point_head is not None:
            world_points, points_conf = out["world_points"], out["world_points_conf"]
        else:
            world_points, points_conf = _unproject(depth, cam_from_world, intrinsics), depth_conf
        prediction = Prediction(
            cam_from_world=cam_from_world,
            intrinsics=intrinsics,
            depth=depth,
            depth_conf=depth_conf,
            world_points=world_points,
            world_points_conf=points_conf,
            attention=out.get("attention"),
            extras={"pose_enc": pose_enc, **_descriptor_extras(out, self.config.patch_size)},
        )
        if with_tracker:
            if images.dim() == 5 and images.shape[0] != 1:
                raise ValueError("with_tracker needs a batch of one sequence")
            prediction.extras["tracker"] = FeatureTracker(self.track_head, out["track_features"])
        return prediction

    @classmethod
    def from_pretrained(
        cls,
        spec: str | os.PathLike = HUB_REPO,
        config: VGGTConfig | None = None,
        attention: AttentionConfig | None = None,
        allow_missing: Callable[[str], bool] | None = is_gsa_parameter,
    ) -> VGGT:
        """Build the model and strictly load weights from a local ``.pt``/``.safetensors`` file or a Hub id.

        ``config`` defaults to the official preset; ``attention`` replaces its global attention. Keys for
        which ``allow_missing(key)`` is true may be absent from the file and keep their initial values (by
        default the GSA gate parameters, so that a dense checkpoint loads into a GSA model training-free).
        Weights of heads disabled in ``config``, and a GSA checkpoint's gates in a dense model, are ignored.
        Returns the model in eval mode, on the CPU.
        """
        config = config or VGGTConfig.preset("vggt-1b")
        if attention is not None:
            config = dataclasses.replace(config, attention=attention)
        path = resolve_checkpoint(spec, default_repo=HUB_REPO, filenames=HUB_FILENAMES)
        state_dict = read_state_dict(path)
        model = cls(config)
        disabled = tuple(
            f"{name}."
            for name in ("camera_head", "depth_head", "point_head", "track_head")
            if getattr(model, name) is None
        )
        dense = config.attention.kind != "gsa"  # a GSA checkpoint's gates have no place in a dense model
        load_state_dict_checked(
            model,
            state_dict,
            source=path,
            allow_missing=allow_missing,
            ignore_unexpected=lambda key: key.startswith(disabled) or (dense and is_gsa_parameter(key)),
        )
        return model.eval()


def _unproject(depth: torch.Tensor, cam_from_world: torch.Tensor, intrinsics: torch.Tensor) -> torch.Tensor:
    """World points (..., H, W, 3) of z-depth maps (..., H, W), pixel (u, v) at integer coordinates."""
    height, width = depth.shape[-2:]
    v, u = torch.meshgrid(
        torch.arange(height, device=depth.device, dtype=depth.dtype),
        torch.arange(width, device=depth.device, dtype=depth.dtype),
        indexing="ij",
    )
    k = intrinsics[..., None, None, :, :]
    x = (u - k[..., 0, 2]) / k[..., 0, 0] * depth
    y = (v - k[..., 1, 2]) / k[..., 1, 1] * depth
    camera_points = torch.stack([x, y, depth], dim=-1)
    rotation, translation = cam_from_world[..., :3], cam_from_world[..., None, None, :, 3]
    # Rᵀ(x - t) of every pixel as rows (x - t) R: one (H·W, 3) @ (3, 3) product per view
    return ((camera_points - translation).flatten(-3, -2) @ rotation).view_as(camera_points)


def _camera_depth(world_points: torch.Tensor, cam_from_world: torch.Tensor) -> torch.Tensor:
    """Camera-frame z of (..., H, W, 3) world points."""
    rotation_z = cam_from_world[..., None, None, 2, :3]
    return (world_points * rotation_z).sum(-1) + cam_from_world[..., None, None, 2, 3]


def _descriptor_extras(out: dict[str, Any], patch_size: int) -> dict[str, Any]:
    """``descriptors`` (B, S, P, C) float16 and their ``patch_size``, when the forward exported them."""
    if "descriptors" not in out:
        return {}
    return {"descriptors": out["descriptors"], "patch_size": patch_size}
