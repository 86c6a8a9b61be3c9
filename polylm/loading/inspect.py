"""`polylm inspect`: what a checkpoint is and what it costs, from config.json, the safetensors headers and which
tokenizer files exist — no tensor data is read, so a checkpoint of many GB answers at once.

    model → directory → config.json → family (registry.select) → IR
                      → safetensors headers → the IR's tensors (checkpoint_weights, values unread)
                          → parameters per part, weight bytes per stored dtype and quantized, KV-cache bytes
          → the backend `auto` picks here (registry) · tokenizer.json and chat template present
"""

from __future__ import annotations

import dataclasses
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ..backend import DTYPES, cache_slots
from ..checkpoint.hub import resolve_model
from ..checkpoint.weights import FLOAT_DTYPES, Weights
from ..config import ConfigView
from ..errors import BackendError
from ..generate.chat import find_template
from ..generate.tokenizer import read_settings
from ..ir import QUANTIZATIONS, ModelIR, Quantization
from .load import checkpoint_weights, infer_task
from .registry import PluginInfo, registry

#: The parts parameters are counted in, in the order they are shown.
PARTS = ("embedding", "attention", "mlp", "norms", "head")
#: Canonical matrices that `--quantize` stores as integers: the block projections and an untied head.
_QUANTIZED = re.compile(r"^(layers\.\d+\.(attn\.(q|k|v|qkv|o)|mlp\.((experts|shared)\.)?(gate|up|down))|head)\.weight$")
_ITEMSIZE = dict(FLOAT_DTYPES.values())


@dataclass(frozen=True)
class BackendChoice:
    """The backend `backend="auto"` picks here (None: none runs) and its state (or why none runs), and every
    installed backend's state (`Backend.describe()`) in auto-selection order: `auto` takes the first that runs
    here and may be picked automatically."""

    auto: str | None
    reason: str
    backends: tuple[dict[str, Any], ...]


@dataclass(frozen=True)
class Inspection:
    """A checkpoint described without reading its tensors; `as_dict()` is the `--json` form."""

    model: str
    directory: Path
    model_type: str
    family: str
    plugin: PluginInfo
    task: str
    notes: tuple[str, ...]
    ir: ModelIR
    parameters: dict[str, int]  # PARTS, then "total"; a tied head counts once, in the embedding
    weight_bytes: dict[str, int]  # stored dtype → bytes of the tensors the model reads
    quantized_bytes: dict[str, dict[str, int]]  # "int8" / "int4" → `weight_bytes` under that `--quantize`
    kv_dtype: str
    kv_bytes_per_token: int
    kv_bytes_at_context: int
    backend: BackendChoice
    tokenizer: bool
    chat_template: str | None  # where the default chat template comes from

    def as_dict(self) -> dict[str, Any]:
        return {
            "model": self.model, "directory": str(self.directory), "model_type": self.model_type,
            "family": self.family, "plugin": dataclasses.asdict(self.plugin), "task": self.task,
            "notes": list(self.notes), "ir": ir_data(self.ir), "parameters": self.parameters,
            "weights": {"bytes_by_dtype": self.weight_bytes, "bytes": sum(self.weight_bytes.values()),
                        "quantized_bytes": self.quantized_bytes},
            "kv_cache": {"dtype": self.kv_dtype, "bytes_per_token": self.kv_bytes_per_token,
                         "context_length": self.ir.context_length, "bytes_at_context": self.kv_bytes_at_context},
            "backend": {"auto": self.backend.auto, "reason": self.backend.reason,
                        "backends": list(self.backend.backends)},
            "tokenizer": self.tokenizer, "chat_template": self.chat_template,
        }


def inspect(model: str | Path, *, dtype: str | None = None) -> Inspection:
    """Describe the checkpoint `model` (a directory or a cached Hub repo id) as `polylm.load` would load it, with
    `dtype` the compute dtype the KV cache is counted in (None: the stored one, as `load` does). Raises the
    errors `load` raises for a bad directory, config or header; reads no tensor data."""
    if dtype is not None and dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    directory = resolve_model(model)
    config = ConfigView.from_dir(directory)
    plugins = registry()
    task = infer_task(config)
    family, mapped = plugins.select(config, task)
    model_type = config.get("model_type", kind=str)
    plugin = next(info for claimant, info in plugins.claimants[model_type] if claimant is family)
    ir = mapped.ir
    weights = checkpoint_weights(directory, config, family, ir, task, check_values=False)
    dtype = dtype or weights["embed.weight"].dtype
    per_token, at_context = kv_cache_bytes(ir, dtype)
    template = find_template(directory, read_settings(directory))
    return Inspection(
        model=str(model), directory=directory, model_type=model_type, family=family.name, plugin=plugin,
        task=task, notes=mapped.notes, ir=ir, parameters=parameters(weights), weight_bytes=weight_bytes(weights),
        quantized_bytes={name: weight_bytes(weights, spec) for name, spec in QUANTIZATIONS.items()},
        kv_dtype=dtype, kv_bytes_per_token=per_token, kv_bytes_at_context=at_context,
        backend=auto_backend(dtype), tokenizer=(directory / "tokenizer.json").exists(),
        chat_template=template.origin if template is not None else None)


