"""Position-scheme math shared by every backend: RoPE inverse frequencies (with scaling) and ALiBi slopes.

Computed in float32 with numpy exactly as transformers does, so backends only turn them into cos/sin or a
bias in their own framework.
"""

from __future__ import annotations

import math

import numpy as np

from ..ir import ALiBi, Attention, RoPE


def rope_frequencies(attention: Attention, seq_len: int) -> tuple[np.ndarray, float]:
    """Inverse frequencies (float32, rotary_dim // 2) and the cos/sin multiplier for a pass over `seq_len`.

    `seq_len` is one more than the largest position in the pass; only dynamic NTK scaling and LongRoPE (which
    takes its long factors past `original_max_positions`) depend on it.
    """
    rope = attention.position
    assert isinstance(rope, RoPE)
    dim = attention.rotary_dim
    exponents = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / np.float32(dim)
    base = float(rope.theta)
    scaling = rope.scaling
    if scaling is not None and scaling.kind == "dynamic" and seq_len > rope.max_positions:
        factor = scaling.factor
        base = base * ((factor * seq_len / rope.max_positions) - (factor - 1)) ** (dim / (dim - 2))
    inv_freq = (1.0 / (np.float32(base) ** exponents)).astype(np.float32)
    if scaling is None or scaling.kind == "dynamic":
        return inv_freq, 1.0
    if scaling.kind == "linear":
        return (inv_freq / np.float32(scaling.factor)).astype(np.float32), 1.0
    if scaling.kind == "llama3":
        return _llama3(inv_freq, scaling), 1.0
    if scaling.kind == "longrope":
        return _longrope(rope, exponents, seq_len)
    return _yarn(rope, dim, exponents)


def rope_frequencies_per_row(attention: Attention, positions: np.ndarray) -> tuple[np.ndarray, float]:
    """Inverse frequencies [batch or 1, rotary_dim // 2] for the query `positions` [batch, new] of a pass.

    Only dynamic NTK scaling and LongRoPE differ per row: each row is scaled by its own length, as if run alone
    (one row when LongRoPE picks the same factors for every row).
    """
    rope = attention.position
    kind = rope.scaling.kind if rope.scaling is not None else None
    if kind not in ("dynamic", "longrope"):
        inv_freq, factor = rope_frequencies(attention, 0)
        return inv_freq[None, :], factor
    rows = [rope_frequencies(attention, int(row.max()) + 1) for row in positions]
    inv_freq = np.stack([row[0] for row in rows])
    if kind == "longrope" and (inv_freq == inv_freq[:1]).all():
        inv_freq = inv_freq[:1]
    return inv_freq, rows[0][1]


def _llama3(inv_freq: np.ndarray, scaling) -> np.ndarray:
    factor, old_context = scaling.factor, scaling.original_max_positions
    low_freq_wavelen = old_context / scaling.low_freq_factor
    high_freq_wavelen = old_context / scaling.high_freq_factor
    wavelen = 2 * math.pi / inv_freq
    scaled = np.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - scaling.low_freq_factor) / (scaling.high_freq_factor - scaling.low_freq_factor)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) & ~(wavelen > low_freq_wavelen)
    return np.where(is_medium, smoothed, scaled).astype(np.float32)


def _longrope(rope: RoPE, exponents: np.ndarray, seq_len: int) -> tuple[np.ndarray, float]:
    scaling = rope.scaling
    original = scaling.original_max_positions
    factors = scaling.long_factor if seq_len > original else scaling.short_factor
    inv_freq = 1.0 / (np.asarray(factors, dtype=np.float32) * np.float32(rope.theta) ** exponents)
    attention_factor = scaling.attention_factor
    if attention_factor is None:
        attention_factor = math.sqrt(1 + math.log(scaling.factor) / math.log(original)) if scaling.factor > 1 else 1.0
    return inv_freq.astype(np.float32), float(attention_factor)


def _yarn(rope: RoPE, dim: int, exponents: np.ndarray) -> tuple[np.ndarray, float]:
    scaling = rope.scaling
    base = float(rope.theta)
    original = scaling.original_max_positions or rope.max_positions
    factor = scaling.factor

    def mscale(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention_factor = scaling.attention_factor
    if attention_factor is None:
        if scaling.mscale and scaling.mscale_all_dim:
            attention_factor = mscale(factor, scaling.mscale) / mscale(factor, scaling.mscale_all_dim)
        else:
            attention_factor = mscale(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(scaling.beta_fast), correction_dim(scaling.beta_slow)
    if scaling.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001
    ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - low) / (high - low), 0, 1).astype(np.float32)
    extrapolation_weight = 1 - ramp
    pos_freqs = np.float32(base) ** exponents
    extrapolation, interpolation = 1.0 / pos_freqs, 1.0 / (np.float32(factor) * pos_freqs)
    inv_freq = interpolation * (1 - extrapolation_weight) + extrapolation * extrapolation_weight
    return inv_freq.astype(np.float32), float(attention_factor)


def alibi_slopes(attention: Attention) -> np.ndarray:
    """Per-head ALiBi slopes (float32), for any head count, as BLOOM computes them; times the softmax scale
    for a `scaled` ALiBi (Falcon's), so that every backend adds slope × distance to the scaled logits."""
    alibi = attention.position
    assert isinstance(alibi, ALiBi)
    heads = attention.num_heads
    closest = 2 ** math.floor(math.log2(heads))
    base = 2.0 ** (-alibi.max_bias / closest)
    slopes = [base ** p for p in range(1, closest + 1)]
    if closest != heads:
        extra_base = 2.0 ** (-alibi.max_bias / (2 * closest))
        remaining = min(closest, heads - closest)
        slopes += [extra_base ** p for p in range(1, 2 * remaining, 2)]
    scale = attention.softmax_scale if alibi.scaled else 1.0
    return (np.asarray(slopes, dtype=np.float64) * scale).astype(np.float32)
