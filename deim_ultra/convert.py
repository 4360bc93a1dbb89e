"""Convert the authors' DEIM / D-FINE checkpoints (`.pth`) and DEIMv2 checkpoints (`.pth`, or the Hugging Face layout:
a folder with `model.safetensors`, or that file alone) into deim-ultra models.

Official state dicts group keys as `backbone.stem.*`, `backbone.stages.<i>.*`, `encoder.*` and `decoder.*`. Our
modules keep the official names below those prefixes, so conversion is a prefix replacement: each official prefix
becomes the `model.<layer index>.` of the YAML layer of the matching type.
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn
from ultralytics import __version__
from ultralytics.utils import LOGGER, ROOT, YAML

from deim_ultra.cfg import DEFAULT_MODEL
from deim_ultra.checkpoints.read import read_checkpoint
from deim_ultra.checkpoints.zoo import HF_WEIGHTS, class_names, release_for_file
from deim_ultra.class_transfer import class_dependent_keys
from deim_ultra.messages import listing
from deim_ultra.model import DEIM
from deim_ultra.nn.tasks import DEIMDetectionModel
from deim_ultra.official_names import official_prefixes, rename_official_key

# Present only when a checkpoint was saved with denoising on; the model initialises it itself otherwise.
TRAINING_ONLY_KEYS = ("decoder.denoising_class_embed.weight",)
# Buffers computed from the decoder's eval_spatial_size: rebuilt by the model for its YAML's size, never loaded, so a
# checkpoint trained at another size (e.g. the authors' 320 px configs) converts too.
DERIVED_KEYS = ("decoder.anchors", "decoder.valid_mask")
# The model YAMLs of each family, tried in order when a checkpoint's size must be found from its tensors.
FAMILY_SIZES = {"deim": "nsmlx", "dfine": "nsmlx", "deimv2": ("atto", "femto", "pico", "n", "s", "m", "l", "x")}


def load_official_state_dict(src: str | Path | dict) -> dict[str, torch.Tensor]:
    """Return the model state dict of an official checkpoint, preferring its EMA weights.

    Args:
        src (str | Path | dict): A `.pth` path (loaded with `weights_only=True`), a `.safetensors` file or a Hugging
            Face folder holding `model.safetensors` (DEIMv2's releases), a checkpoint dict holding `model` and/or
            `ema.module`, or a raw state dict.
    """
    if isinstance(src, (str, Path)) and Path(src).is_dir():
        if not (Path(src) / HF_WEIGHTS).is_file():
            raise FileNotFoundError(
                f"'{src}' is a folder without {HF_WEIGHTS} (a Hugging Face DEIMv2 repository has one)"
            )
        src = Path(src) / HF_WEIGHTS
    if isinstance(src, (str, Path)) and Path(src).suffix == ".safetensors":
        return load_file(src)
    ckpt = read_checkpoint(src) if isinstance(src, (str, Path)) else src
    if "ema" in ckpt:
        return ckpt["ema"]["module"]
    if "model" in ckpt:
        return ckpt["model"]
    if not all(isinstance(v, torch.Tensor) for v in ckpt.values()):
        raise ValueError(f"'{src}' holds neither 'model' nor 'ema' weights nor a state dict; keys: {list(ckpt)[:8]}")
    return ckpt


def map_official_keys(state: dict[str, torch.Tensor], prefixes: dict[str, str]) -> tuple[dict, list[str]]:
    """Rename official keys by prefix; return the renamed dict and the keys no prefix matched."""
    mapped, unmatched = {}, []
    for key, value in state.items():
        name = rename_official_key(key, prefixes)
        if name is None:
            unmatched.append(key)
        else:
            mapped[name] = value
    return mapped, unmatched


def tied_keys(model: nn.Module) -> dict[str, set[str]]:
    """For each state-dict key of `model` whose tensor other keys share (DEIMv2's shared box head), those other keys.

    `safetensors` stores a shared tensor under one of its names only, so a key missing from a file is not missing
    when a key it shares its tensor with was loaded.
    """
    by_storage: dict[int, set[str]] = {}
    for key, tensor in model.state_dict(keep_vars=True).items():
        by_storage.setdefault(id(tensor), set()).add(key)
    return {key: group - {key} for group in by_storage.values() if len(group) > 1 for key in group}


def load_official_weights(
    model: DEIMDetectionModel, state: dict[str, torch.Tensor], source: str = "state dict"
) -> None:
    """Load an official state dict into `model` strictly, naming every missing or unexpected key.

    Raises:
        ValueError: When keys are missing (other than training-only ones), unexpected, or of the wrong shape.
    """
    prefixes = official_prefixes(model)
    derived = {k: state[k] for k in DERIVED_KEYS if k in state}
    mapped, unmatched = map_official_keys({k: v for k, v in state.items() if k not in derived}, prefixes)
    training_only = {rename_official_key(k, prefixes) for k in TRAINING_ONLY_KEYS}
    rebuilt = {rename_official_key(k, prefixes) for k in DERIVED_KEYS}
    official_name = {v: k for k, v in prefixes.items()}  # report keys as the checkpoint names them
    ours = model.state_dict()
    resized = [k for k, v in mapped.items() if k in ours and ours[k].shape != v.shape]
    if resized:  # load_state_dict would list every one of them, hundreds of lines for another size
        key = resized[0]
        raise ValueError(
            f"{source} does not match {model.yaml.get('yaml_file', 'the model YAML')} (is it another size?): "
            f"{len(resized)} tensors differ in shape, e.g. '{rename_official_key(key, official_name)}' "
            f"{tuple(mapped[key].shape)} against {tuple(ours[key].shape)}"
        )
    missing, unexpected = model.load_state_dict(mapped, strict=False)
    tied = tied_keys(model)
    loaded_through_tie = {k for k in missing if tied.get(k, set()) & set(mapped)}
    required = [
        rename_official_key(k, official_name) or k
        for k in missing
        if k not in training_only | rebuilt | loaded_through_tie
    ]
    unexpected = unmatched + [rename_official_key(k, official_name) for k in unexpected]
    if required or unexpected:
        raise ValueError(
            f"{source} does not match {model.yaml.get('yaml_file', 'the model YAML')} (is it another size?).\n"
            f"Missing keys ({len(required)}): {listing(required)}\nUnexpected keys ({len(unexpected)}): "
            f"{listing(unexpected)}"
        )
    for key in sorted(set(missing) & training_only):
        LOGGER.info(f"{source}: '{rename_official_key(key, official_name)}' absent (training-only), initialised anew")
    for key, value in derived.items():
        buffer = ours[rename_official_key(key, prefixes)]
        # the authors mark off-image anchors +inf, ours INVALID_ANCHOR_LOGIT: only a size change is worth a line
        if value.shape != buffer.shape:
            LOGGER.info(
                f"{source}: '{key}' {tuple(value.shape)} was cached for another input size; rebuilt as "
                f"{tuple(buffer.shape)} for this YAML's eval_spatial_size"
            )


def fits_shapes(state: dict[str, torch.Tensor], model: DEIMDetectionModel) -> bool:
    """Whether an official state dict has exactly `model`'s tensors and shapes, at any class count (the class rows
    of the class-dependent tensors are not compared; derived buffers and training-only keys may be absent)."""
    prefixes = official_prefixes(model)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    per_class = class_dependent_keys(model)
    skipped = {rename_official_key(k, prefixes) for k in (*DERIVED_KEYS, *TRAINING_ONLY_KEYS)}
    theirs = {rename_official_key(k, prefixes): v.shape for k, v in state.items() if k not in DERIVED_KEYS}
    tied = tied_keys(model)
    absent = {k for k in set(ours) - skipped - set(theirs) if not tied.get(k, set()) & set(theirs)}
    if None in theirs or absent or set(theirs) - set(ours):
        return False
    # a class-dependent tensor's first dimension is the checkpoint's class count: compare the rest
    return all(ours[k][1:] == shape[1:] if k in per_class else ours[k] == shape for k, shape in theirs.items())


def is_dfine_file(path: str | Path) -> bool:
    """Whether a checkpoint's file name says D-FINE (the authors name theirs `dfine_*.pth`): same tensors as DEIM's,
    other activations, so only the name tells."""
    return Path(path).name.lower().startswith("dfine")


def official_family(state: dict[str, torch.Tensor], path: str | Path | None = None) -> str:
    """'dfine' for a file named like the authors' D-FINE files, 'deimv2' for DEIMv2's decoder layers (SwiGLU FFN),
    else 'deim'."""
    if path is not None and is_dfine_file(path):
        return "dfine"
    return "deimv2" if any(".swish_ffn." in key for key in state) else "deim"


def official_yaml(state: dict[str, torch.Tensor], family: str = "deim") -> str:
    """The shipped YAML of `family` ('deim', 'dfine' or 'deimv2') whose layers fit an official state dict.

    DEIM and D-FINE checkpoints of one size have the same tensors (they differ in activations), so the family must
    come from elsewhere (the file name). Candidates are built on the meta device: no memory, no initialisation.

    Raises:
        ValueError: When no size fits, naming the sizes tried.
    """
    sizes = FAMILY_SIZES[family]
    for size in sizes:
        with torch.device("meta"):
            candidate = DEIMDetectionModel(f"{family}-{size}.yaml", verbose=False)
        if fits_shapes(state, candidate):
            return f"{family}-{size}.yaml"
    raise ValueError(f"no {family}-<{'|'.join(sizes)}>.yaml fits this checkpoint's tensors")


def convert_official(
    src: str | Path | dict, model: str | Path = DEFAULT_MODEL, names: dict[int, str] | None = None
) -> DEIM:
    """Build a DEIM model from an official DEIM / D-FINE checkpoint.

    Args:
        src (str | Path | dict): Official `.pth` path, checkpoint dict (`model` or `ema.module`), or state dict.
        model (str | Path): Model YAML of the checkpoint's size, e.g. 'deim-s.yaml' (a D-FINE checkpoint needs
            'dfine-s.yaml', whose decoder uses ReLU).
        names (dict, optional): Class names of the checkpoint's rows; COCO's when it has 80 and none are given.

    Returns:
        (DEIM): The model with the official weights, class count taken from the checkpoint.
    """
    state = load_official_state_dict(src)
    if isinstance(src, (str, Path)) and is_dfine_file(src) and "deim-" in Path(str(model)).name:
        LOGGER.warning(
            f"'{src}' looks like a D-FINE checkpoint but {model} has DEIM's SiLU decoder: the weights load, outputs "
            f"are wrong. Fix: {Path(str(model)).name.replace('deim-', 'dfine-')}"
        )
    deim = DEIM(model)
    nc = state["decoder.enc_score_head.weight"].shape[0] if "decoder.enc_score_head.weight" in state else None
    if nc and nc != deim.model.yaml["nc"]:
        deim.model = DEIMDetectionModel(deim.model.yaml, nc=nc, verbose=False)
        deim.model.args, deim.model.task = deim.overrides, "detect"
    source = f"'{src}'" if isinstance(src, (str, Path)) else "state dict"
    load_official_weights(deim.model, state, source)
    if any(m.type == "DINOv3Adapter" for m in deim.model.model):
        LOGGER.warning(
            f"{source}: DEIMv2's ViT weights derive from Meta's DINOv3 (DINOv3 License Agreement) and carry no licence "
            "of their own (DEIMv2 issue #167): check both before commercial use"
        )
    if names is not None:
        deim.model.names = dict(names)
    elif deim.model.yaml["nc"] == 80:
        deim.model.names = YAML.load(ROOT / "cfg" / "datasets" / "coco.yaml")["names"]
    deim.model.eval()
    return deim


def convert_official_auto(path: str | Path) -> DEIM:
    """Convert an official `.pth` with the YAML it calls for: its release's (by file name, with the release's class
    names), else the size whose tensor shapes fit, as D-FINE when the name starts with 'dfine', else as DEIM."""
    state = load_official_state_dict(path)
    name = Path(path).name
    release = release_for_file(name)
    yaml = release.yaml if release else official_yaml(state, official_family(state, name))
    names = class_names(release.dataset, state["decoder.enc_score_head.weight"].shape[0]) if release else None
    LOGGER.info(
        f"Converting official checkpoint '{path}' with {yaml} (chosen by "
        f"{'its release name' if release else 'tensor shapes'}; to choose the YAML: deim convert weights={name} "
        "model=<yaml>)"
    )
    return convert_official(state, yaml, names=names)


def convert_official_file(weights: str | Path, model: str | Path | None = None) -> Path:
    """Convert an official `.pth` file and save it in the current directory as `<name>.pt` for `DEIM()`; without
    `model`, the YAML is chosen as `DEIM("<file>.pth")` chooses it (`convert_official_auto`)."""
    if weights is None:
        raise ValueError("Give the official checkpoint: deim convert weights=path/to/official.pth model=deim-s.yaml")
    out = Path(Path(weights).stem + ".pt")
    deim = convert_official(weights, model) if model else convert_official_auto(weights)
    model = deim.model.yaml.get("yaml_file", model)
    # Ultralytics' Model.save stores half precision; keep float32 so the file reproduces the authors' numbers.
    torch.save({"model": deim.model, "train_args": {}, "date": datetime.now().isoformat(), "version": __version__}, out)
    LOGGER.info(f"Converted '{weights}' ({model}) -> '{out.resolve()}'; load it with DEIM('{out}')")
    return out
