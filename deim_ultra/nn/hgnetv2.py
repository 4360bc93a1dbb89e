"""HGNetv2 backbone (PP-HGNetV2) as YAML layers: one stem layer followed by four stage layers.

Attribute names reproduce the official state-dict keys, so an official checkpoint maps by prefix only:
``backbone.stem.*`` -> the ``HGStem`` layer, ``backbone.stages.<i>.*`` -> the i-th ``HGStage`` layer.

YAML arguments per variant (the parser passes the input channel count ``c1`` first; it is listed here
for cross-checking only). LAB (learnable affine after each activation) is used by B0 and B2 only.

    HGStem  args: [mid, out, use_lab]
    HGStage args: [mid, out, num_blocks, downsample, light, kernel, layer_num, use_lab]

    variant  stem (c1, mid, out)  stage (c1, mid, out, num_blocks, downsample, light, kernel, layer_num)
    B0       (3, 16, 16)          (16, 16, 64, 1, F, F, 3, 3)     (64, 32, 256, 1, T, F, 3, 3)
             use_lab=True         (256, 64, 512, 2, T, T, 5, 3)   (512, 128, 1024, 1, T, T, 5, 3)
    B2       (3, 24, 32)          (32, 32, 96, 1, F, F, 3, 4)     (96, 64, 384, 1, T, F, 3, 4)
             use_lab=True         (384, 128, 768, 3, T, T, 5, 4)  (768, 256, 1536, 1, T, T, 5, 4)
    B4       (3, 32, 48)          (48, 48, 128, 1, F, F, 3, 6)    (128, 96, 512, 1, T, F, 3, 6)
             use_lab=False        (512, 192, 1024, 3, T, T, 5, 6) (1024, 384, 2048, 1, T, T, 5, 6)
    B5       (3, 32, 64)          (64, 64, 128, 1, F, F, 3, 6)    (128, 128, 512, 2, T, F, 3, 6)
             use_lab=False        (512, 256, 1024, 5, T, T, 5, 6) (1024, 512, 2048, 2, T, T, 5, 6)

Output strides: stem 4, stages 4, 8, 16, 32. The layers hold plain BatchNorm; recipes l and x train with it frozen
(`freeze_norm`, see `deim_ultra.nn.frozen_norm`).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from deim_ultra.checkpoints.read import read_checkpoint
from deim_ultra.messages import listing

__all__ = ["ConvBNAct", "HGBlock", "HGStage", "HGStem", "LearnableAffine", "LightConvBNAct", "load_hgnetv2_pretrained"]


class LearnableAffine(nn.Module):
    """LAB: ``y = scale * x + bias`` with learnable scalars ``scale`` (1,) = 1 and ``bias`` (1,) = 0 at init."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = nn.Parameter(torch.ones(1))
        self.bias = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, C, H, W) any feature map -> same shape."""
        return self.scale * x + self.bias


class ConvBNAct(nn.Module):
    """Bias-free conv -> BatchNorm -> optional ReLU -> optional LAB.

    Keys: ``conv.weight``, ``bn.*`` and, only when both ``act`` and ``use_lab`` are set, ``lab.scale``/``lab.bias``.
    Padding is ``(k - 1) // 2``, i.e. "same" for odd kernels and none for the stem's 2x2 kernels.

    Args:
        c1: input channels.
        c2: output channels.
        k: square kernel size.
        stride: conv stride.
        groups: conv groups (``c1`` for depthwise).
        act: apply ReLU (and LAB if ``use_lab``).
        use_lab: append a LearnableAffine after the activation.
    """

    def __init__(
        self, c1: int, c2: int, k: int, stride: int = 1, groups: int = 1, act: bool = True, use_lab: bool = False
    ) -> None:
        super().__init__()
        self.conv = nn.Conv2d(c1, c2, k, stride, (k - 1) // 2, groups=groups, bias=False)
        self.bn = nn.BatchNorm2d(c2)
        self.act = nn.ReLU() if act else nn.Identity()
        self.lab = LearnableAffine() if act and use_lab else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, c1, H, W) -> (B, c2, H', W') with H' = (H + 2p - k) // stride + 1."""
        return self.lab(self.act(self.bn(self.conv(x))))


