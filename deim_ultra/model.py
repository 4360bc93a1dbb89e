"""`DEIM`: the user-facing model class, wiring DEIM's model and trainer to Ultralytics' validator and predictor."""

from __future__ import annotations

from pathlib import Path
from typing import Any, NoReturn

import torch
from torch import nn
from ultralytics.engine.model import Model
from ultralytics.models.rtdetr.predict import RTDETRPredictor
from ultralytics.nn.autobackend import AutoBackend
from ultralytics.nn.tasks import RTDETRDetectionModel
from ultralytics.utils import LOGGER, YAML
from ultralytics.utils.checks import check_yaml

from deim_ultra.cfg import DEFAULT_MODEL, DEIM_CFG_DICT, resolve_data_yaml, resolve_model_yaml
from deim_ultra.checkpoints.backbone import is_backbone_file, weights_dir
from deim_ultra.checkpoints.safety import check_checkpoint
from deim_ultra.checkpoints.zoo import HF_WEIGHTS, ZOO, pretrained_path
from deim_ultra.export_options import with_calibration_data
from deim_ultra.nn.deformable_attention import SAMPLERS, MSDeformableAttention
from deim_ultra.nn.tasks import build_detection_model
from deim_ultra.train import DEIMTrainer, check_resumable
from deim_ultra.val import DEIMValidator, model_category_ids


def record_category_ids(exporter) -> None:
    """Export callback: the COCO category ids of a model trained on COCO json data go into the export's metadata.

    (The metadata's `head` reads "RTDETRDecoder" by itself, see `deim_ultra.nn.decoder`, so stock Ultralytics
    decodes DEIM exports as RT-DETR ones, whichever exporter wrote them.)
    """
    category_ids = model_category_ids(exporter.model)
    if category_ids:
        exporter.metadata["category_ids"] = category_ids


def in_weights_dir(name: str) -> Path | None:
    """A bare file name found in Ultralytics' weights directory, where `YOLO("name.pt")` also looks."""
    path = weights_dir() / name
    return path if Path(name).name == name and path.is_file() else None


def missing_checkpoint(path: str) -> NoReturn:
    """Raise for a `.pt` that is neither a file nor a pretrained name (Ultralytics would look it up on GitHub)."""
    raise FileNotFoundError(
        f"'{path}' not found, neither as a file, in {weights_dir()}, nor among the pretrained names: {', '.join(ZOO)}"
    )


def check_pretrained_fits(name: str, model: object) -> None:
    """Warn when a pretrained name was trained with another YAML than `model`'s: a D-FINE checkpoint in a DEIM model
    loads every tensor yet computes with other activations, and another size loads only the tensors that fit."""
    theirs, ours = ZOO[name].yaml, Path(str(getattr(model, "yaml", {}).get("yaml_file", ""))).name
    if ours and ours != theirs:
        LOGGER.warning(
            f"pretrained={name} was trained as {theirs}, but this model is {ours}: its weights will not compute what "
            f"they were trained for (other activations or sizes). Fix: model={theirs}, or DEIM('{name}').train(...)"
        )


