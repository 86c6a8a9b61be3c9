"""Reading canonical tensors from safetensors straight into MLX arrays, in the layout the runtime computes with.

Each layer gets one [q; k; v] and one [gate; up] matrix (see `polylm.numerics.layouts`); norm weights carry their
offset already. `mx.load` reads safetensors itself, so bf16 weights never pass through numpy or torch. With
`ir.quantization` the projection matrices and an untied head become `QuantizedMatrix` records (see `quantize`);
so does the embedding table when the scheme quantizes it (`Quantization.embedding`): the lookup dequantizes the
ids' rows (`ops.embed_rows`) and a head tied to it multiplies with the same record through `mx.quantized_matmul`.
Otherwise embeddings keep the compute dtype, and a tied head stays the (unquantized) embedding; norms and
biases always do.

A checkpoint stored MLX-quantized (`TensorRef.quantized`) keeps its arrays as they are: each such matrix is a
`QuantizedMatrix` of the stored codes, scales and biases, multiplied by `mx.quantized_matmul` as mlx-lm does;
q/k/v (gate/up) fuse when they share bits and group size, else they are dequantized to the compute dtype. A
quantized embedding is dequantized for the row lookup (`mx.dequantize`), and a head tied to it multiplies with
its stored arrays.

Projection matrices are operands of `x @ w`, [in, out]. On the GPU that is a free transposed view of the stored
[out, in] tensor, the layout MLX's Metal kernels are fastest with. On the CPU every dense projection (a tied head
too) is a contiguous float32 [in, out] copy, held as its two column halves (`Halves`): MLX multiplies float32
through BLAS, about 2× faster in that layout than in the stored one, its half-precision kernel (`simd_gemm`,
float32 accumulation) reads half-precision weights about 2× slower per byte than BLAS reads float32 ones, so a
bfloat16 or float16 model decodes ≈1.8× faster held in float32, at twice its weights' memory; and the BLAS it
bundles runs one core a call, so the halves multiply on two CPU streams at once (a decode step's matrix-vector
products 1.2-2× faster, a prefill's matrix products as fast as splitting x's rows). `ops.linear` multiplies
half-precision activations by it in float32 and rounds the product once, as `simd_gemm` does: the results are
bit-identical (the products of half values are exact in float32 and both sum them in the same order).

A mixture-of-experts layer (`ExpertParams`) holds its experts stacked, [gate; up] and down each one matrix of
[experts, out, in] as stored, and multiplies through `mx.gather_mm` with the same [experts, in, out] operand as a
dense projection (a view, or the float32 CPU copy), or `mx.gather_qmm` when quantized; their biases stacked
[experts, out]. The router and the shared expert's gate are dense operands, never quantized (as on torch).
"""

from __future__ import annotations

from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Iterator, Union

import mlx.core as mx

from polylm.backend import ExpertParams, LayerParams, ModelParams, NormParams
from polylm.errors import WeightsError
from polylm.ir import MLP, Block, ModelIR, MoE, Norm, Quantization
from polylm.numerics.layouts import qkv_parts, qkv_row_order, up_parts
from polylm.checkpoint.slices import TensorFiles
from polylm.checkpoint.weights import TensorRef, Weights

from .quantize import QuantizedMatrix, quantize

MX_DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}


@dataclass(frozen=True)
class Halves:
    """A dense [..., in, out] float32 operand on the CPU held as its two contiguous column halves, which
    `ops.linear` multiplies on two CPU streams at once (MLX's CPU BLAS runs one core a call)."""

    left: mx.array
    right: mx.array

    @property
    def dtype(self) -> mx.Dtype:
        return self.left.dtype


#: A projection: a dense [in, out] operand of `x @ w` (on the CPU in `Halves`), or a quantized [out, in] one
#: (see `ops.linear`).
Matrix = Union[mx.array, Halves, QuantizedMatrix]
#: The fewest output columns held in `Halves` (a router's few columns are not split).
HALVES_FROM = 64


