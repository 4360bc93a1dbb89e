"""Activation names accepted in model YAMLs ("silu" for DEIM, "relu" for D-FINE's decoder, "gelu" in AIFI)."""

from __future__ import annotations

from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {"silu": nn.SiLU, "relu": nn.ReLU, "gelu": nn.GELU}


def make_act(act: str | None) -> nn.Module:
    """The activation module named `act`; identity for None."""
    return nn.Identity() if act is None else ACTIVATIONS[act]()
