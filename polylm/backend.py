"""What a backend plugin supplies (`Backend`) and the runtime contract it lowers a model to (`Runtime`).

Core computes positions and masks; a runtime only obeys them, so every backend agrees on padding and
caching by construction:

- `Step.input_ids` [batch, new] are the new tokens; `Step.positions` and `Step.mask` [batch, past + new]
  give each cache slot's position in its own sequence and whether it holds a real token. A query at slot s
  sees key slots ≤ s whose mask is set.
- `Step.gather` [batch], when given, keeps one slot of `input_ids` per row before the head (the last token
  for generation, the last non-pad token for sequence classification).
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import numpy as np

from .checkpoint.weights import Weights
from .errors import BackendError, InputError
from .ir import ModelIR, Norm

if TYPE_CHECKING:
    from .parallel.plan import Shard, ShardPlan
    from .parallel.ranks import RankEnv

API_VERSION = 1
DTYPES: tuple[str, ...] = ("float32", "bfloat16", "float16")
_ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass(frozen=True)
class Availability:
    """Whether a backend runs here; `auto` says whether `backend="auto"` may pick it; `installed` whether its
    framework is installed at all (only then is the backend's install hint worth showing)."""

    available: bool
    reason: str
    auto: bool = True
    installed: bool = True


@dataclass(frozen=True)
class Step:
    """One forward pass over new tokens; see the module docstring."""

    input_ids: np.ndarray
    positions: np.ndarray
    mask: np.ndarray
    gather: np.ndarray | None = None


@dataclass
class Cache:
    """A key/value cache for one batch: per layer, keys and values [batch, kv_heads, capacity, head_dim] as the
    backend's arrays; slots [0, length) are filled."""

    keys: list[Any]
    values: list[Any]
    batch: int
    capacity: int
    length: int = 0

    def admit(self, step: Step) -> tuple[int, int]:
        """(past, new): the filled slots `step` follows and the slots it adds; `InputError` when the step does
        not continue this cache or does not fit in it."""
        past, (_, new) = self.length, step.input_ids.shape
        if step.mask.shape[1] != past + new or past + new > self.capacity:
            raise InputError(f"step covers {step.mask.shape[1]} slots, cache holds {past} of {self.capacity} "
                             f"and {new} are new")
        return past, new


A = TypeVar("A")  # a backend's array type (torch.Tensor, mx.array, …)


@dataclass
class NormParams(Generic[A]):
    """A norm's spec and arrays as a runtime holds them: the weight carries the IR's `weight_offset` already."""

    spec: Norm
    weight: A
    bias: A | None


@dataclass
class LayerParams(Generic[A]):
    """One block's arrays, laid out as the IR's lowering recipes say (`polylm.numerics.layouts`): one [q; k; v]
    projection and one [gate; up] (or up) projection. A matrix is whatever the backend multiplies with (an array,
    a packed or quantized layer). Norms the block does not have are None."""

    attn_norm: NormParams[A] | None
    qkv: Any
    qkv_bias: A | None
    out: Any
    out_bias: A | None
    mlp_norm: NormParams[A] | None
    up: Any
    up_bias: A | None
    down: Any
    down_bias: A | None
    attn_post_norm: NormParams[A] | None = None
    mlp_post_norm: NormParams[A] | None = None
    q_norm: NormParams[A] | None = None
    k_norm: NormParams[A] | None = None


@dataclass
class ModelParams(Generic[A]):
    """A whole model's arrays: the embedding table (or the tied head's layer that serves it), the blocks, the
    final norm, the head's matrix and bias, and the learned position embeddings (`ir.LearnedPositions`)."""

    embed: Any
    embed_norm: NormParams[A] | None
    layers: list[LayerParams[A]]
    final_norm: NormParams[A]
    head: Any
    head_bias: A | None
    positions: A | None = None


class Runtime(ABC):
    """A lowered model: one forward over new tokens, reading and extending a cache."""

    ir: ModelIR
    dtype: str

    @abstractmethod
    def new_cache(self, batch: int, capacity: int) -> Cache:
        """An empty cache for `batch` rows and up to `capacity` slots."""

    @abstractmethod
    def forward(self, step: Step, cache: Cache | None = None) -> np.ndarray:
        """Head outputs as float32: [batch, new, out], or [batch, out] when `step.gather` is set.

        With a cache, the new keys/values are appended at slot `cache.length` and `length` advances.
        """


class ShardRuntime(Runtime):
    """A backend's runtime for one rank of a tensor-parallel group (see `Backend.lower_shard`)."""

    plan: ShardPlan

    def broadcast(self, message: Any) -> Any:
        """Send a picklable `message` from rank 0 to every rank; every rank returns it. Waits as long as it
        takes (a server idles between requests) but fails at once when a rank's connection closes."""
        raise NotImplementedError

    def held_bytes(self) -> int:
        """Bytes of weights this rank holds: the plan's slices of the IR's tensors in the compute dtype."""
        return self.plan.held_elements() * _ITEMSIZE[self.dtype]

    def close(self) -> None:
        """Leave the group's resources (called once the job ends)."""


class Backend(ABC):
    """A backend plugin: its name, auto-selection priority, availability, and the lowering."""

    name: str
    priority: int = 0
    dtypes: tuple[str, ...] = DTYPES
    install_hint: str = ""
    api_version: int = API_VERSION

    @abstractmethod
    def availability(self) -> Availability:
        """Whether this backend can run here, and why (not)."""

    @abstractmethod
    def lower(self, ir: ModelIR, weights: Weights, dtype: str) -> Runtime:
        """Build a runtime for `ir` with `weights`, computing in `dtype` (one of `self.dtypes`)."""

    def join_group(self, world_size: int, timeout_s: float) -> "Shard":
        """This process's place in a group of `world_size` ranks of the backend's distributed engine: the group
        already initialized, else the one the environment describes (RANK, WORLD_SIZE, MASTER_ADDR…), joined
        within `timeout_s` seconds. Backends without tensor parallelism refuse."""
        raise BackendError(f"backend {self.name!r} does not run tensor-parallel models")

    def launched_rank(self) -> "RankEnv | None":
        """This process's place in a job the backend's own launcher started (e.g. `mlx.launch`), None outside
        one; asked when torchrun's variables are absent."""
        return None

    def launch_env(self, world_size: int) -> list[dict[str, str]] | None:
        """The environment variables of each rank (rank 0 first: this process) of a one-machine job that
        `polylm … --tp N` starts, as `join_group` reads them; None (the default) for torchrun's."""
        return None

    def lower_shard(self, ir: ModelIR, weights: Weights, dtype: str, plan: "ShardPlan") -> "ShardRuntime":
        """Like `lower`, for one rank of a tensor-parallel group that is already initialized: read only the
        rank's slices (`plan`, see `polylm.parallel`) and sum/gather over the ranks where the plan needs it."""
        raise BackendError(f"backend {self.name!r} does not run tensor-parallel models")

    def describe(self) -> dict[str, Any]:
        state = self.availability()
        return {"name": self.name, "priority": self.priority, "available": state.available,
                "auto": state.auto, "reason": state.reason, "dtypes": self.dtypes}
