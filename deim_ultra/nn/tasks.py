"""The DEIM detection model: an Ultralytics RT-DETR model whose layers are built from a DEIM YAML.

A DEIM YAML lists layers in Ultralytics' `[from, repeats, module, args]` form. Modules are looked up in this package
(never in Ultralytics' namespace, so nothing depends on import order) or in `torch.nn` as `nn.Name`. Each module is
constructed as `Module(c1, *args)` with `c1` the input channel count (a list for multi-input layers) and reports its
own `out_channels`, so the parser needs no per-module rules.
"""

from __future__ import annotations

from copy import deepcopy
from pathlib import Path

import torch
from torch import distributed as dist
from torch import nn
from ultralytics.nn.tasks import RTDETRDetectionModel, yaml_model_load
from ultralytics.utils import LOGGER

from deim_ultra.cfg import DEFAULT_MODEL, deim_arg, resolve_model_yaml
from deim_ultra.class_transfer import (
    class_dependent_keys,
    copy_class_rows,
    describe_transfer,
    is_placeholder,
    source_rows,
)
from deim_ultra.distributed import in_process_group
from deim_ultra.loss.criterion import DEIMCriterion
from deim_ultra.loss.targets import batch_targets, per_image
from deim_ultra.nn.decoder import DFINEDecoder
from deim_ultra.nn.deimv2_decoder import DEIMv2Decoder
from deim_ultra.nn.encoder import HybridEncoder
from deim_ultra.nn.hgnetv2 import HGStage, HGStem
from deim_ultra.nn.lite_encoder import LiteEncoder
from deim_ultra.nn.spatial_adapter import DINOv3Adapter


class Pick(nn.Module):
    """Select one map from a multi-output layer, so that YAML layers can wire the encoder's levels to the head."""

    def __init__(self, c1: list[int], index: int):
        """Pick `index` from a list input whose channel counts are `c1`."""
        super().__init__()
        self.index = index
        self.out_channels = c1[index]

    def forward(self, x: list[torch.Tensor]) -> torch.Tensor:
        """Return `x[index]`."""
        return x[self.index]


MODULES: dict[str, type[nn.Module]] = {
    m.__qualname__: m
    for m in (HGStem, HGStage, DINOv3Adapter, HybridEncoder, LiteEncoder, Pick, DFINEDecoder, DEIMv2Decoder)
}  # by qualified name: DFINEDecoder's __name__ is "RTDETRDecoder" (see deim_ultra.nn.decoder)


def resolve_module(name: str) -> type[nn.Module]:
    """Return the module class a YAML layer names: one of `MODULES`, or `nn.<Name>` from torch."""
    if name.startswith("nn."):
        return getattr(nn, name[3:])
    if name not in MODULES:
        raise KeyError(f"Unknown DEIM module '{name}' in model YAML; known modules: {sorted(MODULES)}")
    return MODULES[name]


def parse_deim_model(cfg: dict, ch: int, verbose: bool = True) -> tuple[nn.Sequential, list[int]]:
    """Build the layer sequence described by a DEIM model dict.

    Args:
        cfg (dict): Model dict with `nc`, `backbone` and `head` layer lists; the string `nc` in args is replaced by
            the class count.
        ch (int): Input image channels.
        verbose (bool): Log one line per layer.

    Returns:
        (nn.Sequential): The layers, each tagged with Ultralytics' `i` (index), `f` (from), `type` and `np` (params).
        (list[int]): Sorted indices of layers whose outputs later layers read.
    """
    if verbose:
        LOGGER.info(f"\n{'':>3}{'from':>20}{'n':>3}{'params':>10}  {'module':<45}{'arguments':<30}")
    channels: list = [ch]
    layers, save = [], []
    for i, (f, n, name, args) in enumerate(cfg["backbone"] + cfg["head"]):
        if n != 1:
            raise ValueError(f"Layer {i} ({name}): DEIM layers take repeats=1, got {n}")
        args = [cfg["nc"] if a == "nc" else a for a in args]
        c1 = channels[f] if isinstance(f, int) else [channels[j] for j in f]
        m = resolve_module(name)(c1, *args)
        m.i, m.f, m.type = i, f, name
        m.np = sum(p.numel() for p in m.parameters())
        if verbose:
            LOGGER.info(f"{i:>3}{f!s:>20}{n:>3}{m.np:10.0f}  {name:<45}{args!s:<30}")
        save.extend(j % i for j in ([f] if isinstance(f, int) else f) if j != -1)
        layers.append(m)
        channels = channels[1:] if i == 0 else channels
        channels.append(m.out_channels)
    return nn.Sequential(*layers), sorted(save)


