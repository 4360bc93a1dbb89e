"""DEIMv2's ViT backbone with its Spatial Tuning Adapter (STA), as one YAML layer giving stride 8, 16 and 32 maps.

The ViT (see `deim_ultra.nn.vit`) sees the image once at stride 16; three of its blocks' token maps become the three
pyramid levels by bilinear resizing (x2, x1, x0.5). A small convolutional branch (the STA) adds fine detail at the
same strides; per level, the two are concatenated and fused by a 1 x 1 convolution and BatchNorm.

YAML arguments (the parser passes c1 = 3 first):

    DINOv3Adapter args: [variant, indexes, conv_inplane, hidden_dim]

    size  variant            indexes      conv_inplane  hidden_dim  -> out_channels
    S     vit_tiny           [3, 7, 11]   16            192            [192, 192, 192]
    M     vit_tinyplus       [3, 7, 11]   16            256            [256, 256, 256]
    L     dinov3_vits16      [5, 8, 11]   32            224            [224, 224, 224]
    X     dinov3_vits16plus  [5, 8, 11]   64            256            [256, 256, 256]

Attribute names reproduce the authors' state-dict keys below `backbone.` (`dinov3.*` for DINOv3 ViTs,
`dinov3._model.*` for ViT-Tiny, `sta.*`, `convs.*`, `norms.*`), so an official checkpoint maps by renaming that
prefix. The input is an Ultralytics [0, 1] image; the ImageNet normalisation the authors apply in their data
pipeline happens here, with non-persistent buffers that add no state-dict keys.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from deim_ultra.nn.vit import VIT_VARIANTS, VisionTransformer

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "DINOv3Adapter", "SpatialPrior", "TinyViTHolder"]

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _conv_bn(c1: int, c2: int) -> list[nn.Module]:
    """3 x 3 stride-2 bias-free convolution and BatchNorm."""
    return [nn.Conv2d(c1, c2, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c2)]


class SpatialPrior(nn.Module):
    """The STA's convolutional detail branch: (B, 3, H, W) -> maps at strides 8, 16, 32 with 2c, 4c, 4c channels.

    The sequential indices inside `stem`, `conv2`, `conv3` and `conv4` follow the authors' keys (the GELU that opens
    `conv3` and `conv4` holds index 0). The authors use SyncBatchNorm; plain BatchNorm has the same keys.
    """

    def __init__(self, c: int) -> None:
        """Branch with base width `c` (the authors' `conv_inplane`)."""
        super().__init__()
        self.stem = nn.Sequential(*_conv_bn(3, c), nn.GELU(), nn.MaxPool2d(3, stride=2, padding=1))
        self.conv2 = nn.Sequential(*_conv_bn(c, 2 * c))
        self.conv3 = nn.Sequential(nn.GELU(), *_conv_bn(2 * c, 4 * c))
        self.conv4 = nn.Sequential(nn.GELU(), *_conv_bn(4 * c, 4 * c))

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """(B, 3, H, W) -> [(B, 2c, H/8, W/8), (B, 4c, H/16, W/16), (B, 4c, H/32, W/32)] (sizes rounded up)."""
        p8 = self.conv2(self.stem(x))
        p16 = self.conv3(p8)
        return [p8, p16, self.conv4(p16)]


class TinyViTHolder(nn.Module):
    """Holds a ViT-Tiny under `_model`, the extra key level of the authors' ViT-Tiny wrapper (`dinov3._model.*`)."""

    def __init__(self, vit: VisionTransformer) -> None:
        """Wrap `vit`."""
        super().__init__()
        self._model = vit
        self.embed_dim = vit.embed_dim
        self.patch_size = vit.patch_size

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Same as `VisionTransformer.forward`."""
        return self._model(x)


class DINOv3Adapter(nn.Module):
    """DEIMv2 S/M/L/X backbone: ViT token maps of three blocks fused with the STA detail branch.

    Attributes:
        dinov3 (VisionTransformer | TinyViTHolder): The ViT.
        sta (SpatialPrior): Detail branch.
        convs (nn.ModuleList): Per level, 1 x 1 bias-free fusion (D + 2c | D + 4c | D + 4c) -> hidden_dim.
        norms (nn.ModuleList): Per level, BatchNorm of hidden_dim.
        out_channels (list[int]): [hidden_dim] * 3, the widths at strides 8, 16, 32.
        mean, std (torch.Tensor): (1, 3, 1, 1) non-persistent ImageNet statistics.
    """

    def __init__(
        self,
        c1: int,
        variant: str,
        indexes: Sequence[int],
        conv_inplane: int = 16,
        hidden_dim: int | None = None,
    ) -> None:
        """Build the backbone.

        Args:
            c1: Input channels; must be 3.
            variant: A `deim_ultra.nn.vit.VIT_VARIANTS` name; those starting with "dinov3" use the DINOv3 key layout.
            indexes: The three ViT blocks (0-based, increasing) giving the stride 8, 16 and 32 levels.
            conv_inplane: Base width c of the STA branch.
            hidden_dim: Output width of every level; None keeps the ViT width D.
        """
        super().__init__()
        if c1 != 3:
            raise ValueError(f"DINOv3Adapter takes RGB input (c1=3), got c1={c1}")
        if len(indexes) != 3:
            raise ValueError(f"DINOv3Adapter needs three block indexes (strides 8, 16, 32), got {list(indexes)}")
        vit = VisionTransformer(VIT_VARIANTS[variant], indexes)
        self.dinov3 = vit if variant.startswith("dinov3") else TinyViTHolder(vit)
        d, c = vit.embed_dim, conv_inplane
        hidden_dim = hidden_dim or d
        self.sta = SpatialPrior(c)
        self.convs = nn.ModuleList(nn.Conv2d(d + ci, hidden_dim, 1, bias=False) for ci in (2 * c, 4 * c, 4 * c))
        self.norms = nn.ModuleList(nn.BatchNorm2d(hidden_dim) for _ in range(3))
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)
        self.out_channels = [hidden_dim] * 3

    def forward(self, x: torch.Tensor) -> list[torch.Tensor]:
        """Pyramid of a batch of [0, 1] images.

        Args:
            x: (B, 3, H, W) RGB in [0, 1], H and W multiples of 32 (the token maps and the STA maps must agree).

        Returns:
            [(B, hidden, H/8, W/8), (B, hidden, H/16, W/16), (B, hidden, H/32, W/32)].
        """
        x = (x - self.mean) / self.std
        b = x.shape[0]
        h, w = x.shape[2] // self.dinov3.patch_size, x.shape[3] // self.dinov3.patch_size
        outputs = []
        for level, (tokens, detail) in enumerate(zip(self.dinov3(x), self.sta(x))):
            sem = tokens.transpose(1, 2).reshape(b, -1, h, w)
            # The authors resize to the floored size h * 2**(1 - level); for the even h that inputs divisible by 32
            # give, a fixed scale factor is the same resize and keeps a dynamic-shape export free of size constants.
            # Level 1 is their same-size resize, an exact copy.
            if level != 1:
                sem = F.interpolate(sem, scale_factor=2.0 ** (1 - level), mode="bilinear", align_corners=False)
            outputs.append(self.norms[level](self.convs[level](torch.cat([sem, detail], 1))))
        return outputs
