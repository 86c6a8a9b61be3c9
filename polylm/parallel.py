"""Tensor parallelism, framework-free: which slice of each canonical tensor a rank holds, how rank 0 drives the
other ranks through the `Runtime` contract, and how a job of N ranks is started and watched.

The plan is Megatron's, derived from the IR alone (no family code): attention heads are split across ranks
(q/k/v rows by local head, the output projection by the matching columns; KV heads split, or each rank keeps
the one KV head its query heads share when there are fewer KV heads than ranks), the MLP's gate/up rows and
down columns by a range of the intermediate size, the embedding and a vocabulary head by a range of the
vocabulary (a tied head with it); norms and small task heads are replicated. The two row-parallel outputs
(attention output, MLP down) are summed over the ranks, so their biases are read on rank 0 only.

Only rank 0 runs `Model`, the tokenizer and sampling. Its runtime (`Driver`) broadcasts every `new_cache` and
`forward` call — the step's token ids are the tokens rank 0 picked — and the other ranks replay them
(`follow`), so all ranks run the same collectives in the same order and agree on every token by construction.
The transport is the backend's own engine (torch.distributed, mx.distributed) through `ShardRuntime.broadcast`.
"""

from __future__ import annotations

import atexit
import itertools
import os
import socket
import subprocess
import sys
import threading
import time
import weakref
from dataclasses import dataclass, replace
from typing import Any, Callable, Mapping, Sequence

import numpy as np

from .backend import Cache, Runtime, Step
from .errors import ParallelError
from .ir import ModelIR
from .lowering import qkv_parts, up_parts

#: Seconds a collective (and the initial connection of all ranks) may wait before the job fails.
DEFAULT_TIMEOUT_S = 120.0


def timeout_s() -> float:
    """The collective timeout: POLYLM_TP_TIMEOUT seconds, else `DEFAULT_TIMEOUT_S`."""
    value = os.environ.get("POLYLM_TP_TIMEOUT")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ParallelError(f"POLYLM_TP_TIMEOUT must be a number of seconds, got {value!r}") from None


# -------------------------------------------------------------------------------------------------- the plan


@dataclass(frozen=True)
class Shard:
    """One rank of a tensor-parallel group of `world_size` ranks."""

    rank: int
    world_size: int

    def __post_init__(self) -> None:
        if not (isinstance(self.world_size, int) and self.world_size >= 1):
            raise ParallelError(f"tensor-parallel world size must be an integer ≥ 1, got {self.world_size!r}")
        if not (isinstance(self.rank, int) and 0 <= self.rank < self.world_size):
            raise ParallelError(f"rank must be in [0, {self.world_size}), got {self.rank!r}")


@dataclass(frozen=True)
class TensorSlice:
    """Indices [start, stop) of dimension `dim` of a checkpoint tensor."""

    dim: int
    start: int
    stop: int


@dataclass(frozen=True)
class ShardPlan:
    """What one rank holds and computes.

    `slices` maps a canonical tensor name to the part the rank reads, or to None when the rank reads nothing
    of it (a row-parallel bias off rank 0); a name it does not list is read whole (replicated).
    `local_ir` is the model the rank computes with: its own heads, intermediate and vocabulary sizes.
    `head_rows` is the vocabulary range of a vocab-parallel head, None when the head is replicated.
    """

    shard: Shard
    ir: ModelIR
    local_ir: ModelIR
    heads: range
    kv_heads: range
    intermediate: range
    vocab: range
    head_rows: range | None
    slices: Mapping[str, TensorSlice | None]

    def reads(self, name: str) -> bool:
        return name not in self.slices or self.slices[name] is not None

    def part(self, name: str) -> TensorSlice | None:
        """The slice of `name` this rank reads; None for the whole tensor."""
        return self.slices.get(name)

    @property
    def head_sizes(self) -> tuple[int, ...]:
        """Every rank's share of a vocab-parallel head's outputs, in rank order."""
        return tuple(len(r) for r in split(self.ir.head.out_features, self.shard.world_size))

    def held_elements(self, shapes: Mapping[str, tuple[int, ...]]) -> int:
        """Elements of the canonical tensors (`ModelIR.tensor_shapes`) this rank reads."""
        total = 0
        for name, shape in shapes.items():
            if not self.reads(name):
                continue
            part = self.part(name)
            dims = list(shape)
            if part is not None:
                dims[part.dim] = part.stop - part.start
            total += int(np.prod(dims))
        return total


