"""DEIMv2's decoder (the authors' `DEIMTransformer`): the D-FINE decoder of DEIM with a lighter layer.

What changes from `DFINEDecoder` (everything else, FDR, LQE, denoising and query selection, is the same):
- layers normalise with RMSNorm and use a SwiGLU feed-forward network of half the configured width;
- the gate after cross-attention is optional (the Atto, Femto and Pico sizes add and normalise instead);
- the query position is embedded once from the initial reference boxes, by a 3-layer MLP, not per layer;
- proposals are scored on the memory directly (no `enc_output` projection);
- the small sizes share one box head across layers (`share_bbox_head`), so its keys alias one set of tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from ultralytics.nn.modules.transformer import MLP

from deim_ultra.nn.decoder import DFINEDecoder
from deim_ultra.nn.decoder_layers import DFINEDecoderLayer, Gate
from deim_ultra.nn.deformable_attention import MSDeformableAttention


class RMSNorm(nn.Module):
    """x / sqrt(mean(x^2) + eps) * scale over the last dimension, computed in float32 (stable under autocast).

    Written out rather than `F.rms_norm` so that every ONNX opset exports it; key `scale` as the authors name it.
    """

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.eps = eps
        self.scale = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(..., C) -> (..., C), in the dtype of `x`."""
        x32 = x.float()
        return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x) * self.scale


class SwiGLUFFN(nn.Module):
    """w3(silu(a) * b) with (a, b) = w12(x) split in halves: C -> 2 * hidden -> hidden -> C."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)
        for linear in (self.w12, self.w3):
            nn.init.xavier_uniform_(linear.weight)
            nn.init.zeros_(linear.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) -> (B, Q, C)."""
        a, b = self.w12(x).chunk(2, -1)
        return self.w3(F.silu(a) * b)


class DEIMv2DecoderLayer(DFINEDecoderLayer):
    """A DEIMv2 decoder layer: self-attention + RMSNorm, cross-attention merged by an RMSNorm gate (or added and
    normalised), SwiGLU FFN + residual + RMSNorm. Keys: `norm1.scale`, `gateway.*` or `norm2.scale`,
    `swish_ffn.w12`/`w3`, `norm3.scale`.
    """

    def __init__(self, hidden_dim: int, nhead: int, ffn_dim: int, num_points: list[int], gateway: bool):
        """Create a layer; `ffn_dim` is the configured width, the SwiGLU hidden width is half of it."""
        nn.Module.__init__(self)  # not DFINEDecoderLayer's: another norm, FFN and merge
        self.self_attn = nn.MultiheadAttention(hidden_dim, nhead, batch_first=True)
        self.norm1 = RMSNorm(hidden_dim)
        self.cross_attn = MSDeformableAttention(hidden_dim, nhead, num_points)
        if gateway:
            self.gateway = Gate(hidden_dim, RMSNorm)
        else:
            self.norm2 = RMSNorm(hidden_dim)
        self.swish_ffn = SwiGLUFFN(hidden_dim, ffn_dim // 2)
        self.norm3 = RMSNorm(hidden_dim)
        self.o2m_ffn = None

    def enable_one_to_many(self) -> None:
        """Refused: MS-DETR's mixed supervision is built for DEIM's D-FINE layer only."""
        raise ValueError("o2m=True: MS-DETR's one-to-many branch is not available for DEIMv2 models. Fix: o2m=False")

    def merge_cross_attention(self, target: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The gate, or residual + RMSNorm where the size has none; (B, Q, C) -> (B, Q, C)."""
        return self.gateway(target, attended) if hasattr(self, "gateway") else self.norm2(target + attended)

    def feed_forward(self, target: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) -> (B, Q, C): SwiGLU FFN, residual and RMSNorm."""
        target = target + self.swish_ffn(target)
        return self.norm3(target.clamp(min=-65504, max=65504))  # keep float16 finite before the norm


class DEIMv2Decoder(DFINEDecoder):
    """The DEIMv2 decoder head; see the module docstring for what differs from `DFINEDecoder`.

    Takes `DFINEDecoder`'s arguments with `act` (MLP heads; the layers' FFN is always SwiGLU) and two more after
    `feat_strides`: `gateway` (bool, the gate after cross-attention) and `share_bbox_head` (bool, one box head for all
    layers up to eval_idx).
    """

    query_pos_per_layer = False

    def __init__(
        self,
        c1: list[int],
        nc: int,
        hidden_dim: int,
        ffn_dim: int,
        num_layers: int,
        num_points: list[int] | tuple[int, ...],
        num_queries: int,
        num_denoising: int,
        label_noise_ratio: float,
        box_noise_scale: float,
        reg_max: int,
        reg_scale: float,
        eval_idx: int,
        act: str,
        feat_strides: list[int] | tuple[int, ...],
        gateway: bool,
        share_bbox_head: bool,
        eval_spatial_size: list[int] | tuple[int, int] = (640, 640),
        nhead: int = 8,
    ):
        # Plain attributes the builders read during DFINEDecoder.__init__ (nn.Module keeps them across its init).
        self.use_gateway, self.share_bbox_head = gateway, share_bbox_head
        super().__init__(
            c1, nc, hidden_dim, ffn_dim, num_layers, num_points, num_queries, num_denoising, label_noise_ratio,
            box_noise_scale, reg_max, reg_scale, eval_idx, act, feat_strides, eval_spatial_size, nhead,
        )  # fmt: skip

    def _decoder_layer(
        self, hidden_dim: int, nhead: int, ffn_dim: int, num_points: list[int], act: type[nn.Module]
    ) -> DEIMv2DecoderLayer:
        """A DEIMv2 layer (its FFN is SwiGLU whatever `act` is)."""
        return DEIMv2DecoderLayer(hidden_dim, nhead, ffn_dim, num_points, self.use_gateway)

    @staticmethod
    def _query_pos_head(hidden_dim: int, act: type[nn.Module]) -> MLP:
        """Reference box (B, Q, 4) -> query position (B, Q, C), 3 layers of width C."""
        return MLP(4, hidden_dim, hidden_dim, 3, act=act)

    @staticmethod
    def _enc_output(hidden_dim: int) -> nn.Module:
        """None: the memory is scored as it is."""
        return nn.Identity()

    def _box_heads(self, hidden_dim: int, reg_max: int, num_layers: int, act: type[nn.Module]) -> nn.ModuleList:
        """One head per layer, or one head shared by the layers up to eval_idx (later ones keep their own)."""
        if not self.share_bbox_head:
            return super()._box_heads(hidden_dim, reg_max, num_layers, act)
        shared = MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3, act=act)
        own = super()._box_heads(hidden_dim, reg_max, num_layers - self.eval_idx - 1, act)
        return nn.ModuleList([shared] * (self.eval_idx + 1) + list(own))


# Stock Ultralytics recognises RT-DETR heads by class name (see the same line for DFINEDecoder in decoder.py): a
# subclass does not inherit the assignment, and without it `yolo val` / `YOLO()` take the head for YOLO's.
DEIMv2Decoder.__name__ = "RTDETRDecoder"
