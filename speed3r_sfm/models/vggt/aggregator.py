"""VGGT's alternating-attention aggregator: DINOv2 patch tokens + camera/register tokens, then frame and
global attention blocks in turn."""

from __future__ import annotations

import dataclasses
from collections.abc import Collection

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

from ...attention import ViewLayout, build_global_attention
from ..layers.block import Block
from ..layers.dinov2 import DinoVisionTransformer
from ..layers.rope import RopeTable, RotaryPositionEmbedding2D, patch_positions
from .config import VGGTConfig

_IMAGENET_MEAN = (0.485, 0.456, 0.406)
_IMAGENET_STD = (0.229, 0.224, 0.225)


class Aggregator(nn.Module):
    """Turns (B, S, 3, H, W) images in [0, 1] into per-layer tokens (B, S, P, 2·dim).

    Each frame's tokens are [camera, registers, patches]; frame 0 gets the first of the two learned
    camera/register token sets, all other frames the second, which is how the reference frame is marked.
    Layer i runs frame block i on (B·S, P, dim), then global block i on (B, S·P, dim), and outputs
    concat(frame_i, global_i). Both use qk-norm and 2D RoPE on (row+1, col+1) patch positions (special
    tokens at 0); the global blocks' attention kernel comes from ``build_global_attention``.
    """

    def __init__(self, config: VGGTConfig) -> None:
        super().__init__()
        self.config = config
        dim, num_special = config.embed_dim, config.patch_start_idx
        self.camera_token = nn.Parameter(torch.empty(1, 2, 1, dim))
        self.register_token = nn.Parameter(torch.empty(1, 2, config.num_register_tokens, dim))
        self.patch_embed = DinoVisionTransformer(config.dino)
        self.rope = RotaryPositionEmbedding2D(config.rope_base)
        self.frame_blocks = nn.ModuleList(self._block(None) for _ in range(config.depth))
        self.global_blocks = nn.ModuleList(
            self._block(
                build_global_attention(config.attention, dim=dim, num_heads=config.num_heads, layer_index=i)
            )
            for i in range(config.depth)
        )
        self.register_buffer(
            "_resnet_mean", torch.tensor(_IMAGENET_MEAN).view(1, 1, 3, 1, 1), persistent=False
        )
        self.register_buffer("_resnet_std", torch.tensor(_IMAGENET_STD).view(1, 1, 3, 1, 1), persistent=False)
        self.num_special = num_special
        self.gradient_checkpointing = config.gradient_checkpointing
        nn.init.normal_(self.camera_token, std=1e-6)
        nn.init.normal_(self.register_token, std=1e-6)

    def _block(self, attend: nn.Module | None) -> Block:
        c = self.config
        return Block(
            c.embed_dim,
            c.num_heads,
            c.mlp_ratio,
            init_values=c.init_values,
            norm_eps=1e-5,
            qk_norm=True,
            rope=self.rope,
            attend=attend,
            cast_qk_before_rope=False,
        )

    def forward(
        self,
        images: torch.Tensor,
        keep: Collection[int] | None = None,
        records: list | None = None,
    ) -> tuple[list[torch.Tensor | None], int]:
        """images: (B, S, 3, H, W) in [0, 1], H and W multiples of the patch size.

        Returns ``(outputs, patch_start_idx)``: ``outputs[i]`` is layer i's (B, S, P, 2·dim) tokens for the
        layers in ``keep`` (None: all) and None for the others. ``records`` (a list) collects what the
        global attention kernels export (GSA); None records nothing.

        Without autograd (``torch.no_grad``/``inference_mode``) the layers run in place and in chunks (see
        :meth:`_layer_inference`); with autograd they run as plain blocks, optionally checkpointed.
        """
        depth = self.config.depth
        keep_set = set(range(depth)) if keep is None else {i % depth for i in keep}
        batch, frames, _, height, width = images.shape
        patch = self.config.patch_size
        rows, cols = height // patch, width // patch
        tokens_per_view = self.num_special + rows * cols
        inference = not torch.is_grad_enabled()

        if inference:
            self._set_compiled_blocks(self.config.compile_inference)
        images = images.reshape(batch * frames, 3, height, width)
        tokens = self._embed(images, batch, frames, tokens_per_view, inference)
        positions = patch_positions(1, rows, cols, self.num_special, device=images.device)
        global_positions = positions.repeat(1, frames, 1)
        # cos/sin of the RoPE angles, computed once for all blocks (global positions repeat them per view)
        rope = self.rope.table(positions[0])
        layout = ViewLayout(frames, tokens_per_view, self.num_special, (rows, cols), records)

        step = self._layer_inference if inference else self._layer_autograd
        outputs: list[torch.Tensor | None] = [None] * depth
        for i in range(depth):
            tokens, outputs[i] = step(i, tokens, positions, global_positions, rope, layout, i in keep_set)
        return outputs, self.num_special

    def _layer_autograd(
        self,
        index: int,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        global_positions: torch.Tensor,
        rope: RopeTable,
        layout: ViewLayout,
        keep: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Frame block then global block on (B·S, P, dim) tokens; returns them and the kept output."""
        frames_tokens, tokens_per_view, dim = tokens.shape
        batch = frames_tokens // layout.num_views
        frame_out = self._run(self.frame_blocks[index], tokens, positions, rope, None)
        flat = frame_out.reshape(batch, layout.num_tokens, dim)
        global_out = self._run(self.global_blocks[index], flat, global_positions, rope, layout)
        global_out = global_out.reshape_as(tokens)
        if not keep:
            return global_out, None
        both = torch.cat([frame_out, global_out], dim=-1).reshape(
            batch, layout.num_views, tokens_per_view, -1
        )
        storage = self.config.storage_dtype
        return global_out, both if storage is None else both.to(storage)

    def _layer_inference(
        self,
        index: int,
        tokens: torch.Tensor,
        positions: torch.Tensor,
        global_positions: torch.Tensor,
        rope: RopeTable,
        layout: ViewLayout,
        keep: bool,
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """As :meth:`_layer_autograd` without autograd, updating ``tokens`` in place.

        The frame block runs on ``aggregator_chunk_frames`` frames at a time, the token-wise parts of the
        global block on ``global_ffn_chunk_tokens`` tokens at a time (see ``Block``). The kept output
        (B, S, P, 2·dim) is allocated only once the global attention is done and its buffers are freed;
        the frame half is copied from ``tokens`` then, before the global block updates them.
        """
        frames_tokens, tokens_per_view, dim = tokens.shape
        batch = frames_tokens // layout.num_views
        self._frame_block_inference(self.frame_blocks[index], tokens, positions, rope)
        shape = (batch, layout.num_views, tokens_per_view, dim)
        kept = None

        def keep_frame_half(flat: torch.Tensor) -> None:
            nonlocal kept
            kept = flat.new_empty(*shape[:-1], 2 * dim, dtype=self._kept_dtype(flat))
            kept[..., :dim] = flat.view(shape)

        flat = tokens.view(batch, layout.num_tokens, dim)
        self.global_blocks[index](
            flat,
            global_positions,
            layout,
            rope_table=rope,
            inplace=True,
            token_chunk=self.config.global_ffn_chunk_tokens,
            before_update=keep_frame_half if keep else None,
        )
        if kept is not None:
            kept[..., dim:] = tokens.view(shape)
        return tokens, kept

    def _set_compiled_blocks(self, enabled: bool) -> None:
        """``Block.compile_inference`` of the encoder, frame and global blocks."""
        blocks = [*self.patch_embed.blocks, *self.frame_blocks, *self.global_blocks]
        for block in blocks:
            block.compile_inference = enabled

    def _kept_dtype(self, tokens: torch.Tensor) -> torch.dtype:
        """dtype of the kept layer outputs at inference: ``intermediate_dtype``; "auto" is the autocast dtype
        under autocast and the tokens' dtype otherwise."""
        if self.config.intermediate_dtype == "auto":
            return _autocast_dtype(tokens) or tokens.dtype
        return self.config.storage_dtype or tokens.dtype

    def _stream_dtype(self, patches: torch.Tensor) -> torch.dtype:
        """dtype of the residual stream at inference: the encoder's (float32), or with ``autocast_residual``
        the autocast dtype under autocast."""
        if self.config.autocast_residual:
            return _autocast_dtype(patches) or patches.dtype
        return patches.dtype

    def _special_tokens(self, batch: int, frames: int) -> torch.Tensor:
        """(B·S, num_special, dim): set 0 for frame 0, set 1 for the other frames."""

        def per_frame(token: torch.Tensor) -> torch.Tensor:
            token = torch.cat([token[:, :1], token[:, 1:].expand(-1, frames - 1, -1, -1)], dim=1)
            return token.expand(batch, -1, -1, -1).reshape(batch * frames, *token.shape[2:])

        return torch.cat([per_frame(self.camera_token), per_frame(self.register_token)], dim=1)

    def _normalise(self, images: torch.Tensor) -> torch.Tensor:
        """(N, 3, H, W) images in [0, 1] → ResNet-normalised."""
        return (images - self._resnet_mean.view(1, 3, 1, 1)) / self._resnet_std.view(1, 3, 1, 1)

    def _embed(
        self, images: torch.Tensor, batch: int, frames: int, tokens_per_view: int, inference: bool
    ) -> torch.Tensor:
        """(B·S, P, dim) initial tokens of (B·S, 3, H, W) images: special tokens then DINOv2 patch tokens.

        At inference the encoder runs on ``aggregator_chunk_frames`` images at a time (normalised per
        chunk), writing into one preallocated tensor."""
        special = self._special_tokens(batch, frames)
        chunk = self.config.aggregator_chunk_frames
        if not inference:
            patches = self.patch_embed(self._normalise(images))
            return torch.cat([special.to(patches.dtype), patches], dim=1)
        if chunk is None:
            chunk = images.shape[0]
        tokens = None
        for start in range(0, images.shape[0], chunk):
            patches = self.patch_embed(self._normalise(images[start : start + chunk]))
            if tokens is None:
                dtype = self._stream_dtype(patches)
                tokens = patches.new_empty(images.shape[0], tokens_per_view, patches.shape[-1], dtype=dtype)
                tokens[:, : self.num_special] = special
            tokens[start : start + chunk, self.num_special :] = patches
        return tokens

    def _run(
        self,
        block: Block,
        x: torch.Tensor,
        positions: torch.Tensor,
        rope: RopeTable,
        layout: ViewLayout | None,
    ) -> torch.Tensor:
        """A block under autograd, with non-reentrant activation checkpointing when enabled in training."""
        if self.gradient_checkpointing and self.training:
            # The block runs twice (forward and recompute); record sparse-attention exports only once.
            quiet = dataclasses.replace(layout, records=None) if layout is not None else None
            return checkpoint(block, x, positions, quiet, rope_table=rope, use_reentrant=False)
        return block(x, positions, layout, rope_table=rope)

    def _frame_block_inference(
        self, block: Block, tokens: torch.Tensor, positions: torch.Tensor, rope: RopeTable
    ) -> None:
        """Frame block on ``aggregator_chunk_frames`` frames at a time, in place (no autograd)."""
        chunk = self.config.aggregator_chunk_frames or tokens.shape[0]
        for start in range(0, tokens.shape[0], chunk):
            block(tokens[start : start + chunk], positions, rope_table=rope, inplace=True)


def _autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The autocast dtype of x's device when autocast is on there, else None."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else None
