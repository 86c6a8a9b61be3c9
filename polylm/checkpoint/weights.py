"""Safetensors checkpoints: header validation, sharded indexes and canonical tensor names.

Headers are parsed and checked here without any framework; of the tensor data only the small 1-D tensors
(norm weights, biases) are read, to refuse non-finite values. Backends read the data at the offsets found here
(`slices.TensorFiles`, or their framework's own safetensors reader). Files are only read, and only regular files.
"""

from __future__ import annotations

import os
import re
import struct
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterable, Iterator, Mapping, Union

import numpy as np

from ..errors import TaskError, WeightsError
from ..numerics.quantization import AffineQuantization
from ..progress import progress
from .files import open_regular, parse_json, read_json

#: safetensors dtype → (polylm dtype name, bytes per element). Only float weights are model weights.
FLOAT_DTYPES = {"F32": ("float32", 4), "BF16": ("bfloat16", 2), "F16": ("float16", 2)}
_OTHER_DTYPES = {"F64": 8, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U8": 1, "BOOL": 1, "U16": 2, "U32": 4,
                 "U64": 8, "F8_E4M3": 1, "F8_E5M2": 1}
MAX_HEADER_BYTES = 100 * 1024 * 1024
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"


@dataclass(frozen=True)
class TensorRef:
    """Where one checkpoint tensor lives and what it is; for a canonical tensor stored otherwise (`Stored`), the
    view of it: the stored tensor with its last two axes swapped (`transposed`), then indices [a, b) of axis
    `rows_axis` of that (`rows`), every `rows_step`-th of them (an interleaved stack); or, with `parts`, the stack
    of one stored tensor per head (`key` then names them all, with `{h}`); or, with `quantized`, the matrix that
    MLX-format codes, scales and biases encode (`polylm.checkpoint.quantized`), of the scales' dtype.

    `shape` is the view's; `offset`, `nbytes` and `stored_shape` are the whole stored tensor's (the first part's;
    a quantized matrix's codes).
    """

    file: Path
    key: str
    dtype: str
    shape: tuple[int, ...]
    offset: int = 0  # where the stored tensor's bytes start in the file
    nbytes: int = 0
    transposed: bool = False
    rows: tuple[int, int] | None = None
    rows_axis: int = 0
    rows_step: int = 1
    stored_shape: tuple[int, ...] | None = None  # None: `shape`
    parts: tuple[TensorRef, ...] = ()  # the stored tensors stacked along a new first dimension, in order
    quantized: Packed | None = None

    @property
    def plain(self) -> bool:
        """Whether the tensor is the stored one as it is (no transposition, no row range, not stacked, not
        quantized)."""
        return not self.transposed and self.rows is None and not self.parts and self.quantized is None

    def stored(self) -> TensorRef:
        """The whole stored tensor, plain (a quantized one: the whole matrix, still quantized)."""
        if self.plain:
            return self
        return TensorRef(self.file, self.key, self.dtype, self.stored_shape or self.shape, self.offset, self.nbytes,
                         quantized=self.quantized)

    def view_of(self, stored: Any) -> Any:
        """This view of the whole `stored` tensor, an array of any framework with `.swapaxes` and slicing."""
        view = stored.swapaxes(-1, -2) if self.transposed else stored
        if self.rows is None:
            return view
        return view[(slice(None),) * self.rows_axis + (slice(*self.rows, self.rows_step),)]


@dataclass(frozen=True)
class Packed:
    """A matrix stored in MLX's affine quantized form: uint32 codes, scales and biases (plain refs)."""

    spec: AffineQuantization
    codes: TensorRef
    scales: TensorRef
    biases: TensorRef

