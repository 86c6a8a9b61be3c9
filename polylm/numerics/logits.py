"""What the head's outputs go through after the runtime computed them: the logit scale and the final softcap of
`polylm.ir.Head`, applied once here in float32 for every backend; and the per-row summary a sampler needs
when it needs less than the whole row (`top_rows`, the reference of `polylm.backend.Runtime.forward_top`)."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from ..ir import Head


def finish_head(head: Head, out: np.ndarray, tanh: Callable = np.tanh) -> np.ndarray:
    """`out` (a runtime's float32 head outputs) times `head.logit_scale`, then capped as softcap·tanh(out / softcap).
    Any array type works with its own `tanh` (torch.tanh, mx.tanh), so a backend finishes on its device exactly
    as here: the Python-number factors are taken in float32 (weak scalars) by numpy, torch and MLX alike."""
    if head.logit_scale != 1.0:
        out = out * head.logit_scale
    if head.softcap is not None:
        out = tanh(out / head.softcap) * head.softcap
    return out


def top_rows(out: np.ndarray, top: int, norm: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Of finished head outputs [batch, out]: the `top` largest per row (ids [batch, top] int64, largest first,
    equal values by lowest id as `np.argmax` picks; their values float32), each row's log-normalizer
    log Σ exp(out − max) (float64; of the +inf outputs only, where the max is +inf; zeros unless `norm`) and
    whether it holds NaN."""
    order = np.argsort(-out, axis=-1, kind="stable")[:, :top]
    values = np.take_along_axis(out, order, axis=-1)
    norms = np.zeros(out.shape[0])
    if norm:
        best = out.max(axis=-1, keepdims=True).astype(np.float64)
        wide = out.astype(np.float64)
        with np.errstate(invalid="ignore"):
            shifted = np.where(np.isposinf(best), np.where(np.isposinf(wide), 0.0, -np.inf), wide - best)
            norms = np.log(np.exp(shifted).sum(axis=-1))
    return order.astype(np.int64), values, norms, np.isnan(out).any(axis=-1)
