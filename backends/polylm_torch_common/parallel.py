"""Tensor parallelism for the torch and Triton backends (which share this runtime) over torch.distributed: gloo
on CPU, NCCL on CUDA. The plan is core's (`polylm.parallel`); here are only the collectives the runtime calls
through its ops and joining the process group.
"""

from __future__ import annotations

import atexit
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from polylm.errors import ParallelError
from polylm.ir import ModelIR
from polylm.parallel.plan import Shard, ShardPlan, gather_padding, trim_gathered
from polylm.backend import ShardRuntime
from polylm.parallel.launch import watch_parent
from polylm.parallel.ranks import check_group_size, expect_rank, torchrun_rank
from polylm.checkpoint.weights import Weights

from .ops import ReferenceOps
from .params import Prepare
from .runtime import TorchRuntime

#: How long a rank waits for rank 0's next call: a server may idle for days. A dead rank 0 still ends the wait
#: at once, when its connection closes.
CONTROL_TIMEOUT = timedelta(days=30)


class Collectives:
    """The sums and gathers of one tensor-parallel rank, over a torch.distributed group."""

    def __init__(self, group: Any = None) -> None:
        self.group = group
        self.world_size = dist.get_world_size(group)

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        x = x.contiguous()
        dist.all_reduce(x, group=self.group)
        return x

    def all_gather(self, x: torch.Tensor, sizes: tuple[int, ...]) -> torch.Tensor:
        pad = gather_padding(x.shape[-1], sizes)  # uneven shares travel padded to the widest
        if pad:
            x = torch.nn.functional.pad(x, (0, pad))
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in sizes]
        dist.all_gather(parts, x, group=self.group)
        return torch.cat(trim_gathered(parts, sizes), dim=-1)


def join_group(world_size: int, timeout_s: float, device: str = "cpu") -> Shard:
    """This process's shard of the default process group: the one already initialized, else the one torchrun's
    environment (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) describes, joined within `timeout_s`."""
    if not dist.is_available():
        raise ParallelError("this torch build has no torch.distributed; tensor parallelism needs it")
    if not dist.is_initialized():
        env = expect_rank(torchrun_rank(), world_size, "a torch.distributed process group",
                          "call torch.distributed.init_process_group first, or start the ranks with torchrun or "
                          "`polylm … --tp N`")
        watch_parent()
        engine = "nccl" if device.startswith("cuda") else "gloo"
        try:
            dist.init_process_group(engine, init_method="env://", rank=env.rank, world_size=env.world_size,
                                    timeout=timedelta(seconds=timeout_s))
        except Exception as exc:  # noqa: BLE001 - rendezvous errors come as several types
            raise ParallelError(f"rank {env.rank} of {world_size} could not join the group at "
                                f"{_address()} within {timeout_s:.0f} s: {exc}") from None
        atexit.register(_leave)  # the group polylm joined, it leaves (after rank 0 released the others)
    check_group_size(world_size, dist.get_world_size(), "torch.distributed")
    return Shard(dist.get_rank(), world_size)


def _leave() -> None:
    try:
        if dist.is_initialized():
            dist.destroy_process_group()
    except Exception:  # noqa: BLE001 - at exit, a peer may be gone already
        pass


def _address() -> str:
    import os

    return f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"


class TorchShardRuntime(TorchRuntime, ShardRuntime):
    """`TorchRuntime` over this rank's slices, with its collectives on the default group and rank 0's calls
    broadcast on a gloo group of its own (objects travel on the CPU, and waiting there may take long)."""

    def __init__(self, ir: ModelIR, weights: Weights, dtype: str, plan: ShardPlan, device: str = "cpu",
                 ops: ReferenceOps | None = None, prepare: Prepare | None = None) -> None:
        ops = ops or ReferenceOps()
        ops.collectives = Collectives()
        self._control = dist.new_group(backend="gloo", timeout=CONTROL_TIMEOUT)
        super().__init__(ir, weights, dtype, device=device, ops=ops, plan=plan, prepare=prepare)

    def broadcast(self, message: Any) -> Any:
        box = [message]
        dist.broadcast_object_list(box, src=0, group=self._control)
        return box[0]


def param_bytes(params: Any) -> int:
    """Bytes of the distinct weights in a runtime's params (a tied head counted once), kernel layers included."""
    seen: dict[int, int] = {}
    for tensor in _tensors(params):
        if isinstance(tensor, torch.Tensor):
            seen[tensor.data_ptr()] = tensor.numel() * tensor.element_size()
        else:
            seen[id(tensor)] = tensor.nbytes
    return sum(seen.values())


def _tensors(value: Any):
    if isinstance(value, torch.Tensor) or hasattr(value, "nbytes"):
        yield value
    elif isinstance(value, (list, tuple)):
        for item in value:
            yield from _tensors(item)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _tensors(getattr(value, name))