@dataclass(frozen=True, init=False)
class Stored:
    """How a family stores a canonical module when it is not one plain tensor of its own name (a value of
    `Family.module_names`; `.weight` / `.bias` are appended as for a name).

    - `names`: candidate checkpoint module names, the first present wins (`Stored("a", "b")`).
    - `stacked`: canonical modules whose rows the stored tensor holds one after the other (GPT-2's `c_attn`:
      q, k, v; Phi-3's `gate_up_proj`: gate, up); the one mapped to this value is its share of the rows, whose
      sizes come from the IR's shapes. Map each of them to the same `Stored`.
    - `transposed`: matrices are stored [in, out] (GPT-2's Conv1D); the rows are then the stored columns.
    - `interleaved` (with `stacked`): the rows alternate between the stacked modules instead (row r belongs to
      module r mod n: gpt-oss's `gate_up_proj`, gate then up); they must be the same size.
    - `bare`: the stored names are whole tensor names, the weight's without a `.weight` suffix and the bias's
      with `_bias` appended (gpt-oss's `experts.gate_up_proj` / `gate_up_proj_bias`, `self_attn.sinks`).
    Names may hold `{i}` (the layer) as plain names do, and `{h}`: one stored tensor per head, h = 0, 1, … up to
    the canonical tensor's first dimension (heads, or KV heads), stacked along it (StableLM's per-head
    `q_layernorm.norms.{h}` as one [heads, head_dim] `QKNorm` "head_each" weight); not with `stacked` or
    `transposed`.
    """

    names: tuple[str, ...]
    stacked: tuple[str, ...]
    transposed: bool
    interleaved: bool
    bare: bool

    def __init__(self, *names: str, stacked: tuple[str, ...] = (), transposed: bool = False,
                 interleaved: bool = False, bare: bool = False) -> None:
        if not names:
            raise ValueError("Stored needs at least one checkpoint module name")
        if any("{h}" in name for name in names) and (stacked or transposed):
            raise ValueError("Stored names with {h} (a tensor per head) take no `stacked` or `transposed`")
        if interleaved and not stacked:
            raise ValueError("Stored(interleaved=True) needs the `stacked` modules whose rows alternate")
        object.__setattr__(self, "names", names)
        object.__setattr__(self, "stacked", tuple(stacked))
        object.__setattr__(self, "transposed", transposed)
        object.__setattr__(self, "interleaved", interleaved)
        object.__setattr__(self, "bare", bare)

    def key(self, module: str, param: str) -> str:
        """The stored tensor name of parameter `param` (`weight`, `bias`) of checkpoint module `module`."""
        if not self.bare:
            return f"{module}.{param}"
        return module if param == "weight" else f"{module}_{param}"


#: A value of `Family.module_names`: the checkpoint module's name, or how it is stored.
ModuleName = Union[str, Stored]


def read_header(path: Path) -> dict[str, TensorRef]:
    """Validate a safetensors file's header (length, JSON, dtypes, offsets) and list its tensors."""
    with open_regular(path, WeightsError) as fh:
        try:
            size = os.fstat(fh.fileno()).st_size
            prefix = fh.read(8)
            if len(prefix) < 8:
                raise WeightsError(f"{path}: truncated safetensors file ({size} bytes; no header length)")
            (header_len,) = struct.unpack("<Q", prefix)
            if header_len > size - 8:
                raise WeightsError(f"{path}: header length {header_len} runs past the end of the file "
                                   f"({size} bytes); the file is truncated or not safetensors")
            if header_len > MAX_HEADER_BYTES:
                raise WeightsError(f"{path}: header of {header_len} bytes exceeds the {MAX_HEADER_BYTES} limit")
            raw = fh.read(header_len)
        except OSError as exc:
            raise WeightsError(f"{path}: cannot read ({exc})") from None
    header = parse_json(raw, path, WeightsError, unique_keys=True, what="safetensors header")
    if not isinstance(header, dict):
        raise WeightsError(f"{path}: safetensors header must be a JSON object")
    data_size = size - 8 - header_len
    refs: dict[str, TensorRef] = {}
    spans = []
    for key, entry in header.items():
        if key == "__metadata__":
            continue
        ref, span = _check_entry(path, key, entry, data_size, 8 + header_len)
        refs[key] = ref
        spans.append((span, key))
    spans.sort()
    for ((_, end), key), ((begin, _), other) in zip(spans, spans[1:]):
        if begin < end:
            raise WeightsError(f"{path}: tensors {key!r} and {other!r} overlap in the data section")
    return refs


def _check_entry(path: Path, key: str, entry: object, data_size: int,
                 data_start: int) -> tuple[TensorRef, tuple[int, int]]:
    where = f"{path}: tensor {key!r}"
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise WeightsError(f"{where}: header entry must have dtype, shape and data_offsets")
    dtype, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(dtype, str):
        raise WeightsError(f"{where}: dtype must be a string, found {dtype!r}")
    if dtype in FLOAT_DTYPES:
        name, itemsize = FLOAT_DTYPES[dtype]
    elif dtype in _OTHER_DTYPES:
        name, itemsize = dtype, _OTHER_DTYPES[dtype]
    else:
        raise WeightsError(f"{where}: unknown dtype {dtype!r}")
    if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                            for d in shape)):
        raise WeightsError(f"{where}: shape must be a list of non-negative integers, found {shape!r}")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                    for o in offsets)):
        raise WeightsError(f"{where}: data_offsets must be [begin, end], found {offsets!r}")
    begin, end = offsets
    numel = 1
    for d in shape:
        numel *= d
    if not 0 <= begin <= end <= data_size:
        raise WeightsError(f"{where}: data_offsets {offsets} lie outside the data section ({data_size} bytes)")
    if end - begin != numel * itemsize:
        raise WeightsError(f"{where}: data_offsets span {end - begin} bytes but shape {shape} of {dtype} "
                           f"needs {numel * itemsize}")
    return TensorRef(path, key, name, tuple(shape), data_start + begin, end - begin), (begin, end)


