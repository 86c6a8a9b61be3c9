"""`DecodeGraph`: decode steps (one new token per row) captured once in a CUDA graph and replayed, and
`GraphedRuntime`, the runtime that routes its decode steps through one (`POLYLM_CUDA_GRAPH=1`).

At ~1B parameters a decode step is ~170 short kernels whose launch cost exceeds their work; a graph
launches them all at once. Everything a step varies lives in tensors at fixed addresses, sized to the cache:
slot positions and mask [batch, capacity], and a small packed block (token id, position, mask bit, gather
index, slot) that one host→device copy fills per step and the graph itself scatters into place. This needs
graph-safe ops (`TritonOps`): they read the step's tensors, never its host values, and never synchronize.
"""

from __future__ import annotations

from typing import Any, Callable

import numpy as np
import torch

from polylm.backend import Cache, Reduce, Step
from polylm.errors import BackendError, InputError
from polylm.numerics.positions import rope_frequencies_per_row
from polylm_torch_common.ops import StepTensors
from polylm_torch_common.runtime import TorchRuntime, to_host

_ID, _POSITION, _MASK, _GATHER, _SLOT = range(5)


class DecodeGraph:
    """Runs `runtime`'s decode steps on `cache` through one captured CUDA graph.

    Call `step` exactly where `runtime.forward(step, cache)` would be called for a one-token step. With
    `capture=False` the same fixed-shape step runs eagerly (on any device), which is how the CPU tests check
    that nothing in it depends on host values.
    """

    def __init__(self, runtime: TorchRuntime, cache: Cache, capture: bool = True) -> None:
        if not getattr(runtime.ops, "graph_safe", False):
            raise BackendError(f"{type(runtime.ops).__name__} reads host values of a step; a CUDA graph cannot "
                               "replay it (use the triton backend's TritonOps)")
        if capture and runtime.device.type != "cuda":
            raise BackendError(f"CUDA graphs need a CUDA device; this runtime computes on {runtime.device}")
        if cache.length >= cache.capacity:
            raise InputError(f"the cache is full ({cache.length} of {cache.capacity} slots): nothing to decode")
        self.runtime, self.cache = runtime, cache
        batch, capacity, device = cache.batch, cache.capacity, runtime.device
        self.packed = torch.zeros((batch, 5), dtype=torch.int64, device=device)
        self.staging = torch.zeros((batch, 5), dtype=torch.int64, pin_memory=capture)
        self.positions = torch.zeros((batch, capacity), dtype=torch.int64, device=device)
        self.mask = torch.zeros((batch, capacity), dtype=torch.bool, device=device)
        self.host_positions = np.full((batch, capacity), -1, dtype=np.int64)  # what the device buffers hold
        self.host_mask = np.zeros((batch, capacity), dtype=bool)
        rotary = runtime.ir.attention.rotary_dim > 0
        self.inv_freq = torch.zeros((batch, runtime.ir.attention.rotary_dim // 2), dtype=torch.float32,
                                    device=device) if rotary else None
        self.host_inv_freq: np.ndarray | None = None
        self.rope_factor = rope_frequencies_per_row(runtime.ir.attention, np.zeros((1, 1), np.int64))[1] \
            if rotary else 1.0
        self.graph: torch.cuda.CUDAGraph | None = None
        self.logits: torch.Tensor | None = None
        self.staging[:, _SLOT] = cache.length  # warm-up runs write the next slot, which the first step rewrites
        self.packed.copy_(self.staging)
        if capture:
            self._capture()

    @torch.inference_mode()
    def _capture(self) -> None:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # compile the kernels and settle the allocator outside the graph
            for _ in range(2):
                self._run()
        torch.cuda.current_stream().wait_stream(stream)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = self._run()

    def _run(self) -> torch.Tensor:
        """The captured work: scatter the packed step into the slot buffers, then the runtime's device pass."""
        packed = self.packed
        slot = packed[:, _SLOT:_SLOT + 1]
        self.positions.scatter_(1, slot, packed[:, _POSITION:_POSITION + 1])
        self.mask.scatter_(1, slot, packed[:, _MASK:_MASK + 1].bool())
        step = StepTensors(
            input_ids=packed[:, _ID:_ID + 1].contiguous(), positions=self.positions,
            new_positions=packed[:, _POSITION:_POSITION + 1].contiguous(), mask=self.mask,
            slots=packed[:1, _SLOT].to(torch.int32), gather=packed[:, _GATHER].contiguous(),
            frequencies={} if self.inv_freq is None else {self.runtime.ir.attention.position: (self.inv_freq,
                                                                                             self.rope_factor)},
            alibi=self.runtime.alibi,
            past=self.cache.capacity - 1, dtype=self.runtime.torch_dtype)
        return self.runtime.run(step, self.cache)

    @torch.inference_mode()
    def step(self, step: Step, take: Callable[[torch.Tensor], Any] = to_host) -> Any:
        """The head outputs on the device, [batch, out] (with a gather, else [batch, 1, out]), through `take`
        (`TorchRuntime.head_outputs`; by default to the host as float32), for one new token per row."""
        cache = self.cache
        batch, new = step.input_ids.shape
        past = cache.length
        if batch != cache.batch or new != 1 or step.mask.shape[1] != past + 1 or past + 1 > cache.capacity:
            raise InputError(f"a graphed decode step takes [{cache.batch}, 1] new tokens over {past + 1} slots "
                             f"(cache {past} of {cache.capacity}); got {list(step.input_ids.shape)} over "
                             f"{step.mask.shape[1]}")
        self._sync(step, past)
        packed = np.empty((batch, 5), dtype=np.int64)
        packed[:, _ID], packed[:, _POSITION], packed[:, _MASK] = step.input_ids[:, 0], step.positions[:, past], \
            step.mask[:, past]
        packed[:, _GATHER] = step.gather if step.gather is not None else 0
        packed[:, _SLOT] = past
        self.staging.copy_(torch.from_numpy(packed))
        self.packed.copy_(self.staging, non_blocking=True)  # staging is pinned: one asynchronous upload
        if self.graph is not None:
            self.graph.replay()
        else:
            self.logits = self._run()
        self.host_positions[:, past], self.host_mask[:, past] = step.positions[:, past], step.mask[:, past]
        cache.length = past + 1
        return take(self.logits if step.gather is not None else self.logits[:, None])

    def _sync(self, step: Step, past: int) -> None:
        """Bring the earlier slots' positions and mask, and the RoPE frequencies, up to date (eagerly; after
        the first step of a generation this normally copies nothing)."""
        if not (np.array_equal(self.host_positions[:, :past], step.positions[:, :past])
                and np.array_equal(self.host_mask[:, :past], step.mask[:, :past])):
            self.positions[:, :past].copy_(torch.from_numpy(np.ascontiguousarray(step.positions[:, :past])))
            self.mask[:, :past].copy_(torch.from_numpy(np.ascontiguousarray(step.mask[:, :past])))
            self.host_positions[:, :past], self.host_mask[:, :past] = step.positions[:, :past], step.mask[:, :past]
        if self.inv_freq is not None:
            inv_freq = rope_frequencies_per_row(self.runtime.ir.attention, step.positions[:, past:])[0]
            if self.host_inv_freq is None or not np.array_equal(inv_freq, self.host_inv_freq):
                self.inv_freq.copy_(torch.from_numpy(inv_freq).expand_as(self.inv_freq))
                self.host_inv_freq = inv_freq


class GraphedRuntime(TorchRuntime):
    """`TorchRuntime` whose one-token steps on a cache replay that cache's `DecodeGraph`, captured at the first
    such step and again when steps move to another cache (it holds one: `new_cache` lets it go, so that the
    old cache's memory is freed). Other steps run as usual. On a CPU device the graph's step runs eagerly."""

    _graph: DecodeGraph | None = None

    def new_cache(self, batch: int, capacity: int) -> Cache:
        self._graph = None
        return super().new_cache(batch, capacity)

    def head_outputs(self, step: Step, cache: Cache | None, take: Callable[[torch.Tensor], Any],
                     reduce: Reduce | None = None) -> Any:
        if cache is None or step.input_ids.shape[1] != 1 or cache.rings or len(self.ropes) > 1:
            # the graph holds one kind of RoPE and no sliding-window rings (experts it routes on the device)
            return super().head_outputs(step, cache, take, reduce)
        if self._graph is None or self._graph.cache is not cache:
            self._graph = None  # the last graph's memory goes before the next one is captured
            self._graph = DecodeGraph(self, cache, capture=self.device.type == "cuda")
        return self._graph.step(step, take)
