"""The decoder forward pass in torch, over a preallocated KV cache, calling primitives through an ops object."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from polylm.backend import Cache, Runtime, Step
from polylm.errors import InputError
from polylm.ir import ALiBi, ModelIR
from polylm.positions import alibi_slopes, rope_frequencies_per_row
from polylm.weights import Weights

from .ops import TorchOps
from .params import TORCH_DTYPES, LayerParams, build_params, read_tensors


@dataclass
class TorchCache(Cache):
    """Per-layer keys and values [batch, kv_heads, capacity, head_dim]; slots [0, length) are filled."""

    keys: list[torch.Tensor]
    values: list[torch.Tensor]
    batch: int
    capacity: int
    length: int = 0


class TorchRuntime(Runtime):
    """Runs a `ModelIR` with torch tensors on one device."""

    def __init__(self, ir: ModelIR, weights: Weights, dtype: str, device: str = "cpu",
                 ops: TorchOps | None = None) -> None:
        self.ir, self.dtype, self.device = ir, dtype, torch.device(device)
        self.torch_dtype = TORCH_DTYPES[dtype]
        self.ops = ops or TorchOps()
        self.params = build_params(ir, read_tensors(weights, self.torch_dtype, self.device))
        attn = ir.attention
        self.alibi = (torch.from_numpy(alibi_slopes(attn)).to(self.device)
                      if isinstance(attn.position, ALiBi) else None)
        self.embed_scale = torch.tensor(ir.embedding.scale, dtype=self.torch_dtype, device=self.device)

    def new_cache(self, batch: int, capacity: int) -> TorchCache:
        attn = self.ir.attention
        shape = (batch, attn.num_kv_heads, capacity, attn.head_dim)

        def make() -> list[torch.Tensor]:
            return [torch.zeros(shape, dtype=self.torch_dtype, device=self.device) for _ in range(self.ir.num_layers)]

        return TorchCache(make(), make(), batch, capacity)

    @torch.inference_mode()
    def forward(self, step: Step, cache: Cache | None = None) -> np.ndarray:
        batch, new = step.input_ids.shape
        cache = cache if cache is not None else self.new_cache(batch, step.mask.shape[1])
        past = cache.length
        if step.mask.shape[1] != past + new or past + new > cache.capacity:
            raise InputError(f"step covers {step.mask.shape[1]} slots, cache holds {past} of {cache.capacity} "
                             f"and {new} are new")
        positions = torch.from_numpy(step.positions).to(self.device)
        mask = torch.from_numpy(step.mask).to(self.device)
        bias = self._attention_bias(positions, mask, past, new)
        rotary = self._rotary(step.positions[:, past:]) if self.alibi is None else None

        x = self.params.embed[torch.from_numpy(step.input_ids).to(self.device)]
        if self.ir.embedding.scale != 1.0:
            x = x * self.embed_scale
        if self.params.embed_norm is not None:
            x = self.ops.norm(x, self.params.embed_norm)
        for index, layer in enumerate(self.params.layers):
            x = self._block(x, layer, cache, index, past, bias, rotary)
        cache.length = past + new
        x = self.ops.norm(x, self.params.final_norm)
        if step.gather is not None:
            x = x[torch.arange(batch, device=self.device), torch.from_numpy(step.gather).to(self.device)]
        out = self.ops.linear(x, self.params.head, self.params.head_bias)
        return out.float().cpu().numpy()

    def _block(self, x: torch.Tensor, layer: LayerParams, cache: TorchCache, index: int, past: int,
               bias: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        block = self.ir.block
        normed = self.ops.norm(x, layer.attn_norm)
        residual = normed if block.residual_from_normed else x
        x = residual + self._attention(normed, layer, cache, index, past, bias, rotary)
        normed = self.ops.norm(x, layer.mlp_norm)
        residual = normed if block.residual_from_normed else x
        hidden = self.ops.activation(self.ops.linear(normed, layer.up, layer.up_bias), block.mlp)
        return residual + self.ops.linear(hidden, layer.down, layer.down_bias)

    def _attention(self, x: torch.Tensor, layer: LayerParams, cache: TorchCache, index: int, past: int,
                   bias: torch.Tensor, rotary: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
        attn = self.ir.attention
        batch, new, _ = x.shape
        qkv = self.ops.linear(x, layer.qkv, layer.qkv_bias)
        q_size, kv_size = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
        q, k, v = qkv.split((q_size, kv_size, kv_size), dim=-1)
        q = q.view(batch, new, attn.num_heads, attn.head_dim).transpose(1, 2)
        k = k.view(batch, new, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        v = v.view(batch, new, attn.num_kv_heads, attn.head_dim).transpose(1, 2)
        if rotary is not None:
            q, k = self.ops.rope(q, *rotary, attn), self.ops.rope(k, *rotary, attn)
        end = past + new
        cache.keys[index][:, :, past:end] = k
        cache.values[index][:, :, past:end] = v
        out = self.ops.attention(q, cache.keys[index][:, :, :end], cache.values[index][:, :, :end], bias, attn)
        out = out.transpose(1, 2).reshape(batch, new, q_size)
        return self.ops.linear(out, layer.out, layer.out_bias)

    def _attention_bias(self, positions: torch.Tensor, mask: torch.Tensor, past: int, new: int) -> torch.Tensor:
        """Additive bias [batch, 1|heads, new, keys]: ALiBi on visible keys, the dtype's minimum elsewhere."""
        keys = mask.shape[1]
        causal = torch.arange(keys, device=self.device)[None, :] <= (past + torch.arange(new, device=self.device))[:, None]
        visible = (mask[:, None, :] & causal[None]).unsqueeze(1)
        if self.alibi is None:
            bias = torch.zeros((), dtype=torch.float32, device=self.device)
        else:
            distance = (positions[:, None, :] - positions[:, past:, None]).float()
            bias = self.alibi[None, :, None, None] * distance[:, None]
        floor = torch.finfo(self.torch_dtype).min
        return torch.where(visible, bias, floor).to(self.torch_dtype)

    def _rotary(self, positions: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin [batch, 1, new, rotary_dim / 2] in the compute dtype for query `positions`."""
        inv_freq, factor = rope_frequencies_per_row(self.ir.attention, positions)
        angles = (torch.from_numpy(positions).to(self.device).float()[..., None]
                  * torch.from_numpy(inv_freq).to(self.device)[:, None, :])
        cos, sin = angles.cos() * factor, angles.sin() * factor
        return cos.to(self.torch_dtype)[:, None], sin.to(self.torch_dtype)[:, None]
