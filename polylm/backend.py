"""What a backend plugin supplies (`Backend`) and the runtime contract it lowers a model to (`Runtime`).

Core computes positions and masks; a runtime only obeys them, so every backend agrees on padding and
caching by construction:

- `Step.input_ids` [batch, new] are the new tokens; `Step.positions` and `Step.mask` [batch, past + new]
  give each cache slot's position in its own sequence and whether it holds a real token. A query at slot s
  sees key slots ≤ s whose mask is set.
- `Step.gather` [batch], when given, keeps one slot of `input_ids` per row before the head (the last token
  for generation, the last non-pad token for sequence classification).
- A new slot whose mask is not set holds no token: what a runtime computes there is never read (no query sees
  its key), except at a gathered slot, whose head output is returned. `Step.computed` lists the new slots a
  gathering runtime needs to compute, so that padding (a row joining with its prompt while the others feed one
  token, an idle row) costs no matrix work.
- `Runtime.forward_top` returns, for a gathering step, only what the caller needs of each row (`Reduce`): the
  top outputs, the log-normalizer and the NaN check on the device, the whole row only for the rows asking for
  it, so a greedy batch copies O(batch) values to the host, not [batch, vocab].
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Generic, TypeVar

import numpy as np

from .checkpoint.weights import Weights
from .errors import BackendError, InputError
from .ir import Head, ModelIR, Norm
from .numerics.logits import finish_head, top_rows

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

    def computed(self, past: int) -> np.ndarray | None:
        """The new slots a gathering pass after `past` filled slots must compute, as indices into the flattened
        [batch, new] new slots in ascending order: the real ones and the gathered ones; None when that is all of
        them, or when the step gathers nothing (then every slot's head output is returned)."""
        if self.gather is None:
            return None
        needed = self.mask[:, past:].copy()
        needed[np.arange(needed.shape[0]), self.gather] = True
        return None if needed.all() else np.flatnonzero(needed)


#: The most new tokens one forward pass computes: a longer step (a long prompt) runs as several passes, so that a
#: pass's activations and attention bias stay bounded whatever the prompt's length, and a sliding-window layer's
#: ring (`Ring`) holds its window plus one pass of new tokens.
PASS_LIMIT = 512


def cache_windows(ir: ModelIR, capacity: int) -> tuple[int | None, ...]:
    """Each layer's sliding window in a cache of `capacity` slots (None: full; a window as long as the cache
    changes nothing, so that layer is full too)."""
    return tuple(w if w is not None and w < capacity else None for w in (b.attention.window for b in ir.layers))


def ring_size(window: int, capacity: int) -> int:
    """The slots of a `Ring` (its spare slot aside) for `window` in a cache of `capacity`: the window of the first
    new token of a pass and the pass's other tokens, at most the capacity."""
    return min(capacity, window + PASS_LIMIT - 1)


def cache_slots(ir: ModelIR, capacity: int) -> list[int]:
    """The slots each layer's keys (and values) take in a cache of `capacity` (`Cache.build`): the capacity, or a
    windowed layer's ring and its spare slot."""
    return [capacity if w is None else ring_size(w, capacity) + 1 for w in cache_windows(ir, capacity)]


@dataclass
class Ring:
    """The slot bookkeeping of the sliding-window layers of one window size: their caches hold `size` slots, the
    key of a token at position p in slot p % size, plus one spare slot (index `size`) that masked slots' writes
    go to. `owner[b, r]` is the step slot whose key ring slot r of row b holds (-1: none yet)."""

    window: int
    size: int
    owner: np.ndarray
    wraps: bool  # whether positions reach `size` (else the ring is as long as the cache: slot = position)

    @classmethod
    def new(cls, window: int, batch: int, capacity: int) -> "Ring":
        size = ring_size(window, capacity)
        return cls(window, size, np.full((batch, size + 1), -1, dtype=np.int64), size < capacity)

    def write(self, step: Step, past: int) -> "RingPass":
        """Record the new slots of `step` (after `past`) and say where each goes."""
        new_positions, new_mask = step.positions[:, past:], step.mask[:, past:]
        slots = np.where(new_mask, new_positions % self.size, self.size)
        rows = np.broadcast_to(np.arange(slots.shape[0])[:, None], slots.shape)
        self.owner[rows[new_mask], slots[new_mask]] = (past + np.nonzero(new_mask)[1])
        # a pass attends over ring slots [0, span): past the largest position written so far none is used yet
        filled = step.positions[step.mask]
        span = min(self.size, int(filled.max()) + 1) if filled.size else 1
        return RingPass(self.window, slots, self.owner.copy(), span)

    @property
    def tail_allowance(self) -> int | None:
        """How many of a row's latest slots may be masked out (a reused prefix, `generate.scheduler`) without
        losing a key the prefix's next tokens see: the slots beyond the window (None: any, the ring never wraps)."""
        return self.size - self.window if self.wraps else None


@dataclass(frozen=True)
class RingPass:
    """What one pass does to a ring: `slots` [batch, new] where each new token's key goes (the spare slot for
    masked ones), `owner` the ring's owners after the pass, `span` the ring slots the pass attends over."""

    window: int
    slots: np.ndarray
    owner: np.ndarray
    span: int


@dataclass(frozen=True)
class Pass:
    """One forward pass over a cache (`Cache.passes`): `step` covers the cache's slots [0, past + new), of which
    the last `new` are computed; `rings` maps each sliding window to its `RingPass`."""

    step: Step
    past: int
    new: int
    rings: dict[int, RingPass]


@dataclass
class Cache:
    """A key/value cache for one batch: per layer, keys and values [batch, kv_heads, slots, head_dim] as the
    backend's arrays. A full-attention layer has `capacity` slots, of which [0, length) are filled; a layer with
    a sliding window smaller than the capacity has its window's `Ring` (`windows[i]` says which; None: full)."""

    keys: list[Any]
    values: list[Any]
    batch: int
    capacity: int
    length: int = 0
    windows: tuple[int | None, ...] = ()
    rings: dict[int, Ring] = field(default_factory=dict)

    @classmethod
    def build(cls, ir: ModelIR, batch: int, capacity: int, make: Callable[[int], Any]) -> "Cache":
        """An empty cache for `ir`'s layers, with `make(slots)` making one layer's keys (or values) array."""
        windows = cache_windows(ir, capacity)
        rings = {w: Ring.new(w, batch, capacity) for w in set(windows) if w is not None}
        sizes = cache_slots(ir, capacity)
        return cls([make(n) for n in sizes], [make(n) for n in sizes], batch, capacity, 0, windows, rings)

    def admit(self, step: Step) -> tuple[int, int]:
        """(past, new): the filled slots `step` follows and the slots it adds; `InputError` when the step does
        not continue this cache or does not fit in it."""
        past, (_, new) = self.length, step.input_ids.shape
        if step.mask.shape[1] != past + new or past + new > self.capacity:
            raise InputError(f"step covers {step.mask.shape[1]} slots, cache holds {past} of {self.capacity} "
                             f"and {new} are new")
        if step.input_ids.shape[0] != self.batch:
            raise InputError(f"step has {step.input_ids.shape[0]} rows, the cache {self.batch}")
        return past, new

    @property
    def tail_allowance(self) -> int | None:
        """How many of a row's latest slots may be masked out and the rest still be attended (None: any)."""
        limits = [ring.tail_allowance for ring in self.rings.values()]
        limits = [limit for limit in limits if limit is not None]
        return min(limits) if limits else None

    def run(self, step: Step, forward_pass: Callable[[Pass], Any], reduce: "Reduce | None" = None) -> Any:
        """`step` through `forward_pass` (a runtime's forward over one `Pass`, writing this cache): in passes of
        at most `PASS_LIMIT` new tokens. Returns the passes' outputs joined as `Runtime.forward` gives them (with a
        gather, one row per batch entry from the pass that holds its gathered slot); `length` advances after each
        pass. With `reduce` the passes give `Reduced` answers, joined the same way."""
        past, new = self.admit(step)
        outputs: list[np.ndarray] = []
        gathered: Any = None  # with a gather: each row's output, from the pass of its slot
        for start in range(0, new, PASS_LIMIT):
            stop = min(start + PASS_LIMIT, new)
            end = past + stop
            gather = None if step.gather is None else np.clip(step.gather - start, 0, stop - start - 1)
            part = Step(step.input_ids[:, start:stop], step.positions[:, :end], step.mask[:, :end], gather)
            rings = {w: ring.write(part, past + start) for w, ring in self.rings.items()}
            out = forward_pass(Pass(part, past + start, stop - start, rings))
            self.length = end
            if step.gather is None:
                outputs.append(out)
            elif gathered is None:
                gathered = out
            else:  # a row whose slot is in this pass takes its output from it
                take = step.gather >= start
                gathered = (np.where(take[:, None], out, gathered) if reduce is None
                            else out.where(take, gathered, reduce.full))
        if step.gather is not None:
            return gathered
        return outputs[0] if len(outputs) == 1 else np.concatenate(outputs, axis=1)


@dataclass(frozen=True)
class Reduce:
    """What a gathering step's caller needs of each row's finished head outputs (`polylm.numerics.logits`): the
    `top` largest (at least 1), the log-normalizer when `norm` is set, and the whole row only for the rows set in
    `full` [batch] bool."""

    top: int
    full: np.ndarray
    norm: bool = False


@dataclass(frozen=True)
class Reduced:
    """A `Reduce`'s answer (see `polylm.numerics.logits.top_rows`): per row the `top` largest finished outputs'
    `ids` [batch, top] (largest first, ties by lowest id) and `values` (float32, as `finish_head` makes them),
    the log-normalizer `norm` [batch] (float64; zeros unless asked for) and `nan` [batch]; `rows`
    [full rows, out] the finished outputs of the rows set in `Reduce.full`, in row order."""

    ids: np.ndarray
    values: np.ndarray
    norm: np.ndarray
    nan: np.ndarray
    rows: np.ndarray

    @classmethod
    def of(cls, out: np.ndarray, reduce: Reduce) -> "Reduced":
        """The reference answer, from the finished outputs [batch, out] on the host."""
        return cls(*top_rows(out, reduce.top, reduce.norm), out[reduce.full])

    @classmethod
    def of_top(cls, head: Head, ids: np.ndarray, raw: np.ndarray, norm: np.ndarray | None, nan: np.ndarray,
               rows: np.ndarray) -> "Reduced":
        """From a device's answer: the ids [batch, top] of each row's top raw (unfinished) head outputs in any
        order and those outputs, the finished rows' log-normalizer (None: not asked for), NaN flags and the raw
        full rows. The head's scale and softcap keep the order, so finishing the top outputs here with
        `finish_head` gives exactly the reference's values; they are ordered largest first, ties by lowest id."""
        values = finish_head(head, raw.astype(np.float32))
        if ids.shape[-1] > 1:
            order = np.lexsort((ids, -values), axis=-1)
            ids, values = np.take_along_axis(ids, order, -1), np.take_along_axis(values, order, -1)
        return cls(ids.astype(np.int64), values,
                   np.zeros(len(ids)) if norm is None else norm.astype(np.float64), nan.astype(bool),
                   finish_head(head, rows.astype(np.float32)))

    def where(self, take: np.ndarray, other: "Reduced", full: np.ndarray) -> "Reduced":
        """These rows where `take` [batch] is set, else `other`'s (a step run in several passes)."""
        rows = np.where(take[full][:, None], self.rows, other.rows)
        pick = take[:, None]
        return Reduced(np.where(pick, self.ids, other.ids), np.where(pick, self.values, other.values),
                       np.where(take, self.norm, other.norm), np.where(take, self.nan, other.nan), rows)


A = TypeVar("A")  # a backend's array type (torch.Tensor, mx.array, …)


@dataclass
class NormParams(Generic[A]):
    """A norm's spec and arrays as a runtime holds them: the weight carries the IR's `weight_offset` already."""

    spec: Norm
    weight: A
    bias: A | None


@dataclass
class ExpertParams(Generic[A]):
    """A mixture-of-experts layer's arrays (`polylm.ir.MoE`): the router's matrix [experts, hidden] and bias; each
    expert's [gate; up] (or up) and down matrices and biases (`experts_up` … hold them as the backend computes:
    a list over the experts, or one stacked array); the shared expert's, as a dense layer's; its gate [1, hidden]."""

    router: A
    router_bias: A | None
    experts_up: Any
    experts_up_bias: Any
    experts_down: Any
    experts_down_bias: Any
    shared_up: Any = None
    shared_up_bias: A | None = None
    shared_down: Any = None
    shared_down_bias: A | None = None
    shared_gate: A | None = None


@dataclass
class LayerParams(Generic[A]):
    """One block's arrays, laid out as the IR's lowering recipes say (`polylm.numerics.layouts`): one [q; k; v]
    projection and one [gate; up] (or up) projection. A matrix is whatever the backend multiplies with (an array,
    a packed or quantized layer). Norms the block does not have are None; a mixture-of-experts layer has `moe`
    instead of the dense `up` / `down`."""

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
    moe: ExpertParams[A] | None = None
    sinks: A | None = None  # the attention sinks' logits [heads] (`Attention.sinks`)


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

    def forward_top(self, step: Step, cache: Cache | None, reduce: Reduce) -> Reduced:
        """What `reduce` asks of a gathering step's finished outputs, else as `forward`. This reference copies
        every row to the host; a backend's own computes the top outputs on its device and copies those."""
        return Reduced.of(finish_head(self.ir.head, self.forward(step, cache)), reduce)


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
