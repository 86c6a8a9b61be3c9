"""The environment of an mx.distributed ring job, without importing MLX: where this process sits in one that
`mlx.launch --backend ring` started (MLX_RANK, MLX_HOSTFILE: one list of addresses per rank), and the
environment of each rank of a one-machine job that `polylm … --tp N` starts (rank r listens on port + r)."""

from __future__ import annotations

import atexit
import json
import os
import tempfile

from polylm.errors import ParallelError
from polylm.parallel.ranks import RankEnv, free_port


def launched_rank() -> RankEnv | None:
    """MLX_RANK and the world size the hostfile lists, or None outside a ring job."""
    if "MLX_RANK" not in os.environ:
        return None
    hostfile = os.environ.get("MLX_HOSTFILE", "")
    try:
        rank = int(os.environ["MLX_RANK"])
        if "MLX_WORLD_SIZE" in os.environ:
            world = int(os.environ["MLX_WORLD_SIZE"])
        else:  # mlx.launch leaves the hostfile empty for one rank
            hosts = ""
            if hostfile:
                with open(hostfile) as fh:
                    hosts = fh.read().strip()
            world = len(json.loads(hosts)) if hosts else 1
    except (OSError, ValueError, TypeError) as exc:
        raise ParallelError(f"MLX_RANK={os.environ['MLX_RANK']!r} with MLX_HOSTFILE={hostfile!r}: cannot tell "
                            f"this rank's place ({exc})") from None
    return RankEnv(rank, world, rank)


def launch_env(world_size: int) -> list[dict[str, str]]:
    """MLX_RANK and MLX_HOSTFILE of each rank of a one-machine ring job: the hostfile, written here and removed
    when this process (rank 0, which outlives the others) exits, puts rank r at 127.0.0.1:port + r."""
    port = free_port()
    handle, path = tempfile.mkstemp(prefix="polylm-ring-", suffix=".json")
    with os.fdopen(handle, "w") as fh:
        json.dump([[f"127.0.0.1:{port + rank}"] for rank in range(world_size)], fh)
    atexit.register(os.unlink, path)
    return [{"MLX_RANK": str(rank), "MLX_HOSTFILE": path} for rank in range(world_size)]
