"""DEIMv2's LiteEncoder: the two-level encoder of the Atto, Femto and Pico sizes.

Their backbone stops at stride 16, so the encoder makes the stride-32 level itself (average-pool downsampling, then a
global-context fusion) and joins the two levels by one top-down and one bottom-up ELAN block, adding maps instead of
concatenating them. There is no transformer layer. Attribute names reproduce the authors' `encoder.*` keys.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from deim_ultra.nn.activations import make_act
from deim_ultra.nn.encoder_blocks import ConvNorm, RepNCSPELAN4, RepVGGBlock, conv_norm_pair


def pool_down(c: int, act: str) -> nn.Sequential:
    """Stride-2 downsampling by a 3x3 average pool, then 1x1 conv + BN + activation (keys 1.weight, 2.*)."""
    return nn.Sequential(nn.AvgPool2d(3, 2, 1), nn.Conv2d(c, c, 1, bias=False), nn.BatchNorm2d(c), make_act(act))


class GlobalContextFusion(nn.Module):
    """x + its global average, through a 1x1 conv-norm-act (the authors' `GAP_Fusion`, key `cv`).

    Forward: x (B, C, H, W) -> (B, C, H, W).
    """

    def __init__(self, c: int, act: str) -> None:
        super().__init__()
        self.cv = ConvNorm(c, c, 1, act=act)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.cv(x + F.adaptive_avg_pool2d(x, 1))


class LiteEncoder(nn.Module):
    """Two-level encoder from one stride-16 backbone map.

    Args:
        c1: input channels, one level, e.g. [256] for DEIMv2-Atto.
        hidden_dim: channels of every internal and output map.
        expansion: ELAN branch width factor; each CSP branch has round(expansion * hidden_dim // 2) channels.
        depth_mult: RepVGG blocks per CSP layer are round(3 * depth_mult).
        act: activation of the downsampling, the fusion and the ELAN blocks.

    Forward:
        feats: one (B, c1[0], H, W) map at stride 16, H and W even.
        Returns [(B, hidden_dim, H, W), (B, hidden_dim, H / 2, W / 2)], strides 16 and 32.
    """

    def __init__(self, c1: list[int], hidden_dim: int, expansion: float, depth_mult: float, act: str = "silu") -> None:
        super().__init__()
        if len(c1) != 1:
            raise ValueError(f"LiteEncoder takes one backbone level, got {len(c1)} (c1={c1})")
        self.out_channels = [hidden_dim, hidden_dim]
        self.input_proj = nn.ModuleList([conv_norm_pair(c1[0], hidden_dim)])
        self.down_sample1 = pool_down(hidden_dim, act)
        self.down_sample2 = pool_down(hidden_dim, act)
        self.bi_fusion = GlobalContextFusion(hidden_dim, act)
        branch, depth = round(expansion * hidden_dim // 2), round(3 * depth_mult)
        self.fpn_block = RepNCSPELAN4(hidden_dim, hidden_dim, 2 * hidden_dim, branch, depth, act, "csp2")
        self.pan_block = RepNCSPELAN4(hidden_dim, hidden_dim, 2 * hidden_dim, branch, depth, act, "csp2")

    def forward(self, feats: list[torch.Tensor]) -> list[torch.Tensor]:
        fine = self.input_proj[0](feats[0])
        coarse = self.bi_fusion(self.down_sample1(fine))
        fine = self.fpn_block(fine + F.interpolate(coarse, scale_factor=2.0, mode="nearest"))
        return [fine, self.pan_block(coarse + self.down_sample2(fine))]

    def fuse(self) -> None:
        """Fold RepVGG branches and conv-norm pairs for deployment in place; eval outputs are unchanged."""
        for m in [*self.bi_fusion.modules(), *self.fpn_block.modules(), *self.pan_block.modules()]:
            if isinstance(m, (ConvNorm, RepVGGBlock)):
                m.fuse()