def checkpoint_files(directory: Path) -> list[Path]:
    """The safetensors files of a model directory (sharded through the index, or the single file)."""
    index = directory / INDEX_FILE
    if index.exists():
        data = read_json(index, MAX_HEADER_BYTES, WeightsError)
        weight_map = data.get("weight_map") if isinstance(data, dict) else None
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise WeightsError(f"{index}: expected an object with a 'weight_map' of tensor name → file name")
        files = []
        for name in dict.fromkeys(weight_map.values()):
            files.append(_shard_path(directory, index, name))
        return files
    single = directory / SINGLE_FILE
    if single.exists():
        return [single]
    found = sorted(directory.glob("*.safetensors"))
    if found:
        return found
    pickled = [p.name for p in directory.glob("*.bin")] + [p.name for p in directory.glob("*.pt")] + \
        [p.name for p in directory.glob("*.pth")]
    if pickled:
        raise WeightsError(
            f"{directory}: only pickled weights found ({', '.join(sorted(pickled))}); polylm never unpickles files "
            "from a model directory. Convert them once with transformers in a trusted environment: "
            "AutoModel.from_pretrained(DIR).save_pretrained(NEW_DIR, safe_serialization=True)")
    raise WeightsError(f"{directory}: no {SINGLE_FILE}, {INDEX_FILE} or *.safetensors file found")


def _shard_path(directory: Path, index: Path, name: str) -> Path:
    if os.path.isabs(name) or Path(name).drive:
        raise WeightsError(f"{index}: shard path {name!r} is absolute; shards must lie inside the model directory")
    # Checked on the name, not on what it links to: the HF cache links every file into its blob store.
    if ".." in Path(name).parts:
        raise WeightsError(f"{index}: shard path {name!r} points outside the model directory")
    path = directory / name
    if not path.exists():
        raise WeightsError(f"{index}: names shard {name!r}, which does not exist in {directory}")
    return path


