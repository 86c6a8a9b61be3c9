"""Tensor parallelism for the MLX backend over mx.distributed (its `ring` backend: TCP, loopback included).
The plan is core's (`polylm.parallel`); here are joining the group, reading a rank's slices, and the broadcast
rank 0 drives the other ranks with. The sums and gathers of the forward pass are `ops.reduce`,
`ops.gather_columns` and `ops.embed_rows`.

A process joins the group `mlx.launch --backend ring` describes (MLX_RANK, MLX_HOSTFILE), or the one
`polylm … --tp N` starts on this machine (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT: rank r listens on
MASTER_PORT + r).
"""

from __future__ import annotations

import atexit
import json
import os
import pickle
import struct
import tempfile
import threading
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from polylm.errors import ParallelError, WeightsError
from polylm.ir import ModelIR
from polylm.parallel.plan import Shard, ShardPlan
from polylm.backend import ShardRuntime
from polylm.parallel.launch import rank_env, watch_parent
from polylm.checkpoint.weights import Weights

from .params import _arrays
from .runtime import MLXRuntime

_group: Any = None  # the group this process joined (mx.distributed.init is once per process)


def join_group(world_size: int, timeout_s: float) -> Shard:
    """This process's shard of the ring group of `world_size` ranks, joined within `timeout_s`."""
    global _group
    if _group is None:
        if not mx.distributed.is_available():
            raise ParallelError("this mlx build has no mx.distributed; tensor parallelism needs it")
        if "MLX_HOSTFILE" not in os.environ or "MLX_RANK" not in os.environ:
            env = rank_env()
            if env is None:
                raise ParallelError(f"tensor_parallel={world_size} needs an mx.distributed group: start the ranks "
                                    "with `mlx.launch --backend ring` or `polylm … --tp N`")
            if env.world_size != world_size:
                raise ParallelError(f"tensor_parallel={world_size} but WORLD_SIZE={env.world_size}")
            _write_hostfile(env.rank, env.world_size)
        watch_parent()
        _group = _init_within(timeout_s, int(os.environ["MLX_RANK"]), world_size)
    if _group.size() != world_size:
        raise ParallelError(f"tensor_parallel={world_size} but the mx.distributed group has {_group.size()} ranks")
    return Shard(_group.rank(), world_size)


def _write_hostfile(rank: int, world_size: int) -> None:
    """The ring hostfile of a one-machine job started by `polylm … --tp N`: rank r at MASTER_PORT + r."""
    address, port = os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "0"))
    if not port:
        raise ParallelError("MASTER_PORT is not set; start the ranks with `polylm … --tp N` or `mlx.launch`")
    handle, path = tempfile.mkstemp(prefix="polylm-ring-", suffix=".json")
    with os.fdopen(handle, "w") as fh:
        json.dump([[f"{address}:{port + r}"] for r in range(world_size)], fh)
    atexit.register(os.unlink, path)
    os.environ.update(MLX_HOSTFILE=path, MLX_RANK=str(rank))


def _init_within(timeout_s: float, rank: int, world_size: int) -> Any:
    """`mx.distributed.init` on the ring backend, failing after `timeout_s` instead of retrying forever."""
    joined: dict[str, Any] = {}

    def init() -> None:
        try:
            joined["group"] = mx.distributed.init(strict=True, backend="ring")
        except Exception as exc:  # noqa: BLE001 - mlx raises plain RuntimeError
            joined["error"] = exc

    thread = threading.Thread(target=init, name="polylm-ring-init", daemon=True)
    thread.start()
    thread.join(timeout_s)
    where = f"rank {rank} of {world_size} could not join the ring group ({os.environ.get('MLX_HOSTFILE')})"
    if thread.is_alive():
        raise ParallelError(f"{where} within {timeout_s:.0f} s")
    if "error" in joined:
        raise ParallelError(f"{where}: {joined['error']}")
    return joined["group"]


# ------------------------------------------------------------------------------------------ a rank's slices

_STORED = {"F32": (np.float32, mx.float32), "F16": (np.float16, mx.float16), "BF16": (np.uint16, mx.bfloat16)}


def read_slices(weights: Weights, dtype: mx.Dtype, plan: ShardPlan) -> dict[str, mx.array]:
    """The rank's part of every canonical tensor as an MLX array of `dtype`, read alone from the memory-mapped
    file: a slice of an `mx.load`ed tensor would keep the whole tensor's buffer alive."""
    tensors: dict[str, mx.array] = {}
    for path, names in weights.by_file():
        header, data_start = _header(path)
        for name, key in names.items():
            if not plan.reads(name):
                continue
            entry = header[key]
            if entry["dtype"] not in _STORED:
                raise WeightsError(f"{path}: tensor {key!r} is {entry['dtype']}; the MLX backend reads "
                                   f"{', '.join(_STORED)}")
            storage, stored_dtype = _STORED[entry["dtype"]]
            begin = data_start + entry["data_offsets"][0]
            whole = np.memmap(path, dtype=storage, mode="r", offset=begin, shape=tuple(entry["shape"]))
            part = plan.part(name)
            if part is not None:
                whole = whole[(slice(None),) * part.dim + (slice(part.start, part.stop),)]
            tensors[name] = mx.array(np.ascontiguousarray(whole)).view(stored_dtype).astype(dtype)
            mx.eval(tensors[name])
    return tensors


def _header(path: Path) -> tuple[dict[str, Any], int]:
    with open(path, "rb") as fh:
        (length,) = struct.unpack("<Q", fh.read(8))
        return json.loads(fh.read(length)), 8 + length  # validated by `polylm.checkpoint.weights.read_header` already


# ---------------------------------------------------------------------------------------------- the runtime


class MLXShardRuntime(MLXRuntime, ShardRuntime):
    """`MLXRuntime` over this rank's slices, summing and gathering over the joined ring group."""

    def __init__(self, ir: ModelIR, weights: Weights, dtype: str, plan: ShardPlan) -> None:
        self.group = _group
        super().__init__(ir, weights, dtype, plan=plan)

    def read_tensors(self, weights: Weights) -> dict[str, mx.array]:
        return read_slices(weights, self.mx_dtype, self.plan)

    def broadcast(self, message: Any) -> Any:
        """Rank 0's pickled `message` as bytes summed with the other ranks' zeros: its length first, then it."""
        data = np.frombuffer(pickle.dumps(message), np.uint8) if self.plan.shard.rank == 0 else None
        length = mx.distributed.all_sum(mx.array([len(data) if data is not None else 0], mx.int32),
                                        group=self.group).item()
        payload = mx.array(data) if data is not None else mx.zeros((length,), mx.uint8)
        return pickle.loads(bytes(np.array(mx.distributed.all_sum(payload, group=self.group))))

    def held_bytes(self) -> int:
        params = self.params
        tied = self.local.head.tied_to_embedding  # the head is a view of the embedding
        return sum(array.nbytes for array in _arrays(params) if not (tied and array is params.head))
