"""The MLX backend: the IR lowered to Apple's MLX arrays; picked automatically on Apple silicon.

On Linux the `mlx[cpu]` wheel runs the same code on the CPU; there it runs only when asked for by name.
MLX is imported only when availability is checked or a model is lowered, so polylm installs without it.
"""

from __future__ import annotations

import platform
import sys

from polylm.backend import Availability, Backend, Runtime, ShardRuntime
from polylm.checkpoint.weights import Weights
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR
from polylm.parallel.plan import Shard, ShardPlan
from polylm.parallel.ranks import RankEnv

from . import ring


def _apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


class MLXBackend(Backend):
    name = "mlx"
    priority = 20

    @property
    def install_hint(self) -> str:  # type: ignore[override]
        if sys.platform == "darwin":
            return 'pip install "polylm[mlx]"'
        if sys.platform.startswith("linux"):
            return 'pip install "mlx[cpu]"'
        return ""

    def availability(self) -> Availability:
        try:
            import mlx.core as mx
        except Exception as exc:  # noqa: BLE001 - a broken install must not break choosing another backend
            where = ("" if sys.platform == "darwin" or sys.platform.startswith("linux")
                     else f"; MLX has no build for {sys.platform}")
            return Availability(False, f"mlx does not import ({exc}){where}", auto=False, installed=False)
        device = f"mlx {mx.__version__} on {mx.default_device().type.name.upper()}"
        if _apple_silicon():
            return Availability(True, device)
        return Availability(True, f"{device}; not Apple silicon, so only when asked for by name", auto=False)

    def lower(self, ir: ModelIR, weights: Weights, dtype: str) -> Runtime:
        from .runtime import MLXRuntime

        return MLXRuntime(ir, weights, dtype)

    def join_group(self, world_size: int, timeout_s: float) -> Shard:
        from .parallel import join_group

        return join_group(world_size, timeout_s)

    def launched_rank(self) -> RankEnv | None:
        return ring.launched_rank()

    def launch_env(self, world_size: int) -> list[dict[str, str]]:
        return ring.launch_env(world_size)

    def lower_shard(self, ir: ModelIR, weights: Weights, dtype: str, plan: ShardPlan) -> ShardRuntime:
        from .parallel import MLXShardRuntime

        return MLXShardRuntime(ir, weights, dtype, plan)


@hookimpl
def polylm_backends() -> list[Backend]:
    return [MLXBackend()]
