"""Configuration of the global attention of a backbone."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

AttentionKind = Literal["dense", "gsa"]
GSABackend = Literal["auto", "flex", "gather", "reference"]
SpecialKernel = Literal["auto", "flex"]


@dataclass
class AttentionConfig:
    """Which attention the global blocks use, and the parameters of Global Sparse Attention (GSA).

    ``kind`` is "dense" (SDPA) or "gsa". ``gsa_layers`` restricts GSA to some global-block indices
    (None: all); the other global blocks stay dense.

    GSA parameters (see ``speed3r_sfm.attention.gsa`` for the method):

    - ``block_size``: selection block, in patch tokens of one view (the key granularity of the
      sparse branch and of the exported correspondences). 128 matches FlexAttention's default tile on
      Hopper, also in the backward pass; 64 works for inference.
    - ``compression_block_size``: tokens of one view mean-pooled into one compressed key/value of the
      compression branch; a multiple of ``block_size``.
    - ``query_block_size``: queries (consecutive tokens of the view-major sequence) that share one
      selection; the q tile of the sparse kernel.
    - ``top_k``: key blocks of other views selected per query block (besides the always-attended special
      tokens of all views and, with ``include_own_view``, all blocks of the query block's own view).
    - ``per_head_selection``: select per head (True) or once for all heads from head-averaged scores.
    - ``backend``: "flex" (compiled FlexAttention; GPU, or CPU inference), "gather" (plain torch,
      gathers the selected blocks; any device, small sizes), "reference" (explicit N x N masks; tests),
      "auto" (flex on CUDA, gather elsewhere).
    - ``special_kernel``: "auto" computes the keys of the special tokens with a fused dense SDPA kernel
      and merges it with the block-sparse part by log-sum-exp (flex backend, CUDA inference); "flex" keeps
      them in the FlexAttention call (always the case when gradients are needed).
    - ``flex_kernel_options``: extra FlexAttention ``kernel_options`` (tuning; None: tile sizes only).
    """

    kind: AttentionKind = "dense"
    gsa_layers: tuple[int, ...] | None = None
    block_size: int = 128
    compression_block_size: int = 256
    query_block_size: int = 128
    top_k: int = 8
    include_own_view: bool = True
    per_head_selection: bool = True
    backend: GSABackend = "auto"
    special_kernel: SpecialKernel = "auto"
    flex_kernel_options: dict | None = None

    def __post_init__(self) -> None:
        if self.kind not in ("dense", "gsa"):
            raise ValueError(f"unknown attention kind {self.kind!r}")
        if self.backend not in ("auto", "flex", "gather", "reference"):
            raise ValueError(f"unknown GSA backend {self.backend!r}")
        if self.special_kernel not in ("auto", "flex"):
            raise ValueError(f"unknown special_kernel {self.special_kernel!r}")
        if self.gsa_layers is not None:
            self.gsa_layers = tuple(int(i) for i in self.gsa_layers)
        for name in ("block_size", "compression_block_size", "query_block_size"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be positive")
        if self.compression_block_size % self.block_size:
            raise ValueError("compression_block_size must be a multiple of block_size")
        if self.top_k < 0:
            raise ValueError("top_k must be >= 0")

    def uses_gsa(self, layer_index: int) -> bool:
        if self.kind != "gsa":
            return False
        return self.gsa_layers is None or layer_index in self.gsa_layers
