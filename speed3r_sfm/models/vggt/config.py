"""Configuration of the VGGT backbone, with the official (``vggt-1b``) and a tiny test preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch

from ...attention import AttentionConfig
from ..layers.dinov2 import DinoConfig


@dataclass
class VGGTConfig:
    """Sizes and switches of VGGT. The defaults are the released ``facebook/VGGT-1B`` checkpoint.

    The aggregator runs ``depth`` frame blocks and ``depth`` global blocks alternately over tokens
    [camera, ``num_register_tokens`` registers, patches] of width ``embed_dim``; its layer i outputs
    concat(frame_i, global_i) (2 × ``embed_dim``). The DPT heads read layers ``dpt_layers``; the camera head
    reads the camera token of the last layer. Global blocks get their attention kernel from ``attention``.

    Inference (no autograd) runs every block in place, and in chunks to bound memory:
    ``aggregator_chunk_frames`` frames go through the encoder and the frame blocks at a time; the token-wise
    parts of the global blocks (norm, qkv, qk-norm and RoPE; output projection and MLP) run on
    ``global_ffn_chunk_tokens`` tokens at a time (rounded to whole views), so that only q, k, v and the
    attention output exist for the whole sequence; the DPT heads run on ``frames_chunk_size`` frames at a
    time. None disables a chunking.

    ``intermediate_dtype``: dtype of the kept layer outputs (the heads' inputs). "auto": at inference under
    autocast, the autocast dtype (bf16 halves them: 4 layers × 2048 channels × 2 B per token), otherwise the
    aggregator's stream dtype (float32, as upstream; also always under autograd); None: always the stream
    dtype; or a torch dtype name ("bfloat16").

    ``autocast_residual``: at inference under autocast, keep the aggregator's residual stream in the autocast
    dtype (bf16: half its memory and traffic, LayerNorms computed in bf16) instead of float32 as upstream.
    Every residual update is then rounded to bf16, which adds up over the layers: off by default (see
    ``benchmarks/results/vggt_profile.md`` for the measured differences).

    ``compile_inference``: at inference, run the token-wise parts of every block (encoder, frame and
    global blocks) through ``torch.compile``, which fuses the norms, casts, RoPE and residual updates into
    fewer passes over memory. Same maths; the first call compiles (tens of seconds); meant for CUDA.

    ``dense_heads_autocast``: run the depth/point DPT heads under the caller's autocast (bf16 convolutions)
    instead of in float32 as upstream (the camera head always runs in float32). About twice as fast at
    hundreds of views, with bf16-level differences in depth and points; off by default.

    ``cpu_bf16_heads``: ``predict`` on a CPU whose oneDNN has native bf16 (AVX512-BF16 or AMX) runs the DPT
    heads' convolutions in bf16: the shipped default's depth head at 24 views took 0.41 instead of 0.87 s on
    two cores, depth within 0.05 % (median; 0.43 % at most) (``benchmarks/results/dpt_head_cpu.md``).
    ``forward`` (training, distillation) runs them as ``dense_heads_autocast`` says.

    ``cpu_bf16_aggregator``: on such a CPU ``predict`` also runs the aggregator under bf16 autocast (linear
    layers and attention as bf16 matmuls, ``DenseAttention``'s chunked CPU path; residual stream float32)
    with a float32 model: the shipped default at 24 views took 1.45 instead of 2.80 s on two cores
    (``benchmarks/results/cpu_bf16_aggregator.md``).

    ``descriptor_layer``: an aggregator layer whose patch tokens were trained to match across views
    (``speed3r_sfm.training.correspondence``); ``predict`` then exports them, L2-normalised, as
    ``extras["descriptors"]`` for the pipeline's token poses. None (official weights): nothing exported.
    """

    img_size: int = 518
    patch_size: int = 14
    embed_dim: int = 1024
    depth: int = 24
    num_heads: int = 16
    mlp_ratio: float = 4.0
    num_register_tokens: int = 4
    init_values: float = 0.01
    rope_base: float = 100.0
    dino: DinoConfig = field(default_factory=DinoConfig)
    # DPT heads (depth, point, and the track head's feature extractor)
    dpt_features: int = 256
    dpt_out_channels: tuple[int, int, int, int] = (256, 512, 1024, 1024)
    dpt_layers: tuple[int, int, int, int] = (4, 11, 17, 23)
    # camera head
    camera_trunk_depth: int = 4
    camera_num_heads: int = 16
    camera_iterations: int = 4
    # track head
    track_features: int = 128
    track_hidden_size: int = 384
    track_depth: int = 6
    track_num_heads: int = 8
    track_num_virtual: int = 64
    track_corr_levels: int = 7
    track_corr_radius: int = 4
    track_iterations: int = 4
    track_stride: int = 2
    enable_camera: bool = True
    enable_depth: bool = True
    enable_point: bool = True
    enable_track: bool = True
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    gradient_checkpointing: bool = False
    frames_chunk_size: int | None = 8
    aggregator_chunk_frames: int | None = 64
    global_ffn_chunk_tokens: int | None = 1 << 18
    intermediate_dtype: str | None = "auto"
    autocast_residual: bool = False
    compile_inference: bool = False
    dense_heads_autocast: bool = False
    cpu_bf16_heads: bool = True
    cpu_bf16_aggregator: bool = True
    descriptor_layer: int | None = None

    def __post_init__(self) -> None:
        if self.dino.embed_dim != self.embed_dim or self.dino.patch_size != self.patch_size:
            raise ValueError(
                f"the encoder (dim {self.dino.embed_dim}, patch {self.dino.patch_size}) must match the "
                f"aggregator (dim {self.embed_dim}, patch {self.patch_size})"
            )
        if self.embed_dim % self.num_heads or (self.embed_dim // self.num_heads) % 4:
            raise ValueError(f"head dim {self.embed_dim}/{self.num_heads} must be a multiple of 4 (2D RoPE)")
        if self.descriptor_layer is not None and not -self.depth <= self.descriptor_layer < self.depth:
            raise ValueError(f"descriptor_layer {self.descriptor_layer} is not a layer of {self.depth}")
        bad = [i for i in self.dpt_layers if not -self.depth <= i < self.depth]
        if bad:
            raise ValueError(f"dpt_layers {bad} out of range for depth {self.depth}")
        if self.intermediate_dtype not in (None, "auto"):
            self.storage_dtype  # noqa: B018 -- validates the name

    @property
    def patch_start_idx(self) -> int:
        """Index of the first patch token in a frame: after the camera token and the registers."""
        return 1 + self.num_register_tokens

    @property
    def head_dim_in(self) -> int:
        return 2 * self.embed_dim

    @property
    def storage_dtype(self) -> torch.dtype | None:
        """``intermediate_dtype`` as a torch dtype; None for None and "auto" (decided at run time)."""
        if self.intermediate_dtype in (None, "auto"):
            return None
        dtype = getattr(torch, self.intermediate_dtype, None)
        if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
            raise ValueError(f"intermediate_dtype {self.intermediate_dtype!r} is not a torch floating dtype")
        return dtype

    @classmethod
    def preset(cls, name: str, **overrides: Any) -> VGGTConfig:
        """``"vggt-1b"``: the official model (1,256,537,516 parameters); ``"tiny"``: ~1 M parameters for CPU
        tests and small experiments. ``overrides`` replace fields, e.g. ``enable_track=False``."""
        if name == "vggt-1b":
            config = cls()
        elif name == "tiny":
            config = cls(
                img_size=84,
                embed_dim=64,
                depth=4,
                num_heads=4,
                dino=DinoConfig(img_size=84, embed_dim=64, depth=2, num_heads=4, num_register_tokens=4),
                dpt_features=32,
                dpt_out_channels=(16, 32, 64, 64),
                dpt_layers=(0, 1, 2, 3),
                camera_trunk_depth=1,
                camera_num_heads=4,
                track_features=16,
                track_hidden_size=32,
                track_depth=2,
                track_num_heads=4,
                track_num_virtual=4,
                track_corr_levels=3,
                track_corr_radius=2,
            )
        else:
            raise ValueError(f"unknown VGGT preset {name!r}; choose 'vggt-1b' or 'tiny'")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise TypeError(f"unknown VGGTConfig fields {unknown}; valid fields: {sorted(valid)}")
        return dataclasses.replace(config, **overrides)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-serialisable dict (nested dataclasses as dicts)."""
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> VGGTConfig:
        data = dict(data)
        if isinstance(data.get("dino"), dict):
            data["dino"] = DinoConfig(**data["dino"])
        if isinstance(data.get("attention"), dict):
            attention = dict(data["attention"])
            if attention.get("gsa_layers") is not None:
                attention["gsa_layers"] = tuple(attention["gsa_layers"])
            data["attention"] = AttentionConfig(**attention)
        for key in ("dpt_out_channels", "dpt_layers"):
            if key in data:
                data[key] = tuple(data[key])
        return cls(**data)
