"""Deterministic weights for parity fixtures, generated from each state-dict key's name.

A parity fixture cannot hold a full state dict (it would be megabytes), so it holds the list of keys, a *kind* per
generated key, the entries that are kept verbatim (buffers such as anchors, non-trainable parameters, counters) and a
map of aliased (tied) keys. `fixture_state` turns those back into the exact state dict the reference code ran with.

Each generated tensor depends only on its key, its shape and its kind: a fresh ``torch.Generator`` seeded with
``zlib.crc32(key.encode())`` draws it in float32 on the CPU, so the result does not depend on the order of the keys.

Kinds (``fan_in = numel // shape[0]``):

- ``"weight"``: ``randn * fan_in ** -0.5`` (linear / conv / embedding weights, tokens with >= 2 dims)
- ``"conv"``: ``randn * (2 / fan_in) ** 0.5`` (He gain; the backbone's conv weights, so that the signal survives
  the ReLU/GELU + eval-mode BatchNorm stack with generated running statistics)
- ``"norm"``: ``1 + 0.1 * randn`` (1-D norm weights: BatchNorm, LayerNorm, RMSNorm ``scale``; LayerScale gammas; the
  ``scale`` of a learnable affine block)
- ``"bias"``: ``0.02 * randn`` (biases, norm biases, 1-D shifts)
- ``"running_mean"``: ``0.1 * randn``
- ``"running_var"``: ``0.5 + rand`` (uniform in [0.5, 1.5))
"""

from __future__ import annotations

import zlib
from collections.abc import Iterable, Mapping

import torch

KINDS = ("weight", "conv", "norm", "bias", "running_mean", "running_var")


def fixture_tensor(key: str, shape: tuple[int, ...] | torch.Size, kind: str) -> torch.Tensor:
    """The float32 tensor of `shape` that `kind` generates for `key` (seeded by ``zlib.crc32(key)``)."""
    shape = tuple(int(s) for s in shape)
    g = torch.Generator().manual_seed(zlib.crc32(key.encode()))
    if kind in ("weight", "conv"):
        numel = 1
        for s in shape:
            numel *= s
        fan_in = max(numel // shape[0], 1) if shape else 1
        gain = 2.0 if kind == "conv" else 1.0
        return torch.randn(shape, generator=g, dtype=torch.float32) * (gain / fan_in) ** 0.5
    if kind == "norm":
        return 1.0 + 0.1 * torch.randn(shape, generator=g, dtype=torch.float32)
    if kind == "bias":
        return 0.02 * torch.randn(shape, generator=g, dtype=torch.float32)
    if kind == "running_mean":
        return 0.1 * torch.randn(shape, generator=g, dtype=torch.float32)
    if kind == "running_var":
        return 0.5 + torch.rand(shape, generator=g, dtype=torch.float32)
    raise ValueError(f"unknown kind {kind!r} for {key!r} (expected one of {KINDS})")


def fixture_state(
    shapes: Mapping[str, tuple[int, ...]] | Iterable[tuple[str, tuple[int, ...]]],
    kinds: Mapping[str, str],
    kept: Mapping[str, torch.Tensor] | None = None,
    aliases: Mapping[str, str] | None = None,
) -> dict[str, torch.Tensor]:
    """Rebuild a state dict: generated tensors for keys in `kinds`, `kept` tensors as stored, aliases shared.

    Args:
        shapes: every key of the state dict with its shape, in state-dict order (a dict, or a list of
            ``(key, shape)`` pairs as a fixture stores it under ``keys``).
        kinds: ``{key: kind}`` for each generated (canonical) key, see the module docstring.
        kept: ``{key: tensor}`` for entries copied verbatim (buffers, non-trainable parameters, counters).
        aliases: ``{key: canonical_key}`` for tied entries; the key gets the very same tensor object as its
            canonical key (which must be generated or kept).

    Returns:
        ``{key: tensor}`` in the order of `shapes`. Raises ``KeyError`` when a key is neither generated, kept nor
        aliased, and ``ValueError`` when a kept tensor's shape does not match.
    """
    items = list(shapes.items()) if isinstance(shapes, Mapping) else [(k, s) for k, s in shapes]
    kept = dict(kept or {})
    aliases = dict(aliases or {})
    made: dict[str, torch.Tensor] = {}

    def get(key: str, shape: tuple[int, ...]) -> torch.Tensor:
        if key in made:
            return made[key]
        if key in aliases:
            t = get(aliases[key], shape)
        elif key in kinds:
            t = fixture_tensor(key, shape, kinds[key])
        elif key in kept:
            t = kept[key]
            if tuple(t.shape) != tuple(shape):
                raise ValueError(f"kept {key!r} has shape {tuple(t.shape)}, expected {tuple(shape)}")
        else:
            raise KeyError(f"{key!r} is neither generated (kinds), kept nor aliased")
        made[key] = t
        return t

    shape_of = dict(items)
    for key, canon in aliases.items():  # canonical keys may sit after their aliases in the key order
        if canon in shape_of and key in shape_of:
            get(canon, tuple(shape_of[canon]))
    return {key: get(key, tuple(shape)) for key, shape in items}