def read_tensors(weights: Weights, dtype: mx.Dtype) -> dict[str, Matrix]:
    """Every canonical tensor as an MLX array of `dtype`, or a stored-quantized matrix as a `QuantizedMatrix`
    (each file opened once; the few stacked from a tensor per head read by core)."""
    tensors: dict[str, Matrix] = {}
    files: dict[Path, dict[str, mx.array]] = {}

    def stored(ref: TensorRef) -> mx.array:
        if ref.file not in files:
            try:
                files[ref.file] = mx.load(str(ref.file), format="safetensors")
            except Exception as exc:  # noqa: BLE001 - mlx raises plain RuntimeError/ValueError
                raise WeightsError(f"{ref.file}: cannot read tensor data ({exc})") from None
        return files[ref.file][ref.key]

    for _, names in weights.by_file():
        for name in names:
            ref = weights[name]
            if ref.quantized is None:
                tensors[name] = ref.view_of(stored(ref)).astype(dtype)
                continue
            packed = ref.quantized
            matrix = QuantizedMatrix(stored(packed.codes), stored(packed.scales), stored(packed.biases),
                                     packed.spec.group_size, packed.spec.bits, ref.shape[1])
            tensors[name] = matrix if ref.rows is None else matrix.take_rows(mx.arange(*ref.rows))
    with TensorFiles() as reader:
        for name, ref in weights.items():
            if ref.parts:
                tensors[name] = mx.array(reader.read(ref)).view(MX_DTYPES[ref.dtype]).astype(dtype)
    return tensors


def build_params(ir: ModelIR, tensors: dict[str, Matrix]) -> ModelParams:
    """Group canonical tensors into the runtime's layout and materialize them (consumes `tensors`).

    `mx.load` is lazy, so each layer is evaluated as it is built: the file is read and any layout copy made
    one layer at a time, and peak memory stays near the model's own size.
    """
    dtype = tensors["final_norm.weight"].dtype  # the compute dtype: `read_tensors` gave it every dense tensor
    embed = tensors.pop("embed.weight")
    stored_embed = embed if isinstance(embed, QuantizedMatrix) else None
    if stored_embed is not None:  # looked up by rows: dequantized
        embed = stored_embed.dequantize_stored().astype(dtype)
    elif ir.quantization is not None and ir.quantization.embedding is not None:  # its rows dequantized per lookup
        embed = stored_embed = quantize(embed, ir.quantization.embedding, "embed")
    embed_norm = _norm(ir.embedding.norm, tensors, "embed.norm")
    positions = tensors.pop("embed.positions.weight", None)
    layers = []
    for index, block in enumerate(ir.layers):
        layers.append(_layer(block, tensors, f"layers.{index}", ir.quantization, dtype))
        mx.eval(list(_arrays(layers[-1])))
    final_norm = _norm(ir.final_norm, tensors, "final_norm")
    if ir.head.tied_to_embedding:
        head = stored_embed or _matrix(embed, None, "head")
    else:
        head = _matrix(tensors.pop("head.weight"), ir.quantization, "head")
    params = ModelParams(embed, embed_norm, layers, final_norm, head, tensors.pop("head.bias", None), positions)
    mx.eval(list(_arrays(params)))
    return params


def _arrays(node: object) -> Iterator[mx.array]:
    """Every array held by a params dataclass, recursively."""
    if isinstance(node, mx.array):
        yield node
    elif isinstance(node, list):
        for item in node:
            yield from _arrays(item)
    elif is_dataclass(node):
        for field in fields(node):
            yield from _arrays(getattr(node, field.name))


def _norm(spec: Norm | None, tensors: dict[str, mx.array], prefix: str) -> NormParams | None:
    if spec is None:
        return None
    stored = tensors.pop(f"{prefix}.weight")
    weight = stored.astype(mx.float32) + spec.weight_offset
    if spec.kind == "layer":
        weight = weight.astype(stored.dtype)
    return NormParams(spec, weight, tensors.pop(f"{prefix}.bias", None))


def _matrix(stored: Matrix, quantization: Quantization | None, where: str) -> Matrix:
    """A stored [out, in] projection (or a stack of them, [experts, out, in]) as the [in, out] operand of `x @ w`
    (see the module docstring), or quantized (a stored-quantized one stays as it is)."""
    if isinstance(stored, QuantizedMatrix):
        return stored
    if quantization is not None:
        return quantize(stored, quantization, where)
    if mx.default_device().type != mx.cpu:
        return stored.swapaxes(-1, -2)
    operand = stored.astype(mx.float32).swapaxes(-1, -2)
    half = operand.shape[-1] // 2
    if operand.shape[-1] < HALVES_FROM:
        return mx.contiguous(operand)
    return Halves(mx.contiguous(operand[..., :half]), mx.contiguous(operand[..., half:]))


