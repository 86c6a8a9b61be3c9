"""Starting and watching a tensor-parallel job of N ranks on one machine (`polylm … --tp N`), or finding this
process's place in one started by torchrun or a backend's own launcher."""

from __future__ import annotations

import atexit
import os
import subprocess
import sys
import threading
import time
from typing import Any, Sequence

from ..backend import Backend
from ..errors import ParallelError
from ..loading import load, model_ir
from ..loading.registry import registry
from .driver import Follower, follow
from .plan import Shard, plan_shards
from .ranks import RankEnv, torchrun_launch_env, torchrun_rank


def rank_env(backend: Backend | None = None) -> RankEnv | None:
    """This process's place in a launched job: torchrun's variables (RANK, WORLD_SIZE, LOCAL_RANK), else what
    `backend`'s own launcher set (`Backend.launched_rank`), or None outside a launched job."""
    env = torchrun_rank()
    if env is None and backend is not None:
        env = backend.launched_rank()
    return env


def _rank_command(argv: Sequence[str]) -> list[str]:
    """The command of a rank `Launch` starts: `polylm`'s command line on the polylm package this process runs.
    The working directory comes off `sys.path` (`python -m` and `-c` put it first), so a folder named `polylm`
    there cannot shadow the package; `-P` / PYTHONSAFEPATH would do that only from Python 3.11 on."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    code = ("import sys\n"
            "if not getattr(sys.flags, 'safe_path', False): del sys.path[0]\n"
            f"if {root!r} not in sys.path: sys.path.insert(0, {root!r})\n"
            "from polylm.cli import main\n"
            "sys.exit(main())")
    return [sys.executable, "-c", code, *argv]


class Launch:
    """Ranks 1…N-1 of a one-machine job, started as copies of this command with the environment `backend`
    asks for (`Backend.launch_env`, torchrun's by default); this process becomes rank 0. A watcher thread ends
    the job, naming the rank, when one dies; each child ends itself when this process goes away
    (`watch_parent`)."""

    def __init__(self, argv: Sequence[str], world_size: int, backend: Backend, grace_s: float = 5.0) -> None:
        self.world_size = world_size
        self.grace_s = grace_s
        self.done = False
        ranks = backend.launch_env(world_size) or torchrun_launch_env(world_size)
        self.children: dict[int, subprocess.Popen] = {}
        for rank in range(1, world_size):
            env = {**os.environ, **ranks[rank], "POLYLM_TP_PARENT": str(os.getpid())}
            self.children[rank] = subprocess.Popen(_rank_command(argv), env=env,
                                                   stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL)
        os.environ.update(ranks[0])
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
    backend = registry().backend(options.get("backend", "auto"))
    if rank_env(backend) is None:
        plan_shards(model_ir(path, task=options.get("task")), Shard(0, world_size))
        launch = Launch(argv, world_size, backend)
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
