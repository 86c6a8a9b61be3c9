"""`Runtime.forward_top` on MLX: each row's top head outputs, log-normalizer and NaN check computed with mx ops,
so that only those (and the rows asking for all their outputs) are copied to numpy."""

from __future__ import annotations

import mlx.core as mx
import numpy as np

from polylm.backend import Reduce, Reduced
from polylm.ir import Head
from polylm.numerics.logits import finish_head


def reduce_outputs(out: mx.array, head: Head, reduce: Reduce) -> Reduced:
    """What `reduce` asks of raw head outputs [batch, out] (float32); see `Reduced.of_top`."""
    finished = finish_head(head, out, mx.tanh)  # ranked finished: a softcap may make distinct outputs equal
    ids = _top_ids(finished, min(reduce.top, out.shape[-1])).astype(mx.int32)
    norm = _norm(finished) if reduce.norm else None
    full = np.flatnonzero(reduce.full)
    rows = out[mx.array(full.astype(np.int32))] if full.size else mx.zeros((0, out.shape[-1]), dtype=out.dtype)
    picked = [ids, mx.take_along_axis(out, ids, axis=-1), mx.any(mx.isnan(out), axis=-1), rows]
    mx.eval(*picked, *([norm] if norm is not None else []))
    ids, raw, nan, rows = (np.array(a) for a in picked)
    return Reduced.of_top(head, ids, raw, None if norm is None else np.array(norm), nan, rows)


def _top_ids(ranked: mx.array, top: int) -> mx.array:
    """The ids [batch, top] of each row's `top` largest of `ranked`, equal values by lowest id where the cut
    falls among them (`mx.argpartition` promises no order among equals; the ids' order is `Reduced.of_top`'s)."""
    if top == 1:
        return mx.argmax(ranked, axis=-1, keepdims=True)  # the first of the largest
    if top == ranked.shape[-1]:
        return mx.broadcast_to(mx.arange(top)[None], ranked.shape)
    part = mx.argpartition(-ranked, kth=top, axis=-1)[:, :top + 1]  # the top ones, then the next largest
    values = mx.take_along_axis(ranked, part, axis=-1)
    cut = mx.min(values[:, :top], axis=-1, keepdims=True)
    if not mx.any(values[:, top:] == cut).item():  # nothing equal to the cut is left out: the top ones are exact
        return part[:, :top]
    above, tied = ranked > cut, ranked == cut
    wanted = top - mx.sum(above, axis=-1, keepdims=True)
    chosen = above | (tied & (mx.cumsum(tied.astype(mx.int32), axis=-1) <= wanted))
    return mx.argpartition(-chosen.astype(mx.float32), kth=top - 1, axis=-1)[:, :top]  # exactly `top` per row


def _norm(out: mx.array) -> mx.array:
    """log Σ exp(out − max) per row (float64 where the device has it) over the +inf outputs alone where the max
    is +inf."""
    wide = out.astype(mx.float64 if mx.default_device() == mx.cpu else mx.float32)
    best = mx.max(wide, axis=-1, keepdims=True)
    positive = mx.isposinf(best)
    shifted = mx.where(positive, mx.where(mx.isposinf(wide), 0.0, -mx.inf), wide - mx.where(positive, 0.0, best))
    return mx.log(mx.sum(mx.exp(shifted), axis=-1))
