"""Starting and watching a tensor-parallel job of N ranks on one machine (`polylm … --tp N`), or finding this
process's place in one started by torchrun or a backend's own launcher."""

from __future__ import annotations

import atexit
import os
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import ParallelError
from ..loading import load, model_ir
from .driver import Follower, follow
from .plan import Shard, plan_shards


@dataclass(frozen=True)
class RankEnv:
    """Where this process sits in a job started by `torchrun`, `polylm … --tp N`, or `mlx.launch`."""

    rank: int
    world_size: int
    local_rank: int


def rank_env() -> RankEnv | None:
    """RANK/WORLD_SIZE/LOCAL_RANK from the environment (torchrun's names), else MLX_RANK and the ring hostfile
    `mlx.launch` writes (MLX_HOSTFILE: one list of addresses per rank), or None outside a launched job."""
    if ("RANK" not in os.environ or "WORLD_SIZE" not in os.environ) and "MLX_RANK" in os.environ:
        return _mlx_rank_env()
    if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
        return None
    try:
        rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
        local = int(os.environ.get("LOCAL_RANK", rank))
    except ValueError:
        raise ParallelError(f"RANK={os.environ['RANK']!r} and WORLD_SIZE={os.environ['WORLD_SIZE']!r} must be "
                            "integers") from None
    return RankEnv(rank, world, local)


def _mlx_rank_env() -> RankEnv:
    import json

    hostfile = os.environ.get("MLX_HOSTFILE", "")
    try:
        rank = int(os.environ["MLX_RANK"])
        if "MLX_WORLD_SIZE" in os.environ:
            world = int(os.environ["MLX_WORLD_SIZE"])
        else:  # mlx.launch leaves the hostfile empty for one rank
            hosts = open(hostfile).read().strip() if hostfile else ""
            world = len(json.loads(hosts)) if hosts else 1
    except (OSError, ValueError, TypeError) as exc:
        raise ParallelError(f"MLX_RANK={os.environ['MLX_RANK']!r} with MLX_HOSTFILE={hostfile!r}: cannot tell "
                            f"this rank's place ({exc})") from None
    return RankEnv(rank, world, rank)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class Launch:
    """Ranks 1…N-1 of a one-machine job, started as copies of this command with torchrun's environment; this
    process becomes rank 0. A watcher thread ends the job, naming the rank, when one dies; each child ends
    itself when this process goes away (`watch_parent`)."""

    def __init__(self, argv: Sequence[str], world_size: int, grace_s: float = 5.0) -> None:
        self.world_size = world_size
        self.grace_s = grace_s
        self.done = False
        port = free_port()
        base = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": str(world_size),
                "POLYLM_TP_PARENT": str(os.getpid())}
        self.children: dict[int, subprocess.Popen] = {}
        for rank in range(1, world_size):
            env = {**base, "RANK": str(rank), "LOCAL_RANK": str(rank)}
            self.children[rank] = subprocess.Popen([sys.executable, "-m", "polylm", *argv], env=env,
                                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.environ.update({k: base[k] for k in ("MASTER_ADDR", "MASTER_PORT", "WORLD_SIZE")},
                          RANK="0", LOCAL_RANK="0")
        threading.Thread(target=self._watch, name="polylm-tp-watch", daemon=True).start()
        atexit.register(self.finish)

    def _dead(self) -> str | None:
        """Which rank failed, if one did."""
        for rank, child in self.children.items():
            code = child.poll()
            if code is not None and code != 0:
                how = f"was killed by signal {-code}" if code < 0 else f"exited with status {code}"
                return f"tensor-parallel rank {rank} of {self.world_size} (pid {child.pid}) {how}"
        return None

    def _watch(self) -> None:
        while not self.done:
            failed = self._dead()
            if failed is not None:
                deadline = time.monotonic() + self.grace_s
                while time.monotonic() < deadline and not self.done:  # let rank 0 fail on its own first
                    time.sleep(0.05)
                if not self.done:
                    print(f"polylm: error: {failed}; ending the job", file=sys.stderr, flush=True)
                    self._kill()
                    os._exit(2)  # a reported failure, like every other error the CLI names
                return
            time.sleep(0.05)

    def explain(self, error: BaseException) -> BaseException:
        """`error` of rank 0, naming the rank that died when one did."""
        deadline = time.monotonic() + 2.0  # a killed rank's socket closes a moment before its exit is seen
        while (failed := self._dead()) is None and time.monotonic() < deadline:
            time.sleep(0.05)
        if failed is not None:
            return ParallelError(f"{failed}; the job stopped ({error})")
        return error

    def finish(self, timeout_s: float = 10.0) -> None:
        """Wait (bounded) for the other ranks to leave after rank 0 released them, then stop any that did not."""
        if self.done:
            return
        self.done = True
        deadline = time.monotonic() + timeout_s
        for child in self.children.values():
            try:
                child.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        self._kill()

    def _kill(self) -> None:
        for child in self.children.values():
            if child.poll() is None:
                child.kill()


def load_ranked(path: str, world_size: int, argv: Sequence[str], **options: Any):
    """The command line's `--tp N`: load rank 0's model of an N-rank job and return it; on the other ranks,
    follow rank 0 and exit when it is done. Outside torchrun (no RANK in the environment) this process starts
    ranks 1…N-1 on this machine first — after checking that the model shards N ways."""
    if not isinstance(world_size, int) or world_size < 1:
        raise ParallelError(f"--tp must be an integer ≥ 1, got {world_size!r}")
    launch = None
    if rank_env() is None:
        plan_shards(model_ir(path, task=options.get("task")), Shard(0, world_size))
        launch = Launch(argv, world_size)
    try:
        model = load(path, tensor_parallel=world_size, **options)
    except (ParallelError, RuntimeError) as exc:
        raise launch.explain(exc) if launch is not None else exc
    if isinstance(model.runtime, Follower):
        follow(model)
        sys.exit(0)
    if launch is not None:
        model.runtime.explain = launch.explain
    return model


def watch_parent() -> None:
    """In a rank started by `Launch`: exit when the launching process (rank 0) is gone."""
    parent = os.environ.get("POLYLM_TP_PARENT")
    if not parent:
        return

    def watch() -> None:
        while os.getppid() == int(parent):
            time.sleep(0.2)
        os._exit(1)

    threading.Thread(target=watch, name="polylm-tp-parent", daemon=True).start()
