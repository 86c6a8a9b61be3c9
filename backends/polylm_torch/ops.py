"""The torch backend's primitive operations, one per IR feature, written once.

The Triton backend subclasses `TorchOps` and replaces these with fused kernels; the runtime only calls
through an ops object, so both share the same model code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from polylm.ir import Attention, MLP

from .params import NormParams


class TorchOps:
    """Reference implementations in plain torch."""

    def norm(self, x: torch.Tensor, p: NormParams) -> torch.Tensor:
        if p.spec.kind == "layer":
            return F.layer_norm(x, x.shape[-1:], p.weight, p.bias, p.spec.eps)
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + p.spec.eps) * p.weight
        if p.bias is not None:
            h = h + p.bias.float()
        return h.to(x.dtype)

    def linear(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return F.linear(x, weight, bias)

    def rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, attn: Attention) -> torch.Tensor:
        """Rotate the first rotary dims of x [batch, heads, seq, head_dim]; cos/sin are [batch, 1, seq, rot/2]."""
        rot = attn.rotary_dim
        x_rot, x_pass = x[..., :rot], x[..., rot:]
        if attn.position.interleaved:
            even, odd = x_rot[..., 0::2], x_rot[..., 1::2]
            rotated = torch.stack((even * cos - odd * sin, odd * cos + even * sin), dim=-1).flatten(-2)
        else:
            first, second = x_rot[..., : rot // 2], x_rot[..., rot // 2:]
            rotated = torch.cat((first * cos - second * sin, second * cos + first * sin), dim=-1)
        return torch.cat((rotated, x_pass), dim=-1) if x_pass.shape[-1] else rotated

    def attention(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor,
                  attn: Attention) -> torch.Tensor:
        """q [batch, heads, new, d]; k/v [batch, kv_heads, keys, d]; bias [batch, 1|heads, new, keys]."""
        return F.scaled_dot_product_attention(q, k, v, attn_mask=bias, scale=attn.softmax_scale,
                                              enable_gqa=attn.num_heads != attn.num_kv_heads)

    def activation(self, h: torch.Tensor, mlp: MLP) -> torch.Tensor:
        """The MLP's activation, applied to [gate; up] halves when gated."""
        if mlp.gated:
            gate, up = h.chunk(2, dim=-1)
            return _ACTIVATIONS[mlp.activation](gate) * up
        return _ACTIVATIONS[mlp.activation](h)


def _relu2(x: torch.Tensor) -> torch.Tensor:
    return torch.square(F.relu(x))


_ACTIVATIONS = {
    "silu": F.silu,
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "relu2": _relu2,
}
