"""DEIM/D-FINE hybrid encoder: per-level input projection, AIFI on selected levels, then a top-down (FPN) and a
bottom-up (PAN) fusion path built from RepNCSPELAN4 blocks.

Used as one YAML layer: ``HybridEncoder(c1, hidden_dim, ffn_dim, expansion, depth_mult, strides, ...)`` takes the list
of backbone feature maps and returns ``len(c1)`` maps of ``hidden_dim`` channels at the same strides. Attribute names
reproduce the authors' ``encoder.*`` state-dict keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .encoder_blocks import AIFI, ConvNorm, RepNCSPELAN4, RepVGGBlock, SCDown, conv_norm_pair


class HybridEncoder(nn.Module):
    """Hybrid encoder of DEIM-D-FINE and of DEIMv2 (N and the ViT sizes).

    Args:
        c1: input channels per level, finest first, e.g. [512, 1024] for DEIM-N.
        hidden_dim: channels of every internal and output map.
        ffn_dim: hidden width of the AIFI feed-forward network.
        expansion: ELAN branch width factor; each CSP branch has round(expansion * hidden_dim // 2) channels.
        depth_mult: RepVGG blocks per CSP layer are round(3 * depth_mult) (Python rounding: round(1.5) == 2).
        strides: stride of each input level, finest first; consecutive levels must differ by a factor 2.
        nhead: attention heads of AIFI.
        use_encoder_idx: levels that get an AIFI layer (default: the coarsest level only).
        act: activation of the ELAN blocks and their CSP/RepVGG internals.
        version: fusion block kind, the authors' `version`: "dfine" (ELAN with a 3x3 conv after each CSP branch) or
            DEIMv2's "deim" (without).
        csp_type: CSP layer inside the fusion blocks, the authors' `csp_type`: "csp", or DEIMv2's "csp2".
        fuse_op: how the FPN/PAN paths join a level: "cat" (concatenate) or DEIMv2's "sum" (add, so each fusion
            block takes hidden_dim channels, not 2 * hidden_dim).
        identity_proj: DEIMv2's input projection, which leaves levels already hidden_dim wide unprojected (DEIM and
            D-FINE project every level).

    Forward:
        feats: list of len(c1) tensors, feats[i] (B, c1[i], H_i, W_i) with H_i = H_{i+1} * 2 (likewise W).
        Returns a list of len(c1) tensors, out[i] (B, hidden_dim, H_i, W_i).
    """

    fuse_op = "cat"  # what encoders pickled before DEIMv2's options existed do

    def __init__(
        self,
        c1: Sequence[int],
        hidden_dim: int,
        ffn_dim: int,
        expansion: float,
        depth_mult: float,
        strides: Sequence[int],
        nhead: int = 8,
        use_encoder_idx: Sequence[int] | None = None,
        act: str = "silu",
        version: str = "dfine",
        csp_type: str = "csp",
        fuse_op: str = "cat",
        identity_proj: bool = False,
    ) -> None:
        super().__init__()
        if len(strides) != len(c1):
            raise ValueError(f"need one stride per input level, got strides={list(strides)} for c1={list(c1)}")
        if any(b != 2 * a for a, b in zip(strides, strides[1:])):
            raise ValueError(f"consecutive strides must differ by a factor 2, got {list(strides)}")
        if version not in ("dfine", "deim") or csp_type not in ("csp", "csp2") or fuse_op not in ("cat", "sum"):
            raise ValueError(
                f"HybridEncoder: version {version!r}, csp_type {csp_type!r}, fuse_op {fuse_op!r}; supported: "
                "version dfine|deim, csp_type csp|csp2, fuse_op cat|sum"
            )
        n_levels = len(c1)
        self.fuse_op = fuse_op
        self.use_encoder_idx = [i % n_levels for i in (use_encoder_idx or [n_levels - 1])]
        self.strides = list(strides)
        self.out_channels = [hidden_dim] * n_levels

        self.input_proj = nn.ModuleList(
            nn.Identity() if identity_proj and c == hidden_dim else conv_norm_pair(c, hidden_dim) for c in c1
        )
        self.encoder = nn.ModuleList(AIFI(hidden_dim, ffn_dim, nhead) for _ in self.use_encoder_idx)

        branch, depth = round(expansion * hidden_dim // 2), round(3 * depth_mult)

        fused = hidden_dim if fuse_op == "sum" else 2 * hidden_dim

        def elan() -> RepNCSPELAN4:
            return RepNCSPELAN4(fused, hidden_dim, 2 * hidden_dim, branch, depth, act, csp_type, version == "dfine")

        # Index j of the top-down modules handles the step from level n_levels-1-j to the next finer level.
        self.lateral_convs = nn.ModuleList(ConvNorm(hidden_dim, hidden_dim, 1) for _ in range(n_levels - 1))
        self.fpn_blocks = nn.ModuleList(elan() for _ in range(n_levels - 1))
        # Index j of the bottom-up modules handles the step from level j to level j+1.
        self.downsample_convs = nn.ModuleList(
            nn.Sequential(SCDown(hidden_dim, hidden_dim, 3, 2)) for _ in range(n_levels - 1)
        )
        self.pan_blocks = nn.ModuleList(elan() for _ in range(n_levels - 1))

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        proj = [p(f) for p, f in zip(self.input_proj, feats)]
        for aifi, i in zip(self.encoder, self.use_encoder_idx):
            proj[i] = aifi(proj[i])

        # Top-down: the lateral-projected coarse map replaces its unprojected version in the outputs.
        top_down = [proj[-1]]
        for j, (lateral, fpn) in enumerate(zip(self.lateral_convs, self.fpn_blocks)):
            top_down[0] = lateral(top_down[0])
            up = F.interpolate(top_down[0], scale_factor=2.0, mode="nearest")
            top_down.insert(0, fpn(self._join(up, proj[-2 - j])))

        outs = [top_down[0]]
        for j, (down, pan) in enumerate(zip(self.downsample_convs, self.pan_blocks)):
            outs.append(pan(self._join(down(outs[-1]), top_down[j + 1])))
        return outs

    def _join(self, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        """Two (B, hidden_dim, H, W) maps into a fusion block's input: their sum, or their concatenation."""
        return a + b if self.fuse_op == "sum" else torch.cat((a, b), 1)

    def fuse(self) -> None:
        """Convert to the authors' deploy layout in place; idempotent.

        RepVGG blocks become one 3x3 conv with bias, and every ConvNorm outside ``input_proj`` folds its BatchNorm
        (running statistics) into its conv. Outputs are unchanged in eval mode.
        """
        paths = (self.lateral_convs, self.fpn_blocks, self.downsample_convs, self.pan_blocks)
        fusable = [m for path in paths for m in path.modules() if isinstance(m, (ConvNorm, RepVGGBlock))]
        for m in fusable:
            m.fuse()
