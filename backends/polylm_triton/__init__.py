"""The Triton backend: the shared torch runtime (`polylm_torch_common`) with every primitive but the matrix
multiplies as a Triton kernel, and the matrix multiplies too when the weights are quantized (weight-only
int8/int4, `quantized`) or are a mixture of experts' (a grouped matmul over stacked experts, `experts`).

On a CUDA GPU it is available and preferred by `auto`; with `POLYLM_CUDA_GRAPH=1` its decode steps replay a
CUDA graph (`graph`; off by default until verified on a GPU). With `TRITON_INTERPRET=1` it runs its kernels
through Triton's CPU interpreter — slowly, for testing — and `auto` never picks it. Importing this module does
not import triton, so polylm installs and runs without it.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
from dataclasses import replace

from polylm.backend import DTYPES, Availability, Backend, Runtime
from polylm.errors import BackendError
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR
from polylm.parallel.plan import Shard, ShardPlan
from polylm.backend import ShardRuntime
from polylm.checkpoint.weights import Weights


def interpreting() -> bool:
    """Whether Triton interprets kernels on the CPU (TRITON_INTERPRET, read as triton reads it)."""
    return os.environ.get("TRITON_INTERPRET", "0").strip().lower() in ("1", "true", "on", "yes")


def cuda_graphs() -> bool:
    """Whether decode steps replay CUDA graphs: POLYLM_CUDA_GRAPH=1, on CUDA (never under the interpreter)."""
    return not interpreting() and os.environ.get("POLYLM_CUDA_GRAPH", "0").strip() == "1"


class TritonBackend(Backend):
    name = "triton"
    priority = 10
    install_hint = 'pip install "polylm[triton]"'

    @property
    def dtypes(self) -> tuple[str, ...]:  # type: ignore[override]
        # the interpreter cannot do bfloat16 arithmetic (it sees raw bits); float16 and float32 it can
        return ("float32", "float16") if interpreting() else DTYPES

    def availability(self) -> Availability:
        if importlib.util.find_spec("triton") is None:
            return Availability(False, "triton is not installed", installed=False)
        version = importlib.metadata.version("triton")
        # the interpreter runs kernels even where a GPU exists, so it decides first
        if interpreting():
            return Availability(True, f"triton {version} interpreter on CPU (TRITON_INTERPRET=1), for testing",
                                auto=False)
        import torch

        if not torch.cuda.is_available():
            return Availability(False, "no CUDA GPU (set TRITON_INTERPRET=1 to test kernels on the CPU)")
        return Availability(True, f"triton {version} on {torch.cuda.get_device_name()}")

    def lower(self, ir: ModelIR, weights: Weights, dtype: str) -> Runtime:
        self._check(ir, dtype)
        from polylm_torch_common.runtime import TorchRuntime

        from .experts import stack_params
        from .graph import GraphedRuntime
        from .ops import TritonOps

        # the torch runtime builds dense params; a quantized model's matrices are then quantized here, in this
        # backend's own layout (`quantized.QuantizedWeight`), whatever the torch backend does with quantization
        runtime_type = GraphedRuntime if cuda_graphs() else TorchRuntime
        runtime = runtime_type(replace(ir, quantization=None), weights, dtype,
                               device="cpu" if interpreting() else "cuda", ops=TritonOps())
        if ir.quantization is not None:
            from .quantized import quantize_params

            quantize_params(runtime.params, ir)
            runtime.ir = ir
        stack_params(runtime.params)  # the grouped expert matmul reads each projection's experts as one stack
        return runtime

    def join_group(self, world_size: int, timeout_s: float) -> Shard:
        from polylm_torch_common.parallel import join_group

        return join_group(world_size, timeout_s, device="cpu" if interpreting() else "cuda")

    def lower_shard(self, ir: ModelIR, weights: Weights, dtype: str, plan: ShardPlan) -> ShardRuntime:
        """The shared sharded runtime with these kernels; one GPU per rank (cuda:LOCAL_RANK), NCCL."""
        self._check(ir, dtype)
        import torch
        from polylm_torch_common.parallel import TorchShardRuntime

        from .experts import stack_params
        from .ops import TritonOps

        device = "cpu"
        if not interpreting():
            device = f"cuda:{int(os.environ.get('LOCAL_RANK', plan.shard.rank)) % torch.cuda.device_count()}"
            torch.cuda.set_device(device)
        runtime = TorchShardRuntime(ir, weights, dtype, plan, device=device, ops=TritonOps())
        stack_params(runtime.params)
        return runtime

    def _check(self, ir: ModelIR, dtype: str) -> None:
        state = self.availability()
        if not state.available:
            raise BackendError(f"backend 'triton' is not available here: {state.reason}")
        if dtype not in self.dtypes:
            raise BackendError(f"backend 'triton' cannot compute in {dtype} here; it supports {', '.join(self.dtypes)}")


@hookimpl
def polylm_backends() -> list[Backend]:
    return [TritonBackend()]
