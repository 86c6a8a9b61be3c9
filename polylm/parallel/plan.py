"""The tensor-parallel plan, framework-free: which slice of each canonical tensor a rank holds.

The plan is Megatron's, derived from the IR alone (no family code): attention heads are split across ranks
(q/k/v rows by local head, the output projection by the matching columns; KV heads split, or each rank keeps
the one KV head its query heads share when there are fewer KV heads than ranks), the MLP's gate/up rows and
down columns by a range of the intermediate size, the embedding and a vocabulary head by a range of the
vocabulary (a tied head with it); norms and small task heads are replicated. The two row-parallel outputs
(attention output, MLP down) are summed over the ranks, so their biases are read on rank 0 only.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, replace
from typing import Any, Mapping, Sequence

from ..errors import ParallelError
from ..ir import MLP, Block, ModelIR, MoE
from ..numerics.layouts import qkv_parts, up_parts

#: An array of any framework (numpy, torch, MLX) that supports the arithmetic operators and slicing.
Array = Any

#: Seconds a collective (and the initial connection of all ranks) may wait before the job fails.
DEFAULT_TIMEOUT_S = 120.0


def timeout_s() -> float:
    """The collective timeout: POLYLM_TP_TIMEOUT seconds, else `DEFAULT_TIMEOUT_S`."""
    value = os.environ.get("POLYLM_TP_TIMEOUT")
    try:
        return float(value) if value else DEFAULT_TIMEOUT_S
    except ValueError:
        raise ParallelError(f"POLYLM_TP_TIMEOUT must be a number of seconds, got {value!r}") from None


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

    def held_elements(self) -> int:
        """Elements of the canonical tensors (`ModelIR.tensor_shapes`) this rank reads."""
        total = 0
        for name, shape in self.ir.tensor_shapes().items():
            if not self.reads(name):
                continue
            dims = list(shape)
            part = self.part(name)
            if part is not None:
                dims[part.dim] = part.stop - part.start
            total += math.prod(dims)
        return total

    def vocab_rows(self, ids: Array) -> tuple[Array, Array]:
        """The rows of this rank's vocabulary-parallel embedding for token `ids`, and where the ids lie in its
        range: (row, inside); ids outside it get row 0, for the caller to zero, so that the sum over the ranks
        is every id's row. Plain arithmetic operators only, so it runs on numpy, torch or MLX arrays."""
        local = ids - self.vocab.start
        inside = (local >= 0) & (local < len(self.vocab))
        return local * inside, inside


def gather_padding(width: int, sizes: tuple[int, ...]) -> int:
    """How many columns a rank's `width` outputs are padded by for an all-gather of uneven `sizes` (every
    rank's share, in rank order): the collective moves equal parts, each as wide as the widest share."""
    return max(sizes) - width


def trim_gathered(parts: Sequence[Array], sizes: tuple[int, ...]) -> list[Array]:
    """Each rank's gathered (padded) part cut back to its share of the last axis, in rank order."""
    return [part[..., :size] for part, size in zip(parts, sizes)]


