"""Tensor parallelism for the MLX backend over mx.distributed (its `ring` backend: TCP, loopback included).
The plan, a rank's slices and the byte count are core's (`polylm.parallel`, `polylm.checkpoint.slices`); here
are joining the group and the broadcast rank 0 drives the other ranks with. The sums and gathers of the forward
pass are `ops.reduce`, `ops.gather_columns` and `ops.embed_rows`.

A process joins the group its environment describes (`ring`: set by `mlx.launch --backend ring`, or by
`polylm … --tp N` through `MLXBackend.launch_env`).
"""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from typing import Any

import mlx.core as mx
import numpy as np

from polylm.backend import ShardRuntime
from polylm.checkpoint.slices import TensorFiles
from polylm.checkpoint.weights import Weights
from polylm.errors import ParallelError
from polylm.ir import ModelIR
from polylm.parallel.launch import watch_parent
from polylm.parallel.plan import Shard, ShardPlan
from polylm.parallel.ranks import check_group_size, expect_rank

from . import ring
from .params import MX_DTYPES
from .runtime import MLXRuntime

_group: Any = None  # the group this process joined (mx.distributed.init is once per process)


def join_group(world_size: int, timeout_s: float) -> Shard:
    """This process's shard of the ring group of `world_size` ranks, joined within `timeout_s`."""
    global _group
    if _group is None:
        if not mx.distributed.is_available():
            raise ParallelError("this mlx build has no mx.distributed; tensor parallelism needs it")
        env = expect_rank(ring.launched_rank(), world_size, "an mx.distributed ring group",
                          "start the ranks with `mlx.launch --backend ring` or `polylm … --tp N`")
        watch_parent()
        _group = _init_within(timeout_s, env.rank, world_size)
    check_group_size(world_size, _group.size(), "mx.distributed")
    return Shard(_group.rank(), world_size)


#: Ends the process that started it (argv: its pid, seconds, the message) unless its stdin closes first; on
#: Ctrl-C (which reaches the whole process group) at once.
_WATCHDOG = """
import os, select, signal, sys
parent, timeout_s, message = int(sys.argv[1]), float(sys.argv[2]), sys.argv[3]
def end(text):
    sys.stderr.write(text + "\\n")
    sys.stderr.flush()
    os.kill(parent, signal.SIGKILL)
    os._exit(0)
signal.signal(signal.SIGINT, lambda *_: end("polylm: interrupted"))
if not select.select([sys.stdin], [], [], timeout_s)[0]:
    end(message)
"""


def _init_within(timeout_s: float, rank: int, world_size: int) -> Any:
    """`mx.distributed.init` on the ring backend, ended after `timeout_s` instead of waiting forever.

    mlx holds the GIL while it waits for a peer (a rank that died at start-up never answers), so no thread of
    this process can time it out or take Ctrl-C: a small watchdog process does, naming this rank, unless the
    init returns first."""
    where = f"rank {rank} of {world_size} could not join the ring group ({os.environ.get('MLX_HOSTFILE')})"
    message = f"polylm: error: tensor-parallel {where} within {timeout_s:.0f} s; is every rank running?"
    watchdog = subprocess.Popen([sys.executable, "-I", "-c", _WATCHDOG, str(os.getpid()), str(timeout_s), message],
                                stdin=subprocess.PIPE, stdout=subprocess.DEVNULL)
    try:
        return mx.distributed.init(strict=True, backend="ring")
    except Exception as exc:  # noqa: BLE001 - mlx raises plain RuntimeError
        raise ParallelError(f"{where}: {exc}") from None
    finally:
        watchdog.stdin.close()
        watchdog.wait()


# ---------------------------------------------------------------------------------------------- the runtime


class MLXShardRuntime(MLXRuntime, ShardRuntime):
    """`MLXRuntime` over this rank's slices, summing and gathering over the joined ring group."""

    def __init__(self, ir: ModelIR, weights: Weights, dtype: str, plan: ShardPlan) -> None:
        self.group = _group
        super().__init__(ir, weights, dtype, plan=plan)

    def read_tensors(self, weights: Weights) -> dict[str, mx.array]:
        """The rank's part of every canonical tensor, each read alone (`polylm.checkpoint.slices`): a slice of an
        `mx.load`ed tensor would keep the whole tensor's buffer alive."""
        tensors: dict[str, mx.array] = {}
        with TensorFiles() as files:
            for name, ref in weights.items():
                if self.plan.reads(name):
                    stored = files.read(ref, self.plan.part(name))
                    tensors[name] = mx.array(stored).view(MX_DTYPES[ref.dtype]).astype(self.mx_dtype)
                    mx.eval(tensors[name])
        return tensors

    def broadcast(self, message: Any) -> Any:
        """Rank 0's pickled `message` as bytes summed with the other ranks' zeros: its length first, then it."""
        data = np.frombuffer(pickle.dumps(message), np.uint8) if self.plan.shard.rank == 0 else None
        length = mx.distributed.all_sum(mx.array([len(data) if data is not None else 0], mx.int32),
                                        group=self.group).item()
        payload = mx.array(data) if data is not None else mx.zeros((length,), mx.uint8)
        return pickle.loads(bytes(np.array(mx.distributed.all_sum(payload, group=self.group))))
