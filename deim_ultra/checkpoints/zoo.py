"""Pretrained detectors by name: `DEIM("deim-s.pt")`, `DEIM("dfine-s-obj2coco.pt")`, like `YOLO("yolo26n.pt")`.

Each name stands for one of the authors' released checkpoints. The first time a name is asked for and no file of
that name exists (current folder, then Ultralytics' weights directory), the official file (DEIM / D-FINE: a `.pth`
on Google Drive or GitHub; DEIMv2: the `model.safetensors` of its Hugging Face repository) is downloaded with
Ultralytics' own `safe_download` (which follows Google Drive links), checked (not an HTML page, a complete file that
fits the model YAML key by key), converted, and cached in the weights directory as `<name>` with the dataset's class
names and its provenance (URL and SHA-256 of the file downloaded). Later calls load the cache.

`DEIM_WEIGHTS_URL=<base URL>` fetches `<base URL>/<official file name>` instead, for sites that mirror the files
internally. An official file already in the weights directory under its own name is converted without a download.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
import zipfile
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from safetensors.torch import load_file
from ultralytics import __version__
from ultralytics.utils import LOGGER, ROOT, YAML, is_online
from ultralytics.utils.downloads import safe_download

from deim_ultra.checkpoints.atomic import save_atomically
from deim_ultra.checkpoints.backbone import weights_dir

DFINE_RELEASE = "https://github.com/Peterande/storage/releases/download/dfinev1.0"
DEIMV2_HUB = "https://huggingface.co/Intellindust"
HF_WEIGHTS = "model.safetensors"  # what a Hugging Face repository of the authors holds (PyTorchModelHubMixin)
MIRROR_VARIABLE = "DEIM_WEIGHTS_URL"
HTML_STARTS = (b"<!doctype html", b"<html", b"<!--", b"<head")


@dataclass(frozen=True)
class Release:
    """One official checkpoint: the file the authors published, where, and which YAML and class names it needs."""

    file: str  # the official file name, as the authors publish it (and as a mirror must hold it)
    url: str  # where the authors publish it
    yaml: str  # the shipped model YAML its weights fit
    dataset: str  # "coco" or "objects365": the class names the checkpoint's rows stand for


def _deim(size: str, epochs: int, drive_id: str) -> Release:
    url = f"https://drive.google.com/file/d/{drive_id}/view"
    return Release(f"deim_dfine_hgnetv2_{size}_coco_{epochs}e.pth", url, f"deim-{size}.yaml", "coco")


def _dfine(size: str, suffix: str, dataset: str = "coco") -> Release:
    file = f"dfine_{size}_{suffix}.pth"
    return Release(file, f"{DFINE_RELEASE}/{file}", f"dfine-{size}.yaml", dataset)


def _deimv2(size: str, backbone: str = "HGNetv2") -> Release:
    # Hugging Face serves every repository's weights as `model.safetensors`; the file takes the repository's name.
    repo = f"DEIMv2_{backbone}_{size.upper()}_COCO"
    return Release(
        f"{repo}.safetensors", f"{DEIMV2_HUB}/{repo}/resolve/main/{HF_WEIGHTS}", f"deimv2-{size}.yaml", "coco"
    )


# From the authors' READMEs (DEIM: Google Drive links in its model table; D-FINE: GitHub release assets).
ZOO: dict[str, Release] = {
    "deim-n.pt": _deim("n", 160, "1ZPEhiU9nhW4M5jLnYOFwTSLQC1Ugf62e"),
    "deim-s.pt": _deim("s", 120, "1tB8gVJNrfb6dhFvoHJECKOF5VpkthhfC"),
    "deim-m.pt": _deim("m", 90, "18Lj2a6UN6k_n_UzqnJyiaiLGpDzQQit8"),
    "deim-l.pt": _deim("l", 50, "1PIRf02XkrA2xAD3wEiKE2FaamZgSGTAr"),
    "deim-x.pt": _deim("x", 50, "1dPtbgtGgq1Oa7k_LgH1GXPelg1IVeu0j"),
    **{f"dfine-{s}.pt": _dfine(s, "coco") for s in "nsmlx"},
    **{f"dfine-{s}-obj365.pt": _dfine(s, "obj365", "objects365") for s in "smlx"},
    **{f"dfine-{s}-obj2coco.pt": _dfine(s, "obj2coco") for s in "smx"},
    "dfine-l-obj2coco.pt": _dfine("l", "obj2coco_e25"),
    # DEIMv2's README: the Hugging Face repositories Intellindust/DEIMv2_<backbone>_<SIZE>_COCO.
    **{f"deimv2-{s}.pt": _deimv2(s) for s in ("atto", "femto", "pico", "n")},
    **{f"deimv2-{s}.pt": _deimv2(s, "DINOv3") for s in "smlx"},
}


class WeightsUnavailableError(FileNotFoundError):
    """A pretrained name whose file is neither cached nor downloadable now."""


class BadDownloadError(ValueError):
    """A downloaded file that is not the checkpoint it should be (an HTML page, a truncated file)."""


def release_for_file(name: str) -> Release | None:
    """The release whose official file is called `name` (e.g. 'dfine_s_obj365.pth'), if any."""
    return next((r for r in ZOO.values() if r.file == name), None)


def source_url(release: Release) -> str:
    """Where to download `release` from: `$DEIM_WEIGHTS_URL/<file>` when the mirror variable is set."""
    mirror = os.environ.get(MIRROR_VARIABLE, "").rstrip("/")
    return f"{mirror}/{release.file}" if mirror else release.url


def class_names(dataset: str, nc: int) -> dict[int, str]:
    """The class names of a checkpoint trained on `dataset` with `nc` score rows (Ultralytics' dataset YAMLs).

    Objects365 heads with one row more than its 365 classes index classes by the dataset's 1-based category id, so
    row 0 is never a target; it gets the name 'unused'.
    """
    names = YAML.load(ROOT / "cfg" / "datasets" / {"coco": "coco.yaml", "objects365": "Objects365.yaml"}[dataset])
    names = names["names"]
    if nc == len(names):
        return dict(names)
    if nc == len(names) + 1:
        return {0: "unused", **{k + 1: v for k, v in names.items()}}
    raise ValueError(f"a {dataset} checkpoint with {nc} classes: expected {len(names)} or {len(names) + 1}")


def sha256(path: Path) -> str:
    """Hex SHA-256 of a file, read in 1 MiB blocks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def check_download(path: Path, source: str, release: Release) -> None:
    """Raise BadDownloadError unless `path` looks like a complete checkpoint: a PyTorch zip archive that opens, or a
    `.safetensors` file whose tensors all lie within the file.

    Google Drive answers large files with an HTML confirmation page (also what `wget` of a Drive link saves), and an
    interrupted transfer or a broken mirror leaves a truncated archive; neither must be converted or cached.
    """
    fix = f"Fix: download {release.url} in a browser and put it at {weights_dir() / release.file}"
    with open(path, "rb") as f:
        head = f.read(512).lstrip().lower()
    if head.startswith(HTML_STARTS):
        raise BadDownloadError(
            f"{source} is an HTML page, not a checkpoint (Google Drive answers large files with a confirmation "
            f"page). {fix}"
        )
    if release.file.endswith(".safetensors"):
        try:
            load_file(path)  # reads the header and every tensor: a truncated file fails here
        except Exception as e:  # safetensors raises its own SafetensorError
            raise BadDownloadError(f"{source} is an incomplete or corrupt .safetensors file ({e}). {fix}") from e
        return
    try:
        with zipfile.ZipFile(path) as archive:
            bad = archive.testzip()
    except (zipfile.BadZipFile, OSError) as e:
        raise BadDownloadError(
            f"{source} is an incomplete or corrupt file ({path.stat().st_size} bytes: {e}). {fix}"
        ) from e
    if bad is not None:
        raise BadDownloadError(f"{source} is a corrupt file (member '{bad}' fails its checksum). {fix}")


def download(release: Release, folder: Path) -> tuple[Path, str]:
    """Download `release` into `folder` under its official name; return the file and the URL it came from.

    Raises:
        WeightsUnavailableError: When offline (and no mirror is set) or the download fails, naming the URL, the file
            and where to put it.
        BadDownloadError: When what arrived is not a complete checkpoint.
    """
    url = source_url(release)
    fix = f"Fix: download {release.url} to {weights_dir() / release.file}"
    if os.environ.get(MIRROR_VARIABLE) is None and not is_online():
        raise WeightsUnavailableError(f"offline, so {release.file} cannot be downloaded. {fix}")
    try:
        path = safe_download(url, file=folder / release.file, retry=1, unzip=False, min_bytes=1e3)
    except Exception as e:  # Ultralytics raises ConnectionError, requests its own errors: one message for all
        cause = getattr(getattr(e.__cause__, "response", None), "status_code", None)
        reason = f"HTTP {cause}" if cause else str(e).strip()
        raise WeightsUnavailableError(f"download of {url} failed ({reason}). {fix}") from e
    check_download(Path(path), url, release)
    return Path(path), url


def build_cached(name: str, release: Release, official: Path, url: str) -> Path:
    """Convert `official` (a downloaded or user-provided file named `release.file`, so it takes the release's YAML
    and class names) and save it as `<weights dir>/<name>`."""
    from deim_ultra.convert import convert_official_auto

    deim = convert_official_auto(official)
    target = weights_dir() / name
    target.parent.mkdir(parents=True, exist_ok=True)
    provenance = {"file": release.file, "url": url, "sha256": sha256(official)}
    checkpoint = {
        "model": deim.model,
        "train_args": {},
        "date": datetime.now().isoformat(),
        "version": __version__,
        "source": provenance,
    }
    save_atomically(checkpoint, target)  # float32, as converted: the authors' numbers, not a half-precision copy
    LOGGER.info(f"Cached {release.file} ({release.yaml}, {len(deim.model.names)} classes) as '{target}'")
    return target


def pretrained_path(name: str) -> Path | None:
    """The local checkpoint for a pretrained name, downloading and converting it the first time.

    Args:
        name (str): A name of `ZOO` such as 'deim-s.pt'; anything else gives None.

    Returns:
        (Path | None): `name` itself when such a file exists, else the cached file in the weights directory.

    Raises:
        WeightsUnavailableError: When the file is not cached and cannot be downloaded now.
        BadDownloadError: When the download is not a complete checkpoint (nothing is cached).
    """
    release = ZOO.get(name)
    if release is None:
        return None
    if Path(name).is_file():
        return Path(name)
    cached = weights_dir() / name
    if cached.is_file():
        return cached
    provided = weights_dir() / release.file  # the official file, put there by hand as the offline message says
    repository = weights_dir() / Path(release.file).stem / HF_WEIGHTS  # or DEIMv2's whole Hugging Face download
    provided = repository if release.file.endswith(".safetensors") and repository.is_file() else provided
    if provided.is_file():
        check_download(provided, f"'{provided}'", release)
        return build_cached(name, release, provided, f"file://{provided}")
    with tempfile.TemporaryDirectory(prefix="deim-download-") as folder:
        official, url = download(release, Path(folder))
        return build_cached(name, release, official, url)