class LightConvBNAct(nn.Module):
    """Light layer: 1x1 ConvBN without activation (``conv1``) then depthwise kxk ConvBNAct (``conv2``).

    Args:
        c1: input channels.
        c2: output channels.
        k: depthwise kernel size.
        use_lab: LAB after the depthwise conv's ReLU (``conv1`` has no activation, hence never a LAB).
    """

    def __init__(self, c1: int, c2: int, k: int, use_lab: bool = False) -> None:
        super().__init__()
        self.conv1 = ConvBNAct(c1, c2, 1, act=False, use_lab=use_lab)
        self.conv2 = ConvBNAct(c2, c2, k, groups=c2, use_lab=use_lab)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, c1, H, W) -> (B, c2, H, W)."""
        return self.conv2(self.conv1(x))


class HGStem(nn.Module):
    """HGNetv2 stem, stride 4: conv, then a 2x2-conv pair in parallel with a 2x2 max-pool, concat, two convs.

    Keys: ``stem1``, ``stem2a``, ``stem2b``, ``stem3``, ``stem4`` (each a ConvBNAct).

    Args:
        c1: input channels (3 for RGB).
        mid: width of the stem's inner layers.
        out: output channels.
        use_lab: LAB after every activation (B0/B2).
    """

    def __init__(self, c1: int, mid: int, out: int, use_lab: bool = False) -> None:
        super().__init__()
        self.stem1 = ConvBNAct(c1, mid, 3, stride=2, use_lab=use_lab)
        self.stem2a = ConvBNAct(mid, mid // 2, 2, use_lab=use_lab)
        self.stem2b = ConvBNAct(mid // 2, mid, 2, use_lab=use_lab)
        self.stem3 = ConvBNAct(mid * 2, mid, 3, stride=2, use_lab=use_lab)
        self.stem4 = ConvBNAct(mid, out, 1, use_lab=use_lab)
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, c1, H, W) image batch -> (B, out, H/4, W/4) for H, W divisible by 4."""
        x = self.stem1(x)  # (B, mid, H/2, W/2)
        # A 2x2 kernel shifts the grid by half a pixel; padding one row/column at the bottom/right
        # (not symmetric) keeps both branches at H/2 x W/2 and aligned the way the weights were trained.
        x = F.pad(x, [0, 1, 0, 1])  # (B, mid, H/2 + 1, W/2 + 1)
        conv_branch = self.stem2b(F.pad(self.stem2a(x), [0, 1, 0, 1]))  # (B, mid, H/2, W/2)
        pool_branch = F.max_pool2d(x, kernel_size=2, stride=1)  # (B, mid, H/2, W/2)
        x = torch.cat([pool_branch, conv_branch], dim=1)  # (B, 2 * mid, H/2, W/2)
        return self.stem4(self.stem3(x))


class HGBlock(nn.Module):
    """HG block: a chain of ``layer_num`` layers whose input and every output are concatenated, then squeezed.

    Aggregation ("squeeze"): 1x1 ConvBNAct to ``out // 2`` then 1x1 ConvBNAct to ``out`` (``aggregation.0/1``).
    Keys: ``layers.<k>`` (ConvBNAct, or LightConvBNAct with ``conv1``/``conv2``), ``aggregation.<0|1>``.

    Args:
        c1: input channels.
        mid: channels of every chained layer.
        out: output channels.
        layer_num: number of chained layers.
        kernel: kernel size of the chained layers.
        light: use LightConvBNAct layers instead of plain ConvBNAct.
        residual: add the block input to the output (requires ``c1 == out``).
        use_lab: LAB after every activation.
    """

    def __init__(
        self,
        c1: int,
        mid: int,
        out: int,
        layer_num: int,
        kernel: int,
        light: bool,
        residual: bool,
        use_lab: bool = False,
    ) -> None:
        super().__init__()
        self.layers = nn.ModuleList(
            LightConvBNAct(c1 if i == 0 else mid, mid, kernel, use_lab)
            if light
            else ConvBNAct(c1 if i == 0 else mid, mid, kernel, use_lab=use_lab)
            for i in range(layer_num)
        )
        total = c1 + layer_num * mid
        self.aggregation = nn.Sequential(
            ConvBNAct(total, out // 2, 1, use_lab=use_lab), ConvBNAct(out // 2, out, 1, use_lab=use_lab)
        )
        self.residual = residual

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, c1, H, W) -> (B, out, H, W)."""
        features = [x]
        for layer in self.layers:
            features.append(layer(features[-1]))
        y = self.aggregation(torch.cat(features, dim=1))  # concat: (B, c1 + layer_num * mid, H, W)
        return y + x if self.residual else y


class HGStage(nn.Module):
    """HGNetv2 stage: optional stride-2 depthwise 3x3 ConvBN (no activation) then ``num_blocks`` HG blocks.

    Keys: ``downsample`` (absent when ``downsample`` is False) and ``blocks.<j>``. Block 0 maps ``c1 -> out``;
    the later blocks map ``out -> out`` with a residual connection.

    Args:
        c1: input channels.
        mid: channels of the chained layers inside each block.
        out: output channels.
        num_blocks: number of HG blocks.
        downsample: halve the resolution first.
        light: blocks use light (1x1 + depthwise) layers.
        kernel: kernel size of the chained layers.
        layer_num: chained layers per block.
        use_lab: LAB after every activation (B0/B2).
    """

    def __init__(
        self,
        c1: int,
        mid: int,
        out: int,
        num_blocks: int,
        downsample: bool,
        light: bool,
        kernel: int,
        layer_num: int,
        use_lab: bool = False,
    ) -> None:
        super().__init__()
        self.downsample = (
            ConvBNAct(c1, c1, 3, stride=2, groups=c1, act=False, use_lab=use_lab) if downsample else nn.Identity()
        )
        self.blocks = nn.Sequential(
            *(
                HGBlock(c1 if j == 0 else out, mid, out, layer_num, kernel, light, residual=j > 0, use_lab=use_lab)
                for j in range(num_blocks)
            )
        )
        self.out_channels = out

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: (B, c1, H, W) -> (B, out, H/2, W/2) with ``downsample`` (H, W even), else (B, out, H, W)."""
        return self.blocks(self.downsample(x))


