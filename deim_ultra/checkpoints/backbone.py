"""The authors' ImageNet-pretrained HGNetv2 backbones (`PPHGNetV2_B<k>_stage1.pth`): which file `pretrained` means.

The authors start every DEIM size from these stage-1 ImageNet weights. Each model YAML names its file
(`backbone_weights: PPHGNetV2_B0_stage1.pth`); `pretrained=True` (Ultralytics' default) looks for it in Ultralytics'
weights directory and, when the network allows, downloads it there from the authors' public release. The release
publishes no checksum, so none is checked; instead the file must fit the backbone key by key and shape by shape
(`load_hgnetv2_pretrained`) before any weight is copied.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from ultralytics.utils import LOGGER, SETTINGS, is_online
from ultralytics.utils.downloads import safe_download

from deim_ultra.nn.hgnetv2 import load_hgnetv2_pretrained

if TYPE_CHECKING:
    from deim_ultra.nn.tasks import DEIMDetectionModel

RELEASE_URL = "https://github.com/Peterande/storage/releases/download/dfinev1.0"


def is_backbone_file(pretrained: object) -> bool:
    """Whether a `pretrained` setting names an ImageNet backbone file (`.pth`) rather than an Ultralytics `.pt`."""
    return isinstance(pretrained, (str, Path)) and Path(pretrained).suffix == ".pth"


def weights_dir() -> Path:
    """Ultralytics' weights directory (`yolo settings weights_dir=...`), where downloaded backbones are kept."""
    return Path(SETTINGS["weights_dir"])


def backbone_weights(pretrained: object, name: str | None) -> Path | None:
    """The file the backbone starts from, for a `pretrained` setting and the YAML's `backbone_weights` file name.

    Args:
        pretrained: `True` for the authors' file `name`, a `.pth` path for that file; anything else (False, an
            Ultralytics `.pt`, which Ultralytics itself loads) means no backbone file.
        name: The model YAML's `backbone_weights`, e.g. 'PPHGNetV2_B0_stage1.pth'; None for models without one.

    Returns:
        (Path | None): An existing file, or None to start from random weights. For `pretrained=True` a file that
            cannot be found or downloaded gives None and one warning line saying which file to put where.

    Raises:
        FileNotFoundError: When `pretrained` names a `.pth` file that does not exist.
    """
    if is_backbone_file(pretrained):
        path = Path(pretrained)
        if not path.is_file():
            raise FileNotFoundError(
                f"pretrained={pretrained}: no such file. Fix: give the path of a PPHGNetV2_B<k>_stage1.pth file, "
                f"or pretrained=True to use {weights_dir()}/<the model YAML's backbone_weights>"
            )
        return path
    if pretrained is not True or not name:
        return None
    path = weights_dir() / name
    if path.is_file():
        return path
    url = f"{RELEASE_URL}/{name}"
    reason = "offline"
    if is_online():
        try:
            return safe_download(url, file=path, retry=1, unzip=False)
        except Exception as e:  # any failed download means the same thing here: start from random weights
            reason = f"download failed: {e}"
    LOGGER.warning(
        f"pretrained=True: ImageNet backbone {name} is not in {path.parent} ({reason}), so the backbone starts from "
        f"random weights. Fix: download {url} to {path}, or pass pretrained=path/to/{name}"
    )
    return None


def init_backbone(model: DEIMDetectionModel, pretrained: object) -> None:
    """Load into `model`'s HGNetv2 layers the ImageNet file that `pretrained` asks for (see `backbone_weights`)."""
    path = backbone_weights(pretrained, model.yaml.get("backbone_weights"))
    if path is None:
        why = "" if model.yaml.get("backbone_weights") or pretrained is not True else (
            f": {Path(model.yaml.get('yaml_file', 'this model')).name} names no ImageNet backbone file deim-ultra "
            "fetches (DEIMv2 S-X: the authors' distilled ViT and DINOv3 weights); start from its COCO weights instead, "
            "e.g. model=deimv2-s.pt"
        )  # fmt: skip
        LOGGER.info(f"Backbone starts from random weights (pretrained={pretrained}){why}")
        return
    partial = bool(model.yaml.get("backbone_weights_partial"))
    loaded, total = load_hgnetv2_pretrained(*model.hgnetv2_layers(), path, partial=partial)
    fit = f" ({loaded} of {total} tensors fit this pruned backbone; the others start from random weights)"
    LOGGER.info(f"Backbone initialised from ImageNet weights '{path}'" + (fit if partial else ""))