class DEIM(Model):
    """DEIM real-time DETR (DEIM-D-FINE, CVPR 2025) with the Ultralytics train/val/predict/export interface.

    Examples:
        >>> from deim_ultra import DEIM
        >>> model = DEIM("deim-n.yaml")  # or a trained / converted checkpoint: DEIM("best.pt")
        >>> model.train(data="deepforest.yaml", epochs=72, imgsz=640)
        >>> model.predict("image.jpg")
        >>> model.export(format="onnx")
    """

    def __init__(self, model: str | Path = DEFAULT_MODEL, task: str | None = None, verbose: bool = False) -> None:
        """Build a model from a DEIM YAML (a path or a shipped name) or load a DEIM checkpoint or export.

        Args:
            model (str | Path): `deim-{n,s,m,l,x}.yaml` (or `dfine-*.yaml`), a pretrained name such as 'deim-s.pt' or
                'dfine-s-obj2coco.pt' (downloaded and converted once, see `deim_ultra.checkpoints.zoo`), a `.pt` DEIM
                checkpoint, the authors' `.pth` (converted on the fly), or an exported model (`.onnx`, ...).
            task (str, optional): Accepted as `YOLO(model, task=...)` takes it; DEIM models only detect.
            verbose (bool): Log the model summary.
        """
        if task not in {None, "detect"}:
            raise ValueError(f"task='{task}': DEIM models detect; drop task or write task='detect'")
        super().__init__(model=model, task="detect", verbose=verbose)
        self.add_callback("on_export_start", record_category_ids)

    @property
    def task_map(self) -> dict[str, dict[str, Any]]:
        """DEIM's model builder, trainer and validator, Ultralytics' RT-DETR predictor."""
        return {
            "detect": {
                "model": build_detection_model,
                "trainer": DEIMTrainer,
                "validator": DEIMValidator,
                "predictor": RTDETRPredictor,
            }
        }

    @property
    def category_ids(self) -> dict[int, int] | None:
        """Class index -> the dataset's COCO category id, for a model trained on COCO json data (None otherwise):
        `model.category_ids[int(box.cls)]` gives a prediction's category id, `model.names` its name. An exported
        model reads it from the export's metadata."""
        if isinstance(self.model, nn.Module):
            ids = model_category_ids(self.model)
        else:  # an export: Ultralytics' backend reads its metadata (the predictor's, or one loaded for this)
            cpu = torch.device("cpu")
            backend = self.predictor.model if self.predictor else AutoBackend(self.model, device=cpu, verbose=False)
            ids = model_category_ids(backend)
        return dict(enumerate(ids)) if ids else None

    def _new(self, cfg: str, task: str | None = None, verbose: bool = False) -> None:
        """Build from a YAML: a shipped name such as 'deim-s.yaml', a path, or an Ultralytics rtdetr-*.yaml."""
        super()._new(str(resolve_model_yaml(cfg)), task=task, verbose=verbose)

    def _load(self, weights: str, task: str | None = None) -> None:
        """Load a checkpoint or export, refusing `.pt` files that hold neither a DEIM nor an RT-DETR model, and any
        whose pickle could run code (checked before Ultralytics unpickles it, see `deim_ultra.checkpoints.safety`).

        A pretrained name ('deim-s.pt') resolves to its cached file, downloaded the first time; an official `.pth` (or
        DEIMv2's Hugging Face `.safetensors`) is converted in memory.
        """
        weights = str(weights)
        if Path(weights).suffix in (".pth", ".safetensors") or (Path(weights) / HF_WEIGHTS).is_file():
            return self._load_official(weights)  # the authors' file, or DEIMv2's Hugging Face repository folder
        if weights.endswith(".pt") and not Path(weights).is_file():
            weights = str(pretrained_path(weights) or in_weights_dir(weights) or missing_checkpoint(weights))
        if weights.endswith(".pt") and Path(weights).is_file():
            check_checkpoint(weights)
        try:
            super()._load(weights, task=task)
        except (AttributeError, KeyError) as e:  # a readable .pt that is not an Ultralytics checkpoint dict
            raise TypeError(f"'{weights}' is not an Ultralytics/DEIM checkpoint ({type(e).__name__}: {e})") from e
        if str(weights).endswith(".pt") and not isinstance(self.model, RTDETRDetectionModel):
            raise TypeError(
                f"'{weights}' holds a {type(self.model).__name__}, not a DEIM model. Load it with the Ultralytics "
                "class it was trained with (e.g. ultralytics.YOLO), or train a DEIM model from 'deim-n.yaml'."
            )

    def _load_official(self, path: str) -> None:
        """Convert an official DEIM / D-FINE / DEIMv2 `.pth`, or DEIMv2's Hugging Face `.safetensors`, in memory (the
        YAML chosen by `convert_official_auto`)."""
        from deim_ultra.convert import convert_official_auto

        self.model = convert_official_auto(path).model
        self.model.args, self.model.pt_path, self.task = {}, path, "detect"
        self.ckpt = {"model": self.model, "train_args": {}}  # trainable like a loaded .pt: Ultralytics transfers it
        self.ckpt_path = self.model_name = path
        self.overrides = {"model": path, "task": "detect"}

    def train(self, trainer=None, **kwargs: Any):
        """Train; see Ultralytics' `Model.train`. Accepts shipped dataset names such as `data="deepforest.yaml"`.

        With `recipe=auto` (the default) the recipe is the model's own (`recipe` in its YAML, e.g. `s` for
        deim-s.yaml), so a checkpoint fine-tunes with its size's defaults. `resume=True` continues this model's
        checkpoint, `resume=<last.pt>` that file's, with the settings the run was started with; `cfg=<args.yaml>`
        starts a new run with that file's settings (its recipe included) in a folder of its own.
        """
        if isinstance(kwargs.get("resume"), (str, Path)):  # Ultralytics' `resume=<last.pt>` form
            self._load(str(kwargs["resume"]))
            kwargs["resume"] = True
        if kwargs.get("resume") is True:
            self.check_resumable()
        from_file = YAML.load(check_yaml(kwargs["cfg"])) if kwargs.get("cfg") else {}
        if from_file and not kwargs.get("resume"):
            # An args.yaml repeats its run's settings in a new run: not the run's folder, and no resume of its last.pt.
            kwargs.setdefault("save_dir", None)
            kwargs.setdefault("resume", False)
        if "data" in kwargs:
            kwargs["data"] = resolve_data_yaml(kwargs["data"])
        if isinstance(kwargs.get("pretrained"), str) and kwargs["pretrained"] in ZOO:  # pretrained=deim-s.pt
            check_pretrained_fits(kwargs["pretrained"], self.model)
            kwargs["pretrained"] = str(pretrained_path(kwargs["pretrained"]))
        if self.ckpt and is_backbone_file(kwargs.get("pretrained")) and not kwargs.get("resume"):
            raise ValueError(
                f"pretrained={kwargs['pretrained']} initialises the backbone of a model built from a YAML, but this "
                f"model was loaded from '{self.ckpt_path}' and already holds weights. Fix: DEIM('deim-<size>.yaml')"
            )
        return super().train(trainer=trainer, **kwargs)

    def check_resumable(self) -> None:
        """Raise unless this model was loaded from a checkpoint that can resume (it still holds its optimizer state).

        Ultralytics would warn and start a new run instead, on its default dataset unless `data` is given.
        """
        if not self.ckpt:
            raise ValueError(
                "resume=True continues a checkpoint, but this model was built from a YAML. Fix: "
                "resume=runs/detect/train/weights/last.pt, or DEIM('<last.pt>').train(resume=True)"
            )
        check_resumable(self.ckpt, self.ckpt_path)

    def export(self, **kwargs: Any) -> str:
        """Export; see Ultralytics' `Model.export`. DEIM adds `sampler`: "grid_sample" (default) or "gather", which
        builds the deformable attention from gathers only, for runtimes without a GridSample operator (TFLite, EdgeTPU,
        RKNN, some NPUs); both give the same outputs (see `deim_ultra.nn.deformable_attention.bilinear_gather`).
        Static INT8 (`quantize=8`) without `data` calibrates on the checkpoint's training data (see
        `deim_ultra.export_options.with_calibration_data`)."""
        kwargs = with_calibration_data(kwargs, (self.ckpt or {}).get("train_args"))
        sampler = kwargs.pop("sampler", DEIM_CFG_DICT["sampler"])
        if sampler not in SAMPLERS:
            raise ValueError(f"sampler={sampler!r}: choose one of {', '.join(SAMPLERS)}")
        attentions = [m for m in self.model.modules() if isinstance(m, MSDeformableAttention)]
        for m in attentions:
            m.sampler = sampler
        try:
            return super().export(**kwargs)
        finally:
            for m in attentions:
                m.sampler = DEIM_CFG_DICT["sampler"]

    def val(self, validator=None, **kwargs: Any):
        """Validate, accepting shipped dataset names; see Ultralytics' `Model.val`."""
        if "data" in kwargs:
            kwargs["data"] = resolve_data_yaml(kwargs["data"])
        return super().val(validator=validator, **kwargs)
