"""D-FINE decoder layer stack: gated decoder layers iterated with FDR box refinement and the LQE quality score.

Each layer refines the queries (self-attention, deformable cross-attention with a gate, FFN) and predicts box-edge
distributions relative to the first layer's box; the prediction heads themselves live on `DFINEDecoder` (passed in as
`DFINEHeads`) so that module attribute names reproduce the official keys `decoder.decoder.layers.*` and
`decoder.dec_bbox_head.*`.
"""

from __future__ import annotations

import copy
from typing import NamedTuple

import torch
from torch import nn
from ultralytics.nn.modules.utils import bias_init_with_prob, inverse_sigmoid

from deim_ultra.nn.deformable_attention import MSDeformableAttention, split_value
from deim_ultra.nn.fdr import LQE, distance_to_box, distribution_to_distance, weighting_function


class Gate(nn.Module):
    """Gated residual: sigmoid(Linear([x1, x2])) weights each input per channel, then a norm.

    Attributes:
        gate (nn.Linear): 2C -> 2C gate logits, zero weight and logit(0.5) bias so both inputs start at weight 0.5.
        norm (nn.Module): Output normalisation over C: LayerNorm (D-FINE, DEIM) or RMSNorm (DEIMv2).
    """

    def __init__(self, dim: int, norm: type[nn.Module] = nn.LayerNorm):
        """Create the gate for width `dim`, normalising with `norm(dim)`."""
        super().__init__()
        self.gate = nn.Linear(2 * dim, 2 * dim)
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, bias_init_with_prob(0.5))
        self.norm = norm(dim)

    def forward(self, x1: torch.Tensor, x2: torch.Tensor) -> torch.Tensor:
        """Mix (B, Q, C) `x1` (the residual stream) and (B, Q, C) `x2` (the cross-attention output) into (B, Q, C)."""
        g1, g2 = self.gate(torch.cat([x1, x2], -1)).sigmoid().chunk(2, -1)
        return self.norm(g1 * x1 + g2 * x2)


