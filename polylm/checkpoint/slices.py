"""Reading a tensor, or one tensor-parallel rank's slice of it, straight from a checkpoint file with plain reads
at the offsets its validated header gave (`weights.TensorRef`): no second header parse, no framework.

Data come back as numpy arrays of the stored bits (`STORAGE`: bfloat16 as uint16, which numpy has no type
for), so a backend views them as its own dtype without a float copy. A matrix stored MLX-quantized comes back
dequantized (`polylm.numerics.quantization.affine_dequantize`) in its scales' dtype, as `mx.dequantize` gives it.
Plain reads rather than a memory map: the file's pages are not counted in the process's resident memory, which
keeps a load's peak near the weights'.
"""

from __future__ import annotations

import math
from contextlib import ExitStack
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ..errors import WeightsError
from ..numerics.quantization import affine_dequantize
from ..parallel.plan import TensorSlice
from .weights import TensorRef

#: The numpy type holding each stored dtype's bits.
STORAGE = {"float32": np.dtype(np.float32), "float16": np.dtype(np.float16), "bfloat16": np.dtype(np.uint16),
           "U32": np.dtype(np.uint32)}

#: A column slice is read in runs of whole rows of about this many bytes, then cut.
_CHUNK_BYTES = 8 << 20


def slice_shape(ref: TensorRef, part: TensorSlice | None) -> tuple[int, ...]:
    """The shape of `part` of `ref`'s tensor (the whole tensor's when None)."""
    shape = list(ref.shape)
    if part is not None:
        if not (0 <= part.dim < len(shape) and 0 <= part.start <= part.stop <= shape[part.dim]):
            raise WeightsError(f"{ref.file}: tensor {ref.key!r} of shape {shape} has no slice [{part.start}, "
                               f"{part.stop}) of dimension {part.dim}")
        shape[part.dim] = part.stop - part.start
    return tuple(shape)


