"""`data=` given as a COCO dataset: where its json files and image folders are, as Ultralytics' data dict.

Three forms are read (anything else is left to Ultralytics):

- a folder in the COCO 2017 layout: `annotations/instances_<split>.json` beside the image folder `<split>/` (or
  `images/<split>/`), e.g. `instances_train2017.json` with `train2017/`; a split name starting with `train`, `val` or
  `test` is that split;
- a folder in Roboflow's COCO export layout: `train/_annotations.coco.json` with its images beside it, likewise
  `valid/` and `test/`;
- a data YAML whose `train` / `val` / `test` name json files (relative to `path`, or to the YAML's folder). Images are
  found relative to the json's folder, in the COCO 2017 places above, or in the folder that `<split>_images` names.

The data dict carries, besides Ultralytics' keys (`path`, `train`, `val`, `test` as json paths, `names`, `nc`,
`channels`), `category_ids` (class index -> the dataset's category id) and `coco_images` (json path -> its image
folder), which `deim_ultra.data.coco_dataset` and the validator read.
"""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ultralytics.utils import YAML

from deim_ultra.data.audit import DatasetError
from deim_ultra.data.coco_json import CocoSplit, read_coco_json

SPLITS = ("train", "val", "test")
ROBOFLOW = {"train": "train", "val": "valid", "test": "test"}  # split -> Roboflow's folder name
ROBOFLOW_JSON = "_annotations.coco.json"


def split_of(name: str) -> str | None:
    """The split a COCO file or folder name stands for: 'train2017' -> 'train', 'valid' -> 'val'."""
    name = name.lower()
    return next((s for s in SPLITS if name.startswith(s) or name.startswith(f"image_info_{s}")), None)


def coco2017_jsons(root: Path) -> dict[str, Path]:
    """`annotations/instances_<split>.json` of a COCO 2017 layout folder, by split."""
    found: dict[str, list[Path]] = {}
    for file in sorted((root / "annotations").glob("instances_*.json")):
        split = split_of(file.stem.removeprefix("instances_"))
        if split:
            found.setdefault(split, []).append(file)
    for split, files in found.items():
        if len(files) > 1:
            raise DatasetError(
                f"{root / 'annotations'} holds {len(files)} {split} files ({', '.join(f.name for f in files)}). "
                f"Fix: a data YAML whose '{split}:' names the one to use"
            )
    return {split: files[0] for split, files in found.items()}


def image_dir_candidates(json_file: Path, split: str) -> list[Path]:
    """Folders a json's `file_name`s may be relative to, most specific first."""
    folders = [json_file.parent]
    if json_file.parent.name == "annotations":  # COCO 2017 layout: the folder is named after the json's split
        root, name = json_file.parent.parent, json_file.stem.removeprefix("instances_")
        folders += [root / name, root / "images" / name, root / split, root / "images" / split, root / "images", root]
    return list(dict.fromkeys(folders))


def find_image_dir(json_file: Path, split: str, explicit: Path | None) -> Path:
    """The folder the json's images are in: `explicit`, or the candidate holding most of its first images."""
    if explicit is not None:
        if not explicit.is_dir():
            raise DatasetError(f"{split}_images: {explicit} is not a folder")
        return explicit
    candidates = image_dir_candidates(json_file, split)
    names = [image.file_name for image in read_coco_json(json_file).images[:20]]
    if not names:
        return candidates[0]
    hits = [sum((folder / name).is_file() for name in names) for folder in candidates]
    if max(hits) == 0:
        raise DatasetError(
            f"{json_file}: none of its first images (e.g. '{names[0]}') is in {', '.join(map(str, candidates))}. "
            f"Fix: a data YAML with '{split}: {json_file}' and '{split}_images: <the image folder>'"
        )
    return candidates[hits.index(max(hits))]


