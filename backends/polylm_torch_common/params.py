"""Reading canonical tensors from safetensors into torch, in the layout the runtime computes with: one tensor
at a time, each matrix handed to the backend's `Prepare` (packing, quantization) as soon as it is built.

The q/k/v projections become one [q; k; v] matrix (BLOOM's per-head interleaving undone) and a gated MLP's
gate and up one [gate; up] matrix, so each is a single matmul — the recipes of `polylm.numerics.layouts`, shared with
the other backends. Norm weights carry their offset already.
"""

from __future__ import annotations

import ctypes
from typing import Any, Callable, Protocol

import numpy as np
import torch

from polylm.backend import ExpertParams, LayerParams, ModelParams, NormParams
from polylm.checkpoint.slices import TensorFiles, slice_shape
from polylm.ir import MLP, Block, ModelIR, MoE, Norm, Quantization
from polylm.numerics.layouts import qkv_parts, qkv_row_order, up_parts
from polylm.parallel.plan import ShardPlan
from polylm.progress import progress
from polylm.checkpoint.weights import Weights

try:  # glibc's; elsewhere freed memory is left to the allocator
    _MALLOC_TRIM = ctypes.CDLL(None).malloc_trim
except (OSError, AttributeError, TypeError):
    _MALLOC_TRIM = None

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: A weight matrix [out, in]: a tensor, or the prepared layer computing `x @ W.T + b` (`ReferenceOps.linear`).
Matrix = torch.Tensor | Callable[[torch.Tensor], torch.Tensor]
#: Turns a matrix and its bias into the layer the runtime computes with (holding the bias), quantized as the
#: spec says (None: not quantized). A tied head's layer is the embedding table too, so it is a `RowTable`.
Prepare = Callable[[torch.Tensor, torch.Tensor | None, Quantization | None], Any]


#: Turns a weight and its bias into what the runtime multiplies with, and the bias it adds (None when the layer
#: holds it).
MatrixOf = Callable[[torch.Tensor, torch.Tensor | None], tuple[Matrix, torch.Tensor | None]]


class RowTable(Protocol):
    """A prepared layer that is also an embedding table (a tied head)."""

    shape: torch.Size  # [rows, hidden]

    def __call__(self, x: torch.Tensor) -> torch.Tensor: ...

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """`weight[ids]` exactly (a quantized layer: its dequantized weight's rows, in the compute dtype)."""


class TensorReader:
    """Canonical tensors read one at a time, when the params need them, converted to `dtype` on `device`: whole,
    or with a tensor-parallel `plan` only the rank's slices, with plain file reads (`polylm.checkpoint.slices`).
    A context manager: the files stay open until it exits."""

    def __init__(self, weights: Weights, dtype: torch.dtype, device: str | torch.device = "cpu",
                 plan: ShardPlan | None = None) -> None:
        self.weights, self.dtype, self.device, self.plan = weights, dtype, device, plan
        self._files = TensorFiles()

    def __enter__(self) -> TensorReader:
        return self

    def __exit__(self, *exc: object) -> None:
        self._files.__exit__(*exc)

    def tensor(self, name: str) -> torch.Tensor:
        """The tensor `name` (one the model has and the rank reads)."""
        ref = self.weights[name]
        part = self.plan.part(name) if self.plan is not None else None
        shape = slice_shape(ref, part)
        tensor = torch.empty(shape, dtype=TORCH_DTYPES[ref.dtype])
        self._files.read(ref, part, out=tensor.view(-1).view(torch.uint8).numpy())
        return tensor.to(device=self.device, dtype=self.dtype)

    def rows(self, names: tuple[str, ...]) -> torch.Tensor:
        """The row-wise concatenation of tensors `names` (alike but for their first dimension): read straight
        into one tensor where no conversion is needed, so no second copy is made to join them."""
        if len(names) == 1:
            return self.tensor(names[0])
        refs = [self.weights[name] for name in names]
        direct = self.plan is None and torch.device(self.device).type == "cpu" and all(
            ref.plain and TORCH_DTYPES[ref.dtype] == self.dtype and ref.shape[1:] == refs[0].shape[1:]
            for ref in refs)
        if not direct:
            return torch.cat([self.tensor(name) for name in names])
        out = torch.empty(sum(ref.shape[0] for ref in refs), *refs[0].shape[1:], dtype=self.dtype)
        data, start = out.view(-1).view(torch.uint8), 0
        for ref in refs:
            self._files.read(ref, out=data[start:start + ref.nbytes].numpy())
            start += ref.nbytes
        return out

    def optional(self, name: str) -> torch.Tensor | None:
        """The tensor `name`, or None when the model has none or the rank reads none of it."""
        if name not in self.weights or (self.plan is not None and not self.plan.reads(name)):
            return None
        return self.tensor(name)


