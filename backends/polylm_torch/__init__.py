"""The torch backend: the shared torch runtime (`polylm_torch_common`) on the CPU, with the compiled kernels of
`cpu_gemv` for the matrices (`cpu_linear`) and the fused ops (`cpu_ops`)."""

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
            return Availability(False, f"torch does not import ({exc})", installed=False)
        return Availability(True, f"torch {torch.__version__} on CPU")

    def lower(self, ir: ModelIR, weights: Weights, dtype: str) -> Runtime:
        from polylm_torch_common.runtime import TorchRuntime

        from .cpu_linear import kernel_layer
        from .cpu_ops import CpuOps

        return TorchRuntime(ir, weights, dtype, ops=CpuOps(), prepare=kernel_layer)

    def join_group(self, world_size: int, timeout_s: float) -> Shard:
        from polylm_torch_common.parallel import join_group

        return join_group(world_size, timeout_s)

    def lower_shard(self, ir: ModelIR, weights: Weights, dtype: str, plan: ShardPlan) -> ShardRuntime:
        from polylm_torch_common.parallel import TorchShardRuntime

        from .cpu_linear import kernel_layer
        from .cpu_ops import CpuOps

        return TorchShardRuntime(ir, weights, dtype, plan, ops=CpuOps(), prepare=kernel_layer)


@hookimpl
def polylm_backends() -> list[Backend]:
    return [TorchBackend()]
