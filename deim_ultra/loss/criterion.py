"""DEIM training criterion: MAL + L1/GIoU + FGL + DDF over all decoder outputs, with the union ("GO") box set.

Output groups of the decoder's training dict and what supervises them (names as in the official criterion):

    final layer        ""          class (own Hungarian match), bbox/giou/fgl (GO set)
    aux_outputs[i]     "_aux_{i}"  class (own match), bbox/giou/fgl (GO set), ddf (teacher = final layer)
    pre_outputs        "_pre"      class (own match), bbox/giou (GO set)
    enc_aux_outputs[i] "_enc_{i}"  class (own match), bbox/giou (GO set)
    dn_outputs[i]      "_dn_{i}"   class/bbox/giou/fgl/ddf on the fixed denoising assignment
    dn_pre_outputs     "_dn_pre"   class/bbox/giou on the fixed denoising assignment
    o2m_outputs[i]     "_o2m_{i}"  class/bbox/giou on the layer's own one-to-many assignment (MS-DETR)

Class terms are normalised by num_boxes (GTs in the batch), GO box/FGL terms by the GO set size, denoising terms by
num_boxes * dn groups, one-to-many terms by num_boxes (as MS-DETR does). Every returned term is already multiplied by
its weight. A non-finite term is returned as it is: the trainer skips such a step (`deim_ultra.nonfinite`) rather
than training on a loss with a term silently removed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .localization import box_losses, ddf_balance, ddf_loss, distance_bins, fgl_loss, paired_iou
from .mal import CLASS_LOSSES
from .matcher import HungarianMatcher, Indices, denoising_indices, union_indices
from .one_to_many import one_to_many_assign

# RT-DETR's and D-FINE's VFL (also used by the focal option): focusing exponent and negative weight.
VFL_GAMMA = 2.0
VFL_ALPHA = 0.75
# MS-DETR's one-to-many coefficients (Deformable-DETR's cls/L1/GIoU weights); they replace, not scale, `weights`.
O2M_WEIGHTS = {"cls": 2.0, "bbox": 5.0, "giou": 2.0}
# MS-DETR's classification loss: sigmoid focal loss on one-hot targets, Deformable-DETR's alpha and gamma.
O2M_FOCAL_ALPHA = 0.25
O2M_FOCAL_GAMMA = 2.0


@dataclass(frozen=True)
class Matched:
    """An assignment flattened over the batch: M (image, query) -> GT pairs.

    batch: (M,) image index; query: (M,) query index; labels: (M,) GT class; boxes: (M, 4) GT cxcywh.
    """

    batch: torch.Tensor
    query: torch.Tensor
    labels: torch.Tensor
    boxes: torch.Tensor

    @classmethod
    def from_indices(cls, indices: Indices, targets: list[dict[str, torch.Tensor]], device: torch.device) -> Matched:
        """Gather GT labels/boxes for per-image (query_idx, gt_idx) pairs and move everything to `device`."""
        batch = torch.cat([torch.full_like(q, i) for i, (q, _) in enumerate(indices)]).to(device)
        query = torch.cat([q for q, _ in indices]).to(device)
        gts = [g.to(device) for _, g in indices]
        labels = torch.cat([t["labels"][g] for t, g in zip(targets, gts)])
        boxes = torch.cat([t["boxes"][g] for t, g in zip(targets, gts)])
        return cls(batch, query, labels, boxes)


@dataclass
class BoxSupervision:
    """What the box, FGL and DDF terms of one family of outputs (primary or denoising) share.

    match: pairs supervising boxes (the GO set, or the denoising assignment).
    num: their normaliser.
    up, reg_scale: (1,) decoder distance hyper-parameters, None when the outputs carry no distributions.
    balance: DDF pos/neg mixing weights, always from the primary GO set (as the official criterion does for dn too).
    bins: FGL targets (left bin, right weight), computed once from the family's first layer with reference points
        (all layers share the initial reference points).
    """

    match: Matched
    num: float
    up: torch.Tensor | None
    reg_scale: torch.Tensor | None
    balance: tuple[float, float]
    bins: tuple[torch.Tensor, torch.Tensor] | None = None


def global_counts(counts: list[int], device: torch.device) -> list[float]:
    """Average per-process counts over all processes (when distributed), clamped >= 1, for loss normalisation."""
    t = torch.tensor(counts, dtype=torch.float, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(t)
        t = t / dist.get_world_size()
    return t.clamp(min=1).tolist()


def as_float32(tree):
    """`tree` (nested dicts, lists and tuples of tensors and plain values) with every floating tensor in float32."""
    if isinstance(tree, torch.Tensor):
        return tree.float() if tree.is_floating_point() else tree
    if isinstance(tree, dict):
        return {k: as_float32(v) for k, v in tree.items()}
    if isinstance(tree, (list, tuple)):
        return type(tree)(as_float32(v) for v in tree)
    return tree


def check_union_set(union_set: bool | None, fgl: float, ddf: float) -> None:
    """Raise ValueError for `union_set=False` with an FGL or DDF weight, a combination no recipe of the authors uses."""
    if union_set is False and (fgl or ddf):
        raise ValueError(
            f"union_set=False needs loss_fgl=0 and loss_ddf=0 (got {fgl} and {ddf}): without the union set the "
            "distribution terms have no supervision the authors defined (DEIMv2's small sizes drop both)"
        )


class DEIMCriterion(nn.Module):
    """DEIM loss (MAL, L1, GIoU, FGL, DDF) over every decoder output, reproducing the official criterion's terms.

    Attributes:
        last_pos_per_img: after each forward, the mean number of final-layer primary queries per image that received
            a positive target (Hungarian matches, plus the final layer's one-to-many matches under mixed supervision).
        quality_matching: match by -p * IoU**4 instead of the weighted cost (DEIMv2's matcher change); the trainer
            sets it at the recipe's `matcher_change_epoch`.
    """

    def __init__(
        self,
        nc: int,
        weights: dict[str, float],
        cls_loss: str,
        mal_gamma: float,
        reg_max: int | None,
        union_set: bool,
    ):
        """Configure the criterion; the settings come from the training arguments (`deim_ultra/cfg/default.yaml`).

        Args:
            nc: number of classes.
            weights: term weights by name: `cls_loss`'s name ("mal", "vfl" or "focal"), "bbox", "giou", "fgl", "ddf".
            cls_loss: "mal", "vfl" or "focal".
            mal_gamma: gamma of MAL; VFL and focal loss use the D-FINE recipe's VFL_GAMMA and VFL_ALPHA.
            reg_max: number of distribution bin intervals; None for heads without a distribution (no FGL/DDF).
            union_set: box terms of the matched layers on the union ("GO") set of all their matches (DEIM); False
                supervises each layer's boxes by its own match (DEIMv2's small sizes, which have no FGL/DDF).
                FGL and DDF (weights `fgl`, `ddf`) are left out when both weights are 0.

        Raises:
            ValueError: For union_set=False with FGL or DDF weighted, a combination no recipe of the authors uses.
        """
        super().__init__()
        if cls_loss not in CLASS_LOSSES:
            raise ValueError(f"cls_loss must be one of {sorted(CLASS_LOSSES)}, got {cls_loss!r}")
        missing = {cls_loss, "bbox", "giou", "fgl", "ddf"} - set(weights)
        if missing:
            raise KeyError(f"DEIMCriterion: no weight for term(s) {sorted(missing)}")
        self.nc = nc
        self.weights = {k: float(v) for k, v in weights.items()}
        self.cls_loss = cls_loss
        self.cls_fn = CLASS_LOSSES[cls_loss]
        self.gamma = mal_gamma if cls_loss == "mal" else VFL_GAMMA
        self.cls_alpha = None if cls_loss == "mal" else VFL_ALPHA
        self.local = bool(self.weights["fgl"] or self.weights["ddf"])
        if reg_max is not None:
            check_union_set(union_set, self.weights["fgl"], self.weights["ddf"])
        self.reg_max = reg_max if self.local else None
        self.union_set = union_set
        self.matcher = HungarianMatcher()
        self.quality_matching = False
        self.last_pos_per_img = 0.0

    def forward(self, outputs: dict, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """All weighted loss terms (see `weighted_terms`), computed in float32 whatever the autocast state.

        As in the authors' trainer, which runs the criterion with autocast disabled: in half precision the matcher's
        focal cost rounds its 1e-8 guard to 0 and saturates to +-inf, and the losses lose their small terms.
        """
        with torch.autocast(outputs["pred_logits"].device.type, enabled=False):
            return self.weighted_terms(as_float32(outputs), targets)

    def weighted_terms(self, outputs: dict, targets: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
        """Compute all weighted loss terms.

        Args:
            outputs: decoder dict: "pred_logits" (B, Q, C), "pred_boxes" (B, Q, 4) cxcywh, optionally "pred_corners"
                (B, Q, 4 * (reg_max + 1)), "ref_points" (B, Q, 4), "up", "reg_scale", "aux_outputs" (list of dicts
                with the same keys plus "teacher_corners"/"teacher_logits"), "pre_outputs", "enc_aux_outputs",
                "dn_outputs", "dn_pre_outputs", "dn_meta" (Ultralytics get_cdn_group format).
            targets: B dicts with "labels" (n_i,) long and "boxes" (n_i, 4) normalised cxcywh.

        Returns:
            Dict of scalar weighted terms named like the official criterion ("loss_mal", "loss_bbox_aux_0", ...).
        """
        device = outputs["pred_logits"].device
        num_gts = [len(t["labels"]) for t in targets]
        aux = outputs.get("aux_outputs", [])
        pre = [outputs["pre_outputs"]] if "pre_outputs" in outputs else []
        enc = outputs.get("enc_aux_outputs", [])
        suffixes = [f"_aux_{i}" for i in range(len(aux))] + ["_pre"] * len(pre) + [f"_enc_{i}" for i in range(len(enc))]
        layers = [outputs, *aux, *pre, *enc]
        indices = [self.matcher(o["pred_logits"], o["pred_boxes"], targets, self.quality_matching) for o in layers]
        go = union_indices(indices, num_gts)
        num_boxes, num_go = global_counts([sum(num_gts), sum(len(q) for q, _ in go)], device)

        bs, nq = outputs["pred_logits"].shape[:2]
        up, reg_scale = (outputs.get("up"), outputs.get("reg_scale")) if self.reg_max is not None else (None, None)
        primary = BoxSupervision(
            Matched.from_indices(go, targets, device),
            num_go,
            up,
            reg_scale,
            ddf_balance(sum(len(q) for q, _ in go), bs * nq),
        )
        matched = [Matched.from_indices(idx, targets, device) for idx in indices]
        losses = {}
        for out, match, suffix in zip(layers, matched, ["", *suffixes]):
            sup = primary if self.union_set else BoxSupervision(match, num_boxes, None, None, primary.balance)
            terms = self._layer_terms(out, match, num_boxes, sup)
            losses.update({f"loss_{k}{suffix}": v for k, v in terms.items()})

        if "dn_meta" in outputs:
            losses.update(self._denoising_terms(outputs, targets, num_boxes, primary))

        positive = torch.zeros(bs, nq, dtype=torch.bool, device=device)
        positive[matched[0].batch, matched[0].query] = True
        for i, out in enumerate(outputs.get("o2m_outputs", [])):
            o2m = Matched.from_indices(
                one_to_many_assign(out["pred_logits"], out["pred_boxes"], targets), targets, device
            )
            losses.update({f"loss_{k}_o2m_{i}": v for k, v in self._o2m_terms(out, o2m, num_boxes).items()})
        if "o2m_outputs" in outputs:
            positive[o2m.batch, o2m.query] = True  # the final layer's
        self.last_pos_per_img = positive.sum().item() / bs
        return losses

    def _layer_terms(self, out: dict, match: Matched, num_boxes: float, sup: BoxSupervision) -> dict[str, torch.Tensor]:
        """Weighted terms of one output dict, names without the "loss_" prefix and layer suffix.

        Args:
            out: one layer's dict ("pred_logits", "pred_boxes", optionally "pred_corners", "ref_points",
                "teacher_corners", "teacher_logits").
            match: this layer's assignment for the class term.
            num_boxes: class-term normaliser.
            sup: the family's box supervision (GO set or denoising assignment).
        """
        w = self.weights
        terms = {self.cls_loss: w[self.cls_loss] * self._class_term(out, match, num_boxes)}
        pred = out["pred_boxes"][sup.match.batch, sup.match.query]
        l1, giou = box_losses(pred, sup.match.boxes)
        terms["bbox"] = w["bbox"] * l1 / sup.num
        terms["giou"] = w["giou"] * giou / sup.num
        if "pred_corners" not in out or "ref_points" not in out or sup.up is None or sup.reg_scale is None:
            return terms
        iou = paired_iou(pred, sup.match.boxes)
        if sup.bins is None:
            ref = out["ref_points"][sup.match.batch, sup.match.query].detach()
            sup.bins = distance_bins(ref, sup.match.boxes, self.reg_max, sup.up, sup.reg_scale)
        corners = out["pred_corners"][sup.match.batch, sup.match.query]
        terms["fgl"] = w["fgl"] * fgl_loss(corners, *sup.bins, iou) / sup.num
        if "teacher_corners" in out:
            terms["ddf"] = w["ddf"] * self._ddf_term(out, sup, iou)
        return terms

    def _class_term(self, out: dict, match: Matched, num_boxes: float) -> torch.Tensor:
        """Normalised class loss; the IoU of each matched prediction with its GT is the quality target."""
        logits = out["pred_logits"]
        onehot = torch.zeros_like(logits)
        onehot[match.batch, match.query, match.labels] = 1.0
        iou = logits.new_zeros(logits.shape[:2])
        iou[match.batch, match.query] = paired_iou(out["pred_boxes"][match.batch, match.query], match.boxes).to(iou)
        return self.cls_fn(logits, onehot, iou, self.gamma, self.cls_alpha) / num_boxes

    def _ddf_term(self, out: dict, sup: BoxSupervision, iou: torch.Tensor) -> torch.Tensor:
        """Unweighted DDF of one layer: matched queries weighted by IoU, the rest by the teacher's max class prob."""
        idx = (sup.match.batch, sup.match.query)
        weight = out["teacher_logits"].detach().sigmoid().amax(-1).index_put(idx, iou.to(out["teacher_logits"]))
        pos = torch.zeros_like(weight, dtype=torch.bool).index_put(idx, torch.tensor(True, device=weight.device))
        return ddf_loss(out["pred_corners"], out["teacher_corners"], weight, pos, sup.balance)

    def _denoising_terms(
        self, outputs: dict, targets: list[dict[str, torch.Tensor]], num_boxes: float, primary: BoxSupervision
    ) -> dict[str, torch.Tensor]:
        """Terms of the denoising queries: each dn layer and the dn pre-layer on the fixed denoising assignment."""
        meta = outputs["dn_meta"]
        device = outputs["pred_logits"].device
        match = Matched.from_indices(denoising_indices(meta, [len(t["labels"]) for t in targets]), targets, device)
        num = num_boxes * meta["dn_num_group"]
        sup = BoxSupervision(match, num, primary.up, primary.reg_scale, primary.balance)
        named = [(o, f"_dn_{i}") for i, o in enumerate(outputs.get("dn_outputs", []))]
        if "dn_pre_outputs" in outputs:
            named.append((outputs["dn_pre_outputs"], "_dn_pre"))
        losses = {}
        for out, suffix in named:
            losses.update({f"loss_{k}{suffix}": v for k, v in self._layer_terms(out, match, num, sup).items()})
        return losses

    def _o2m_terms(self, out: dict, match: Matched, num_boxes: float) -> dict[str, torch.Tensor]:
        """MS-DETR one-to-many terms of one layer, normalised by num_boxes, with the O2M_WEIGHTS coefficients.

        The class term is MS-DETR's own: focal loss on one-hot targets. With DEIM's MAL (IoU**gamma targets) in its
        place the quick set ended 0.007 lower and trailed by up to 0.09 mid-run (docs/journal.md, 2026-12-06). It is
        logged under the run's classification kind. A query several GTs took is classified as its best GT (the last
        of its pairs), as the authors' criterion leaves it. Box terms count every pair. FGL and DDF are one-to-one
        terms (the GO set, the final layer's distributions as teacher) and are not applied to one-to-many queries.
        """
        logits = out["pred_logits"]
        best = best_pair_per_query(match)
        onehot = torch.zeros_like(logits)
        onehot[best.batch, best.query, best.labels] = 1.0
        cls = CLASS_LOSSES["focal"](logits, onehot, None, O2M_FOCAL_GAMMA, O2M_FOCAL_ALPHA) / num_boxes
        l1, giou = box_losses(out["pred_boxes"][match.batch, match.query], match.boxes)
        return {
            self.cls_loss: O2M_WEIGHTS["cls"] * cls,
            "bbox": O2M_WEIGHTS["bbox"] * l1 / num_boxes,
            "giou": O2M_WEIGHTS["giou"] * giou / num_boxes,
        }


def best_pair_per_query(match: Matched) -> Matched:
    """The last pair of each (image, query) in `match`, whose pairs come lowest quality first (`one_to_many_assign`)."""
    if len(match.query) == 0:
        return match
    key = match.batch * (int(match.query.max()) + 1) + match.query
    position = torch.arange(len(key), device=key.device)
    last = torch.full((int(key.max()) + 1,), -1, dtype=torch.long, device=key.device)
    last = last.scatter_reduce(0, key, position, reduce="amax")
    keep = last[last >= 0]
    return Matched(match.batch[keep], match.query[keep], match.labels[keep], match.boxes[keep])