def split(size: int, parts: int) -> list[range]:
    """`size` indices in `parts` contiguous ranges whose lengths differ by at most one."""
    return [range(i * size // parts, (i + 1) * size // parts) for i in range(parts)]


def plan_shards(ir: ModelIR, shard: Shard) -> ShardPlan:
    """The Megatron plan of `ir` for `shard`; raises `ParallelError` naming the numbers when it cannot shard."""
    world, rank = shard.world_size, shard.rank
    attn = ir.attention
    if attn.num_heads % world:
        raise ParallelError(f"tensor parallelism over {world} ranks needs the attention heads to split evenly, "
                            f"but the model has {attn.num_heads} heads ({attn.num_heads} % {world} = "
                            f"{attn.num_heads % world}); choose a world size that divides {attn.num_heads}")
    if attn.num_kv_heads % world and world % attn.num_kv_heads:
        raise ParallelError(f"tensor parallelism over {world} ranks needs the {attn.num_kv_heads} key/value heads "
                            f"to split evenly or each to be shared by whole ranks; choose a world size that "
                            f"divides or is a multiple of {attn.num_kv_heads}")
    if ir.embedding.vocab_size < world:
        raise ParallelError(f"tensor parallelism over {world} ranks: the vocabulary ({ir.embedding.vocab_size}) is "
                            "smaller than the world size")
    if attn.qkv_layout != "separate" and attn.num_kv_heads % world:
        raise ParallelError(f"tensor parallelism over {world} ranks needs the {attn.num_kv_heads} key/value groups of "
                            f"the fused query_key_value tensor to split evenly; choose a world size that divides "
                            f"{attn.num_kv_heads}")
    if attn.qk_norm is not None and attn.qk_norm.scope == "projection" and world > 1:
        raise ParallelError(f"tensor parallelism over {world} ranks does not split a query/key norm over the whole "
                            "projection (OLMo-2's q_norm/k_norm) yet: its statistics span every head; run it in one "
                            "process")
    local_heads = attn.num_heads // world
    heads = range(rank * local_heads, (rank + 1) * local_heads)
    if attn.num_kv_heads % world == 0:
        local_kv = attn.num_kv_heads // world
        kv_heads = range(rank * local_kv, (rank + 1) * local_kv)
    else:  # fewer KV heads than ranks: keep the one KV head this rank's query heads read
        group = attn.num_heads // attn.num_kv_heads
        kv_heads = range(heads.start // group, heads.start // group + 1)
    vocab = split(ir.embedding.vocab_size, world)[rank]
    # A vocabulary head is split like the embedding; a classifier's few outputs are cheaper to replicate.
    head_sharded = ir.head.tied_to_embedding or ir.head.task == "causal-lm"
    head_rows = split(ir.head.out_features, world)[rank] if head_sharded else None

    slices: dict[str, TensorSlice | None] = {"embed.weight": TensorSlice(0, vocab.start, vocab.stop)}
    d = attn.head_dim
    q_rows, kv_rows = TensorSlice(0, heads.start * d, heads.stop * d), TensorSlice(0, kv_heads.start * d,
                                                                                 kv_heads.stop * d)
    for i, block in enumerate(ir.layers):
        layer, attn, mlp = f"layers.{i}", block.attention, block.mlp
        for param in ("weight", "bias") if attn.qkv_bias else ("weight",):
            parts = qkv_parts(attn, layer, param)
            if attn.qkv_layout == "separate":
                slices.update(zip(parts, (q_rows, kv_rows, kv_rows)))
            else:  # rows [kv_heads, group + 2, head_dim]: a rank's groups are one contiguous block
                group_rows = (attn.num_heads // attn.num_kv_heads + 2) * d
                slices[parts[0]] = TensorSlice(0, kv_heads.start * group_rows, kv_heads.stop * group_rows)
        slices[f"{layer}.attn.o.weight"] = TensorSlice(1, heads.start * d, heads.stop * d)
        slices[f"{layer}.attn.sinks.weight"] = TensorSlice(0, heads.start, heads.stop)
        if attn.qk_norm is not None and attn.qk_norm.scope == "head_each":  # one weight row per head
            for param in ("weight", "bias") if attn.qk_norm.norm.bias else ("weight",):
                slices[f"{layer}.attn.q_norm.{param}"] = TensorSlice(0, heads.start, heads.stop)
                slices[f"{layer}.attn.k_norm.{param}"] = TensorSlice(0, kv_heads.start, kv_heads.stop)
        if isinstance(mlp, MoE):  # each expert split like a dense MLP; the router replicated
            slices.update(_mlp_slices(mlp.expert, f"{layer}.mlp.experts", world, rank, stacked=True))
            if mlp.shared is not None:
                slices.update(_mlp_slices(mlp.shared, f"{layer}.mlp.shared", world, rank))
        else:
            slices.update(_mlp_slices(mlp, f"{layer}.mlp", world, rank))
        if rank != 0:  # summed over the ranks: added once
            slices[f"{layer}.attn.o.bias"] = None
    if head_rows is not None:
        for name in ("head.weight", "head.bias"):
            slices[name] = TensorSlice(0, head_rows.start, head_rows.stop)
    shapes = ir.tensor_shapes()
    slices = {name: part for name, part in slices.items() if name in shapes}

    def local_mlp(mlp: MLP) -> MLP:
        return replace(mlp, intermediate_size=len(split(mlp.intermediate_size, world)[rank]))

    def local(block: Block) -> Block:
        mlp = block.mlp
        if isinstance(mlp, MoE):
            mlp = replace(mlp, expert=local_mlp(mlp.expert), shared=mlp.shared and local_mlp(mlp.shared))
        else:
            mlp = local_mlp(mlp)
        return replace(block, attention=replace(block.attention, num_heads=len(heads), num_kv_heads=len(kv_heads)),
                       mlp=mlp)

    local_ir = replace(ir, embedding=replace(ir.embedding, vocab_size=len(vocab)), block=local(ir.block),
                       variants=tuple(local(block) for block in ir.variants),
                       head=replace(ir.head, out_features=len(head_rows), labels=())
                       if head_rows is not None else ir.head)
    return ShardPlan(shard, ir, local_ir, heads, kv_heads, vocab, head_rows, slices)


def _mlp_slices(mlp: MLP, module: str, world: int, rank: int, stacked: bool = False) -> dict[str, TensorSlice | None]:
    """This rank's slices of the MLP at canonical `module` (of every expert's, when `stacked` over experts): a
    range of the intermediate size, the rows of [gate; up] and the columns of down; down's bias on rank 0 only."""
    if mlp.intermediate_size < world:
        raise ParallelError(f"tensor parallelism over {world} ranks: the intermediate size of {module} "
                            f"({mlp.intermediate_size}) is smaller than the world size")
    part, lead = split(mlp.intermediate_size, world)[rank], int(stacked)
    slices: dict[str, TensorSlice | None] = {}
    for param in ("weight", "bias") if mlp.bias else ("weight",):
        for name in up_parts(mlp, module, param):
            slices[name] = TensorSlice(lead, part.start, part.stop)
    slices[f"{module}.down.weight"] = TensorSlice(lead + 1, part.start, part.stop)
    if rank != 0:
        slices[f"{module}.down.bias"] = None
    return slices
