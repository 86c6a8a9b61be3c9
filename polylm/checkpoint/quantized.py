"""MLX-format quantized checkpoints (what mlx-lm writes): which tensors are stored quantized, and how.

config.json's `quantization` (or `quantization_config`, which mlx-lm writes as a copy) holds the default
`{"group_size", "bits", "mode": "affine"}` and, keyed by module path (`model.layers.0.mlp.gate`), per-module
exceptions: other parameters, or false. A module is stored quantized when its `weight` is uint32 and a `scales`
tensor sits beside it (mlx-lm's own rule); a module mlx-lm left as it is (a dimension not divisible by the group
size) keeps a float weight. Each quantized module's three tensors become one ref of the matrix they encode
(`TensorRef.quantized`), which `resolve` then matches like any other; readers dequantize it
(`slices.TensorFiles`) or keep it packed (the MLX backend).
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Mapping

from ..config import ConfigView
from ..errors import ConfigError, WeightsError
from ..numerics.quantization import AffineQuantization
from .weights import Checkpoint, Packed

_KEYS = ("quantization", "quantization_config")


@dataclass(frozen=True)
class StoredQuantization:
    """A checkpoint's quantization from config.json: the default and the per-module exceptions (None: the
    module is not quantized)."""

    default: AffineQuantization
    modules: Mapping[str, AffineQuantization | None]

    def spec(self, module: str) -> AffineQuantization | None:
        return self.modules.get(module, self.default)

    def describe(self) -> str:
        return f"MLX affine {self.default.bits}-bit, groups of {self.default.group_size}"


def read_quantization(config: ConfigView) -> StoredQuantization | None:
    """The MLX quantization config.json declares, or None; another quantization method (GPTQ, AWQ,
    bitsandbytes…) is refused, naming it."""
    key = next((k for k in _KEYS if config.has(k)), None)
    if key is None:
        return None
    section = config.sub(key)
    if section.has("quant_method"):
        raise ConfigError(f"{config.path}: {key!r} declares quant_method "
                          f"{section.get('quant_method', kind=str)!r}; polylm loads MLX-format quantized "
                          "checkpoints (group_size, bits) and float ones")
    modules = {}
    for name, value in section.data.items():
        if isinstance(value, (dict, bool)):
            modules[name] = _spec(ConfigView(value, f"{section.path}:{name}")) if isinstance(value, dict) else (
                None if value is False else _spec(section))
    return StoredQuantization(_spec(section), modules)


def _spec(section: ConfigView) -> AffineQuantization:
    mode = section.get("mode", kind=str, default="affine")
    if mode != "affine":
        raise ConfigError(f"{section.path}: quantization mode {mode!r} is not supported; polylm loads MLX's "
                          "'affine' mode")
    try:
        return AffineQuantization(section.get("bits"), section.get("group_size"))
    except ValueError as exc:
        raise ConfigError(f"{section.path}: {exc}") from None


def unpack_quantized(checkpoint: Checkpoint, quantization: StoredQuantization | None) -> None:
    """Replace, in `checkpoint.tensors`, each quantized module's uint32 `weight`, `scales` and `biases` by one ref
    of the [out, in] matrix they encode (`TensorRef.quantized`), checked: the config declares the module
    quantized, scales and biases are present, float and alike, with the shapes the bits and group size give.
    Errors name the tensor. A float weight stays as it is, whatever the config says (mlx-lm's rule)."""
    tensors = checkpoint.tensors
    for key, codes in list(tensors.items()):
        module, _, param = key.rpartition(".")
        if param != "weight" or codes.dtype != "U32":
            continue
        where = f"{codes.file}: tensor {key!r}"
        spec = quantization.spec(module) if quantization is not None else None
        if spec is None:
            why = "config.json declares no quantization" if quantization is None else \
                f"config.json leaves module {module!r} unquantized"
            raise WeightsError(f"{where} is packed (uint32) but {why}")
        scales, biases = (tensors.get(f"{module}.{part}") for part in ("scales", "biases"))
        for part, ref in (("scales", scales), ("biases", biases)):
            if ref is None:
                raise WeightsError(f"{where} is quantized ({spec.bits} bits) but {module}.{part} is missing")
        if len(codes.shape) != 2 or len(scales.shape) != 2:
            raise WeightsError(f"{where}: a quantized matrix and its scales have 2 dimensions, found shapes "
                               f"{list(codes.shape)} and {list(scales.shape)}")
        out_features, in_features = scales.shape[0], scales.shape[1] * spec.group_size
        codes_shape, scales_shape = spec.packed_shape(out_features, in_features)
        if codes.shape != codes_shape:
            raise WeightsError(f"{where} has shape {list(codes.shape)}; with scales {list(scales.shape)}, "
                               f"{spec.bits} bits in groups of {spec.group_size} pack as {list(codes_shape)}")
        for ref in (scales, biases):
            if ref.shape != scales_shape or ref.dtype not in ("float32", "bfloat16", "float16") or \
                    ref.dtype != scales.dtype:
                raise WeightsError(f"{ref.file}: tensor {ref.key!r} has shape {list(ref.shape)} and dtype "
                                   f"{ref.dtype}; expected {list(scales_shape)} in a float dtype, the same for "
                                   "scales and biases")
        del tensors[f"{module}.scales"], tensors[f"{module}.biases"]
        tensors[key] = replace(codes, dtype=scales.dtype, shape=(out_features, in_features),
                               quantized=Packed(spec, codes, scales, biases))