def build_params(ir: ModelIR, read: TensorReader, prepare: Prepare | None = None) -> ModelParams:
    """The runtime's params, read tensor by tensor. With `prepare`, each matrix becomes its layer as soon as it
    is built, so the peak memory is the prepared weights plus one matrix's transients; the embedding and head,
    the largest, come first, while nothing else is held. A tied head is prepared as the embedding table's scheme
    says (`Quantization.embedding`; unquantized without one) and is then the embedding table too; an untied
    embedding stays a tensor, or is prepared by that scheme when there is one (its `rows` serve the lookup)."""

    def matrix(weight: torch.Tensor, bias: torch.Tensor | None,
               quantization: Quantization | None = ir.quantization) -> tuple[Matrix, torch.Tensor | None]:
        return (weight, bias) if prepare is None else (prepare(weight, bias, quantization), None)

    table = None if ir.quantization is None else ir.quantization.embedding  # the embedding table's scheme
    if ir.head.tied_to_embedding:
        head, head_bias = matrix(read.tensor("embed.weight"), read.optional("head.bias"), table)
        embed = head
    else:
        head, head_bias = matrix(read.tensor("head.weight"), read.optional("head.bias"))
        embed = read.tensor("embed.weight")
        if table is not None and prepare is not None:
            embed = prepare(embed, None, table)
    embed_norm = _norm(ir.embedding.norm, read, "embed.norm")
    positions = read.optional("embed.positions.weight")
    layers = []
    for i, block in progress(enumerate(ir.layers), total=ir.num_layers, desc="loading layers", unit="layer"):
        _release_freed_memory()
        layers.append(_layer(block, read, f"layers.{i}", matrix))
    _release_freed_memory()
    final_norm = _norm(ir.final_norm, read, "final_norm")
    return ModelParams(embed, embed_norm, layers, final_norm, head, head_bias, positions)


def _release_freed_memory() -> None:
    """Return the memory the last matrices' transients freed to the system. glibc keeps it otherwise: its trim
    threshold grows with the large blocks freed, and the freed pages would count in the load's peak."""
    if _MALLOC_TRIM is not None:
        _MALLOC_TRIM(0)


def _norm(spec: Norm | None, read: TensorReader, prefix: str) -> NormParams | None:
    if spec is None:
        return None
    weight = read.tensor(f"{prefix}.weight").float() + spec.weight_offset
    if spec.kind == "layer":
        weight = weight.to(read.dtype)
    return NormParams(spec, weight, read.optional(f"{prefix}.bias"))


def _layer(block: Block, read: TensorReader, prefix: str, matrix: MatrixOf) -> LayerParams:
    attn, mlp = block.attention, block.mlp
    order = qkv_row_order(attn)
    qkv = matrix(_fused(read, qkv_parts(attn, prefix, "weight"), order),
                 _fused(read, qkv_parts(attn, prefix, "bias"), order) if attn.qkv_bias else None)
    out = matrix(read.tensor(f"{prefix}.attn.o.weight"), read.optional(f"{prefix}.attn.o.bias"))
    moe = _experts(mlp, read, f"{prefix}.mlp", matrix) if isinstance(mlp, MoE) else None
    dense = (None,) * 4 if moe is not None else _dense(mlp, read, f"{prefix}.mlp", matrix)
    qk_norm = attn.qk_norm.norm if attn.qk_norm is not None else None
    return LayerParams(_norm(block.attn_norm, read, f"{prefix}.attn_norm"), *qkv, *out,
                       _norm(block.mlp_norm, read, f"{prefix}.mlp_norm"), *dense, moe=moe,
                       attn_post_norm=_norm(block.attn_post_norm, read, f"{prefix}.attn_post_norm"),
                       mlp_post_norm=_norm(block.mlp_post_norm, read, f"{prefix}.mlp_post_norm"),
                       q_norm=_norm(qk_norm, read, f"{prefix}.attn.q_norm"),
                       k_norm=_norm(qk_norm, read, f"{prefix}.attn.k_norm"),
                       sinks=read.optional(f"{prefix}.attn.sinks.weight"))


def _dense(mlp: MLP, read: TensorReader, module: str, matrix: MatrixOf) -> tuple[Any, ...]:
    """The (up, up bias, down, down bias) of the dense MLP at canonical `module`."""
    up = matrix(_fused(read, up_parts(mlp, module, "weight")),
                _fused(read, up_parts(mlp, module, "bias")) if mlp.bias else None)
    return (*up, *matrix(read.tensor(f"{module}.down.weight"), read.optional(f"{module}.down.bias")))


def _experts(moe: MoE, read: TensorReader, module: str, matrix: MatrixOf) -> ExpertParams:
    """A mixture-of-experts layer's params: the router and shared-expert gate as tensors, every expert's matrices
    each its own layer (a list over the experts), the shared expert as a dense MLP."""
    experts = f"{module}.experts"

    def stacked(param: str) -> torch.Tensor:  # [experts, gate rows + up rows, …]
        return torch.cat([read.tensor(name) for name in up_parts(moe.expert, experts, param)], dim=1)

    up, up_bias = stacked("weight"), stacked("bias") if moe.expert.bias else None
    down, down_bias = read.tensor(f"{experts}.down.weight"), read.optional(f"{experts}.down.bias")
    ups = [matrix(up[e], None if up_bias is None else up_bias[e]) for e in range(moe.num_experts)]
    downs = [matrix(down[e], None if down_bias is None else down_bias[e]) for e in range(moe.num_experts)]
    del up, down
    shared = _dense(moe.shared, read, f"{module}.shared", matrix) if moe.shared is not None else (None,) * 4
    return ExpertParams(read.tensor(f"{module}.router.weight"), read.optional(f"{module}.router.bias"),
                        [m for m, _ in ups], [b for _, b in ups], [m for m, _ in downs], [b for _, b in downs],
                        *shared, shared_gate=read.optional(f"{module}.shared_gate.weight"))


def _fused(read: TensorReader, names: tuple[str, ...], row_order: np.ndarray | None = None) -> torch.Tensor:
    """The row-wise concatenation of `names` (see `polylm.numerics.layouts`), rows reordered when asked."""
    fused = read.rows(names)
    return (fused if row_order is None else fused[torch.from_numpy(row_order)]).contiguous()