def part(name: str) -> str:
    """The part of the model a canonical tensor belongs to (one of `PARTS`)."""
    module = name.rpartition(".")[0]
    if module.rpartition(".")[2].endswith("norm"):
        return "norms"
    top = module.split(".")[0]
    if top == "layers":
        return "attention" if module.split(".")[2] == "attn" else "mlp"
    return "embedding" if top == "embed" else top


def parameters(weights: Weights) -> dict[str, int]:
    """Parameters per part and in total: every tensor the model reads, once (a tied head is the embedding)."""
    counts = dict.fromkeys(PARTS, 0)
    for name, ref in weights.items():
        counts[part(name)] += math.prod(ref.shape)
    return counts | {"total": sum(counts.values())}


def weight_bytes(weights: Weights, quantization: Quantization | None = None) -> dict[str, int]:
    """Bytes of the tensors the model reads, per stored dtype; with `quantization`, the quantized matrices under
    the name of their scheme ("int8", "int4": codes at their bit width plus scales in the scheme's scale dtype).
    Matrices a checkpoint stores MLX-quantized count as stored, under "mlx-int<bits>" (codes, scales, biases)."""
    sizes: dict[str, int] = {}
    for name, ref in weights.items():
        if ref.quantized is not None:
            packed = ref.quantized
            key = f"mlx-int{packed.spec.bits}"
            size = packed.codes.nbytes + packed.scales.nbytes + packed.biases.nbytes
        elif quantization is not None and _QUANTIZED.match(name):
            key, size = f"int{quantization.bits}", quantized_bytes(ref.shape, quantization)
        else:
            key, size = ref.dtype, math.prod(ref.shape) * _ITEMSIZE[ref.dtype]
        sizes[key] = sizes.get(key, 0) + size
    return sizes


def quantized_bytes(shape: tuple[int, ...], quantization: Quantization) -> int:
    """Bytes of an [out, in] matrix (or a stack of them: [experts, out, in]) quantized as `quantization` says
    (`polylm.numerics.quantization`): the codes, and a scale per row and group of `group_size` inputs (a short
    last group has one too)."""
    rows, columns = math.prod(shape[:-1]), shape[-1]
    groups = -(-columns // (quantization.group_size or columns))
    return -(-rows * columns * quantization.bits // 8) + rows * groups * _ITEMSIZE[quantization.scale_dtype]


def kv_cache_bytes(ir: ModelIR, dtype: str) -> tuple[int, int]:
    """KV-cache bytes per token (every layer's keys and values in `dtype`) and of a cache of the full context,
    where a layer with a sliding window holds only its ring (`polylm.backend.cache_slots`)."""
    per_token = at_context = 0
    for block, slots in zip(ir.layers, cache_slots(ir, ir.context_length)):
        attention = block.attention
        layer = 2 * attention.num_kv_heads * attention.head_dim * _ITEMSIZE[dtype]
        per_token += layer
        at_context += layer * slots
    return per_token, at_context


def auto_backend(dtype: str) -> BackendChoice:
    """Which backend `auto` picks here (the registry's own choice) and why, or why none runs."""
    plugins = registry()
    states = tuple(b.describe() for b in plugins.ranked_backends())
    try:
        chosen = plugins.backend("auto")
    except BackendError as exc:
        return BackendChoice(None, str(exc), states)
    reason = next(state["reason"] for state in states if state["name"] == chosen.name)
    if dtype not in chosen.dtypes:
        reason += f"; but it cannot compute in {dtype} (only {', '.join(chosen.dtypes)}): pass --dtype"
    return BackendChoice(chosen.name, reason, states)


def ir_data(ir: ModelIR) -> dict[str, Any]:
    """The IR as JSON-ready data: its dataclasses' fields, each attention's position with a `type` (rope, alibi)."""
    data = dataclasses.asdict(ir)
    for block, node in zip(ir.blocks, [data["block"], *data["variants"]]):
        position = block.attention.position
        if position is not None:  # RoPE or ALiBi: their fields alone do not say which
            node["attention"]["position"] = {"type": type(position).__name__.lower(), **node["attention"]["position"]}
    return data