class DEIMCriterionModel(RTDETRDetectionModel):
    """An RT-DETR-style detection model trained with the DEIM criterion; its subclasses say how their layers are built.

    Overrides Ultralytics' `init_criterion` and `loss`, the two methods through which its trainer and validator reach
    a model's loss.
    """

    def backbone_modules(self) -> list[nn.Module]:
        """The layers of the YAML's `backbone` section: those at the backbone learning rate, and under `freeze_norm`."""
        return list(self.model[: len(self.yaml["backbone"])])

    def criterion_outputs(self, preds: dict | tuple) -> dict:
        """The head's outputs as the criterion's dict: DEIM's decoder returns it in training, and as the last item of
        its RT-DETR-layout tuple (boxes, logits, dict) in eval."""
        return preds if isinstance(preds, dict) else preds[-1]

    def init_criterion(self) -> DEIMCriterion:
        """The DEIM criterion, configured from the training arguments (`cls_loss`, `mal_gamma`, `loss_*`)."""
        args = getattr(self, "args", None)
        cls_loss = deim_arg(args, "cls_loss")
        weights = {name: deim_arg(args, f"loss_{name}") for name in ("bbox", "giou", "fgl", "ddf")}
        weights[cls_loss] = deim_arg(args, "loss_mal")  # one classification weight, whichever loss is chosen
        return DEIMCriterion(
            nc=self.model[-1].nc,
            weights=weights,
            cls_loss=cls_loss,
            mal_gamma=deim_arg(args, "mal_gamma"),
            reg_max=getattr(self.model[-1], "reg_max", None),  # Ultralytics' RT-DETR head has no distribution
            union_set=deim_arg(args, "union_set") is not False,  # None: no recipe said otherwise
        )

    def loss(self, batch: dict, preds: tuple | dict | None = None) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Compute the DEIM loss of a batch.

        Args:
            batch (dict): Ultralytics batch, see `deim_ultra.loss.targets.batch_targets`.
            preds (tuple | dict, optional): Head outputs already computed for `batch["img"]`: the training dict, or
                the eval-mode `(detections, outputs)` pair a validator passes.

        Returns:
            (torch.Tensor): Sum of all weighted loss terms, for backpropagation.
            (dict[str, torch.Tensor]): Detached sums per loss kind (classification, bbox, giou, fgl, ddf) and
                `pos_per_img`, the final layer's queries per image with a positive target (one-to-one matches, and
                one-to-many ones under mixed supervision).
        """
        if getattr(self, "criterion", None) is None:
            self.criterion = self.init_criterion()
        img = batch["img"]
        targets, dropped = batch_targets(batch, img.device)
        if dropped and not getattr(self, "warned_degenerate", False):
            LOGGER.warning(f"Ignoring {dropped} zero-area target boxes in a batch (logged once)")
            self.warned_degenerate = True
        if preds is None:
            preds = self.predict(img, batch=targets)
        outputs = self.criterion_outputs(preds if self.training else preds[1])
        terms = self.criterion(outputs, per_image(targets))
        zero = img.new_zeros(())
        groups = {kind: zero for kind in (self.criterion.cls_loss, "bbox", "giou", "fgl", "ddf")}
        for name, value in terms.items():
            kind = name.split("_")[1]
            groups[kind] = groups[kind] + value.detach()
        # Not a loss: matched positives per image, the quantity Dense O2O raises, logged beside the loss columns.
        groups["pos_per_img"] = img.new_tensor(self.criterion.last_pos_per_img)
        total = sum(terms.values(), zero)
        if self.training and in_process_group():
            # The criterion divides by the box count averaged over the processes, as the authors' does, so DDP's
            # gradient average is already the whole batch's gradient; Ultralytics' trainer multiplies the loss by the
            # number of processes (`self.loss *= self.world_size`, made for its per-process-mean YOLO losses).
            total = total / dist.get_world_size()
        return total, groups


class RTDETRDEIMModel(DEIMCriterionModel):
    """Ultralytics' RT-DETR model (e.g. rtdetr-l.yaml) trained with the DEIM criterion: MAL, matching, L1/GIoU.

    Its decoder has no distribution head, so there are no FGL/DDF terms and no pre-layer outputs.
    """

    def criterion_outputs(self, preds: tuple) -> dict:
        """Turn RTDETRDecoder's `(dec_bboxes, dec_scores, enc_bboxes, enc_scores, dn_meta)` into the criterion dict.

        dec_bboxes (L, B, dn+Q, 4) sigmoid cxcywh and dec_scores (L, B, dn+Q, nc) logits per decoder layer; enc_bboxes
        (B, Q, 4) and enc_scores (B, Q, nc) of the top-k encoder queries; dn_meta with `dn_num_split` [dn, Q] or None.
        """
        dec_bboxes, dec_scores, enc_bboxes, enc_scores, dn_meta = preds
        layers = [{"pred_logits": s, "pred_boxes": b} for b, s in zip(dec_bboxes, dec_scores)]
        if dn_meta is not None:
            num_dn = dn_meta["dn_num_split"][0]
            dn = [{k: v[:, :num_dn] for k, v in layer.items()} for layer in layers]
            layers = [{k: v[:, num_dn:] for k, v in layer.items()} for layer in layers]
        outputs = {**layers[-1], "aux_outputs": layers[:-1]}
        outputs["enc_aux_outputs"] = [{"pred_logits": enc_scores, "pred_boxes": enc_bboxes}]
        if dn_meta is not None:
            outputs.update(dn_outputs=dn, dn_meta=dn_meta)
        return outputs


class DEIMDetectionModel(DEIMCriterionModel):
    """DEIM-D-FINE detector: HGNetv2 backbone, hybrid encoder and D-FINE decoder, trained with the DEIM criterion.

    It keeps Ultralytics' RT-DETR model interface (`predict`, `loss`, `fuse`, checkpoint pickling), so Ultralytics'
    validator, predictor, exporter and AutoBackend drive it unchanged.
    """

    def __init__(
        self, cfg: str | Path | dict = DEFAULT_MODEL, ch: int = 3, nc: int | None = None, verbose: bool = True
    ):
        """Build the model from a DEIM YAML path or dict.

        Args:
            cfg (str | Path | dict): Model YAML (bare names are looked up in the package's `cfg/`) or its dict.
            ch (int): Input image channels.
            nc (int, optional): Class count overriding the YAML's `nc`.
            verbose (bool): Log the layer table and model summary.
        """
        nn.Module.__init__(self)  # Ultralytics' DetectionModel.__init__ re-initialises BatchNorm eps/momentum
        self.yaml = cfg if isinstance(cfg, dict) else yaml_model_load(resolve_model_yaml(cfg))
        self.yaml["channels"] = ch
        if nc and nc != self.yaml["nc"]:
            LOGGER.info(f"Overriding model.yaml nc={self.yaml['nc']} with nc={nc}")
            self.yaml["nc"] = nc
        self.model, self.save = parse_deim_model(deepcopy(self.yaml), ch=ch, verbose=verbose)
        if self.yaml.get("o2m"):
            self.model[-1].enable_one_to_many()
        self.names = {i: f"{i}" for i in range(self.yaml["nc"])}
        self.inplace = True
        self.stride = torch.Tensor([32])
        self.criterion = None
        if verbose:
            self.info()
            LOGGER.info("")

    def load(self, weights: nn.Module | dict, verbose: bool = True) -> None:
        """Ultralytics' transfer, saying when the checkpoint was trained with the other MS-DETR setting (`o2m`)."""
        super().load(weights, verbose)
        source = weights["model"] if isinstance(weights, dict) else weights
        theirs, ours = bool(getattr(source, "yaml", {}).get("o2m")), bool(self.yaml.get("o2m"))
        if verbose and theirs != ours:
            LOGGER.warning(
                f"The checkpoint was trained {'with' if theirs else 'without'} MS-DETR's mixed supervision and this "
                f"model has it {'off' if theirs else 'on'} (o2m={ours}): its decoder layers now run "
                f"{'self' if theirs else 'cross'}-attention first"
                + ("" if theirs else ", and their one-to-many FFNs (o2m_ffn) start from random weights")
                + f" (o2m={theirs} would keep the checkpoint's layer order)"
            )

    def hgnetv2_layers(self) -> tuple[HGStem, list[HGStage]]:
        """The HGNetv2 stem and stages, in order: what the authors' ImageNet backbone files hold."""
        stem = next(m for m in self.model if isinstance(m, HGStem))
        return stem, [m for m in self.model if isinstance(m, HGStage)]

    def fuse(self, verbose: bool = True, imgsz: int = 640) -> DEIMDetectionModel:
        """Convert to the deploy layout in place: conv-BN and RepVGG branches folded, training-only heads dropped.

        Outputs in eval mode are unchanged; the converted model can no longer be trained.
        """
        if not self.is_fused():
            for m in self.model:
                if hasattr(m, "fuse"):
                    m.fuse()
            self.fused = True
            self.info(verbose=verbose, imgsz=imgsz)
        return self

    def is_fused(self) -> bool:
        """Whether `fuse()` has already converted the model."""
        return getattr(self, "fused", False)

    def _remap_cls_by_names(self, csd: dict[str, torch.Tensor], src_model: nn.Module, verbose: bool = True) -> int:
        """Give each class the checkpoint's rows of the class of the same name, in every class-dependent tensor.

        Called by Ultralytics' `load()` before it copies the tensors of equal shape. Replaces RT-DETR's version, which
        assumes a denoising embedding of nc rows (ours has a padding row) and leaves unmatched classes with whatever
        row sits at their index. Here, with names on both sides (`cls_remap=True`, Ultralytics' default, sets the
        dataset's), matched classes take their rows, new classes keep fresh ones, and the class-dependent keys leave
        `csd` so nothing is copied by position. With placeholder names (`cls_remap=False`) Ultralytics' positional
        copy stands: row k to class k when the class counts agree, fresh rows otherwise.

        Args:
            csd (dict): The checkpoint's state dict; the keys handled here are removed from it.
            src_model (nn.Module): The checkpoint's model, for its `names`.
            verbose (bool): Log what was transferred.

        Returns:
            (int): How many tensors were transferred here in full (added to Ultralytics' "Transferred N/M items"); a
                tensor with fresh rows for new classes is not counted, so the count agrees with the line logged here.
        """
        source, target = getattr(src_model, "names", None), self.names
        keys = class_dependent_keys(self)
        if is_placeholder(source) or is_placeholder(target):
            if verbose and len(source or {}) != len(target):
                LOGGER.warning(
                    f"Fine-tuning a {len(source or {})}-class checkpoint on {len(target)} classes without class names "
                    f"to match (cls_remap=False, or unnamed classes): the class-dependent tensors {', '.join(keys)} "
                    "start from random weights, every other layer from the checkpoint"
                )
            return 0
        rows = source_rows(source, target)
        if len(source) == len(target) and torch.equal(rows, torch.arange(len(target))):
            return 0  # same classes in the same order: Ultralytics copies every tensor as it is
        copied = copy_class_rows(self.state_dict(), csd, keys, rows)
        for key in keys:
            csd.pop(key, None)
        if verbose:
            LOGGER.info(describe_transfer(source, target, rows))
        return len(copied) if bool((rows >= 0).all()) else 0  # partly fresh tensors are not counted as transferred


def model_class_for(cfg: str | Path | dict) -> type[RTDETRDetectionModel]:
    """DEIMDetectionModel for YAMLs made of DEIM modules, RTDETRDEIMModel for Ultralytics RT-DETR YAMLs."""
    d = cfg if isinstance(cfg, dict) else yaml_model_load(resolve_model_yaml(cfg))
    names = {layer[2] for layer in d["backbone"] + d["head"]}
    return DEIMDetectionModel if names <= set(MODULES) | {n for n in names if n.startswith("nn.")} else RTDETRDEIMModel


def build_detection_model(
    cfg: str | Path | dict, ch: int = 3, nc: int | None = None, verbose: bool = True, o2m: bool | None = None
) -> DEIMCriterionModel:
    """Build the model class `cfg` calls for (see `model_class_for`).

    Args:
        cfg (str | Path | dict): Model YAML or its dict (not modified).
        ch (int): Input image channels.
        nc (int, optional): Class count overriding the YAML's.
        verbose (bool): Log the layer table and model summary.
        o2m (bool, optional): MS-DETR's mixed supervision, overriding the YAML's `o2m` key; recorded in `model.yaml`.
    """
    d = deepcopy(cfg) if isinstance(cfg, dict) else yaml_model_load(resolve_model_yaml(cfg))
    if o2m is not None:
        d["o2m"] = o2m
    model_class = model_class_for(d)
    if d.get("o2m") and model_class is not DEIMDetectionModel:
        raise ValueError(
            f"o2m=True: MS-DETR's one-to-many branch is part of DEIM's D-FINE decoder; Ultralytics' RT-DETR decoder "
            f"({d.get('yaml_file', 'this model')}) has none. Fix: a deim-<size>.yaml or dfine-<size>.yaml model, or "
            "o2m=False"
        )
    return model_class(d, ch=ch, nc=nc, verbose=verbose)