def split(size: int, parts: int) -> list[range]:
    """`size` indices in `parts` contiguous ranges whose lengths differ by at most one."""
    return [range(i * size // parts, (i + 1) * size // parts) for i in range(parts)]


def plan_shards(ir: ModelIR, shard: Shard) -> ShardPlan:
    """The Megatron plan of `ir` for `shard`; raises `ParallelError` naming the numbers when it cannot shard."""
    world, rank = shard.world_size, shard.rank
    attn, mlp = ir.attention, ir.block.mlp
    if attn.num_heads % world:
        raise ParallelError(f"tensor parallelism over {world} ranks needs the attention heads to split evenly, "
                            f"but the model has {attn.num_heads} heads ({attn.num_heads} % {world} = "
                            f"{attn.num_heads % world}); choose a world size that divides {attn.num_heads}")
    if attn.num_kv_heads % world and world % attn.num_kv_heads:
        raise ParallelError(f"tensor parallelism over {world} ranks needs the {attn.num_kv_heads} key/value heads "
                            f"to split evenly or each to be shared by whole ranks; choose a world size that "
                            f"divides or is a multiple of {attn.num_kv_heads}")
    for what, size in (("intermediate size", mlp.intermediate_size), ("vocabulary", ir.embedding.vocab_size)):
        if size < world:
            raise ParallelError(f"tensor parallelism over {world} ranks: the {what} ({size}) is smaller than the "
                                f"world size")
    local_heads = attn.num_heads // world
    heads = range(rank * local_heads, (rank + 1) * local_heads)
    if attn.num_kv_heads % world == 0:
        local_kv = attn.num_kv_heads // world
        kv_heads = range(rank * local_kv, (rank + 1) * local_kv)
    else:  # fewer KV heads than ranks: keep the one KV head this rank's query heads read
        group = attn.num_heads // attn.num_kv_heads
        kv_heads = range(heads.start // group, heads.start // group + 1)
    intermediate = split(mlp.intermediate_size, world)[rank]
    vocab = split(ir.embedding.vocab_size, world)[rank]
    # A vocabulary head is split like the embedding; a classifier's few outputs are cheaper to replicate.
    head_sharded = ir.head.tied_to_embedding or ir.head.task == "causal-lm"
    head_rows = split(ir.head.out_features, world)[rank] if head_sharded else None

    slices: dict[str, TensorSlice | None] = {"embed.weight": TensorSlice(0, vocab.start, vocab.stop)}
    d = attn.head_dim
    q_rows, kv_rows = TensorSlice(0, heads.start * d, heads.stop * d), TensorSlice(0, kv_heads.start * d,
                                                                                 kv_heads.stop * d)
    for i in range(ir.num_layers):
        layer = f"layers.{i}"
        for param in ("weight", "bias") if attn.qkv_bias else ("weight",):
            parts = qkv_parts(attn, layer, param)
            if attn.qkv_layout == "separate":
                slices.update(zip(parts, (q_rows, kv_rows, kv_rows)))
            else:  # rows [heads, 3, head_dim]: a rank's heads are one contiguous block
                slices[parts[0]] = TensorSlice(0, heads.start * 3 * d, heads.stop * 3 * d)
        slices[f"{layer}.attn.o.weight"] = TensorSlice(1, heads.start * d, heads.stop * d)
        for param in ("weight", "bias") if mlp.bias else ("weight",):
            for name in up_parts(mlp, layer, param):
                slices[name] = TensorSlice(0, intermediate.start, intermediate.stop)
        slices[f"{layer}.mlp.down.weight"] = TensorSlice(1, intermediate.start, intermediate.stop)
        if rank != 0:  # summed over the ranks: added once
            slices[f"{layer}.attn.o.bias"] = None
            slices[f"{layer}.mlp.down.bias"] = None
    if head_rows is not None:
        for name in ("head.weight", "head.bias"):
            slices[name] = TensorSlice(0, head_rows.start, head_rows.stop)
    shapes = ir.tensor_shapes()
    slices = {name: part for name, part in slices.items() if name in shapes}

    local_attention = replace(attn, num_heads=len(heads), num_kv_heads=len(kv_heads))
    local_mlp = replace(mlp, intermediate_size=len(intermediate))
    local_ir = replace(ir, embedding=replace(ir.embedding, vocab_size=len(vocab)),
                       block=replace(ir.block, attention=local_attention, mlp=local_mlp),
                       head=replace(ir.head, out_features=len(head_rows), labels=())
                       if head_rows is not None else ir.head)
    return ShardPlan(shard, ir, local_ir, heads, kv_heads, intermediate, vocab, head_rows, slices)


# ------------------------------------------------------------------------------------- rank 0 drives the rest


class ShardRuntime(Runtime):
    """A backend's runtime for one rank of a tensor-parallel group (see `Backend.lower_shard`)."""

    plan: ShardPlan

    def broadcast(self, message: Any) -> Any:
        """Send a picklable `message` from rank 0 to every rank; every rank returns it. Waits as long as it
        takes (a server idles between requests) but fails at once when a rank's connection closes."""
        raise NotImplementedError

    def held_bytes(self) -> int:
        """Bytes of weights this rank holds."""
        raise NotImplementedError

    def close(self) -> None:
        """Leave the group's resources (called once the job ends)."""


_NEW_CACHE, _FORWARD, _STOP = "new_cache", "forward", "stop"


class Driver(Runtime):
    """Rank 0's runtime: each call is broadcast to the other ranks, then run on this rank's shard."""

    def __init__(self, local: ShardRuntime) -> None:
        self.local = local
        self.ir, self.dtype = local.plan.ir, local.dtype
        self._ids = itertools.count()
        self._freed: list[int] = []
        self._stopped = False
        #: turns an engine error into the error to raise (a launcher names the rank that died)
        self.explain: Callable[[BaseException], BaseException] = lambda error: error
        atexit.register(self.release)

    def new_cache(self, batch: int, capacity: int) -> Cache:
        key = next(self._ids)
        self._send((_NEW_CACHE, key, batch, capacity))
        cache = self.local.new_cache(batch, capacity)
        cache.parallel_key = key  # type: ignore[attr-defined]
        weakref.finalize(cache, self._freed.append, key)  # the other ranks drop theirs with the next message
        return cache

    def forward(self, step: Step, cache: Cache | None = None) -> np.ndarray:
        self._send((_FORWARD, step, getattr(cache, "parallel_key", None)))
        try:
            return self.local.forward(step, cache)
        except RuntimeError as exc:  # the engine's own error when a rank is gone
            raise self.explain(ParallelError(f"tensor-parallel forward pass failed on rank 0 of "
                                             f"{self.local.plan.shard.world_size}: {exc}")) from None

    def release(self) -> None:
        """Let the other ranks' `follow` return (once; also run at exit)."""
        if not self._stopped:
            self._stopped = True
            try:
                self.local.broadcast((_STOP, [], ()))
            except Exception:  # noqa: BLE001 - the group may already be gone at exit
                pass

    def _send(self, message: tuple) -> None:
        if self._stopped:
            raise ParallelError("this tensor-parallel model was released; its other ranks have stopped")
        freed, self._freed = self._freed, []
        try:
            self.local.broadcast((message[0], freed, message[1:]))
        except RuntimeError as exc:
            raise self.explain(ParallelError(f"tensor-parallel rank 0 cannot reach the other ranks: {exc}")) from None


class Follower(Runtime):
    """The runtime a rank other than 0 holds: `follow` replays rank 0's calls; direct calls are refused."""

    def __init__(self, local: ShardRuntime) -> None:
        self.local = local
        self.ir, self.dtype = local.plan.ir, local.dtype

    def new_cache(self, batch: int, capacity: int) -> Cache:
        raise self._refuse()

    def forward(self, step: Step, cache: Cache | None = None) -> np.ndarray:
        raise self._refuse()

    def _refuse(self) -> ParallelError:
        shard = self.local.plan.shard
        return ParallelError(f"rank {shard.rank} of {shard.world_size} only follows rank 0; call "
                             "polylm.parallel.follow(model) here and use the model on rank 0")

    def follow(self) -> None:
        caches: dict[int, Cache] = {}
        shard = self.local.plan.shard
        while True:
            try:
                kind, freed, args = self.local.broadcast(None)
            except RuntimeError as exc:
                raise ParallelError(f"tensor-parallel rank {shard.rank}: lost rank 0 ({exc})") from None
            for key in freed:
                caches.pop(key, None)
            if kind == _STOP:
                return
            if kind == _NEW_CACHE:
                key, batch, capacity = args
                caches[key] = self.local.new_cache(batch, capacity)
                continue
            step, key = args
            try:
                self.local.forward(step, caches[key] if key is not None else None)
            except RuntimeError as exc:
                raise ParallelError(f"tensor-parallel forward pass failed on rank {shard.rank}: {exc}") from None


def follow(model) -> None:
    """On a rank other than 0: run rank 0's forward passes until rank 0 calls `release` (or exits)."""
    runtime = model.runtime
    if not isinstance(runtime, Follower):
        raise ParallelError("polylm.parallel.follow needs a model loaded with tensor_parallel on a rank other than 0")
    runtime.follow()


def release(model) -> None:
    """On rank 0: end the other ranks' `follow`. Also done when rank 0's process exits."""
    if isinstance(model.runtime, Driver):
        model.runtime.release()


def wrap(local: ShardRuntime) -> Runtime:
    """Rank 0's `Driver` or another rank's `Follower` around a backend's shard runtime."""
    return Driver(local) if local.plan.shard.rank == 0 else Follower(local)


# ------------------------------------------------------------------------------------------------ launching


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
    from .loading import load, model_ir

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
