"""`deim` command line: Ultralytics' `yolo` key=value syntax for DEIM models.

deim train model=deim-n.yaml data=deepforest.yaml epochs=72 imgsz=640
deim val model=runs/detect/train/weights/best.pt
deim predict model=best.pt source=image.jpg
deim track model=best.pt source=video.mp4
deim export model=best.pt format=onnx
deim convert weights=deim_dfine_hgnetv2_s_coco.pth model=deim-s.yaml

Ultralytics' special commands (`deim checks`, `version`, `settings`, `cfg`, `solutions`, ...) are Ultralytics' own
(`ultralytics.cfg.entrypoint`), and arguments are cleaned up as `yolo` cleans them: leading `--` and trailing commas
dropped, the optional task word (`deim detect train ...`), bare boolean flags (`save`, `agnostic_nms`).
"""

from __future__ import annotations

import logging
import sys

import ultralytics
from ultralytics.cfg import TASKS, check_dict_alignment, entrypoint, merge_equals_args, parse_key_value_pair
from ultralytics.utils import ASSETS, DEFAULT_CFG_DICT, LOGGER

from deim_ultra.cfg import CFG_DIR, DEFAULT_MODEL, DEIM_CFG_DICT, MODE_SETTINGS
from deim_ultra.checkpoints.zoo import ZOO
from deim_ultra.data.audit import DatasetError
from deim_ultra.nonfinite import DivergedError

MODES = ("train", "val", "predict", "track", "export")
# Ultralytics' special commands, run by its own entrypoint (ultralytics/cfg/__init__.py, `special` in `entrypoint`).
ULTRALYTICS_COMMANDS = ("checks", "version", "settings", "cfg", "copy-cfg", "solutions", "login", "logout")
BARE_TRUE = {"half", "int8", "end2end", "nms"}  # flags `yolo` sets True when given bare, though their default is None
CONVERT_KEYS = {"weights": None, "model": None}
HELP = f"""Usage: deim MODE key=value ...

  MODE     one of {", ".join(MODES)}, convert, help
  keys     any Ultralytics setting (see `yolo cfg`) plus the DEIM settings below

  deim train model=deim-n.yaml data=deepforest.yaml epochs=72 imgsz=640
  deim train model=deim-s.pt data=path/to/coco   # COCO json: COCO 2017 or Roboflow folder, or a YAML naming json
  deim val model=runs/detect/train/weights/best.pt
  deim predict model=best.pt source=image.jpg
  deim track model=best.pt source=video.mp4 tracker=bytetrack.yaml
  deim export model=best.pt format=onnx
  deim convert weights=official.pth model=deim-s.yaml   # writes official.pt (model= optional: found from the file)
  deim checks | version | settings | cfg | solutions ...   # Ultralytics' own commands

Pretrained names (downloaded and converted once; README "Pretrained detectors by name"):
  {", ".join(ZOO)}

DEIM settings ({CFG_DIR / "default.yaml"}):
"""


def check_keys(mode: str, overrides: dict) -> None:
    """Raise SyntaxError for a DEIM setting that `mode` does not read, or a key no mode knows (Ultralytics' check,
    with its "similar arguments" hint; the `yolo` help it logs first is held back, `deim help` is ours)."""
    for key in overrides:
        readers = [m for m, keys in MODE_SETTINGS.items() if key in keys]
        if mode != "convert" and readers and mode not in readers:
            raise SyntaxError(f"'{key}' is a DEIM {' / '.join(readers)} setting: `deim {mode}` does not use it")
    level = LOGGER.level
    LOGGER.setLevel(logging.WARNING)
    try:
        check_dict_alignment(CONVERT_KEYS if mode == "convert" else DEIM_CFG_DICT, overrides)
    except SyntaxError as e:
        raise SyntaxError(f"{str(e).strip()}\nSee `deim help` for the settings.") from None
    finally:
        LOGGER.setLevel(level)


