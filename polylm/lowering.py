"""Framework-free recipes a backend follows when lowering the IR: which canonical tensors it fuses, and the
additive attention bias it derives from a `Step`'s positions and mask.

Written once in numpy so backends agree on them by construction; a backend only converts the results.
"""

from __future__ import annotations

import numpy as np

from .ir import ALiBi, Attention, MLP
from .positions import alibi_slopes

#: The most negative finite value of each compute dtype: the bias of a key a query must not see. Finite, so
#: that a query that sees no key at all (a padding slot) gets a uniform softmax instead of NaN.
LOWEST: dict[str, float] = {
    "float32": float(np.finfo(np.float32).min),
    "bfloat16": -3.3895313892515355e38,
    "float16": float(np.finfo(np.float16).min),
}


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


def attention_bias(attention: Attention, positions: np.ndarray, mask: np.ndarray, past: int, dtype: str,
                   keys: int | None = None) -> np.ndarray:
    """Additive attention bias, float32 [batch, 1 or heads, new, keys], for the new slots of a step.

    A query at slot s sees key slots ≤ s whose `mask` is set; those get the ALiBi bias slope × (key position −
    query position) (0 without ALiBi), the others `LOWEST[dtype]`. `positions` and `mask` are the step's
    [batch, past + new]; `keys` (≥ past + new) pads the key axis with slots no query sees, so a backend can
    attend over a fixed-size window of its cache. Every value is exactly representable in `dtype`'s range.
    """
    batch, total = mask.shape
    keys = total if keys is None else keys
    new = total - past
    filled = np.zeros((batch, keys), dtype=bool)
    filled[:, :total] = mask
    causal = np.arange(keys)[None, :] <= (past + np.arange(new))[:, None]
    visible = (filled[:, None, :] & causal[None])[:, None]
    if isinstance(attention.position, ALiBi):
        key_positions = np.zeros((batch, keys), dtype=np.int64)
        key_positions[:, :total] = positions
        distance = (key_positions[:, None, :] - key_positions[:, past:total, None]).astype(np.float32)
        bias = alibi_slopes(attention)[None, :, None, None] * distance[:, None]
    else:
        bias = np.float32(0.0)
    return np.where(visible, bias, np.float32(LOWEST[dtype])).astype(np.float32)
