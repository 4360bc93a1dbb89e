"""Multi-scale deformable cross-attention as used by the D-FINE decoder.

Unlike Deformable-DETR this variant has no value and no output projection: each head samples its own channel slice of
the (already projected) encoder memory. The number of sampling points may differ per level, sampling offsets are
scaled by 1 / points_of_level and by half the reference box size, and one softmax runs jointly over all points of all
levels of a head.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def split_value(memory: torch.Tensor, shapes: list[list[int]], nhead: int) -> list[torch.Tensor]:
    """Split flattened multi-level memory into per-level, per-head feature maps.

    Args:
        memory (torch.Tensor): (B, sum(H_l * W_l), C) flattened encoder features, levels in order.
        shapes (list[list[int]]): [H_l, W_l] per level.
        nhead (int): Number of attention heads; head h owns channels [h * C / nhead, (h + 1) * C / nhead).

    Returns:
        (list[torch.Tensor]): per level a (B * nhead, C / nhead, H_l, W_l) map.
    """
    b, _, c = memory.shape
    value = memory.unflatten(-1, (nhead, c // nhead)).permute(0, 2, 3, 1)  # (B, nhead, C / nhead, L)
    levels = value.split([h * w for h, w in shapes], dim=-1)
    return [v.reshape(b * nhead, c // nhead, h, w) for v, (h, w) in zip(levels, shapes)]


SAMPLERS = ("grid_sample", "gather")


def bilinear_gather(value: torch.Tensor, grid: torch.Tensor) -> torch.Tensor:
    """`F.grid_sample(value, grid, mode="bilinear", padding_mode="zeros", align_corners=False)` from gathers only.

    For runtimes without a GridSample operator (TFLite, EdgeTPU, RKNN, some NPUs): the four neighbours of every point
    are read with `torch.gather` from the flattened map and blended with the bilinear weights; a neighbour outside the
    map contributes 0, as grid_sample's zero padding.

    Args:
        value (torch.Tensor): (N, D, H, W) feature maps.
        grid (torch.Tensor): (N, Q, P, 2) sampling points, x then y, in [-1, 1] (pixel edges at -1 and 1).

    Returns:
        (torch.Tensor): (N, D, Q, P) sampled features.
    """
    n, d, h, w = value.shape
    _, q, p, _ = grid.shape
    x = ((grid[..., 0] + 1) * w - 1) / 2  # (N, Q, P) pixel coordinates, centres at integers
    y = ((grid[..., 1] + 1) * h - 1) / 2
    x0, y0 = x.floor(), y.floor()
    flat = value.flatten(2)  # (N, D, H * W)
    out = value.new_zeros(n, d, q * p)
    for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
        xi, yi = x0 + dx, y0 + dy
        weight = (1 - (x - xi).abs()) * (1 - (y - yi).abs())
        inside = (xi >= 0) & (xi <= w - 1) & (yi >= 0) & (yi <= h - 1)
        index = (yi.clamp(0, h - 1) * w + xi.clamp(0, w - 1)).long().reshape(n, 1, q * p).expand(n, d, q * p)
        out = out + flat.gather(2, index) * (weight * inside).reshape(n, 1, q * p)
    return out.reshape(n, d, q, p)


def deformable_sample(
    value: list[torch.Tensor],
    grids: torch.Tensor,
    attention_weights: torch.Tensor,
    num_points: list[int],
    sampler: str = "grid_sample",
) -> torch.Tensor:
    """Bilinearly sample every head's points and sum them with the attention weights.

    Args:
        value (list[torch.Tensor]): per level a (B * nhead, D, H_l, W_l) map from `split_value`.
        grids (torch.Tensor): (B * nhead, Q, P, 2) sampling points, x then y, in grid_sample's [-1, 1] coordinates
            (align_corners=False: pixel edges at -1 and 1), P = sum(num_points), points ordered level by level.
        attention_weights (torch.Tensor): (B, Q, nhead, P) weights, softmax-normalised over P.
        num_points (list[int]): Points per level.
        sampler (str): "grid_sample" (`F.grid_sample`) or "gather" (`bilinear_gather`, the same numbers without a
            GridSample operator in exported graphs).

    Returns:
        (torch.Tensor): (B, Q, nhead * D) attended features, head-major channels.
    """
    b, q, nhead, p = attention_weights.shape
    samples = [  # each (B * nhead, D, Q, P_l)
        F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False)
        if sampler == "grid_sample"
        else bilinear_gather(v, g)
        for v, g in zip(value, grids.split(num_points, dim=2))
    ]
    weights = attention_weights.transpose(1, 2).reshape(b * nhead, 1, q, p)
    out = (torch.cat(samples, -1) * weights).sum(-1)  # (B * nhead, D, Q)
    return out.reshape(b, -1, q).transpose(1, 2)


class MSDeformableAttention(nn.Module):
    """Deformable cross-attention of queries with 4-d reference boxes into multi-level memory.

    Attributes:
        nhead (int): Number of attention heads.
        num_points (list[int]): Sampling points per level and head.
        offset_scale (float): Factor on the reference box size that bounds the offsets (0.5: half the box).
        sampling_offsets (nn.Linear): hidden -> nhead * P * 2 raw offsets.
        attention_weights (nn.Linear): hidden -> nhead * P attention logits.
        num_points_scale (torch.Tensor): (P,) buffer, 1 / points_of_level for each point.
        sampler (str): how points are sampled, one of SAMPLERS (set for export by `DEIM.export(sampler=...)`).
    """

    sampler: str = "grid_sample"

    def __init__(self, hidden_dim: int, nhead: int, num_points: list[int], offset_scale: float = 0.5):
        """Create the attention.

        Args:
            hidden_dim (int): Query and memory width; must be divisible by nhead.
            nhead (int): Number of attention heads.
            num_points (list[int]): Sampling points per level (one entry per memory level).
            offset_scale (float): Factor on the reference box size applied to the offsets.
        """
        super().__init__()
        self.nhead = nhead
        self.num_points = list(num_points)
        self.offset_scale = offset_scale
        total = nhead * sum(self.num_points)
        self.sampling_offsets = nn.Linear(hidden_dim, total * 2)
        self.attention_weights = nn.Linear(hidden_dim, total)
        scale = [1 / n for n in self.num_points for _ in range(n)]
        self.register_buffer("num_points_scale", torch.tensor(scale, dtype=torch.float32))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        """Start every head sampling along its own direction, point k of a level k steps out, with uniform weights."""
        nn.init.zeros_(self.sampling_offsets.weight)
        thetas = torch.arange(self.nhead, dtype=torch.float32) * (2 * math.pi / self.nhead)
        direction = torch.stack([thetas.cos(), thetas.sin()], -1)
        direction = direction / direction.abs().max(-1, keepdim=True).values  # (nhead, 2), on the unit square
        steps = torch.cat([torch.arange(1, n + 1, dtype=torch.float32) for n in self.num_points])  # (P,)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_((direction[:, None] * steps[None, :, None]).flatten())
        nn.init.zeros_(self.attention_weights.weight)
        nn.init.zeros_(self.attention_weights.bias)

    def forward(self, query: torch.Tensor, reference: torch.Tensor, value: list[torch.Tensor]) -> torch.Tensor:
        """Attend from queries into the memory around their reference boxes.

        Args:
            query (torch.Tensor): (B, Q, C) queries (content + position embedding).
            reference (torch.Tensor): (B, Q, 4) reference boxes, normalised cx, cy, w, h.
            value (list[torch.Tensor]): per level a (B * nhead, C / nhead, H_l, W_l) map from `split_value`.

        Returns:
            (torch.Tensor): (B, Q, C) attended features.
        """
        b, q, _ = query.shape
        n, p = self.nhead, sum(self.num_points)
        offsets = self.sampling_offsets(query)  # (B, Q, nhead * P * 2): x, y interleaved per head and point
        weights = self.attention_weights(query).reshape(b, q, n, p).softmax(-1)
        # grid_sample's [-1, 1] coordinates, 2 * (centre + offset * size * offset_scale / points_of_level) - 1, with the
        # box spread to the offsets' layout by two small matmuls: broadcasting (B, Q, 1, 2) boxes over runs of 2 values
        # instead cost ONNX Runtime's CPU kernels ~0.3 ms per product at 300 queries (a quarter of a DEIM-N decoder
        # layer); each output of these matmuls is a single product, so the numbers are those of the broadcast. The -1
        # comes as 2 * (centre - 0.5): a constant added after a matmul reads to NNCF's INT8 calibration as a bias of
        # the matmul's width, and its bias correction then fails.
        size_map, centre_map = self._coordinate_maps(offsets.dtype)
        grids = offsets * (reference[..., 2:] @ size_map) + (reference[..., :2] - 0.5) @ centre_map
        grids = grids.reshape(b, q, n, p, 2).transpose(1, 2).flatten(0, 1)  # (B * nhead, Q, P, 2)
        return deformable_sample(value, grids, weights, self.num_points, self.sampler)

    def _coordinate_maps(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(2, nhead * P * 2) maps from a box's (w, h) and (cx, cy) to every offset's column: column (j, d) takes
        coordinate d times 2 * offset_scale / points_of_level(j), resp. times 2. Constants, folded into exports."""
        eye = torch.eye(2, dtype=dtype, device=self.num_points_scale.device)
        factors = self.num_points_scale.to(dtype).repeat(self.nhead) * (2 * self.offset_scale)  # (nhead * P,)
        size_map = (factors[:, None, None] * eye).transpose(0, 1).flatten(1)  # [d, (j, d')] = factor_j if d == d'
        return size_map, 2 * eye.repeat(1, self.nhead * sum(self.num_points))
