"""The torch backend: the reference lowering of the IR and the CPU fallback."""

from __future__ import annotations

from polylm.backend import Availability, Backend, Runtime
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR
from polylm.parallel.plan import Shard, ShardPlan
from polylm.backend import ShardRuntime
from polylm.checkpoint.weights import Weights


class TorchBackend(Backend):
    name = "torch"
    priority = 0
    install_hint = "pip install torch"

    def availability(self) -> Availability:
        try:
            import torch
        except ImportError as exc:
            return Availability(False, f"torch does not import ({exc})")
        return Availability(True, f"torch {torch.__version__} on CPU")

    def lower(self, ir: ModelIR, weights: Weights, dtype: str) -> Runtime:
        from .cpu_linear import kernel_layer
        from .runtime import TorchRuntime

        return TorchRuntime(ir, weights, dtype, prepare=kernel_layer)

    def join_group(self, world_size: int, timeout_s: float) -> Shard:
        from .parallel import join_group

        return join_group(world_size, timeout_s)

    def lower_shard(self, ir: ModelIR, weights: Weights, dtype: str, plan: ShardPlan) -> ShardRuntime:
        from .cpu_linear import kernel_layer
        from .parallel import TorchShardRuntime

        return TorchShardRuntime(ir, weights, dtype, plan, prepare=kernel_layer)


@hookimpl
def polylm_backends() -> list[Backend]:
    return [TorchBackend()]
