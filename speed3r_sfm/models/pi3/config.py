"""Configuration of the π³ (Pi3) backbone, with the official and a tiny test preset."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

from ...attention import AttentionConfig
from ..layers.dinov2 import DinoConfig


def _official_encoder() -> DinoConfig:
    return DinoConfig(with_mask_token=False)


@dataclass
class Pi3Config:
    """Sizes of π³. The defaults are the released ``yyfz233/Pi3`` checkpoint (958,696,732 parameters).

    The decoder alternates frame attention (even block indices) and global attention over all views (odd
    indices); the global blocks get their attention kernel from ``attention`` (dense or GSA). The decoder
    width is the encoder width; the point/conf/camera decoders read the concatenation of the last two
    decoder blocks (2 × width).

    Inference (no autograd) runs the blocks in place; the token-wise parts of the global blocks (norm,
    qkv, qk-norm, RoPE; output projection, MLP) run on ``global_chunk_tokens`` tokens at a time (None: all).

    ``cpu_bf16``: ``predict`` on a CPU whose oneDNN runs bf16 natively (AVX512-BF16 or AMX) runs the encoder
    and decoders under bf16 autocast (the heads stay float32), as VGGT's ``cpu_bf16_aggregator``.
    """

    encoder: DinoConfig = field(default_factory=_official_encoder)
    num_register_tokens: int = 5
    decoder_depth: int = 36
    decoder_num_heads: int = 16
    mlp_ratio: float = 4.0
    layerscale_init: float = 0.01
    rope_base: float = 100.0
    head_embed_dim: int = 1024
    head_depth: int = 5
    head_num_heads: int = 16
    camera_dim: int = 512
    attention: AttentionConfig = field(default_factory=AttentionConfig)
    gradient_checkpointing: bool = False
    global_chunk_tokens: int | None = 1 << 18
    cpu_bf16: bool = True

    def __post_init__(self) -> None:
        if self.encoder.with_mask_token:
            raise ValueError("π³'s encoder has no mask_token: use DinoConfig(with_mask_token=False)")
        if self.decoder_depth < 2:
            raise ValueError(
                f"decoder_depth must be >= 2 (one frame and one global block), got {self.decoder_depth}"
            )

    @property
    def dim(self) -> int:
        """Token width of the encoder and the alternating decoder."""
        return self.encoder.embed_dim

    @property
    def patch_size(self) -> int:
        return self.encoder.patch_size

    @property
    def num_global_blocks(self) -> int:
        return self.decoder_depth // 2

    @classmethod
    def preset(cls, name: str, **overrides) -> Pi3Config:
        """``"pi3"``: the official model; ``"tiny"``: a 0.6 M-parameter model for CPU tests.

        ``overrides`` replace fields, e.g. ``Pi3Config.preset("pi3", attention=AttentionConfig(kind="gsa"))``.
        """
        if name == "pi3":
            config = cls()
        elif name == "tiny":
            config = cls(
                encoder=DinoConfig(
                    img_size=56,
                    embed_dim=64,
                    depth=2,
                    num_heads=2,
                    num_register_tokens=4,
                    with_mask_token=False,
                ),
                decoder_depth=4,
                decoder_num_heads=2,
                head_embed_dim=64,
                head_depth=1,
                head_num_heads=2,
                camera_dim=32,
            )
        else:
            raise ValueError(f"unknown Pi3 preset {name!r}; choose 'pi3' or 'tiny'")
        valid = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - valid)
        if unknown:
            raise ValueError(f"unknown Pi3Config field(s) {unknown}; valid fields: {sorted(valid)}")
        return dataclasses.replace(config, **overrides)
