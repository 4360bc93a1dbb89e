"""D-FINE decoder head (as used by DEIM), packaged as an Ultralytics RT-DETR head.

Pipeline: flattened multi-level memory -> query selection (top-k encoder proposals around fixed anchors) -> the layer
stack of `decoder_layers.py` (FDR box refinement, LQE scores), with the denoising queries of `denoising.py` in front
during training -> the official output dicts, or Ultralytics' (B, k, 6) detections in eval.

Module attribute names reproduce the official checkpoint keys below `decoder.` (e.g. `decoder.layers.0.gateway.gate`,
`dec_bbox_head.2.layers.1`, `enc_output.proj`), so official weights load by stripping that prefix.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import nn
from ultralytics.nn.modules.head import Detect, RTDETRDecoder
from ultralytics.nn.modules.transformer import MLP
from ultralytics.nn.modules.utils import bias_init_with_prob

from deim_ultra.nn.activations import ACTIVATIONS
from deim_ultra.nn.decoder_layers import DecoderStates, DFINEDecoderLayer, DFINEHeads, DFINETransformerDecoder
from deim_ultra.nn.denoising import denoising_group

# Logit of an invalid (off-image) proposal anchor. Its sigmoid is exactly 1 in float32, as that of the authors' +inf,
# even after the proposal head adds its offset, so every output is unchanged; unlike +inf it survives float16 and
# arithmetic in exported graphs (TensorRT / ONNX Runtime fp16).
INVALID_ANCHOR_LOGIT = 1e4


def anchor_logits(
    shapes: list[list[int]], like: torch.Tensor, grid_size: float = 0.05, eps: float = 1e-2
) -> tuple[torch.Tensor, torch.Tensor]:
    """Proposal anchors of every level in logit space, and which lie inside the image.

    Ultralytics' `RTDETRDecoder._generate_anchors` computes the same anchors but masks invalid ones with +inf inside,
    which a dynamic-shape export keeps as a graph constant; hence this version with `INVALID_ANCHOR_LOGIT`.

    Each cell centre of level l gets a square anchor of side `grid_size * 2**l` (normalised); anchors with any
    coordinate outside (eps, 1 - eps) are invalid and get `INVALID_ANCHOR_LOGIT`.

    Args:
        shapes: [H_l, W_l] per level.
        like: tensor whose dtype and device the anchors take (a traced input keeps them on its device).

    Returns:
        (1, sum(H_l * W_l), 4) cxcywh anchor logits, row-major within a level, and the (1, L, 1) bool valid mask.
    """
    levels = []
    for i, (h, w) in enumerate(shapes):
        # meshgrid(..., indexing="ij") by broadcasting: NCNN's converter (pnnx) has no meshgrid
        y = torch.arange(h).type_as(like)[:, None].expand(h, w)
        x = torch.arange(w).type_as(like)[None, :].expand(h, w)
        centres = torch.stack([(x + 0.5) / w, (y + 0.5) / h], -1).reshape(1, h * w, 2)
        levels.append(torch.cat([centres, torch.full_like(centres, grid_size * 2.0**i)], -1))
    anchors = torch.cat(levels, 1)
    inside = ((anchors > eps) & (anchors < 1 - eps)).to(anchors.dtype)
    valid = inside.amin(-1, keepdim=True) > 0  # .all(-1, keepdim=True), which NCNN's converter (pnnx) lacks
    return torch.log(anchors / (1 - anchors)).masked_fill(~valid, INVALID_ANCHOR_LOGIT), valid


class _BufferAttribute:
    """Class-level accessor for a registered buffer whose name a base class already uses as a class attribute.

    `RTDETRDecoder` declares `anchors`/`valid_mask` as class attributes, which would both shadow the buffers on lookup
    and make `register_buffer` refuse the names; this descriptor reads the instance's buffer instead and reports a
    missing one as AttributeError so that `register_buffer` accepts the name.
    """

    def __set_name__(self, owner: type, name: str):
        """Remember the attribute name."""
        self.name = name

    def __get__(self, obj: nn.Module | None, objtype: type | None = None):
        """Return the buffer of `obj` (the descriptor itself on the class)."""
        if obj is None:
            return self
        try:
            return obj._buffers[self.name]
        except KeyError:
            raise AttributeError(self.name) from None


class DFINEDecoder(RTDETRDecoder):
    """D-FINE decoder head with DEIM settings (SiLU FFN and MLPs), usable wherever Ultralytics expects an RT-DETR head.

    Eval output is the inherited `postprocess` top-k over queries x classes, (B, k, 6) = normalised cx, cy, w, h,
    score, class, so Ultralytics' predictor, validator, exporter and `max_det` handling work unchanged.

    Attributes:
        nc (int): Number of classes.
        num_queries (int): Decoder queries (top-k proposals).
        hidden_dim (int): Query and memory width.
        nhead (int): Attention heads.
        nl (int): Memory levels.
        num_decoder_layers (int): Decoder layers in the training layout.
        eval_idx (int): Non-negative index of the layer used at inference.
        reg_max (int): Index of the last FDR bin.
        num_denoising (int): Denoising queries per batch (0 disables denoising).
        label_noise_ratio (float): Denoising label flip probability x 2.
        box_noise_scale (float): Denoising box noise scale.
        feat_strides (list[int]): Stride of each memory level, for the cached eval anchors.
        eval_spatial_size (tuple[int, int]): (H, W) the `anchors`/`valid_mask` buffers are cached for (static exports).
        out_channels (int): Width of one eval detection row (6), for the model parser.
        input_proj (nn.ModuleList): Per level Identity, or 1x1 conv + BN where the level width differs from hidden_dim.
        decoder (DFINETransformerDecoder): The layer stack.
        up, reg_scale (torch.Tensor): (1,) FDR constants (buffers) shared with `decoder`.
        anchors (torch.Tensor): (1, L, 4) buffer, proposal anchors in logit space (INVALID_ANCHOR_LOGIT where invalid).
        valid_mask (torch.Tensor): (1, L, 1) bool buffer, anchors inside (0.01, 0.99).
        denoising_class_embed (nn.Embedding): nc + 1 rows (the last is padding), present when num_denoising > 0.
        query_pos_head, enc_output, enc_score_head, enc_bbox_head, dec_score_head, pre_bbox_head, dec_bbox_head:
            prediction modules with the official names.
    """

    anchors = _BufferAttribute()
    valid_mask = _BufferAttribute()

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
        eval_spatial_size: list[int] | tuple[int, int] = (640, 640),
        nhead: int = 8,
    ):
        """Create the head; the model YAMLs give every argument up to `feat_strides`, per size.

        Args:
            c1 (list[int]): Channels of each input memory level.
            nc (int): Number of classes.
            hidden_dim (int): Query and memory width.
            ffn_dim (int): Decoder FFN hidden width.
            num_layers (int): Decoder layers (training layout).
            num_points (list[int] | tuple[int, ...]): Deformable sampling points per level.
            num_queries (int): Decoder queries.
            num_denoising (int): Denoising queries per batch; 0 disables denoising and its class embedding.
            label_noise_ratio (float): Denoising label noise ratio.
            box_noise_scale (float): Denoising box noise scale.
            reg_max (int): Index of the last FDR bin (reg_max + 1 bins per edge).
            reg_scale (float): FDR offset scale.
            eval_idx (int): Layer used at inference; negative counts from the end.
            act (str): Activation of the FFNs and MLP heads: "silu" (DEIM), "relu" (D-FINE) or "gelu".
            feat_strides (list[int] | tuple[int, ...]): Stride of each level.
            eval_spatial_size (list[int] | tuple[int, int]): Input (H, W) the anchor buffers are cached for.
            nhead (int): Attention heads.
        """
        # RTDETRDecoder.__init__ would build its own projection, decoder and heads (other names, other maths); only
        # its class-level export attributes and its methods are wanted, so initialise as a plain module.
        nn.Module.__init__(self)
        if len(c1) != len(num_points) or len(c1) != len(feat_strides):
            raise ValueError(
                f"c1 {c1}, num_points {num_points} and feat_strides {feat_strides} need one entry per level"
            )
        act_cls = ACTIVATIONS[act]
        self.nc = nc
        self.num_queries = num_queries
        self.hidden_dim = hidden_dim
        self.nhead = nhead
        self.nl = len(c1)
        self.num_decoder_layers = num_layers
        self.eval_idx = eval_idx % num_layers
        self.reg_max = reg_max
        self.num_denoising = num_denoising
        self.label_noise_ratio = label_noise_ratio
        self.box_noise_scale = box_noise_scale
        self.feat_strides = list(feat_strides)
        self.eval_spatial_size = tuple(eval_spatial_size)
        self.out_channels = 6

        self.input_proj = nn.ModuleList(self._input_projection(c, hidden_dim) for c in c1)
        # Constants in the state dict under the authors' keys; buffers, so no optimizer or freeze setting sees them.
        self.register_buffer("up", torch.tensor([0.5]))
        self.register_buffer("reg_scale", torch.tensor([float(reg_scale)]))
        layer = self._decoder_layer(hidden_dim, nhead, ffn_dim, list(num_points), act_cls)
        self.decoder = DFINETransformerDecoder(
            layer, num_layers, self.eval_idx, reg_max, self.up, self.reg_scale, nhead, act_cls, self.query_pos_per_layer
        )
        if num_denoising > 0:
            self.denoising_class_embed = nn.Embedding(nc + 1, hidden_dim, padding_idx=nc)

        self.query_pos_head = self._query_pos_head(hidden_dim, act_cls)
        self.enc_output = self._enc_output(hidden_dim)
        self.enc_score_head = nn.Linear(hidden_dim, nc)
        self.enc_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=act_cls)
        anchors, valid_mask = anchor_logits(self._eval_shapes(), torch.empty(0))
        self.register_buffer("anchors", anchors)
        self.register_buffer("valid_mask", valid_mask)
        self.pre_bbox_head = MLP(hidden_dim, hidden_dim, 4, 3, act=act_cls)
        self.dec_score_head = nn.ModuleList(nn.Linear(hidden_dim, nc) for _ in range(num_layers))
        self.dec_bbox_head = self._box_heads(hidden_dim, reg_max, num_layers, act_cls)
        self._reset_parameters()

    # The builders below are what DEIMv2's decoder (deim_ultra.nn.deimv2_decoder) changes.
    query_pos_per_layer = True  # see DFINETransformerDecoder

    @staticmethod
    def _decoder_layer(
        hidden_dim: int, nhead: int, ffn_dim: int, num_points: list[int], act: type[nn.Module]
    ) -> DFINEDecoderLayer:
        """The layer the stack copies."""
        return DFINEDecoderLayer(hidden_dim, nhead, ffn_dim, num_points, act)

    @staticmethod
    def _query_pos_head(hidden_dim: int, act: type[nn.Module]) -> MLP:
        """Reference box (B, Q, 4) -> query position (B, Q, C)."""
        return MLP(4, 2 * hidden_dim, hidden_dim, 2, act=act)

    @staticmethod
    def _enc_output(hidden_dim: int) -> nn.Module:
        """The projection of the memory before proposals are scored."""
        return nn.Sequential(OrderedDict(proj=nn.Linear(hidden_dim, hidden_dim), norm=nn.LayerNorm(hidden_dim)))

    @staticmethod
    def _box_heads(hidden_dim: int, reg_max: int, num_layers: int, act: type[nn.Module]) -> nn.ModuleList:
        """One edge-distribution head per layer."""
        return nn.ModuleList(MLP(hidden_dim, hidden_dim, 4 * (reg_max + 1), 3, act=act) for _ in range(num_layers))

    @staticmethod
    def _input_projection(channels: int, hidden_dim: int) -> nn.Module:
        """Identity for a level already `hidden_dim` wide, else 1x1 conv (no bias) + BN named `conv`/`norm`."""
        if channels == hidden_dim:
            return nn.Identity()
        conv = nn.Conv2d(channels, hidden_dim, 1, bias=False)
        nn.init.xavier_uniform_(conv.weight)
        return nn.Sequential(OrderedDict(conv=conv, norm=nn.BatchNorm2d(hidden_dim)))

    def _reset_parameters(self) -> None:
        """Official initialisation: 1 % prior class bias, zero last box layers, Xavier on projections."""
        prior = bias_init_with_prob(0.01)
        for head in (self.enc_score_head, *self.dec_score_head):
            nn.init.constant_(head.bias, prior)
        for mlp in (self.enc_bbox_head, self.pre_bbox_head, *self.dec_bbox_head):
            nn.init.zeros_(mlp.layers[-1].weight)
            nn.init.zeros_(mlp.layers[-1].bias)
        if isinstance(self.enc_output, nn.Sequential):
            nn.init.xavier_uniform_(self.enc_output.proj.weight)
        for linear in self.query_pos_head.layers:
            nn.init.xavier_uniform_(linear.weight)

    def _eval_shapes(self) -> list[list[int]]:
        """[H_l, W_l] of every level at `eval_spatial_size`, the shapes the anchor buffers are cached for."""
        h, w = self.eval_spatial_size
        return [[int(h / s), int(w / s)] for s in self.feat_strides]

    def _heads(self) -> DFINEHeads:
        """The prediction modules the layer stack needs."""
        return DFINEHeads(self.query_pos_head, self.pre_bbox_head, self.dec_score_head, self.dec_bbox_head)

    def forward(self, x: list[torch.Tensor], batch: dict | None = None) -> dict | torch.Tensor | tuple:
        """Detect objects in the encoder's feature maps.

        Args:
            x (list[torch.Tensor]): Per level a (B, c1[l], H_l, W_l) feature map.
            batch (dict, optional): Training targets enabling denoising: `cls` (N,) long class indices, `bboxes`
                (N, 4) normalised cx, cy, w, h, `batch_idx` (N,) image index, `gt_groups` list of boxes per image.

        Returns:
            In training a dict: `pred_logits` (B, Q, nc), `pred_boxes` (B, Q, 4) normalised cxcywh, `pred_corners`
            (B, Q, 4 * (reg_max + 1)), `ref_points` (B, Q, 4), `up`, `reg_scale` of the last layer; `aux_outputs`
            (earlier layers, each also with `teacher_corners`/`teacher_logits` of the last layer, `up`, `reg_scale`);
            `pre_outputs` and `enc_aux_outputs` (list of one) with `pred_logits`/`pred_boxes`; with denoising also
            `dn_outputs` (every layer, like `aux_outputs`), `dn_pre_outputs` and `dn_meta` (Ultralytics' format).
            In eval the (B, k, 6) detections [cx, cy, w, h, score, class] if exporting, else, in RT-DETR's layout,
            a tuple of them and (boxes (1, B, Q, 4), logits (1, B, Q, nc), the eval layer's dict with `pred_logits`,
            `pred_boxes`, `pred_corners`, `ref_points`, `up`, `reg_scale`): Ultralytics' class-activation maps
            (`predict(visualize=True)`) read RT-DETR's per-layer logits there.
        """
        memory, shapes = self._get_encoder_input(x)
        dn_embed, dn_bbox, attn_mask, dn_meta = self._denoising_group(batch, min(self.num_queries, memory.shape[1]))
        target, ref_logits, enc_bboxes, enc_scores = self._get_decoder_input(memory, shapes, dn_embed, dn_bbox)
        states = self.decoder(target, ref_logits, memory, shapes, self._heads(), attn_mask)
        if self.training:
            return self._training_outputs(states, enc_bboxes, enc_scores, dn_meta)
        out = self._layer_output(states.logits[-1], states.boxes[-1], states.corners[-1], states.refs[-1])
        y = self.postprocess(out["pred_boxes"], out["pred_logits"].sigmoid())
        return y if self.export else (y, (out["pred_boxes"][None], out["pred_logits"][None], out))

    def _get_encoder_input(self, x: list[torch.Tensor]) -> tuple[torch.Tensor, list[list[int]]]:
        """Project and flatten the levels.

        Args:
            x (list[torch.Tensor]): Per level a (B, c1[l], H_l, W_l) feature map.

        Returns:
            memory (torch.Tensor): (B, sum(H_l * W_l), hidden_dim), levels in order, row-major within a level.
            shapes (list[list[int]]): [H_l, W_l] per level.
        """
        feats = [proj(f) for proj, f in zip(self.input_proj, x)]
        shapes = [list(f.shape[2:]) for f in feats]
        return torch.cat([f.flatten(2).transpose(1, 2) for f in feats], 1), shapes

    def _denoising_group(
        self, batch: dict | None, num_queries: int
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, dict | None]:
        """`denoising_group` queries when training with denoising enabled and targets given, else four Nones."""
        if not self.training or self.num_denoising <= 0 or batch is None:
            return None, None, None, None
        return denoising_group(
            batch,
            self.nc,
            num_queries,
            self.denoising_class_embed.weight,
            self.num_denoising,
            self.label_noise_ratio,
            self.box_noise_scale,
        )

    def _anchors(self, shapes: list[list[int]], memory: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Anchors for `shapes`, (1, L, 4) logits and (1, L, 1) valid, computed in float32 and cast to the memory's
        dtype; a static export at the eval size bakes the cached buffers instead (refreshed by `convert_to_deploy`).

        Computed rather than cached because Ultralytics saves checkpoints in float16, which moves cached logits by up
        to 1e-3 and the detections by 1e-4 from the authors' (and from a dynamic export's, which computes them).
        """
        if self.export and not self.dynamic and shapes == self._eval_shapes():
            return self.anchors, self.valid_mask
        anchors, valid_mask = anchor_logits(shapes, memory.new_empty(0, dtype=torch.float32))
        return anchors.to(memory.dtype), valid_mask

    def _get_decoder_input(
        self,
        feats: torch.Tensor,
        shapes: list[list[int]],
        dn_embed: torch.Tensor | None = None,
        dn_bbox: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """Select the top-k encoder proposals as decoder queries.

        Memory at invalid anchors is zeroed; proposals are ranked by their highest class logit; content and reference
        boxes are detached so no gradient flows from the decoder into query selection.

        Args:
            feats (torch.Tensor): (B, L, C) flattened memory.
            shapes (list[list[int]]): [H_l, W_l] per level.
            dn_embed (torch.Tensor, optional): (B, D, C) denoising query content, placed before the regular queries.
            dn_bbox (torch.Tensor, optional): (B, D, 4) denoising boxes in logit space.

        Returns:
            target (torch.Tensor): (B, D + k, C) initial query content.
            ref_logits (torch.Tensor): (B, D + k, 4) initial reference boxes in logit space.
            enc_bboxes (torch.Tensor | None): (B, k, 4) sigmoid proposal boxes (training only).
            enc_scores (torch.Tensor | None): (B, k, nc) proposal class logits (training only).
        """
        anchors, valid_mask = self._anchors(shapes, feats)
        memory = self.enc_output(valid_mask.to(feats.dtype) * feats)
        logits = self.enc_score_head(memory)
        k = (
            torch._shape_as_tensor(logits)[1].clamp(max=self.num_queries)
            if self.dynamic
            else min(self.num_queries, logits.shape[1])
        )
        groups = 8 if self.export and self.format == "engine" and not self.dynamic else 1
        index = Detect._grouped_topk(logits.max(-1).values, k, groups)[1]  # (B, k)
        top_memory = _gather(memory, index)
        ref_logits = self.enc_bbox_head(top_memory) + _gather(anchors.expand(memory.shape[0], -1, -1), index)
        enc_bboxes = ref_logits.sigmoid() if self.training else None
        enc_scores = _gather(logits, index) if self.training else None
        target, ref_logits = top_memory.detach(), ref_logits.detach()
        if dn_embed is not None:
            target = torch.cat([dn_embed, target], 1)
            ref_logits = torch.cat([dn_bbox, ref_logits], 1)
        return target, ref_logits, enc_bboxes, enc_scores

    def _layer_output(
        self, logits: torch.Tensor, boxes: torch.Tensor, corners: torch.Tensor, refs: torch.Tensor
    ) -> dict[str, torch.Tensor]:
        """One layer's prediction dict in the official layout (see `forward`)."""
        return {
            "pred_logits": logits,
            "pred_boxes": boxes,
            "pred_corners": corners,
            "ref_points": refs,
            "up": self.up,
            "reg_scale": self.reg_scale,
        }

    def _layer_outputs(self, states: DecoderStates) -> list[dict[str, torch.Tensor]]:
        """Per-layer dicts, each with the last layer's corners and logits as DDF teacher."""
        teacher = {"teacher_corners": states.corners[-1], "teacher_logits": states.logits[-1]}
        layers = zip(states.logits, states.boxes, states.corners, states.refs)
        return [{**self._layer_output(*layer), **teacher} for layer in layers]

    def _training_outputs(
        self,
        states: DecoderStates,
        enc_bboxes: torch.Tensor,
        enc_scores: torch.Tensor,
        dn_meta: dict | None,
    ) -> dict:
        """Assemble the training dict (see `forward`), splitting denoising queries off when present."""
        out = {}
        if dn_meta is not None:
            dn_states, states = _split_states(states, dn_meta["dn_num_split"])
            out["dn_outputs"] = self._layer_outputs(dn_states)
            out["dn_pre_outputs"] = {"pred_logits": dn_states.pre_logits, "pred_boxes": dn_states.pre_boxes}
            out["dn_meta"] = dn_meta
        if states.o2m_logits:
            out["o2m_outputs"] = [
                {"pred_logits": logits, "pred_boxes": boxes}
                for logits, boxes in zip(states.o2m_logits, states.o2m_boxes)
            ]
        return {
            **self._layer_output(states.logits[-1], states.boxes[-1], states.corners[-1], states.refs[-1]),
            "aux_outputs": self._layer_outputs(states)[:-1],
            "pre_outputs": {"pred_logits": states.pre_logits, "pred_boxes": states.pre_boxes},
            "enc_aux_outputs": [{"pred_logits": enc_scores, "pred_boxes": enc_bboxes}],
            **out,
        }

    def enable_one_to_many(self) -> DFINEDecoder:
        """MS-DETR's mixed supervision in every decoder layer (see `DFINEDecoderLayer`); training then also returns
        `o2m_outputs`, one dict of `pred_logits` (B, Q, nc) and `pred_boxes` (B, Q, 4) per layer."""
        for layer in self.decoder.layers:
            layer.enable_one_to_many()
        return self

    def convert_to_deploy(self) -> DFINEDecoder:
        """Drop the training-only parts in place, as the authors' deploy layout does; eval outputs are unchanged.

        Layers past `eval_idx` (and their heads) are removed; score heads and LQEs before `eval_idx` become Identity
        so the remaining ones keep their official indices. Box heads before `eval_idx` stay (FDR chains through them).
        MS-DETR's one-to-many FFNs go; its layer order stays. The cached anchors are computed again in float32.
        """
        keep = self.eval_idx + 1
        anchors, self.valid_mask = anchor_logits(self._eval_shapes(), self.anchors.new_empty(0, dtype=torch.float32))
        self.anchors = anchors.to(self.anchors.dtype)  # exact again after a float16 checkpoint, for static exports
        for layer in self.decoder.layers:
            layer.o2m_ffn = None
        self.dec_score_head = _keep_only(self.dec_score_head, self.eval_idx)
        self.decoder.lqe_layers = _keep_only(self.decoder.lqe_layers, self.eval_idx)
        self.decoder.layers = self.decoder.layers[:keep]
        self.dec_bbox_head = self.dec_bbox_head[:keep]
        return self

    fuse = convert_to_deploy  # the name Ultralytics-style model code calls


# Stock Ultralytics recognises RT-DETR heads by class name: the exporter writes `type(head).__name__` into every
# export's metadata, its loaders and backends compare it with "RTDETRDecoder", and `YOLO("<.pt>")` switches to its
# RT-DETR predictor and validator when the last layer's name contains "RTDETR". DEIM's head keeps RT-DETR's output
# format, so it answers to that name there (and in torch's module repr); pickles keep `__qualname__`, DFINEDecoder.
DFINEDecoder.__name__ = "RTDETRDecoder"


def _keep_only(modules: nn.ModuleList, index: int) -> nn.ModuleList:
    """`modules[:index + 1]` with every entry before `index` replaced by Identity (indices, hence keys, unchanged)."""
    return nn.ModuleList([*(nn.Identity() for _ in range(index)), modules[index]])


def _gather(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """Rows `index` (B, k) of `x` (B, L, C) along dim 1 -> (B, k, C)."""
    return x.gather(1, index[..., None].expand(-1, -1, x.shape[-1]))


def _split_states(states: DecoderStates, split: list[int]) -> tuple[DecoderStates, DecoderStates]:
    """Split every (B, D + Q, ...) prediction along the query axis into denoising (D) and regular (Q) states.

    The denoising queries get no one-to-many predictions: their assignment is fixed, one query per box.
    """
    halves = [
        [t.split(split, dim=1) for t in field] for field in (states.logits, states.boxes, states.corners, states.refs)
    ]
    pre_logits, pre_boxes = states.pre_logits.split(split, dim=1), states.pre_boxes.split(split, dim=1)
    o2m = [[t.split(split, dim=1)[1] for t in field] for field in (states.o2m_logits, states.o2m_boxes)]
    dn, regular = (
        DecoderStates(*[[t[j] for t in field] for field in halves], pre_logits[j], pre_boxes[j], *empty_or_o2m)
        for j, empty_or_o2m in ((0, ([], [])), (1, o2m))
    )
    return dn, regular
