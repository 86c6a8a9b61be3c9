"""Writing safetensors files (for `polylm convert`): tensors streamed one at a time after a header computed from
their shapes, so a checkpoint of many GB is never held in memory; shards of at most `max_shard_bytes` with a
`model.safetensors.index.json`, as transformers and mlx-lm write them."""

from __future__ import annotations

import json
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

from .weights import INDEX_FILE, SINGLE_FILE

#: polylm dtype name (and "U32") → (safetensors dtype, bytes per element)
_SAFETENSORS = {"float32": ("F32", 4), "bfloat16": ("BF16", 2), "float16": ("F16", 2), "U32": ("U32", 4)}


@dataclass(frozen=True)
class Entry:
    """A tensor to write: its name, dtype, shape, and a function giving its data (any array of exactly its
    bytes, e.g. bfloat16 bits as uint16), called once when the tensor is written."""

    key: str
    dtype: str
    shape: tuple[int, ...]
    data: Callable[[], np.ndarray]

    @property
    def nbytes(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64)) * _SAFETENSORS[self.dtype][1]


def write_checkpoint(directory: Path, entries: Sequence[Entry], max_shard_bytes: int = 5 << 30) -> list[Path]:
    """Write `entries` into `directory` (which exists) as model.safetensors, or as shards with an index when
    they exceed `max_shard_bytes`; the files written."""
    shards: list[list[Entry]] = [[]]
    size = 0
    for entry in entries:
        if shards[-1] and size + entry.nbytes > max_shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append(entry)
        size += entry.nbytes
    if len(shards) == 1:
        names = [SINGLE_FILE]
    else:
        names = [f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        weight_map = {entry.key: name for name, shard in zip(names, shards) for entry in shard}
        total = sum(entry.nbytes for entry in entries)
        (directory / INDEX_FILE).write_text(json.dumps({"metadata": {"total_size": total},
                                                        "weight_map": weight_map}, indent=2))
    for name, shard in zip(names, shards):
        _write_file(directory / name, shard)
    return [directory / name for name in names]


def _write_file(path: Path, entries: Sequence[Entry]) -> None:
    header: dict[str, object] = {"__metadata__": {"format": "mlx"}}
    offset = 0
    for entry in entries:
        header[entry.key] = {"dtype": _SAFETENSORS[entry.dtype][0], "shape": list(entry.shape),
                             "data_offsets": [offset, offset + entry.nbytes]}
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * (-len(raw) % 8)  # the data section starts 8-byte aligned
    with open(path, "wb") as fh:
        fh.write(struct.pack("<Q", len(raw)))
        fh.write(raw)
        for entry in entries:
            data = np.ascontiguousarray(entry.data())
            if data.nbytes != entry.nbytes:
                raise ValueError(f"tensor {entry.key!r}: {data.nbytes} bytes given, {entry.nbytes} expected")
            fh.write(memoryview(data.reshape(-1).view(np.uint8)))
