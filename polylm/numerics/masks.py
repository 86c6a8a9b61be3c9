"""The attention visibility rule as data: the additive bias a backend adds to a step's attention logits,
derived from the step's positions and mask (causal, padding, sliding window, ALiBi). Written once in numpy so
backends agree."""

from __future__ import annotations

import numpy as np

from ..backend import RingPass
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
    key_slots = np.broadcast_to(np.arange(keys), (batch, keys))
    return _bias(attention, positions, mask, past, dtype, key_slots, heads)


def ring_keys(positions: np.ndarray, mask: np.ndarray, ring: RingPass) -> tuple[np.ndarray, np.ndarray]:
    """The keys a sliding-window layer's ring holds for a pass, [batch, ring.span] each: their positions, and
    whether each is a real token (for a kernel that applies `ring_bias`'s rule itself: a query at position p
    sees the real keys at positions in (p − window, p])."""
    owner = ring.owner[:, :ring.span]
    held = (owner >= 0) & (owner < mask.shape[1])
    rows, slots = np.arange(owner.shape[0])[:, None], np.where(held, owner, 0)
    return positions[rows, slots], held & mask[rows, slots]


def ring_bias(attention: Attention, positions: np.ndarray, mask: np.ndarray, past: int, ring: RingPass, dtype: str,
              heads: range | None = None) -> np.ndarray:
    """`attention_bias` for a sliding-window layer's ring (`polylm.backend.Ring`), float32
    [batch, 1 or heads, new, ring.span]: ring slot r holds the key of step slot `ring.owner[:, r]`, which a query
    at slot s sees when it is set in `mask`, at most s, and fewer than `ring.window` positions before s."""
    return _bias(attention, positions, mask, past, dtype, ring.owner[:, :ring.span], heads, ring.window)


def _bias(attention: Attention, positions: np.ndarray, mask: np.ndarray, past: int, dtype: str,
          key_slots: np.ndarray, heads: range | None, window: int | None = None) -> np.ndarray:
    """The bias of the new slots over keys held in `key_slots` [batch, keys] (step slots; ≥ past + new or < 0:
    nothing a query sees)."""
    batch, total = mask.shape
    new = total - past
    held = (key_slots >= 0) & (key_slots < total)
    slots = np.where(held, key_slots, 0)
    rows = np.arange(batch)[:, None]
    filled = held & mask[rows, slots]
    causal = slots[:, None, :] <= (past + np.arange(new))[None, :, None]
    visible = filled[:, None, :] & causal
    key_positions = positions[rows, slots]
    distance = (key_positions[:, None, :] - positions[:, past:total, None]).astype(np.float32)
    if window is not None:
        visible &= distance > -window
    visible = visible[:, None]
    if isinstance(attention.position, ALiBi):
        slopes = alibi_slopes(attention)
        if heads is not None:
            slopes = slopes[heads.start:heads.stop]
        bias = slopes[None, :, None, None] * distance[:, None]
    else:
        bias = np.float32(0.0)
    return np.where(visible, bias, np.float32(LOWEST[dtype])).astype(np.float32)
