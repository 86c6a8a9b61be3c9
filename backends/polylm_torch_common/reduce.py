"""`Runtime.forward_top` on torch: each row's top head outputs, log-normalizer and NaN check computed on the
device, so that only those (and the rows asking for all their outputs) are copied to the host."""

from __future__ import annotations

import torch

from polylm.backend import Reduce, Reduced
from polylm.ir import Head
from polylm.numerics.logits import finish_head


def reduce_outputs(out: torch.Tensor, head: Head, reduce: Reduce) -> Reduced:
    """What `reduce` asks of raw head outputs [batch, out] (any float dtype, on any device); see `Reduced.of_top`."""
    out = out.float()
    top = min(reduce.top, out.shape[-1])
    # max and topk rank NaN above everything (max: the first NaN), so one pass gives the top values, their ids
    # and the NaN check: a row holds NaN exactly when its top value is NaN.
    values, ids = out.max(dim=-1, keepdim=True) if top == 1 else out.topk(top, dim=-1)
    norm = _norm(finish_head(head, out, torch.tanh)).cpu().numpy() if reduce.norm else None
    full = torch.from_numpy(reduce.full).to(out.device)
    return Reduced.of_top(head, ids.cpu().numpy(), values.cpu().numpy(), norm, values[:, 0].isnan().cpu().numpy(),
                          out[full].cpu().numpy())


def _norm(out: torch.Tensor) -> torch.Tensor:
    """log Σ exp(out − max) per row in float64 (over the +inf outputs alone where the max is +inf)."""
    wide = out.double()
    best = wide.max(dim=-1, keepdim=True).values
    shifted = wide - best
    if best.isposinf().any():  # rare: only then the [batch, out] select
        shifted = torch.where(best.isposinf(), torch.where(wide.isposinf(), 0.0, -torch.inf), shifted)
    return shifted.exp().sum(dim=-1).log()
