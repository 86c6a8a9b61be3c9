"""Reading canonical tensors from safetensors into torch, in the layout the runtime computes with.

The q/k/v projections become one [q; k; v] matrix (BLOOM's per-head interleaving undone) and a gated MLP's
gate and up one [gate; up] matrix, so each is a single matmul — the recipes of `polylm.lowering`, shared with
the other backends. Norm weights carry their offset already.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from safetensors import safe_open

from polylm.errors import WeightsError
from polylm.ir import Block, ModelIR, Norm
from polylm.lowering import qkv_parts, qkv_row_order, up_parts
from polylm.parallel import ShardPlan
from polylm.weights import TensorRef, Weights

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class NormParams:
    spec: Norm
    weight: torch.Tensor  # float32 for RMSNorm (computed in float32), compute dtype for LayerNorm
    bias: torch.Tensor | None


@dataclass
class LayerParams:
    attn_norm: NormParams
    qkv: torch.Tensor
    qkv_bias: torch.Tensor | None
    out: torch.Tensor
    out_bias: torch.Tensor | None
    mlp_norm: NormParams
    up: torch.Tensor  # [gate; up] when gated
    up_bias: torch.Tensor | None
    down: torch.Tensor
    down_bias: torch.Tensor | None


@dataclass
class ModelParams:
    embed: torch.Tensor
    embed_norm: NormParams | None
    layers: list[LayerParams]
    final_norm: NormParams
    head: torch.Tensor
    head_bias: torch.Tensor | None


def read_tensors(weights: Weights, dtype: torch.dtype, device: str | torch.device = "cpu",
                 plan: ShardPlan | None = None) -> dict[str, torch.Tensor]:
    """Every canonical tensor, converted to `dtype` on `device` (read with plain file reads); with a
    tensor-parallel `plan`, only the rank's slices, each read alone from the memory-mapped file."""
    tensors: dict[str, torch.Tensor] = {}
    if plan is None:
        for path, names in weights.by_file():
            try:
                with open(path, "rb") as handle:
                    for name in sorted(names, key=lambda n: weights[n].offset):
                        tensors[name] = _read_whole(handle, weights[name]).to(device=device, dtype=dtype)
            except OSError as exc:
                raise WeightsError(f"{path}: cannot read tensor data ({exc.strerror})") from None
        return tensors
    for path, names in weights.by_file():
        try:
            with safe_open(str(path), framework="pt", device="cpu") as handle:
                for name, key in names.items():
                    if not plan.reads(name):
                        continue
                    part = plan.part(name)
                    if part is None:
                        tensor = handle.get_tensor(key)
                    else:
                        tensor = handle.get_slice(key)[(slice(None),) * part.dim + (slice(part.start, part.stop),)]
                    tensors[name] = tensor.to(device=device, dtype=dtype)
        except WeightsError:
            raise
        except Exception as exc:  # noqa: BLE001 - safetensors raises its own error types
            raise WeightsError(f"{path}: cannot read tensor data ({exc})") from None
    return tensors


def _read_whole(handle, ref: TensorRef) -> torch.Tensor:
    """One tensor read with plain file reads into memory of its own: unlike a memory map, the file's pages are
    not counted in this process's resident memory, which keeps the load's peak near the weights' size."""
    data = torch.empty(ref.nbytes, dtype=torch.uint8)
    handle.seek(ref.offset)
    if handle.readinto(data.numpy()) != ref.nbytes:
        raise WeightsError(f"{ref.file}: tensor {ref.key!r} is cut short; the file is truncated")
    return data.view(TORCH_DTYPES[ref.dtype]).reshape(ref.shape)


def build_params(ir: ModelIR, tensors: dict[str, torch.Tensor]) -> ModelParams:
    """Group canonical tensors into the runtime's layout (consumes `tensors`)."""
    embed = tensors.pop("embed.weight")
    embed_norm = _norm(ir.embedding.norm, tensors, "embed.norm", embed.dtype) if ir.embedding.norm else None
    layers = [_layer(ir.block, tensors, f"layers.{i}", embed.dtype) for i in range(ir.num_layers)]
    final_norm = _norm(ir.final_norm, tensors, "final_norm", embed.dtype)
    head = embed if ir.head.tied_to_embedding else tensors.pop("head.weight")
    return ModelParams(embed, embed_norm, layers, final_norm, head, tensors.pop("head.bias", None))


def _norm(spec: Norm, tensors: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> NormParams:
    weight = tensors.pop(f"{prefix}.weight").float() + spec.weight_offset
    if spec.kind == "layer":
        weight = weight.to(dtype)
    return NormParams(spec, weight, tensors.pop(f"{prefix}.bias", None))


def _layer(block: Block, tensors: dict[str, torch.Tensor], prefix: str, dtype: torch.dtype) -> LayerParams:
    attn, mlp = block.attention, block.mlp
    qkv, qkv_bias = _fused(tensors, qkv_parts(attn, prefix, "weight"), qkv_row_order(attn)), None
    if attn.qkv_bias:
        qkv_bias = _fused(tensors, qkv_parts(attn, prefix, "bias"), qkv_row_order(attn))
    up = _fused(tensors, up_parts(mlp, prefix, "weight"))
    up_bias = _fused(tensors, up_parts(mlp, prefix, "bias")) if mlp.bias else None
    attn_norm = _norm(block.attn_norm, tensors, f"{prefix}.attn_norm", dtype)
    mlp_norm = _norm(block.mlp_norm, tensors, f"{prefix}.mlp_norm", dtype)
    return LayerParams(attn_norm, qkv, qkv_bias, tensors.pop(f"{prefix}.attn.o.weight"),
                       tensors.pop(f"{prefix}.attn.o.bias", None), mlp_norm, up, up_bias,
                       tensors.pop(f"{prefix}.mlp.down.weight"), tensors.pop(f"{prefix}.mlp.down.bias", None))


def _fused(tensors: dict[str, torch.Tensor], names: tuple[str, ...], row_order=None) -> torch.Tensor:
    """The row-wise concatenation of `names` (see `polylm.lowering`), rows reordered when asked."""
    fused = torch.cat([tensors.pop(name) for name in names])
    return (fused if row_order is None else fused[torch.from_numpy(row_order)]).contiguous()