class Checkpoint:
    """All tensors of a model directory by checkpoint name, validated, with no data read."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.tensors: dict[str, TensorRef] = {}
        for path in checkpoint_files(directory):
            for key, ref in read_header(path).items():
                if key in self.tensors:
                    raise WeightsError(f"{path}: tensor {key!r} also appears in {self.tensors[key].file}")
                self.tensors[key] = ref


class Weights(Mapping[str, TensorRef]):
    """The tensors a model reads, by canonical name (see `ModelIR.tensor_shapes`)."""

    def __init__(self, refs: dict[str, TensorRef]) -> None:
        self.refs = refs

    def __getitem__(self, name: str) -> TensorRef:
        return self.refs[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.refs)

    def __len__(self) -> int:
        return len(self.refs)

    def by_file(self) -> Iterable[tuple[Path, dict[str, str]]]:
        """(file, canonical name → checkpoint key) per file, so each file is opened once; shows a progress
        bar over the shards of a sharded checkpoint. Tensors stacked from one stored tensor per head
        (`TensorRef.parts`, small norm weights) are not listed: read them with `slices.TensorFiles`."""
        grouped: dict[Path, dict[str, str]] = {}
        for name, ref in self.refs.items():
            if not ref.parts:
                grouped.setdefault(ref.file, {})[name] = ref.key
        return progress(grouped.items(), total=len(grouped), desc="loading shards", unit="shard")


def resolve(checkpoint: Checkpoint, shapes: Mapping[str, tuple[int, ...]], module_names: Mapping[str, ModuleName],
            head_name: str, base_prefixes: tuple[str, ...], ignored: tuple[str, ...],
            other_heads: Mapping[str, str], *, check_values: bool = True) -> Weights:
    """Match every canonical tensor to its checkpoint tensor (or its view: `Stored`), checking presence, shape,
    dtype and leftovers (a checkpoint tensor may serve several canonical ones); with `check_values`, the 1-D
    tensors' values too (the only tensor data read here; `polylm inspect` reads none)."""
    prefix = _detect_prefix(checkpoint, module_names, base_prefixes)
    refs: dict[str, TensorRef] = {}
    for name, shape in shapes.items():
        stored, layer, param = _stored_as(name, module_names, head_name, prefix)
        if "{h}" in stored.names[0]:
            refs[name] = _per_head(checkpoint, stored, name, param, shape)
            continue
        keys = [stored.key(module, param) for module in stored.names]
        key = next((k for k in keys if k in checkpoint.tensors), keys[0])
        ref = checkpoint.tensors.get(key)
        if ref is None and name.startswith("head."):
            held = [task for task, module in other_heads.items() if f"{module}.weight" in checkpoint.tensors]
            found = f"; it holds a {held[0]} head — load it with task={held[0]!r}" if held else ""
            raise TaskError(f"{checkpoint.directory}: no {head_name!r} head tensor {key!r} for this task{found}")
        if ref is None:
            wanted = " or ".join(repr(k) for k in keys)
            raise WeightsError(f"{checkpoint.directory}: missing tensor {wanted} (for {name}, expected shape "
                               f"{list(shape)})")
        if ref.quantized is not None and stored.transposed:
            raise WeightsError(f"{ref.file}: tensor {key!r} is quantized, but this family stores it transposed; "
                               "only [out, in] matrices load quantized")
        if stored.transposed or stored.stacked:
            ref = _view(ref, stored, name, layer, param, shapes)
        if ref.shape != tuple(shape):
            seen = "" if ref.plain else " seen as"
            raise WeightsError(f"{ref.file}: tensor {key!r}{seen} has shape {list(ref.shape)}, expected "
                               f"{list(shape)} (for {name})")
        if ref.dtype not in ("float32", "bfloat16", "float16"):
            raise WeightsError(f"{ref.file}: tensor {key!r} has dtype {ref.dtype}; expected F32, BF16 or F16")
        refs[name] = ref
    if check_values:
        _check_finite_vectors(part for ref in refs.values() for part in ref.parts or (ref,))
    used = {part.key for ref in refs.values() for part in ref.parts or (ref,)}
    patterns = [re.compile(p) for p in ignored]
    tied_copy = f"{head_name}.weight" if "head.weight" not in shapes else None
    for key in checkpoint.tensors:
        if key in used or key == tied_copy or any(p.search(key) for p in patterns):
            continue
        hint = ""
        for task, module in other_heads.items():
            if key.startswith(module + "."):
                hint = f"; it belongs to a {task} head — load with task={task!r}"
        raise WeightsError(f"{checkpoint.tensors[key].file}: unexpected tensor {key!r}{hint}")
    return Weights(refs)


def _view(ref: TensorRef, stored: Stored, name: str, layer: str | None, param: str,
          shapes: Mapping[str, tuple[int, ...]]) -> TensorRef:
    """`ref` (a whole stored tensor) seen as canonical tensor `name`: a matrix's last two axes swapped (biases,
    [experts, rows] stacks included, are read as they are), then its share of the rows — of a matrix, its
    second-to-last axis (the rows of each expert's matrix in a [experts, rows, in] stack); of a bias, its last:
    a run of rows, or every n-th row when `interleaved`."""
    transposed = stored.transposed and param == "weight" and len(ref.shape) > 1
    shape = list(ref.shape)
    if transposed:
        shape[-2:] = shape[:-3:-1]
    rows, step, axis = None, 1, max(len(shape) - (2 if param == "weight" else 1), 0)
    if stored.stacked:
        module = name[:-len(param) - 1]
        parts = [part.format(i=layer) for part in stored.stacked]
        if module not in parts:
            raise WeightsError(f"module names map {module} to {stored} which does not list it in `stacked`")
        start = sum(shapes[f"{part}.{param}"][axis] for part in parts[:parts.index(module)])
        size = shapes[name][axis]
        total = sum(shapes[f"{part}.{param}"][axis] for part in parts)
        if len(shape) != len(shapes[name]) or shape[axis] != total:
            raise WeightsError(f"{ref.file}: tensor {ref.key!r}{' transposed' if transposed else ''} has "
                               f"shape {list(shape)}; expected {total} rows stacking {', '.join(parts)}")
        rows = (start, start + size)
        if stored.interleaved:
            if any(shapes[f"{part}.{param}"][axis] != size for part in parts):
                raise WeightsError(f"{ref.file}: tensor {ref.key!r} interleaves {', '.join(parts)}, which need "
                                   f"rows of one size")
            step = len(parts)
            rows = (parts.index(module), total)
        shape[axis] = size
    return replace(ref, shape=tuple(shape), transposed=transposed, rows=rows, rows_axis=axis, rows_step=step,
                   stored_shape=ref.shape)


