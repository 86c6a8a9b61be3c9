"""`Runtime.forward_top` on torch: each row's top head outputs, log-normalizer and NaN check computed on the
device, so that only those (and the rows asking for all their outputs) are copied to the host."""

from __future__ import annotations

import numpy as np
import torch

from polylm.backend import Reduce, Reduced
from polylm.ir import Head
from polylm.numerics.logits import finish_head


def reduce_outputs(out: torch.Tensor, head: Head, reduce: Reduce) -> Reduced:
    """What `reduce` asks of raw head outputs [batch, out] (any float dtype, on any device); see `Reduced.of_top`."""
    out = out.float()
    finished = finish_head(head, out, torch.tanh)  # ranked finished: a softcap may make distinct outputs equal
    ids, nan = _top_ids(finished, min(reduce.top, out.shape[-1]))
    norm = _norm(finished).cpu().numpy() if reduce.norm else None
    rows = np.empty((0, out.shape[-1]), np.float32)
    if reduce.full.any():
        rows = out[torch.from_numpy(reduce.full).to(out.device)].cpu().numpy()
    return Reduced.of_top(head, ids.cpu().numpy(), out.gather(-1, ids).cpu().numpy(), norm, nan.cpu().numpy(), rows)


def _top_ids(ranked: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The ids [batch, top] of each row's `top` largest of `ranked`, equal values by lowest id where the cut
    falls among them (`torch.topk` promises no order among equals; the ids' order is `Reduced.of_top`'s to make),
    and whether each row holds NaN: max and topk rank NaN above everything (max: the first NaN), so a row holds
    NaN exactly when its top value is NaN, and one pass gives both."""
    if top == 1:
        if ranked.device.type == "cpu":  # numpy's argmax (the first of the largest, or the first NaN) is ~14×
            ids = torch.from_numpy(ranked.numpy().argmax(-1)[:, None])  # faster than torch.max on a CPU row
            return ids, ranked.gather(-1, ids)[:, 0].isnan()
        values, ids = ranked.max(dim=-1, keepdim=True)  # the first of the largest
        return ids, values[:, 0].isnan()
    if top == ranked.shape[-1]:
        return torch.arange(top, device=ranked.device).expand(ranked.shape[0], top), ranked.isnan().any(dim=-1)
    values, ids = ranked.topk(top + 1, dim=-1)
    cut = values[:, top - 1:top]
    if not (values[:, top:] == cut).any():  # nothing equal to the cut is left out: the top ones are exact
        return ids[:, :top], values[:, 0].isnan()
    above, tied = ranked > cut, ranked == cut
    chosen = above | (tied & (tied.cumsum(dim=-1) <= top - above.sum(dim=-1, keepdim=True)))
    return chosen.float().topk(top, dim=-1).indices, values[:, 0].isnan()  # exactly `top` chosen per row


def _norm(out: torch.Tensor) -> torch.Tensor:
    """log Σ exp(out − max) per row in float64 (over the +inf outputs alone where the max is +inf)."""
    wide = out.double()
    best = wide.max(dim=-1, keepdim=True).values
    shifted = wide - best
    if best.isposinf().any():  # rare: only then the [batch, out] select
        shifted = torch.where(best.isposinf(), torch.where(wide.isposinf(), 0.0, -torch.inf), shifted)
    return shifted.exp().sum(dim=-1).log()
