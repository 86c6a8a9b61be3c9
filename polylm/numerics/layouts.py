"""Where each canonical tensor's rows go when a backend fuses them: the layer's [q; k; v] projection (a fused
tensor's per-group interleaving undone) and its [gate; up] projection, as recipes every backend follows."""

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

    A fused tensor holds rows [kv_heads, group + 2, head_dim] (each group's query heads, its key, its value;
    `polylm.ir.Attention`); the runtime wants every query head, then every key, then every value.
    """
    if attention.qkv_layout == "separate":
        return None
    kv_heads, group = attention.num_kv_heads, attention.num_heads // attention.num_kv_heads
    rows = np.arange(kv_heads * (group + 2) * attention.head_dim).reshape(kv_heads, group + 2, attention.head_dim)
    return np.concatenate([rows[:, :group].reshape(-1), rows[:, group].reshape(-1), rows[:, group + 1].reshape(-1)])


def up_parts(mlp: MLP, module: str, param: str) -> tuple[str, ...]:
    """Canonical tensors whose row-wise concatenation is the [gate; up] (gated) or up `param` of the MLP at
    canonical `module` ("layers.3.mlp", "layers.3.mlp.shared"; "layers.3.mlp.experts": then each expert's rows,
    [experts, rows, …], concatenate along the rows)."""
    names = ("gate", "up") if mlp.gated else ("up",)
    return tuple(f"{module}.{name}.{param}" for name in names)