def _per_head(checkpoint: Checkpoint, stored: Stored, name: str, param: str, shape: tuple[int, ...]) -> TensorRef:
    """Canonical tensor `name` of `shape` [heads, …] as the stack of one stored tensor per head (`{h}` names:
    the first candidate whose head 0 is present), each checked for presence, shape and dtype."""
    patterns = [stored.key(module, param) for module in stored.names]
    pattern = next((p for p in patterns if p.format(h=0) in checkpoint.tensors), patterns[0])
    parts = []
    for head in range(shape[0]):
        key = pattern.format(h=head)
        part = checkpoint.tensors.get(key)
        if part is None:
            wanted = " or ".join(repr(p.format(h=head)) for p in patterns)
            raise WeightsError(f"{checkpoint.directory}: missing tensor {wanted} (head {head} of {name}, expected "
                               f"shape {list(shape[1:])})")
        if part.shape != tuple(shape[1:]) or (parts and part.dtype != parts[0].dtype):
            raise WeightsError(f"{part.file}: tensor {key!r} has shape {list(part.shape)} and dtype {part.dtype}; "
                               f"expected shape {list(shape[1:])} and head 0's dtype (for head {head} of {name})")
        parts.append(part)
    first = parts[0]
    if first.dtype not in ("float32", "bfloat16", "float16"):
        raise WeightsError(f"{first.file}: tensor {first.key!r} has dtype {first.dtype}; expected F32, BF16 or F16")
    return replace(first, key=pattern, shape=tuple(shape), stored_shape=first.shape, parts=tuple(parts))


#: The bit pattern of an all-ones exponent (infinity or NaN) in each float dtype, by (numpy view, mask).
_NON_FINITE = {"float32": (np.uint32, 0x7F800000), "bfloat16": (np.uint16, 0x7F80), "float16": (np.uint16, 0x7C00)}


def _check_finite_vectors(refs: Iterable[TensorRef]) -> None:
    """Refuse a NaN or infinity in a 1-D tensor (norm weights, biases), naming it.

    These vectors are a few kilobytes in all, so this costs nothing at load; matrices are not scanned (that
    would read the whole checkpoint): a non-finite value there shows as non-finite logits instead.
    """
    for ref in refs:
        if len(ref.shape) != 1 or ref.nbytes == 0:
            continue
        view, mask = _NON_FINITE[ref.dtype]
        with open_regular(ref.file, WeightsError) as fh:
            fh.seek(ref.offset)
            bits = np.frombuffer(fh.read(ref.nbytes), dtype=view)
        bad = np.flatnonzero((bits & mask) == mask)
        if bad.size:
            raise WeightsError(f"{ref.file}: tensor {ref.key!r} holds a NaN or infinity at index {int(bad[0])} "
                               f"({bad.size} of {bits.size} values)")


def _stored_as(name: str, module_names: Mapping[str, ModuleName], head_name: str, prefix: str
               ) -> tuple[Stored, str | None, str]:
    """How canonical tensor `name` is stored (names with the prefix and layer filled in), its layer and its
    parameter (`weight`, `bias`)."""
    module, _, param = name.rpartition(".")
    if module == "head":
        return Stored(head_name), None, param
    match = re.match(r"layers\.(\d+)\.(.*)$", module)
    layer = match.group(1) if match else None
    entry = module_names[f"layers.{{i}}.{match.group(2)}"] if match else module_names[module]
    stored = entry if isinstance(entry, Stored) else Stored(entry)
    names = tuple(f"{prefix}{n.format(i=layer, h='{h}')}" for n in stored.names)
    return Stored(*names, stacked=stored.stacked, transposed=stored.transposed, interleaved=stored.interleaved,
                  bare=stored.bare), layer, param


def _detect_prefix(checkpoint: Checkpoint, module_names: Mapping[str, ModuleName],
                   base_prefixes: tuple[str, ...]) -> str:
    entry = module_names["embed"]
    embeds = [f"{n}.weight" for n in (entry.names if isinstance(entry, Stored) else (entry,))]
    for prefix in (*base_prefixes, "transformer.", "model.", ""):
        if any(prefix + embed in checkpoint.tensors for embed in embeds):
            return prefix
    return base_prefixes[0] if base_prefixes else ""
