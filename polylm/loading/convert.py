"""`polylm convert`: a checkpoint rewritten MLX-quantized, the form mlx-lm writes and loads and polylm loads
without quantizing again (`polylm.checkpoint.quantized`).

Every projection matrix and the embedding whose input size is a whole number of groups is stored as MLX's
affine codes, scales and biases — computed as `mx.quantize` computes them (`numerics.quantization.
affine_quantize`), scales and biases in the matrix's dtype; the rest (norms, biases, learned positions, matrices
a dimension of which does not divide the group size, or stored transposed) is copied as it is. Only the tensors
the model reads are written (a tied head's copy and stale buffers are dropped). config.json gains
`quantization` (and mlx-lm's copy `quantization_config`); tokenizer files, the chat template and the generation
config are copied. The output is written beside the target and renamed into place when complete.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from pathlib import Path

import numpy as np

from ..checkpoint.files import open_regular
from ..checkpoint.hub import resolve_model
from ..checkpoint.quantized import read_quantization
from ..checkpoint.slices import TensorFiles
from ..checkpoint.weights import TensorRef
from ..checkpoint.write import Entry, write_checkpoint
from ..config import ConfigView
from ..errors import InputError, WeightsError
from ..numerics.quantization import AffineQuantization, affine_quantize
from .load import checkpoint_weights, infer_task
from .registry import registry

#: `--quantize` names → bits
BITS = {"int8": 8, "int4": 4}
#: mlx-lm's default group size
DEFAULT_GROUP_SIZE = 64
#: Canonical matrices stored quantized: the embedding, the block projections and the head (mlx-lm quantizes
#: every Linear and Embedding).
_QUANTIZED = re.compile(r"^(embed|head|layers\.\d+\.(attn\.(q|k|v|qkv|o)|mlp\.(gate|up|down)))\.weight$")
#: Side files copied when present: mlx-lm and polylm read them from the model folder.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
              "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json",
              "generation_config.json")


def convert(source: str | Path, target: str | Path, *, quantize: str, group_size: int = DEFAULT_GROUP_SIZE,
            max_shard_bytes: int = 5 << 30) -> Path:
    """Write `source` (a directory or cached Hub repo id) MLX-quantized (`quantize`: "int4" or "int8", in
    groups of `group_size`: 32, 64 or 128) into the new directory `target`; returns it."""
    if quantize not in BITS:
        raise InputError(f"unknown quantization {quantize!r}; choose one of {', '.join(BITS)}")
    try:
        spec = AffineQuantization(BITS[quantize], group_size)
    except ValueError as exc:
        raise InputError(str(exc)) from None
    directory = resolve_model(source)
    target = Path(target)
    if target.exists():
        raise InputError(f"{target} already exists; convert writes a new directory")
    config = ConfigView.from_dir(directory)
    if read_quantization(config) is not None:
        raise InputError(f"{directory} is already quantized ({read_quantization(config).describe()})")
    task = infer_task(config)
    family, mapped = registry().select(config, task)
    weights = checkpoint_weights(directory, config, family, mapped.ir, task)
    stored = _stored_tensors(weights)
    quantized = {ref.key for name, ref in weights.items() if _QUANTIZED.match(name) and _quantizable(ref, spec)}
    partial = target.with_name(f".{target.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        with TensorFiles() as files:
            entries = []
            for key, ref in stored.items():
                entries.extend(_entries(files, ref, spec) if key in quantized else [_copy(files, ref)])
            write_checkpoint(partial, entries, max_shard_bytes)
        data = dict(config.data)
        data["quantization"] = data["quantization_config"] = {"group_size": group_size, "bits": spec.bits,
                                                              "mode": "affine"}
        (partial / "config.json").write_text(json.dumps(data, indent=2) + "\n")
        for name in SIDE_FILES:
            if (directory / name).exists():
                with open_regular(directory / name, WeightsError) as src, open(partial / name, "wb") as dst:
                    shutil.copyfileobj(src, dst)
        partial.rename(target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target


def _stored_tensors(weights) -> dict[str, TensorRef]:
    """The stored tensors the model reads, by checkpoint key, in checkpoint order, each whole and plain."""
    stored: dict[str, TensorRef] = {}
    for ref in weights.values():
        for part in ref.parts or (ref,):
            stored.setdefault(part.key, part.stored())
    return stored


def _quantizable(ref: TensorRef, spec: AffineQuantization) -> bool:
    """Whether a canonical matrix's stored tensor can be stored quantized: [out, in], a whole number of groups."""
    shape = ref.stored().shape
    return not ref.transposed and not ref.parts and len(shape) == 2 and shape[1] % spec.group_size == 0


def _float32(files: TensorFiles, ref: TensorRef) -> np.ndarray:
    data = files.read(ref)
    return (data.astype(np.uint32) << 16).view(np.float32) if ref.dtype == "bfloat16" else data.astype(np.float32)


def _storage(values: np.ndarray, dtype: str) -> np.ndarray:
    """float32 values of `dtype` as its stored bits."""
    if dtype == "bfloat16":
        return (np.ascontiguousarray(values, dtype=np.float32).view(np.uint32) >> 16).astype(np.uint16)
    return values.astype(dtype)


def _entries(files: TensorFiles, ref: TensorRef, spec: AffineQuantization) -> list[Entry]:
    """The codes, scales and biases of one matrix, computed once when the codes are written."""
    module = ref.key[:-len(".weight")]
    (rows, columns), dtype = ref.shape, ref.dtype
    codes_shape, scales_shape = spec.packed_shape(rows, columns)
    made: dict[str, np.ndarray] = {}

    def part(name: str):
        def data() -> np.ndarray:
            if not made:
                codes, scales, biases = affine_quantize(_float32(files, ref), spec, dtype)
                made.update(codes=codes, scales=_storage(scales, dtype), biases=_storage(biases, dtype))
            return made.pop(name)
        return data

    return [Entry(ref.key, "U32", codes_shape, part("codes")),
            Entry(f"{module}.scales", dtype, scales_shape, part("scales")),
            Entry(f"{module}.biases", dtype, scales_shape, part("biases"))]


def _copy(files: TensorFiles, ref: TensorRef) -> Entry:
    return Entry(ref.key, ref.dtype, ref.shape, lambda: files.read(ref))