class TensorFiles:
    """Checkpoint files opened once each, for reading tensors or their slices; a context manager that closes
    them on exit."""

    def __init__(self) -> None:
        self._stack = ExitStack()
        self._files: dict[Path, BinaryIO] = {}

    def __enter__(self) -> TensorFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def read(self, ref: TensorRef, part: TensorSlice | None = None, out: np.ndarray | None = None) -> np.ndarray:
        """`part` of `ref`'s tensor (the whole tensor when None) as a C-contiguous array of its stored bits
        (`STORAGE[ref.dtype]`). Rows of dimension 0 are one read; a slice of a later dimension reads runs of
        whole rows and keeps the slice. `out`, when given, is filled instead: a C-contiguous array of exactly
        the slice's bytes, of any type (a framework's tensor seen through numpy). A view (`TensorRef.plain`
        false) reads the stored rows or columns it covers, then cuts, transposes and copies; a stack of
        per-head tensors (`TensorRef.parts`) reads the heads it covers and stacks them; a quantized matrix
        (`TensorRef.quantized`) reads the rows it covers and dequantizes them."""
        if ref.quantized is not None:
            return _fill(out, self._dequantized(ref, part), ref)
        if ref.parts:
            heads = (part.start, part.stop) if part is not None and part.dim == 0 else (0, len(ref.parts))
            inner = TensorSlice(part.dim - 1, part.start, part.stop) if part is not None and part.dim else None
            data = np.stack([self.read(head, inner) for head in ref.parts[heads[0]:heads[1]]])
            return _fill(out, data, ref)
        if not ref.plain:
            return self._read_view(ref, part, out)
        shape = slice_shape(ref, part)
        storage = STORAGE[ref.dtype]
        nbytes = math.prod(shape) * storage.itemsize
        if out is None:
            out = np.empty(shape, dtype=storage)
        elif not (out.flags.c_contiguous and out.nbytes == nbytes):
            raise ValueError(f"out holds {out.nbytes} bytes, contiguous={out.flags.c_contiguous}; "
                             f"tensor {ref.key!r} needs {nbytes}")
        data = out.reshape(-1).view(np.uint8)
        try:
            fh = self._open(ref.file)
            if part is None or part.dim == 0:
                row = nbytes // shape[0] if shape and shape[0] else 0
                self._read_at(fh, ref, ref.offset + (part.start * row if part is not None else 0), data)
            else:
                self._read_columns(fh, ref, part, data)
        except OSError as exc:
            raise WeightsError(f"{ref.file}: cannot read tensor data ({exc.strerror or exc})") from None
        return out.view(storage).reshape(shape) if out.dtype == np.uint8 else out

    def _read_view(self, ref: TensorRef, part: TensorSlice | None, out: np.ndarray | None) -> np.ndarray:
        """`part` of a transposed, row-range or interleaved view: its index ranges mapped onto the stored
        tensor."""
        ranges = [(0, size, 1) for size in ref.shape]
        if part is not None:
            ranges[part.dim] = (part.start, part.stop, 1)
        if ref.rows is not None:
            start, stop, _ = ranges[ref.rows_axis]
            first, step = ref.rows[0], ref.rows_step
            ranges[ref.rows_axis] = (first + start * step, first + (stop - 1) * step + 1 if stop > start else first,
                                     step)
        if ref.transposed:
            ranges[-2:] = ranges[:-3:-1]
        stored = ref.stored()
        # read along one cut dimension (a run of rows, or of columns), then cut the others
        cut = [d for d, (start, stop, _) in enumerate(ranges) if (start, stop) != (0, stored.shape[d])]
        dim = cut[0] if cut else 0
        data = self.read(stored, TensorSlice(dim, *ranges[dim][:2]))
        data = data[tuple(slice(None, None, r[2]) if d == dim else slice(*r) for d, r in enumerate(ranges))]
        return _fill(out, np.ascontiguousarray(data.swapaxes(-1, -2) if ref.transposed else data), ref)

    def _dequantized(self, ref: TensorRef, part: TensorSlice | None) -> np.ndarray:
        """`part` of a quantized matrix (or of its row range): the rows' codes, scales and biases read and
        dequantized, then the columns cut."""
        packed = ref.quantized
        start, stop = ref.rows or (0, ref.shape[0])
        if part is not None and part.dim == 0:
            start, stop = start + part.start, start + part.stop
        rows = TensorSlice(0, start, stop)
        scales, biases = (self.read(stored, rows).view(STORAGE[stored.dtype]) for stored in (packed.scales,
                                                                                           packed.biases))
        if ref.dtype == "bfloat16":  # the stored bits are the upper half of a float32
            scales, biases = ((values.astype(np.uint32) << 16).view(np.float32) for values in (scales, biases))
        weight = affine_dequantize(self.read(packed.codes, rows), scales, biases, packed.spec, ref.dtype)
        if part is not None and part.dim == 1:
            weight = weight[:, part.start:part.stop]
        weight = np.ascontiguousarray(weight)  # values of ref.dtype already, as float32
        if ref.dtype == "bfloat16":
            return (weight.view(np.uint32) >> 16).astype(np.uint16)
        return weight.astype(STORAGE[ref.dtype])

    def _read_columns(self, fh: BinaryIO, ref: TensorRef, part: TensorSlice, data: np.ndarray) -> None:
        """A slice of dimension `part.dim` ≥ 1: the tensor seen as [outer, size, inner] bytes, read in runs of
        outer rows, each keeping its [start, stop) block."""
        itemsize = STORAGE[ref.dtype].itemsize
        outer = math.prod(ref.shape[:part.dim])
        inner = math.prod(ref.shape[part.dim + 1:]) * itemsize
        row = ref.shape[part.dim] * inner
        if outer == 0 or row == 0:
            return
        kept = data.reshape(outer, (part.stop - part.start) * inner)
        run = max(1, _CHUNK_BYTES // row)
        buffer = np.empty((min(run, outer), row), dtype=np.uint8)
        for first in range(0, outer, run):
            rows = buffer[:min(run, outer - first)]
            self._read_at(fh, ref, ref.offset + first * row, rows.reshape(-1))
            kept[first:first + len(rows)] = rows[:, part.start * inner:part.stop * inner]

    @staticmethod
    def _read_at(fh: BinaryIO, ref: TensorRef, offset: int, data: np.ndarray) -> None:
        fh.seek(offset)
        if fh.readinto(memoryview(data)) != data.nbytes:
            raise WeightsError(f"{ref.file}: tensor {ref.key!r} is cut short; the file is truncated")

    def _open(self, path: Path) -> BinaryIO:
        if path not in self._files:
            self._files[path] = self._stack.enter_context(open(path, "rb"))
        return self._files[path]


def _fill(out: np.ndarray | None, data: np.ndarray, ref: TensorRef) -> np.ndarray:
    """`data` (C-contiguous, read for `ref`) as `TensorFiles.read` returns it: itself, or copied into `out`."""
    if out is None:
        return data
    if not (out.flags.c_contiguous and out.nbytes == data.nbytes):
        raise ValueError(f"out holds {out.nbytes} bytes, contiguous={out.flags.c_contiguous}; "
                         f"tensor {ref.key!r} needs {data.nbytes}")
    out.reshape(-1).view(np.uint8)[:] = data.reshape(-1).view(np.uint8)
    return out.view(data.dtype).reshape(data.shape) if out.dtype == np.uint8 else out