def load_hgnetv2_pretrained(
    stem: nn.Module, stages: Sequence[nn.Module], path: str | Path, partial: bool = False
) -> tuple[int, int]:
    """Load the authors' ImageNet HGNetv2 weights (``PPHGNetV2_B*_stage1.pth``) into a stem and its stages.

    The file holds a state dict, or ``{"model": state_dict}``, with keys ``stem.*`` and ``stages.<i>.*``; any other
    key (the classification head) is ignored. Every weight of the stem and of all given stages must be present with
    the right shape, else nothing is loaded; only BatchNorm's ``num_batches_tracked`` counters may be absent. With
    `partial` (DEIMv2's pruned backbones, which start from B0's file as the authors load it) only the tensors whose
    name and shape the model shares are loaded, the rest keep their initialisation.

    Args:
        stem: an HGStem-compatible module (receives ``stem.*``).
        stages: the stage modules in order (stage i receives ``stages.<i>.*``).
        path: local path of the checkpoint.
        partial: load the tensors that fit instead of requiring an exact match.

    Returns:
        (int, int): Tensors loaded, and tensors of the stem and stages (counters excluded).

    Raises:
        ValueError: naming the file and the missing, unexpected or wrongly shaped keys when it does not match.
    """
    path = Path(path)
    checkpoint = read_checkpoint(path)
    state = checkpoint.get("model", checkpoint)
    # Plain containers named like the official model give exactly the official key prefixes.
    backbone = nn.Module()
    backbone.stem = stem
    backbone.stages = nn.ModuleList(stages)
    ours = {k: v for k, v in backbone.state_dict().items() if not k.endswith("num_batches_tracked")}
    wanted = {k: v for k, v in state.items() if k.startswith(("stem.", "stages."))}
    if partial:
        wanted = {k: v for k, v in wanted.items() if k in ours and v.shape == ours[k].shape}
    else:
        problems = _state_mismatches(backbone.state_dict(), wanted)
        if problems:
            raise ValueError(f"HGNetv2 checkpoint {path} does not match the model: " + "; ".join(problems))
    backbone.load_state_dict(wanted, strict=False)  # completeness was checked above, counters aside
    return len(set(wanted) & set(ours)), len(ours)


def _state_mismatches(expected: dict[str, torch.Tensor], given: dict[str, torch.Tensor]) -> list[str]:
    """Describe how ``given`` differs from ``expected`` (both key -> tensor): missing, unexpected, shape errors.

    A missing ``num_batches_tracked`` is no error: it only counts training steps, and converted checkpoints omit it.
    """
    missing = sorted(k for k in expected.keys() - given.keys() if not k.endswith("num_batches_tracked"))
    unexpected = sorted(given.keys() - expected.keys())
    shapes = [
        f"{k} {tuple(given[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in given and given[k].shape != v.shape
    ]
    groups = (("missing keys", missing), ("unexpected keys", unexpected), ("shape mismatches", shapes))
    return [f"{len(items)} {what}: {listing(items)}" for what, items in groups if items]