def coco_splits(
    data: str | Path, needed: tuple[str, ...]
) -> tuple[Path, dict[str, Path], dict[str, Path | None], dict] | None:
    """(root, json file per split, explicit image folder per split, the YAML's other keys) of a COCO `data`, or None
    when `data` is not given as COCO json. A json file alone is the one split `needed` (validation)."""
    path = Path(str(data))
    if path.is_dir():
        jsons = coco2017_jsons(path)
        if not jsons:
            jsons = {s: path / d / ROBOFLOW_JSON for s, d in ROBOFLOW.items() if (path / d / ROBOFLOW_JSON).is_file()}
        return (path.resolve(), jsons, {}, {}) if jsons else None
    if path.suffix == ".json" and path.is_file():
        if len(needed) == 1:
            return path.resolve().parent, {needed[0]: path.resolve()}, {}, {}
        raise DatasetError(
            f"data={data} names one json file, but training needs a train and a val split. Fix: the folder that "
            f"holds it (COCO 2017 or Roboflow layout), or a data YAML with 'train: <json>' and 'val: <json>'"
        )
    if path.suffix not in {".yaml", ".yml"} or not path.is_file():
        return None
    content = YAML.load(path)
    named = {s: content[s] for s in SPLITS if isinstance(content.get(s), str) and content[s].endswith(".json")}
    if not named:
        return None
    others = [s for s in SPLITS if content.get(s) and s not in named]
    if others:
        raise DatasetError(f"{path}: {', '.join(named)} name json files but {', '.join(others)} not; use one format")
    root = Path(content.get("path") or path.parent)
    root = root if root.is_absolute() else (path.parent / root)
    jsons = {s: (root / f).resolve() for s, f in named.items()}
    explicit = {s: (root / content[f"{s}_images"]).resolve() for s in named if content.get(f"{s}_images")}
    missing = [f"{s}: {f}" for s, f in jsons.items() if not f.is_file()]
    if missing:
        raise DatasetError(f"{path}: json file(s) not found: {', '.join(missing)}")
    return root.resolve(), jsons, explicit, content


def check_same_categories(splits: dict[str, CocoSplit]) -> None:
    """Every split must list the same categories (ids and names, same order): classes are indexed by them."""
    train = next(iter(splits.values()))
    for split in splits.values():
        if (split.category_ids, split.names) != (train.category_ids, train.names):
            raise DatasetError(
                f"{split.json_file} lists other categories than {train.json_file} "
                f"({dict(zip(split.category_ids, split.names.values()))} vs "
                f"{dict(zip(train.category_ids, train.names.values()))}). Fix: the same 'categories' in every split"
            )


def coco_data(data: str | Path, needed: tuple[str, ...] = ("train", "val")) -> dict | None:
    """Ultralytics' data dict for a COCO dataset (see the module docstring), or None when `data` is not COCO json.

    Args:
        data: what the user gave as `data=`.
        needed: the splits that must exist: train and val to train, the validated split alone to validate (then a
            json file alone is that split).

    Raises:
        DatasetError: For a COCO dataset that cannot be read: a needed split missing, images not found, splits with
            different categories, or a json that is not COCO.
    """
    found = coco_splits(data, needed)
    if found is None:
        return None
    root, jsons, explicit, content = found
    for split in needed:
        if split not in jsons:
            raise DatasetError(
                f"data={data}: no {split} split found (looked for annotations/instances_{split}*.json and "
                f"{ROBOFLOW[split]}/{ROBOFLOW_JSON}). Fix: add it, or a data YAML naming the json files"
            )
    image_dirs = {s: find_image_dir(f, s, explicit.get(s)) for s, f in jsons.items()}
    splits = {s: read_coco_json(f) for s, f in jsons.items()}
    check_same_categories(splits)
    train = splits.get("train") or next(iter(splits.values()))
    if content.get("names") is not None and list(yaml_names(content["names"])) != list(train.names.values()):
        raise DatasetError(
            f"data={data}: 'names' {content['names']} differ from the json's categories {list(train.names.values())}. "
            "Fix: drop 'names' (they come from the json)"
        )
    return {
        "path": root,
        **{s: str(f) for s, f in jsons.items()},
        "names": dict(train.names),
        "nc": len(train.names),
        "channels": content.get("channels", 3),
        "category_ids": list(train.category_ids),
        "coco_images": {str(jsons[s]): str(image_dirs[s]) for s in jsons},
    }


def yaml_names(names: list | dict) -> list[str]:
    """A data YAML's `names` (list or index -> name dict) as a list of strings."""
    return [str(n) for n in (names.values() if isinstance(names, dict) else names)]


@contextlib.contextmanager
def data_yaml(data: dict) -> Iterator[str]:
    """A temporary data YAML holding `data`, for Ultralytics code that takes its dataset as a YAML path.

    Ultralytics requires `train` and `val` in every data YAML; a split `data` lacks (a val-only dataset) names the
    json of one it has, and is never read.
    """
    present = next(data[s] for s in SPLITS if data.get(s))
    content = {"train": present, "val": present, **{k: str(v) if isinstance(v, Path) else v for k, v in data.items()}}
    with tempfile.TemporaryDirectory(prefix="deim-coco-") as folder:
        file = Path(folder) / "data.yaml"
        YAML.save(file, content)
        yield str(file)
