"""Where a process sits in a tensor-parallel job, framework-free: torchrun's environment variables, the
environment `polylm … --tp N` gives the ranks it starts (torchrun's, unless a backend's `launch_env` says
otherwise), and the checks every backend's `join_group` makes."""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass

from ..errors import ParallelError


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in a job started by `torchrun`, `polylm … --tp N`, or a backend's launcher."""

    rank: int
    world_size: int
    local_rank: int


def torchrun_rank() -> RankEnv | None:
    """RANK/WORLD_SIZE/LOCAL_RANK from the environment (torchrun's names), or None when they are absent."""
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ParallelError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be "
                            "integers") from None
    return RankEnv(rank, world, local)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def torchrun_launch_env(world_size: int) -> list[dict[str, str]]:
    """torchrun's variables for each rank of a one-machine job: rank r's RANK, WORLD_SIZE, a free MASTER_PORT."""
    port = str(free_port())
    return [{"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(world_size), "RANK": str(rank),
             "LOCAL_RANK": str(rank)} for rank in range(world_size)]


def expect_rank(env: RankEnv | None, world_size: int, engine: str, how: str) -> RankEnv:
    """`env` checked against `tensor_parallel=world_size`; `engine` names the group a backend needs and `how`
    how to start one, for the error when this process was not started as a rank."""
    if env is None:
        raise ParallelError(f"tensor_parallel={world_size} needs {engine}: {how}")
    if env.world_size != world_size:
        raise ParallelError(f"tensor_parallel={world_size} but this job has {env.world_size} ranks")
    return env


def check_group_size(world_size: int, size: int, engine: str) -> None:
    """Refuse a joined group whose size is not `tensor_parallel`."""
    if size != world_size:
        raise ParallelError(f"tensor_parallel={world_size} but the {engine} group has {size} ranks")