class FFN(nn.Module):
    """Feed-forward block with residual and post-norm: norm(x + linear2(act(linear1(x)))), float16-safe."""

    def __init__(self, hidden_dim: int, ffn_dim: int, act: type[nn.Module]):
        """C -> `ffn_dim` -> C with activation `act`, Xavier-initialised."""
        super().__init__()
        self.linear1 = nn.Linear(hidden_dim, ffn_dim)
        self.act = act()
        self.linear2 = nn.Linear(ffn_dim, hidden_dim)
        self.norm = nn.LayerNorm(hidden_dim)
        nn.init.xavier_uniform_(self.linear1.weight)
        nn.init.xavier_uniform_(self.linear2.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) -> (B, Q, C)."""
        x = x + self.linear2(self.act(self.linear1(x)))
        return self.norm(x.clamp(min=-65504, max=65504))  # keep float16 finite before the norm


class DFINEDecoderLayer(nn.Module):
    """One decoder layer: self-attention + post-norm, deformable cross-attention + gate, FFN + residual + norm.

    With MS-DETR's mixed supervision (`enable_one_to_many`) the layer runs cross-attention first, as MS-DETR's
    decoder layer does: the one-to-many branch is taken from the cross-attention output through its own FFN, before
    self-attention, which is what lets the one-to-one queries suppress the duplicates one-to-many supervision breeds.

    Attributes:
        self_attn (nn.MultiheadAttention): Query self-attention (batch first).
        norm1 (nn.LayerNorm): Post-norm of the self-attention residual.
        cross_attn (MSDeformableAttention): Deformable attention into the memory.
        gateway (Gate): Mixes the residual stream with the cross-attention output.
        linear1, linear2 (nn.Linear): FFN C -> ffn_dim -> C.
        act (nn.Module): FFN activation.
        norm3 (nn.LayerNorm): Post-norm of the FFN residual.
        cross_attention_first (bool): MS-DETR's layer order.
        o2m_ffn (FFN | None): MS-DETR's auxiliary FFN giving the one-to-many queries (training only; the deploy
            layout drops it).
    """

    cross_attention_first = False  # the default of layers pickled before mixed supervision existed

    def __init__(self, hidden_dim: int, nhead: int, ffn_dim: int, num_points: list[int], act: type[nn.Module]):
        """Create a layer.

        Args:
            hidden_dim (int): Query width C.
            nhead (int): Attention heads (self- and cross-attention).
            ffn_dim (int): FFN hidden width.
            num_points (list[int]): Deformable sampling points per memory level.
            act (type[nn.Module]): FFN activation class.
        """
        super().__init__()
        self.self_attn = nn.MultiheadAttention(hidden_dim, nhead, batch_first=True)
        self.norm1 = nn.LayerNorm(hidden_dim)
        self.cross_attn = MSDeformableAttention(hidden_dim, nhead, num_points)
        self.gateway = Gate(hidden_dim)
        ffn = FFN(hidden_dim, ffn_dim, act)  # its parts kept under the authors' key names
        self.linear1, self.act, self.linear2, self.norm3 = ffn.linear1, ffn.act, ffn.linear2, ffn.norm
        self.o2m_ffn: FFN | None = None

    def enable_one_to_many(self) -> None:
        """MS-DETR's mixed supervision: cross-attention first, and the auxiliary FFN of the one-to-many queries (the
        width and activation of the layer's own FFN)."""
        self.cross_attention_first = True
        self.o2m_ffn = FFN(self.linear1.in_features, self.linear1.out_features, type(self.act))

    def forward(
        self,
        target: torch.Tensor,
        reference: torch.Tensor,
        value: list[torch.Tensor],
        pos: torch.Tensor,
        attn_mask: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Refine the queries.

        Args:
            target (torch.Tensor): (B, Q, C) query content.
            reference (torch.Tensor): (B, Q, 4) reference boxes, normalised cx, cy, w, h.
            value (list[torch.Tensor]): Per-level, per-head memory maps from `split_value`.
            pos (torch.Tensor): (B, Q, C) query position embedding, added to queries and keys but not to values.
            attn_mask (torch.Tensor, optional): (Q, Q) bool self-attention mask, True = may not attend.

        Returns:
            (torch.Tensor): (B, Q, C) refined query content.
            (torch.Tensor | None): (B, Q, C) the one-to-many queries, in training with mixed supervision; else None.
        """
        o2m = None
        if self.cross_attention_first:
            target = self.merge_cross_attention(target, self.cross_attn(target + pos, reference, value))
            if self.training and self.o2m_ffn is not None:
                o2m = self.o2m_ffn(target)
        q = target + pos
        target = self.norm1(target + self.self_attn(q, q, target, attn_mask=attn_mask, need_weights=False)[0])
        if not self.cross_attention_first:
            target = self.merge_cross_attention(target, self.cross_attn(target + pos, reference, value))
        return self.feed_forward(target), o2m

    def merge_cross_attention(self, target: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The gate between the (B, Q, C) queries and their (B, Q, C) cross-attention output."""
        return self.gateway(target, attended)

    def feed_forward(self, target: torch.Tensor) -> torch.Tensor:
        """(B, Q, C) -> (B, Q, C): FFN, residual and norm."""
        target = target + self.linear2(self.act(self.linear1(target)))
        return self.norm3(target.clamp(min=-65504, max=65504))  # keep float16 finite before the norm


class DecoderStates(NamedTuple):
    """Per-layer predictions of `DFINETransformerDecoder`, one list entry per reported layer.

    Attributes:
        logits (list[torch.Tensor]): (B, Q, nc) class logits incl. the LQE score.
        boxes (list[torch.Tensor]): (B, Q, 4) boxes, normalised cx, cy, w, h.
        corners (list[torch.Tensor]): (B, Q, 4 * (reg_max + 1)) edge-bin logits.
        refs (list[torch.Tensor]): (B, Q, 4) initial reference boxes the corners are decoded against (detached).
        pre_logits (torch.Tensor | None): (B, Q, nc) first-layer class logits without LQE (training only).
        pre_boxes (torch.Tensor): (B, Q, 4) first-layer boxes from the pre-head, normalised cx, cy, w, h.
        o2m_logits, o2m_boxes (list[torch.Tensor]): (B, Q, nc) and (B, Q, 4) of every layer's one-to-many queries
            (training with mixed supervision; else empty).
    """

    logits: list[torch.Tensor]
    boxes: list[torch.Tensor]
    corners: list[torch.Tensor]
    refs: list[torch.Tensor]
    pre_logits: torch.Tensor | None
    pre_boxes: torch.Tensor
    o2m_logits: list[torch.Tensor]
    o2m_boxes: list[torch.Tensor]


class DFINEHeads(NamedTuple):
    """The head-owned modules the layer stack calls (kept on the head to match the official key layout)."""

    query_pos_head: nn.Module
    pre_bbox_head: nn.Module
    dec_score_head: nn.ModuleList
    dec_bbox_head: nn.ModuleList


class DFINETransformerDecoder(nn.Module):
    """The decoder layer stack with FDR box refinement and LQE (official key prefix `decoder.decoder.`).

    Attributes:
        layers (nn.ModuleList): Decoder layers; those past `eval_idx` are training-only.
        lqe_layers (nn.ModuleList): One LQE per layer.
        up (torch.Tensor): (1,) weighting-function bound scale, a buffer shared with the head.
        reg_scale (torch.Tensor): (1,) offset scale, a buffer shared with the head.
        reg_max (int): Index of the last distribution bin.
        eval_idx (int): Non-negative index of the layer reported in eval mode.
        nhead (int): Attention heads.
        query_pos_per_layer (bool): Embed each layer's reference box as its query position (D-FINE, DEIM); False
            embeds the initial reference once for all layers (DEIMv2).
    """

    query_pos_per_layer = True  # what stacks pickled before DEIMv2 existed do

    def __init__(
        self,
        layer: DFINEDecoderLayer,
        num_layers: int,
        eval_idx: int,
        reg_max: int,
        up: torch.Tensor,
        reg_scale: torch.Tensor,
        nhead: int,
        act: type[nn.Module],
        query_pos_per_layer: bool = True,
    ):
        """Create the stack from `num_layers` copies of `layer`; `up`/`reg_scale` are the head's constant buffers."""
        super().__init__()
        self.layers = nn.ModuleList(copy.deepcopy(layer) for _ in range(num_layers))
        self.lqe_layers = nn.ModuleList(LQE(reg_max, act=act) for _ in range(num_layers))
        self.register_buffer("up", up)
        self.register_buffer("reg_scale", reg_scale)
        self.reg_max = reg_max
        self.eval_idx = eval_idx
        self.nhead = nhead
        self.query_pos_per_layer = query_pos_per_layer

    def forward(
        self,
        target: torch.Tensor,
        ref_logits: torch.Tensor,
        memory: torch.Tensor,
        shapes: list[list[int]],
        heads: DFINEHeads,
        attn_mask: torch.Tensor | None = None,
    ) -> DecoderStates:
        """Run the layers.

        Layer i predicts corners_i = bbox_head_i(out_i + out_{i-1}.detach()) + corners_{i-1} (the previous corners
        keep their gradient) and decodes them against the detached first-layer box, which the pre-head predicts
        relative to the selected proposals. Each layer's box (detached) is the next layer's reference.

        Args:
            target (torch.Tensor): (B, Q, C) initial query content (detached top-k memory, denoising queries first).
            ref_logits (torch.Tensor): (B, Q, 4) initial reference boxes in logit space (detached).
            memory (torch.Tensor): (B, sum(H_l * W_l), C) flattened encoder memory.
            shapes (list[list[int]]): [H_l, W_l] per level.
            heads (DFINEHeads): The head's prediction modules.
            attn_mask (torch.Tensor, optional): (Q, Q) bool self-attention mask, True = may not attend.

        Returns:
            (DecoderStates): all layers in training, only layer `eval_idx` in eval.
        """
        value = split_value(memory, shapes, self.nhead)
        project = weighting_function(self.reg_max, self.up, self.reg_scale)
        logits, boxes_list, corners_list, refs, o2m_logits, o2m_boxes = [], [], [], [], [], []
        output, output_detach, corners_prev, ref = target, 0, 0, ref_logits.sigmoid()
        for i, layer in enumerate(self.layers):
            if i == 0 or self.query_pos_per_layer:
                pos = heads.query_pos_head(ref).clamp(min=-10, max=10)
            output, o2m = layer(output, ref, value, pos, attn_mask)
            if i == 0:
                pre_boxes = (heads.pre_bbox_head(output) + inverse_sigmoid(ref)).sigmoid()
                pre_logits = heads.dec_score_head[0](output) if self.training else None
                ref_initial = pre_boxes.detach()
            corners = heads.dec_bbox_head[i](output + output_detach) + corners_prev
            boxes = distance_to_box(ref_initial, distribution_to_distance(corners, project), self.reg_scale)
            if o2m is not None:  # the layer's heads, as MS-DETR shares them; decoded like the one-to-one queries
                o2m_corners = heads.dec_bbox_head[i](o2m + output_detach) + corners_prev
                o2m_logits.append(self.lqe_layers[i](heads.dec_score_head[i](o2m), o2m_corners))
                o2m_boxes.append(
                    distance_to_box(ref_initial, distribution_to_distance(o2m_corners, project), self.reg_scale)
                )
            if self.training or i == self.eval_idx:
                logits.append(self.lqe_layers[i](heads.dec_score_head[i](output), corners))
                boxes_list.append(boxes)
                corners_list.append(corners)
                refs.append(ref_initial)
                if not self.training:
                    break
            corners_prev, ref, output_detach = corners, boxes.detach(), output.detach()
        return DecoderStates(logits, boxes_list, corners_list, refs, pre_logits, pre_boxes, o2m_logits, o2m_boxes)
