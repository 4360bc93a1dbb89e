"""The authors' parameter names: official checkpoints group keys as `backbone.stem.*`, `backbone.stages.<i>.*`,
`encoder.*` and `decoder.*`, and our modules keep the official names below those prefixes, so one prefix per YAML
layer translates between the two. Used by the converter and by the optimizer's per-size parameter groups, whose
official rules are regexes on these names.
"""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from deim_ultra.nn.decoder import DFINEDecoder
from deim_ultra.nn.encoder import HybridEncoder
from deim_ultra.nn.hgnetv2 import HGStage, HGStem
from deim_ultra.nn.lite_encoder import LiteEncoder
from deim_ultra.nn.spatial_adapter import DINOv3Adapter


def official_prefixes(model: nn.Module) -> dict[str, str]:
    """Map each official key prefix to the prefix of the layer of `model` that holds those weights."""
    prefixes = {}
    stages = 0
    for m in model.model:
        if isinstance(m, DINOv3Adapter):  # DEIMv2's ViT sizes: the whole backbone is one layer
            prefixes["backbone."] = f"model.{m.i}."
        elif isinstance(m, HGStem):
            prefixes["backbone.stem."] = f"model.{m.i}."
        elif isinstance(m, HGStage):
            prefixes[f"backbone.stages.{stages}."] = f"model.{m.i}."
            stages += 1
        elif isinstance(m, (HybridEncoder, LiteEncoder)):
            prefixes["encoder."] = f"model.{m.i}."
        elif isinstance(m, DFINEDecoder):
            prefixes["decoder."] = f"model.{m.i}."
    return prefixes


def rename_official_key(key: str, prefixes: dict[str, str]) -> str | None:
    """Our name for official `key`, or None when no official prefix matches it."""
    prefix = next((p for p in prefixes if key.startswith(p)), None)
    return None if prefix is None else prefixes[prefix] + key[len(prefix) :]


def official_namer(model: nn.Module) -> Callable[[str], str]:
    """A function from `model`'s parameter names to the official ones (names outside the mapped layers unchanged)."""
    ours_to_official = {v: k for k, v in official_prefixes(model).items()}
    return lambda name: rename_official_key(name, ours_to_official) or name