def clean(argument: str) -> str:
    """An argument as `yolo` reads it: without leading `--` or a trailing comma (Ultralytics' `entrypoint` does this
    inline, so it is repeated here)."""
    stripped = argument.removeprefix("--").removesuffix(",")
    if stripped != argument:
        LOGGER.warning(f"argument '{argument}' does not need leading dashes or a trailing comma; read as '{stripped}'")
    return stripped


def parse(argv: list[str]) -> tuple[str, dict]:
    """Split `[TASK] MODE key=value ...` into the mode and a dict of typed values, validated like `yolo` does.

    A bare flag whose default is a boolean (`save`, `agnostic_nms`) or one of BARE_TRUE means `flag=True`, as for
    `yolo`; the mode and the task word (only `detect`) may stand anywhere, as for `yolo`.

    Raises:
        SyntaxError: For an unknown key (with Ultralytics' "similar arguments" hint), a DEIM setting of another mode,
            another task, or a bare word that is no flag.
    """
    words = [clean(a) for a in merge_equals_args(argv)]
    bare = [w for w in words if "=" not in w]
    for task in (w for w in bare if w in TASKS):
        if task != "detect":
            raise SyntaxError(f"task '{task}': DEIM models detect; drop the task word or write 'detect'")
    # As for `yolo`, the mode and the task word may stand anywhere; a first bare word that is neither is reported as
    # an unknown mode.
    mode = next((w for w in bare if w in (*MODES, "convert")), next((w for w in bare if w not in TASKS), ""))
    overrides = {}
    for word in words:
        if "=" in word:
            key, value = parse_key_value_pair(word)
            overrides[key] = value
        elif word == mode or word in TASKS:
            continue
        elif word in BARE_TRUE or isinstance({**DEFAULT_CFG_DICT, **DEIM_CFG_DICT}.get(word), bool):
            overrides[word] = True
        else:
            raise SyntaxError(f"'{word}' is missing '=': arguments are key=value pairs, e.g. epochs=10")
    check_keys(mode, overrides)
    return mode, overrides


def run(mode: str, overrides: dict) -> None:
    """Carry out one command."""
    if mode == "convert":
        from deim_ultra.convert import convert_official_file

        convert_official_file(**{**CONVERT_KEYS, **overrides})
        return
    from deim_ultra.model import DEIM

    model = DEIM(overrides.pop("model", DEFAULT_MODEL))
    if mode in {"predict", "track"}:  # as `yolo` does: Ultralytics saves results by default only for its own command
        overrides.setdefault("save", True)
    if mode in {"predict", "track"} and "source" not in overrides:
        overrides["source"] = ASSETS
        LOGGER.warning(f"'source' is missing; predicting on the sample images in {ASSETS}")
    getattr(model, mode)(**overrides)


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `deim` console script; returns the process exit status."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] in {"help", "-h", "--help"}:
        print(HELP + (CFG_DIR / "default.yaml").read_text())
        return 0
    if argv[0].lstrip("-") == "version":
        from deim_ultra import __version__

        print(f"deim-ultra {__version__}, ultralytics {ultralytics.__version__}")
        return 0
    if argv[0].lstrip("-") in ULTRALYTICS_COMMANDS:
        entrypoint(" ".join(["yolo", argv[0].lstrip("-"), *argv[1:]]))
        if argv[0].lstrip("-") == "cfg":  # Ultralytics prints its own settings; the DEIM ones follow
            print(f"\n# DEIM settings ({CFG_DIR / 'default.yaml'})\n{(CFG_DIR / 'default.yaml').read_text()}")
        return 0
    try:
        mode, overrides = parse(argv)
    except SyntaxError as e:
        LOGGER.error(str(e))
        return 2
    if mode not in (*MODES, "convert"):
        LOGGER.error(
            f"Unknown mode '{mode}'. Valid modes: {', '.join(MODES)}, convert, help, or Ultralytics' "
            f"{', '.join(ULTRALYTICS_COMMANDS)}"
        )
        return 2
    try:
        run(mode, overrides)
    except (FileNotFoundError, TypeError, ValueError, DatasetError, DivergedError) as e:
        LOGGER.error(f"deim {mode} failed: {type(e).__name__}: {e}")
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
