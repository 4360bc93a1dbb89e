"""Fine-grained distribution refinement (FDR) of D-FINE: bin weights, distribution -> distance -> box, and LQE.

Every decoder layer predicts, for each of the four box edges, logits over ``reg_max + 1`` bins. A bin's value is a
signed edge offset given by the non-uniform weighting function W; the expected offset under the softmax distribution
moves that edge of the (fixed) initial reference box. The localization quality estimator (LQE) turns how peaked those
distributions are into a score added to the class logits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules.transformer import MLP


def weighting_function(reg_max: int, up: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """Build the bin values W of the edge-offset distributions.

    W is symmetric around 0 and grows geometrically so that bins are dense near the reference edge and sparse far away:
    with b1 = up * reg_scale, b2 = 2 * b1 and step s = (b1 + 1) ** (2 / (reg_max - 2)),
    W = [-b2, -(s**k - 1) for k = reg_max/2 - 1 .. 1, 0, (s**k - 1) for k = 1 .. reg_max/2 - 1, b2].

    Args:
        reg_max (int): Index of the last bin (there are reg_max + 1 bins); must be even.
        up (torch.Tensor): (1,) bound scale, 0.5 in the official models.
        reg_scale (torch.Tensor): (1,) offset scale (4 for D-FINE/DEIM N-L, 8 for X).

    Returns:
        (torch.Tensor): (reg_max + 1,) bin values, in up's dtype and device.
    """
    bound1 = up.abs() * reg_scale.abs()
    bound2 = 2 * bound1
    step = (bound1 + 1) ** (2 / (reg_max - 2))
    # Computed with tensor ops on up/reg_scale (not Python floats) so the float32 values match the official ones.
    powers = [step**k - 1 for k in range(1, reg_max // 2)]
    return torch.cat([-bound2, *[-p for p in reversed(powers)], torch.zeros_like(bound1), *powers, bound2])


def distribution_to_distance(corners: torch.Tensor, project: torch.Tensor) -> torch.Tensor:
    """Expected edge offsets of per-edge bin distributions.

    Args:
        corners (torch.Tensor): (..., 4 * (reg_max + 1)) bin logits, edge-major (left, top, right, bottom).
        project (torch.Tensor): (reg_max + 1,) bin values from `weighting_function`.

    Returns:
        (torch.Tensor): (..., 4) expected offsets sum_j softmax(logits)_j * W_j per edge, in units of reg_scale-th parts
            of the reference box size.
    """
    prob = corners.unflatten(-1, (4, project.shape[0])).softmax(-1)
    return F.linear(prob, project.to(prob.dtype)[None]).squeeze(-1)


def distance_to_box(points: torch.Tensor, distance: torch.Tensor, reg_scale: torch.Tensor) -> torch.Tensor:
    """Move the edges of reference boxes by the decoded offsets.

    Each edge sits at (0.5 * reg_scale + d) * size / reg_scale from the centre, so d = 0 reproduces the reference box.

    Args:
        points (torch.Tensor): (..., 4) reference boxes, normalised cx, cy, w, h.
        distance (torch.Tensor): (..., 4) offsets for the left, top, right and bottom edges.
        reg_scale (torch.Tensor): (1,) offset scale.

    Returns:
        (torch.Tensor): (..., 4) boxes, normalised cx, cy, w, h.
    """
    reg_scale = reg_scale.abs()
    half = 0.5 * reg_scale
    cx, cy, w, h = points.unbind(-1)
    x1 = cx - (half + distance[..., 0]) * (w / reg_scale)
    y1 = cy - (half + distance[..., 1]) * (h / reg_scale)
    x2 = cx + (half + distance[..., 2]) * (w / reg_scale)
    y2 = cy + (half + distance[..., 3]) * (h / reg_scale)
    return torch.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], -1)


class LQE(nn.Module):
    """Localization quality estimator: a score from the sharpness of the edge distributions, added to class logits.

    Attributes:
        k (int): Number of top bin probabilities taken per edge.
        reg_max (int): Index of the last bin.
        reg_conf (MLP): 4 * (k + 1) -> hidden -> 1 MLP, last layer zero-initialised so LQE starts as a no-op.
    """

    def __init__(self, reg_max: int, k: int = 4, hidden_dim: int = 64, num_layers: int = 2, act: type = nn.SiLU):
        """Create the estimator.

        Args:
            reg_max (int): Index of the last bin.
            k (int): Top probabilities per edge fed to the MLP (besides their mean).
            hidden_dim (int): MLP hidden width.
            num_layers (int): MLP depth.
            act (type): MLP activation class.
        """
        super().__init__()
        self.k = k
        self.reg_max = reg_max
        self.reg_conf = MLP(4 * (k + 1), hidden_dim, 1, num_layers, act=act)
        nn.init.zeros_(self.reg_conf.layers[-1].weight)
        nn.init.zeros_(self.reg_conf.layers[-1].bias)

    def forward(self, scores: torch.Tensor, corners: torch.Tensor) -> torch.Tensor:
        """Add the quality score to the class logits.

        Args:
            scores (torch.Tensor): (B, Q, nc) class logits.
            corners (torch.Tensor): (B, Q, 4 * (reg_max + 1)) bin logits.

        Returns:
            (torch.Tensor): (B, Q, nc) class logits plus the (B, Q, 1) quality score.
        """
        prob = corners.unflatten(-1, (4, self.reg_max + 1)).softmax(-1)
        top = prob.topk(self.k, dim=-1).values
        stat = torch.cat([top, top.mean(-1, keepdim=True)], -1)  # (B, Q, 4, k + 1)
        return scores + self.reg_conf(stat.flatten(-2))
