"""π³ (Pi3): permutation-equivariant feed-forward reconstruction, loadable from the official checkpoint.

A DINOv2 encoder tokenises every view; 5 register tokens are prepended per view; a decoder alternates
attention within each view (even blocks) and across all views (odd blocks, through the global-attention
hook so that GSA applies); three per-view transformer decoders read the last two decoder outputs and predict
camera-frame points, confidence logits and a camera-to-world pose per view. No view is special.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import torch
from torch import nn

from ...attention import (
    AttentionConfig,
    ViewLayout,
    build_global_attention,
    is_gsa_parameter,
    reset_gsa_parameters,
)
from ..checkpoint import load_state_dict_checked, read_state_dict, resolve_checkpoint
from ..cpu_features import cpu_has_native_bf16
from ..intrinsics import intrinsics_from_local_points
from ..layers.block import Block
from ..layers.dinov2 import DinoVisionTransformer
from ..layers.rope import RopeTable, RotaryPositionEmbedding2D, patch_positions
from ..prediction import Prediction
from .config import Pi3Config
from .heads import CameraHead, LinearPts3d, TransformerDecoder, run_block

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
HUB_REPO = "yyfz233/Pi3"
CHECKPOINT_FILES = ("model.safetensors",)


def cam_from_world_from_c2w(camera_to_world: torch.Tensor) -> torch.Tensor:
    """(..., 4, 4) or (..., 3, 4) rigid camera-to-world → (..., 3, 4) camera-from-world [Rᵀ | −Rᵀt]."""
    rotation = camera_to_world[..., :3, :3]
    translation = camera_to_world[..., :3, 3:]
    rotation_t = rotation.transpose(-1, -2)
    return torch.cat([rotation_t, -rotation_t @ translation], dim=-1)


class Pi3(nn.Module):
    """π³ backbone. ``forward`` returns the official outputs; ``predict`` the common ``Prediction``."""

    #: ``speed3r_sfm.data.images.preprocess_images`` mode of the official loader (≤ 255,000 pixels, Lanczos).
    preprocessing_mode = "pixel_limit"

    def __init__(self, config: Pi3Config | None = None) -> None:
        super().__init__()
        self.config = config = config if config is not None else Pi3Config()
        dim, patch = config.dim, config.patch_size
        self.num_special = config.num_register_tokens
        self.encoder = DinoVisionTransformer(config.encoder)
        self.rope = RotaryPositionEmbedding2D(config.rope_base)
        self.decoder = nn.ModuleList(self._decoder_block(i) for i in range(config.decoder_depth))
        self.register_token = nn.Parameter(torch.empty(1, 1, config.num_register_tokens, dim))
        nn.init.normal_(self.register_token, std=1e-6)

        def head_decoder(out_dim: int) -> TransformerDecoder:
            return TransformerDecoder(
                2 * dim,
                config.head_embed_dim,
                out_dim,
                config.head_depth,
                config.head_num_heads,
                config.mlp_ratio,
                self.rope,
            )

        self.point_decoder = head_decoder(config.head_embed_dim)
        self.point_head = LinearPts3d(patch, config.head_embed_dim, 3)
        self.conf_decoder = head_decoder(config.head_embed_dim)
        self.conf_head = LinearPts3d(patch, config.head_embed_dim, 1)
        self.camera_decoder = head_decoder(config.camera_dim)
        self.camera_head = CameraHead(config.camera_dim)
        self.register_buffer("image_mean", torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1))
        self.register_buffer("image_std", torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1))
        self.gradient_checkpointing = config.gradient_checkpointing

    def _decoder_block(self, index: int) -> Block:
        config = self.config
        is_global = index % 2 == 1
        attend = None
        if is_global:
            attend = build_global_attention(
                config.attention, dim=config.dim, num_heads=config.decoder_num_heads, layer_index=index // 2
            )
        return Block(
            config.dim,
            config.decoder_num_heads,
            config.mlp_ratio,
            init_values=config.layerscale_init,
            norm_eps=1e-6,
            qk_norm=True,
            qk_norm_eps=1e-5,
            rope=self.rope,
            attend=attend,
        )

    @property
    def gradient_checkpointing(self) -> bool:
        return self._gradient_checkpointing

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, enabled: bool) -> None:
        """Activation checkpointing per block (decoder and head decoders) while training."""
        self._gradient_checkpointing = enabled
        for decoder in (self.point_decoder, self.conf_decoder, self.camera_decoder):
            decoder.gradient_checkpointing = enabled

    def decode(
        self, tokens: torch.Tensor, batch: int, views: int, grid: tuple[int, int], records: list | None
    ) -> tuple[torch.Tensor, torch.Tensor, RopeTable]:
        """Alternating frame/global decoder over (B·N, P, C) patch tokens.

        Returns the concatenated outputs of the last two blocks, (B·N, 5 + P, 2C), the (y, x) RoPE
        positions of those tokens and their RoPE table. Only the two latest block outputs are kept alive;
        without autograd the blocks run in place (global blocks chunked, see ``global_chunk_tokens``).
        """
        dim = tokens.shape[-1]
        registers = self.register_token.expand(batch, views, -1, -1).reshape(
            batch * views, self.num_special, dim
        )
        hidden = torch.cat([registers.to(tokens.dtype), tokens], dim=1)
        per_view = hidden.shape[1]
        frame_positions = patch_positions(batch * views, *grid, self.num_special, device=tokens.device)
        global_positions = frame_positions.reshape(batch, views * per_view, 2)
        layout = ViewLayout(views, per_view, self.num_special, grid, records)
        rope = self.rope.table(frame_positions[0])  # cos/sin once for all blocks
        checkpointing = self.gradient_checkpointing and self.training
        inplace = not torch.is_grad_enabled()
        previous = hidden
        for index, block in enumerate(self.decoder):
            # In place, the input of the last block is the only earlier output still needed: copy it.
            previous = hidden.clone() if inplace and index == len(self.decoder) - 1 else hidden
            is_global = index % 2 == 1
            x = hidden.reshape(
                (batch, views * per_view, dim) if is_global else (batch * views, per_view, dim)
            )
            positions = global_positions if is_global else frame_positions
            block_layout = layout if is_global else None
            if inplace:
                chunk = self.config.global_chunk_tokens if block_layout is not None else None
                hidden = block(x, positions, block_layout, rope_table=rope, inplace=True, token_chunk=chunk)
            else:
                hidden = run_block(block, x, positions, block_layout, checkpointing, rope_table=rope)
        shape = (batch * views, per_view, dim)
        return torch.cat([previous.reshape(shape), hidden.reshape(shape)], dim=-1), frame_positions, rope

    def forward(self, images: torch.Tensor, return_attention: bool = False) -> dict[str, torch.Tensor]:
        """images: (B, N, 3, H, W) (or (N, 3, H, W)) RGB in [0, 1], H and W multiples of the patch size (14).

        Returns the official outputs, in float32 (float64 / bfloat16 for a model cast to it): the heads run
        with autocast disabled, as in the official model:
        ``points`` (B, N, H, W, 3) world points, ``local_points`` (B, N, H, W, 3) camera-frame points,
        ``conf`` (B, N, H, W, 1) confidence logits, ``camera_poses`` (B, N, 4, 4) OpenCV camera-to-world;
        with ``return_attention``, also ``attention``: the records of the global attention kernels.
        """
        if images.dim() == 4:
            images = images.unsqueeze(0)
        if images.dim() != 5 or images.shape[2] != 3:
            raise ValueError(f"expected images of shape (B, N, 3, H, W), got {tuple(images.shape)}")
        batch, views, _, height, width = images.shape
        patch = self.config.patch_size
        if height % patch or width % patch:
            raise ValueError(
                f"image size {height}x{width} is not a multiple of the patch size {patch}; "
                "preprocess with speed3r_sfm.data.images.preprocess_images(..., mode='pixel_limit')"
            )
        rows, cols = height // patch, width // patch
        records: list | None = [] if return_attention else None

        normalised = (images - self.image_mean) / self.image_std
        tokens = self.encoder(normalised.reshape(batch * views, 3, height, width))
        features, positions, rope = self.decode(tokens, batch, views, (rows, cols), records)
        point_tokens = self.point_decoder(features, positions, rope)[:, self.num_special :]
        conf_tokens = self.conf_decoder(features, positions, rope)[:, self.num_special :]
        camera_tokens = self.camera_decoder(features, positions, rope)[:, self.num_special :]

        with torch.autocast(device_type=images.device.type, enabled=False):
            # float32 under autocast (float32 weights); a model cast to bfloat16 runs its heads in it
            weights = next(self.point_head.parameters()).dtype
            head_dtype = torch.promote_types(point_tokens.dtype, weights)
            point_tokens, conf_tokens = point_tokens.to(head_dtype), conf_tokens.to(head_dtype)
            camera_tokens = camera_tokens.to(head_dtype)
            raw = self.point_head(point_tokens, rows, cols)
            xy, log_z = raw.split([2, 1], dim=-1)
            z = torch.exp(log_z)
            local_points = torch.cat([xy * z, z], dim=-1).reshape(batch, views, height, width, 3)
            conf = self.conf_head(conf_tokens, rows, cols).reshape(batch, views, height, width, 1)
            camera_poses = self.camera_head(camera_tokens).reshape(batch, views, 4, 4)
            rotation, translation = camera_poses[..., :3, :3], camera_poses[..., None, None, :3, 3]
            points = torch.einsum("bnij,bnhwj->bnhwi", rotation, local_points) + translation

        out = {"points": points, "local_points": local_points, "conf": conf, "camera_poses": camera_poses}
        if records is not None:
            out["attention"] = records
        return out

    @torch.no_grad()
    def predict(
        self, images: torch.Tensor, return_attention: bool = False, fix_principal_point: bool = True
    ) -> Prediction:
        """Run ``forward`` and convert to the common ``Prediction`` (no autograd; call ``eval()`` first).

        - ``cam_from_world``: inverse of the predicted camera-to-world poses. The world frame is π³'s own
          (not anchored to view 0) and the scale is arbitrary.
        - ``intrinsics``: fitted to the local points by confidence-weighted least squares, principal point
          at the image centre ((W−1)/2, (H−1)/2) unless ``fix_principal_point=False``.
        - ``depth``: z of the local points; ``world_points``: ``points``.
        - ``depth_conf`` and ``world_points_conf``: sigmoid of the confidence logits, in (0, 1) (the
          official demos keep pixels with confidence > 0.1).
        - ``extras``: ``local_points``, ``conf_logits`` and ``camera_to_world``.

        On a CPU with native bf16 the encoder and decoders run under bf16 autocast (``Pi3Config.cpu_bf16``).
        """
        bf16 = (
            images.device.type == "cpu"
            and self.config.cpu_bf16
            and self.image_mean.dtype == torch.float32  # not a float64 reference model
            and cpu_has_native_bf16()
        )
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=bf16):
            out = self(images, return_attention=return_attention)
        confidence = torch.sigmoid(out["conf"][..., 0])
        local_points = out["local_points"]
        intrinsics = intrinsics_from_local_points(
            local_points, confidence, fix_principal_point=fix_principal_point
        )
        return Prediction(
            cam_from_world=cam_from_world_from_c2w(out["camera_poses"]),
            intrinsics=intrinsics,
            depth=local_points[..., 2],
            depth_conf=confidence,
            world_points=out["points"],
            world_points_conf=confidence,
            attention=out.get("attention"),
            extras={
                "local_points": local_points,
                "conf_logits": out["conf"],
                "camera_to_world": out["camera_poses"],
            },
        )

    @classmethod
    def from_pretrained(
        cls,
        spec: str | os.PathLike = HUB_REPO,
        config: Pi3Config | None = None,
        attention: AttentionConfig | None = None,
        allow_missing: Callable[[str], bool] | None = is_gsa_parameter,
    ) -> Pi3:
        """π³ with the weights of a Hub id (default ``yyfz233/Pi3``, file ``model.safetensors``) or a local
        ``.safetensors``/``.pt`` file, loaded strictly. Returns the model in eval mode, on the CPU.

        ``config`` defaults to the official preset; ``attention`` replaces its global attention (e.g. GSA).
        Model keys for which ``allow_missing(key)`` is true may be absent from the file: by default the GSA
        parameters, which keep their training-free init when loading the official (dense) checkpoint. A GSA
        checkpoint's gates are ignored by a dense model.
        """
        config = config if config is not None else Pi3Config.preset("pi3")
        if attention is not None:
            config = dataclasses.replace(config, attention=attention)
        path = resolve_checkpoint(spec, default_repo=HUB_REPO, filenames=CHECKPOINT_FILES)
        state_dict = read_state_dict(path)
        with torch.device("meta"):
            model = cls(config)
        if all(key in state_dict or is_gsa_parameter(key) for key in model.state_dict()):
            # Every other tensor comes from the file: skip the random init of ~1 B parameters.
            model = model.to_empty(device="cpu")
            reset_gsa_parameters(model)
        else:
            model = cls(config)  # keys may be allowed missing: they keep their initial values
        dense = config.attention.kind != "gsa"  # a GSA checkpoint's gates have no place in a dense model
        load_state_dict_checked(
            model,
            state_dict,
            source=path,
            allow_missing=allow_missing,
            ignore_unexpected=is_gsa_parameter if dense else None,
        )
        return model.eval()
