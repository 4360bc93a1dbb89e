"""`DEIMDataset`: Ultralytics' YOLO training dataset with DEIM's staged data policy (see `deim_ultra.data.augment`)."""

from __future__ import annotations

from ultralytics.data.augment import Compose
from ultralytics.data.dataset import YOLODataset
from ultralytics.data.utils import get_split_fraction
from ultralytics.utils import IterableSimpleNamespace, colorstr

from deim_ultra.data.augment import deim_transforms
from deim_ultra.data.stages import stage_augmentation


class DEIMDataset(YOLODataset):
    """Training set whose transforms follow one DEIM data stage ("warmup", "dense_o2o", "aug" or "no_aug").

    The stage lives on the dataset, and `set_stage` rebuilds `self.transforms` in this process only. DataLoader worker
    processes hold their own copy of the dataset, taken when the loader's iterator starts them; Ultralytics'
    InfiniteDataLoader keeps its workers for the whole run, so after `set_stage` call `loader.reset()` (as
    Ultralytics' trainer does after `close_mosaic`) and the next iteration starts workers that copy the new stage.

    Attributes:
        stage: current data stage.
        hyp: the settings the transforms were last built from (reused by `set_stage`).
    """

    def __init__(self, *args, stage: str = "warmup", **kwargs) -> None:
        """Same arguments as YOLODataset, plus the data `stage` to start in."""
        stage_augmentation(stage)  # refuses an unknown stage before YOLODataset.__init__ builds the transforms
        self.stage = stage
        super().__init__(*args, **kwargs)

    def build_transforms(self, hyp: IterableSimpleNamespace) -> Compose:
        """The pipeline of the current stage at `self.imgsz` (see `deim_transforms`)."""
        self.hyp = hyp
        return deim_transforms(self, self.imgsz, self.stage, hyp)

    def set_stage(self, stage: str) -> None:
        """Switch to data `stage` and rebuild the transforms; reset the DataLoader for its workers to see it."""
        stage_augmentation(stage)  # refuses an unknown stage
        self.stage = stage
        self.transforms = self.build_transforms(self.hyp)


def rtdetr_style_dataset(
    dataset_class: type[YOLODataset],
    img_path: str,
    args: IterableSimpleNamespace,
    data: dict,
    mode: str,
    batch: int | None,
    split: str,
) -> YOLODataset:
    """A `dataset_class` with the arguments Ultralytics' RT-DETR trainer and validator give RTDETRDataset
    (`build_dataset` of ultralytics/models/rtdetr/train.py and val.py), repeated because they name their class.

    Args:
        dataset_class: DEIMDataset, a COCO json dataset, or RTDETRDataset itself.
        img_path: the split's images (a folder, list or txt file), or its json for COCO data.
        args: the trainer's or validator's settings.
        data: Ultralytics' data dict.
        mode: "train" (augmented) or "val".
        batch: batch size.
        split: the split whose `fraction` applies.
    """
    return dataset_class(
        img_path=img_path,
        imgsz=args.imgsz,
        batch_size=batch,
        augment=mode == "train",
        hyp=args,
        rect=False,
        cache=args.cache or None,
        single_cls=args.single_cls or False,
        prefix=colorstr(f"{mode}: "),
        classes=args.classes,
        data=data,
        fraction=1.0 if data.get("complete") else get_split_fraction(args.fraction, split),
    )
