"""The attention visibility rule as data: the additive bias a backend adds to a step's attention logits,
derived from the step's positions and mask (causal, padding, ALiBi). Written once in numpy so backends agree."""

from __future__ import annotations

import numpy as np

from ..ir import ALiBi, Attention
from .positions import alibi_slopes

#: The most negative finite value of each compute dtype: the bias of a key a query must not see. Finite, so
#: that a query that sees no key at all (a padding slot) gets a uniform softmax instead of NaN.
LOWEST: dict[str, float] = {
    "float32": float(np.finfo(np.float32).min),
    "bfloat16": -3.3895313892515355e38,
    "float16": float(np.finfo(np.float16).min),
}


def attention_bias(attention: Attention, positions: np.ndarray, mask: np.ndarray, past: int, dtype: str,
                   keys: int | None = None, heads: range | None = None) -> np.ndarray:
    """Additive attention bias, float32 [batch, 1 or heads, new, keys], for the new slots of a step.

    A query at slot s sees key slots ≤ s whose `mask` is set; those get the ALiBi bias slope × (key position −
    query position) (0 without ALiBi), the others `LOWEST[dtype]`. `positions` and `mask` are the step's
    [batch, past + new]; `keys` (≥ past + new) pads the key axis with slots no query sees, so a backend can
    attend over a fixed-size window of its cache; `heads` keeps the ALiBi heads of one tensor-parallel rank.
    Every value is exactly representable in `dtype`'s range.
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
        slopes = alibi_slopes(attention)
        if heads is not None:
            slopes = slopes[heads.start:heads.stop]
        bias = slopes[None, :, None, None] * distance[:, None]
    else:
        bias = np.float32(0.0)
    return np.where(visible, bias, np.float32(LOWEST[dtype])).astype(np.float32)
