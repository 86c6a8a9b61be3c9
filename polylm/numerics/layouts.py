"""Where each canonical tensor's rows go when a backend fuses them: the layer's [q; k; v] projection (BLOOM's
per-head interleaving undone) and its [gate; up] projection, as recipes every backend follows."""

from __future__ import annotations

import numpy as np

from ..ir import MLP, Attention


def qkv_parts(attention: Attention, layer: str, param: str) -> tuple[str, ...]:
    """Canonical tensors whose row-wise concatenation (then `qkv_row_order`) is the layer's [q; k; v] `param`
    ("weight" or "bias"); `layer` is the canonical prefix, e.g. "layers.3"."""
    if attention.qkv_layout == "separate":
        return tuple(f"{layer}.attn.{name}.{param}" for name in "qkv")
    return (f"{layer}.attn.qkv.{param}",)


def qkv_row_order(attention: Attention) -> np.ndarray | None:
    """Row permutation taking the concatenated `qkv_parts` to [q; k; v] rows, or None when already in order.

    BLOOM's fused tensor holds rows [heads, 3, head_dim]; the runtime wants [3, heads, head_dim].
    """
    if attention.qkv_layout == "separate":
        return None
    heads, head_dim = attention.num_heads, attention.head_dim
    return np.arange(3 * heads * head_dim).reshape(heads, 3, head_dim).transpose(1, 0, 2).reshape(-1)


def up_parts(mlp: MLP, layer: str, param: str) -> tuple[str, ...]:
    """Canonical tensors whose row-wise concatenation is the layer's [gate; up] (gated) or up `param`."""
    names = ("gate", "up") if mlp.gated else ("up",)
    return tuple(f"{layer}.mlp.{name}.{param}" for name in names)