def _fuse(tensors: dict[str, Matrix], names: tuple[str, ...], dtype: mx.Dtype | None = None, axis: int = 0
          ) -> Matrix:
    """The concatenation of `names` along `axis` (rows; 1 for expert stacks): stored-quantized parts stay
    quantized when they share bits and group size, a mix is dequantized to `dtype`."""
    parts = [tensors.pop(name) for name in names]
    if len(parts) == 1:
        return parts[0]
    quantized = [part for part in parts if isinstance(part, QuantizedMatrix)]
    if not quantized:
        return mx.concatenate(parts, axis=axis)
    if len(quantized) == len(parts) and len({(part.bits, part.group_size) for part in quantized}) == 1:
        return QuantizedMatrix.concatenate(quantized)
    return mx.concatenate([part.dequantize_stored().astype(dtype) if isinstance(part, QuantizedMatrix) else part
                           for part in parts], axis=0)


def _layer(block: Block, tensors: dict[str, Matrix], prefix: str, quantization: Quantization | None,
           dtype: mx.Dtype) -> LayerParams:
    attn, mlp = block.attention, block.mlp
    qkv = _fuse(tensors, qkv_parts(attn, prefix, "weight"), dtype)
    qkv_bias = _fuse(tensors, qkv_parts(attn, prefix, "bias")) if attn.qkv_bias else None
    order = qkv_row_order(attn)
    if order is not None:
        rows = mx.array(order)
        qkv = qkv.take_rows(rows) if isinstance(qkv, QuantizedMatrix) else qkv[rows]
        qkv_bias = qkv_bias[rows] if qkv_bias is not None else None
    moe = _experts(mlp, tensors, f"{prefix}.mlp", quantization) if isinstance(mlp, MoE) else None
    dense = (None,) * 4 if moe is not None else _dense(mlp, tensors, f"{prefix}.mlp", quantization, dtype)
    qk_norm = attn.qk_norm.norm if attn.qk_norm is not None else None
    return LayerParams(_norm(block.attn_norm, tensors, f"{prefix}.attn_norm"),
                       _matrix(qkv, quantization, f"{prefix}.attn.qkv"), qkv_bias,
                       _matrix(tensors.pop(f"{prefix}.attn.o.weight"), quantization, f"{prefix}.attn.o"),
                       tensors.pop(f"{prefix}.attn.o.bias", None),
                       _norm(block.mlp_norm, tensors, f"{prefix}.mlp_norm"), *dense, moe=moe,
                       attn_post_norm=_norm(block.attn_post_norm, tensors, f"{prefix}.attn_post_norm"),
                       mlp_post_norm=_norm(block.mlp_post_norm, tensors, f"{prefix}.mlp_post_norm"),
                       q_norm=_norm(qk_norm, tensors, f"{prefix}.attn.q_norm"),
                       k_norm=_norm(qk_norm, tensors, f"{prefix}.attn.k_norm"),
                       sinks=tensors.pop(f"{prefix}.attn.sinks.weight", None))


def _dense(mlp: MLP, tensors: dict[str, Matrix], module: str, quantization: Quantization | None,
           dtype: mx.Dtype | None = None) -> tuple[Matrix, mx.array | None, Matrix, mx.array | None]:
    """The (up, up bias, down, down bias) of the dense MLP at canonical `module`."""
    up = _fuse(tensors, up_parts(mlp, module, "weight"), dtype)
    up_bias = _fuse(tensors, up_parts(mlp, module, "bias")) if mlp.bias else None
    return (_matrix(up, quantization, f"{module}.up"), up_bias,
            _matrix(tensors.pop(f"{module}.down.weight"), quantization, f"{module}.down"),
            tensors.pop(f"{module}.down.bias", None))


def _experts(moe: MoE, tensors: dict[str, mx.array], module: str, quantization: Quantization | None
             ) -> ExpertParams:
    """A mixture-of-experts layer's params (see the module docstring); the shared expert as a dense MLP."""
    experts = f"{module}.experts"
    up = _fuse(tensors, up_parts(moe.expert, experts, "weight"), axis=1)  # [experts, gate rows + up rows, hidden]
    up_bias = _fuse(tensors, up_parts(moe.expert, experts, "bias"), axis=1) if moe.expert.bias else None
    shared = _dense(moe.shared, tensors, f"{module}.shared", quantization) if moe.shared is not None else (None,) * 4
    gate = tensors.pop(f"{module}.shared_gate.weight", None)
    return ExpertParams(_matrix(tensors.pop(f"{module}.router.weight"), None, f"{module}.router"),
                        tensors.pop(f"{module}.router.bias", None), _matrix(up, quantization, f"{experts}.up"),
                        up_bias,
                        _matrix(tensors.pop(f"{experts}.down.weight"), quantization, f"{experts}.down"),
                        tensors.pop(f"{experts}.down.bias", None), *shared,
                        shared_gate=None if gate is None else _matrix(gate, None, f"{module}.shared_gate"))
