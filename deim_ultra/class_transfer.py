"""Fine-tuning onto other classes: which rows of a checkpoint's class-dependent tensors each new class takes.

A DEIM model has several tensors with one row per class: the encoder's score head, every decoder layer's score head
and the denoising label embedding (nc + 1 rows, the last one padding). When a checkpoint is fine-tuned on a dataset
whose class names overlap its own (COCO weights on `[dog, person, tree]`), each class whose name the checkpoint knows
takes that class's rows (dog <- COCO row 16, person <- row 0) and the others keep their fresh initialisation.
Names match case-insensitively, surrounding spaces ignored, as in Ultralytics' own `_remap_cls_by_names`.
"""

from __future__ import annotations

from copy import deepcopy

import torch
from torch import nn

from deim_ultra.messages import listing


def norm_name(name: object) -> str:
    """A class name as names are compared: lower case, surrounding spaces stripped."""
    return str(name).strip().lower()


def is_placeholder(names: dict | None) -> bool:
    """Whether `names` are the `{0: "0", 1: "1", ...}` a model built from a YAML starts with (nothing to match on)."""
    return not names or all(str(k) == str(v) for k, v in names.items())


def source_rows(source: dict[int, str], target: dict[int, str]) -> torch.Tensor:
    """(len(target),) long tensor: for each target class in index order, the source class of the same name, or -1."""
    lookup = {norm_name(v): k for k, v in source.items()}
    return torch.tensor([lookup.get(norm_name(target[k]), -1) for k in range(len(target))], dtype=torch.long)


def class_dependent_keys(model: nn.Module) -> dict[str, int]:
    """The keys of `model.state_dict()` whose first dimension grows with the class count, each with that dimension.

    Found by building the same YAML with one more class on the meta device (no memory, no initialisation cost) and
    comparing shapes, so every tensor sized by `nc` is found, the padding row of the denoising embedding included.
    """
    cfg = deepcopy(model.yaml)
    cfg["nc"] += 1
    with torch.device("meta"):
        wider = type(model)(cfg, ch=cfg.get("channels", 3), verbose=False).state_dict()
    return {k: v.shape[0] for k, v in model.state_dict().items() if wider[k].shape != v.shape}


def copy_class_rows(
    target: dict[str, torch.Tensor], source: dict[str, torch.Tensor], keys: dict[str, int], rows: torch.Tensor
) -> list[str]:
    """Copy, for every key in `keys`, source row `rows[i]` into target row i wherever `rows[i] >= 0`, in place.

    Args:
        target (dict): The fine-tuned model's state dict (its tensors are written to).
        source (dict): The checkpoint's state dict.
        keys (dict): Class-dependent keys and their first dimension in `target` (nc, or nc + 1 with a padding row,
            which is left as the target initialised it).
        rows (torch.Tensor): (nc,) source class per target class, -1 for a new class.

    Returns:
        (list[str]): The keys that were copied from; keys the checkpoint lacks or holds at another width are skipped.
    """
    matched = rows >= 0
    copied = []
    for key in keys:
        if key not in source or source[key].shape[1:] != target[key].shape[1:]:
            continue
        target[key][: len(rows)][matched] = source[key][rows[matched]].to(target[key].dtype)
        copied.append(key)
    return copied


def describe_transfer(source: dict[int, str], target: dict[int, str], rows: torch.Tensor) -> str:
    """One log line: which target classes took which checkpoint rows by name, and which start fresh."""
    taken = [f"{target[i]} <- {int(r)}" for i, r in enumerate(rows) if r >= 0]
    fresh = [str(target[i]) for i, r in enumerate(rows) if r < 0]
    line = f"Class rows transferred by name from the checkpoint's {len(source)} classes: "
    line += listing(taken, 20) if taken else "none (no class name in common)"
    if fresh:
        line += f"; new classes, fresh rows: {listing(fresh, 20)}"
    return line
