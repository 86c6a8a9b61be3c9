"""What the head's outputs go through after the runtime computed them: the logit scale and the final softcap of
`polylm.ir.Head`, applied once here in float32 for every backend."""

from __future__ import annotations

import numpy as np

from ..ir import Head


def finish_head(head: Head, out: np.ndarray) -> np.ndarray:
    """`out` (a runtime's float32 head outputs) times `head.logit_scale`, then capped as softcap·tanh(out / softcap)."""
    if head.logit_scale != 1.0:
        out = out * np.float32(head.logit_scale)
    if head.softcap is not None:
        cap = np.float32(head.softcap)
        out = np.tanh(out / cap) * cap
    return out
