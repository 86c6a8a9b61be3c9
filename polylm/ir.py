"""The intermediate representation: a backend-agnostic description of a decoder model as frozen data.

A family plugin maps a checkpoint's config.json to a `ModelIR`; a backend lowers a `ModelIR` plus weights into
something that runs. No tensors and no framework imports live here. Building any node validates it and raises
`IRError` naming the config key (`source`) the bad value came from when the family passed one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Literal, Union

from .errors import IRError

NormKind = Literal["rms", "layer"]
Activation = Literal["silu", "gelu_tanh", "gelu", "relu", "relu2", "swiglu_oai"]
RopeScalingKind = Literal["linear", "dynamic", "yarn", "llama3", "longrope"]
QKVLayout = Literal["separate", "fused_per_kv_group"]
Task = Literal["causal-lm", "sequence-classification", "token-classification", "question-answering"]

ACTIVATIONS: tuple[str, ...] = ("silu", "gelu_tanh", "gelu", "relu", "relu2", "swiglu_oai")
TASKS: tuple[str, ...] = ("causal-lm", "sequence-classification", "token-classification", "question-answering")
MAX_ROPE_FACTOR = 1e6
#: More layers than any decoder has (the largest have ~130); a config asking for more is refused, not enumerated.
MAX_LAYERS = 65536
MIN_YARN_BETA = 1e-3


def _require(condition: bool, message: str) -> None:
    if not condition:
        raise IRError(message)


def _positive_int(value: object, what: str) -> None:
    _require(isinstance(value, int) and not isinstance(value, bool) and value > 0,
             f"{what} must be a positive integer, got {value!r}")


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _positive_float(value: object, what: str) -> None:
    _require(_is_number(value) and value > 0, f"{what} must be a positive number, got {value!r}")


@dataclass(frozen=True)
class Norm:
    """RMSNorm or LayerNorm. `weight_offset` is added to the stored weight (Gemma `1 + w`, LayerNorm1P)."""

    kind: NormKind
    eps: float
    weight_offset: float = 0.0
    bias: bool = False

    def __post_init__(self) -> None:
        _require(self.kind in ("rms", "layer"), f"norm kind must be 'rms' or 'layer', got {self.kind!r}")
        _positive_float(self.eps, "norm epsilon")


@dataclass(frozen=True)
class RopeScaling:
    """RoPE frequency scaling, with the parameters of transformers' `rope_parameters` of the same name.

    LongRoPE (Phi-3) divides each frequency by its own factor: `short_factor` for a sequence of at most
    `original_max_positions` tokens, `long_factor` past it, one factor per rotary pair; cos/sin are multiplied by
    `attention_factor`, by default √(1 + ln factor / ln original_max_positions).
    """

    kind: RopeScalingKind
    factor: float = 1.0
    original_max_positions: int | None = None
    # longrope
    short_factor: tuple[float, ...] = ()
    long_factor: tuple[float, ...] = ()
    # llama3
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    # yarn
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self) -> None:
        _require(self.kind in ("linear", "dynamic", "yarn", "llama3", "longrope"),
                 f"rope scaling type must be one of linear, dynamic, yarn, llama3, longrope; got {self.kind!r}")
        # Bounds that keep the frequencies finite (transformers asks for the same factor ≥ 1); the top of the
        # factor keeps dynamic NTK's base power within float range.
        _require(_is_number(self.factor) and 1 <= self.factor <= MAX_ROPE_FACTOR,
                 f"factor must be a number in [1, {MAX_ROPE_FACTOR:g}], got {self.factor!r}")
        if self.original_max_positions is not None:
            _positive_int(self.original_max_positions, "original_max_position_embeddings")
        if self.kind == "llama3":
            _require(self.original_max_positions is not None,
                     "rope scaling 'llama3' needs original_max_position_embeddings")
            _positive_float(self.low_freq_factor, "low_freq_factor")
            _positive_float(self.high_freq_factor, "high_freq_factor")
            _require(self.high_freq_factor != self.low_freq_factor,
                     "rope scaling 'llama3' needs high_freq_factor != low_freq_factor")
        if self.kind == "longrope":
            # ≥ 2: the default attention factor divides by its logarithm
            _require(self.original_max_positions is not None and self.original_max_positions >= 2,
                     f"rope scaling 'longrope' needs original_max_position_embeddings ≥ 2, got "
                     f"{self.original_max_positions!r}")
            for name in ("short_factor", "long_factor"):
                value = getattr(self, name)
                _require(isinstance(value, tuple) and len(value) > 0 and all(
                    _is_number(v) and v > 0 for v in value),
                    f"{name} must be a list of positive numbers, got {value!r}")
        if self.kind in ("yarn", "longrope") and self.attention_factor is not None:
            _positive_float(self.attention_factor, "attention_factor")
        if self.kind == "yarn":
            for name in ("beta_fast", "beta_slow"):  # rotation counts; YaRN takes log(positions / (2π β))
                value = getattr(self, name)
                _require(_is_number(value) and value >= MIN_YARN_BETA,
                         f"{name} must be a number ≥ {MIN_YARN_BETA:g}, got {value!r}")
            for name in ("mscale", "mscale_all_dim"):  # ≥ 0 keeps YaRN's 0.1·m·ln(factor) + 1 ≥ 1
                value = getattr(self, name)
                _require(value is None or (_is_number(value) and value >= 0),
                         f"{name} must be a number ≥ 0, got {value!r}")
            _require(isinstance(self.truncate, bool), f"truncate must be true or false, got {self.truncate!r}")


@dataclass(frozen=True)
class RoPE:
    """Rotary position embedding.

    `interleaved` rotates pairs (x0, x1), (x2, x3)…; otherwise the two halves of the rotary dims are paired.
    Only the first `rotary_fraction` of each head's dims rotate; the rest pass through.
    `max_positions` is the config's max_position_embeddings (dynamic and YaRN scaling read it).
    """

    theta: float
    max_positions: int
    rotary_fraction: float = 1.0
    interleaved: bool = False
    scaling: RopeScaling | None = None

    def __post_init__(self) -> None:
        # Above 1 every frequency is at most one radian per position (finite angles), and YaRN's log(θ) ≠ 0.
        _require(_is_number(self.theta) and self.theta > 1, f"rope_theta must be a number > 1, got {self.theta!r}")
        _positive_int(self.max_positions, "max_position_embeddings")
        _require(isinstance(self.rotary_fraction, (int, float)) and 0 < self.rotary_fraction <= 1,
                 f"partial_rotary_factor must be in (0, 1], got {self.rotary_fraction!r}")


@dataclass(frozen=True)
class ALiBi:
    """Attention with linear biases: per-head slope × (key position − query position), no rotary.

    `scaled`: the bias is multiplied by the softmax scale too (Falcon adds it to q·k before scaling; BLOOM after).
    """

    max_bias: float = 8.0
    scaled: bool = False


#: How attention sees positions; None: it does not (the embedding's `LearnedPositions` carry them, GPT-2).
Position = Union[RoPE, ALiBi, None]


@dataclass(frozen=True)
class LearnedPositions:
    """Absolute position embeddings (GPT-2): row p of `embed.positions.weight` [max_positions, hidden] is added
    to the (scaled) token embedding of a token at position p."""

    max_positions: int

    def __post_init__(self) -> None:
        _positive_int(self.max_positions, "max_position_embeddings")


QKNormScope = Literal["head", "head_each", "projection"]


@dataclass(frozen=True)
class QKNorm:
    """Normalization of the queries and keys after their projections, before RoPE.

    `scope` says over what the statistics run and which weights scale them:
    - "head": each head's head_dim values, one weight [head_dim] shared by every head (Qwen3, Gemma 3, Phi);
    - "head_each": each head's values, every head its own weight: [heads, head_dim] (Cohere, StableLM);
    - "projection": the whole projection at once, weights [heads·head_dim] and [kv_heads·head_dim] (OLMo-2).
    """

    norm: Norm
    scope: QKNormScope = "head"

    def __post_init__(self) -> None:
        _require(self.scope in ("head", "head_each", "projection"),
                 f"query/key norm scope must be 'head', 'head_each' or 'projection', got {self.scope!r}")


@dataclass(frozen=True)
class Attention:
    """Multi-head / grouped-query attention.

    `qkv_layout` says how the checkpoint stores the projections: separately (q, k, v) or as one tensor
    interleaved per key/value group, rows [kv_heads, heads / kv_heads + 2, head_dim]: each group's query heads,
    then its key and its value (Falcon's; with one head per group, [heads, 3, head_dim]: BLOOM, GPT-NeoX).
    `scale` defaults to head_dim ** -0.5.
    `position` None: attention sees no positions (the embedding adds learned ones, `LearnedPositions`).
    `window`: sliding-window attention, a query sees only the keys fewer than `window` positions before it (itself
    included: transformers' `sliding_window`); None sees every earlier key. `softcap` caps the scaled attention
    logits to ±softcap as `softcap·tanh(logit / softcap)` before the mask is applied (Gemma 2's
    attn_logit_softcapping). `sinks`: each head has a learned logit (`layers.{i}.attn.sinks` [heads]) that joins
    its softmax's denominator as one more key with no value (gpt-oss's attention sinks): the weights of the real
    keys then sum to less than 1.
    """

    num_heads: int
    num_kv_heads: int
    head_dim: int
    position: Position
    qkv_bias: bool = False
    out_bias: bool = False
    qkv_layout: QKVLayout = "separate"
    scale: float | None = None
    qk_norm: QKNorm | None = None
    window: int | None = None
    softcap: float | None = None
    sinks: bool = False

    def __post_init__(self) -> None:
        _positive_int(self.num_heads, "num_attention_heads")
        if self.window is not None:
            _positive_int(self.window, "sliding_window")
        if self.softcap is not None:
            _positive_float(self.softcap, "attention logit softcap")
        _positive_int(self.num_kv_heads, "num_key_value_heads")
        _positive_int(self.head_dim, "head_dim")
        _require(self.num_heads % self.num_kv_heads == 0,
                 f"num_attention_heads ({self.num_heads}) must be divisible by num_key_value_heads "
                 f"({self.num_kv_heads})")
        _require(self.qkv_layout in ("separate", "fused_per_kv_group"), f"unknown qkv layout {self.qkv_layout!r}")
        if isinstance(self.position, RoPE):
            _require(self.rotary_dim >= 2 and self.rotary_dim % 2 == 0,
                     f"rotary dims (head_dim {self.head_dim} × partial_rotary_factor "
                     f"{self.position.rotary_fraction}) must be even and ≥ 2, got {self.rotary_dim}")
            scaling = self.position.scaling
            _require(scaling is None or scaling.kind != "dynamic" or self.rotary_dim >= 4,
                     f"dynamic rope scaling needs at least 4 rotary dims (its base grows by a power dim / (dim - 2)), "
                     f"got {self.rotary_dim}")
            if scaling is not None and scaling.kind == "longrope":
                for name in ("short_factor", "long_factor"):
                    count = len(getattr(scaling, name))
                    _require(count == self.rotary_dim // 2,
                             f"{name} has {count} values; rope scaling 'longrope' needs one per rotary pair: "
                             f"{self.rotary_dim // 2} (rotary dims {self.rotary_dim} / 2)")

    @property
    def rotary_dim(self) -> int:
        """Number of dims per head that rotate (0 without RoPE)."""
        if not isinstance(self.position, RoPE):
            return 0
        return int(self.head_dim * self.position.rotary_fraction)

    @property
    def softmax_scale(self) -> float:
        return self.scale if self.scale is not None else self.head_dim ** -0.5


@dataclass(frozen=True)
class MLP:
    """Feed-forward: `down(act(gate(x)) * up(x))` when gated, else `down(act(up(x)))`.

    "swiglu_oai" (gpt-oss's clamped SwiGLU, gated only) is `(up' + 1) · g · sigmoid(alpha · g)` with
    g = min(gate, limit) and up' = up clamped to ±limit (`limit`: the config's swiglu_limit, `alpha` its
    swiglu_alpha); the other activations take no `limit`.
    """

    intermediate_size: int
    activation: Activation
    gated: bool
    bias: bool = False
    limit: float | None = None
    alpha: float = 1.702

    def __post_init__(self) -> None:
        _positive_int(self.intermediate_size, "intermediate_size")
        _require(self.activation in ACTIVATIONS,
                 f"unknown activation {self.activation!r}; supported: {', '.join(ACTIVATIONS)}")
        if self.activation == "swiglu_oai":
            _require(self.gated, "activation 'swiglu_oai' needs a gated MLP")
            _positive_float(self.limit, "swiglu_limit")
            _positive_float(self.alpha, "swiglu_alpha")
        else:
            _require(self.limit is None, f"activation {self.activation!r} takes no swiglu_limit")


Routing = Literal["softmax_topk", "topk_softmax"]


@dataclass(frozen=True)
class MoE:
    """Routed experts in place of a block's dense MLP (a mixture of experts).

    A router (`layers.{i}.mlp.router`: [num_experts, hidden], with a bias when `router_bias`) scores every expert
    for each token, and `routing` turns the scores into the weights of the `top_k` experts chosen:
    - "softmax_topk": the softmax over all experts, then the k largest (renormalized to sum to 1 when `normalize`:
      Mixtral, Qwen3-MoE; as they are: Qwen2-MoE, OLMoE by default);
    - "topk_softmax": the k largest logits, then their softmax (gpt-oss).
    The output is the weighted sum of the chosen experts' MLPs (each an `expert`; tensors
    `layers.{i}.mlp.experts.gate|up|down` stacked over the experts: [num_experts, …]), plus, when `shared` is set,
    an MLP every token goes through (`layers.{i}.mlp.shared.*`), its output scaled by sigmoid(x ·
    `layers.{i}.mlp.shared_gate` [1, hidden]) when `shared_gate` (Qwen2-MoE).
    """

    num_experts: int
    top_k: int
    expert: MLP
    routing: Routing = "softmax_topk"
    normalize: bool = False
    router_bias: bool = False
    shared: MLP | None = None
    shared_gate: bool = False

    def __post_init__(self) -> None:
        _positive_int(self.num_experts, "num_experts")
        _positive_int(self.top_k, "num_experts_per_tok")
        _require(self.top_k <= self.num_experts,
                 f"num_experts_per_tok ({self.top_k}) must be at most num_experts ({self.num_experts})")
        _require(self.routing in ("softmax_topk", "topk_softmax"), f"unknown routing {self.routing!r}")
        _require(self.shared is not None or not self.shared_gate, "a shared-expert gate needs a shared expert")


@dataclass(frozen=True)
class Block:
    """One decoder layer: an attention branch and an MLP branch added to the residual stream.

    - Sequential (default): `x += attn(attn_norm(x))`, then `x += mlp(mlp_norm(x))`.
    - `parallel`: both branches read the same input, `x += attn(attn_norm(x)) + mlp(mlp_norm(x))`; without an
      `mlp_norm` the MLP reads the attention's normed input (one shared norm: Phi, Cohere, Falcon-7B), with one it
      has its own (GPT-NeoX, Falcon's new decoder architecture).
    - A norm set to None is absent (OLMo-2 has no norm before its branches); `attn_post_norm` / `mlp_post_norm`
      norm a branch's output before it is added (OLMo-2 after, Gemma 2/3 before and after: sandwich norms).
    - `residual_scale` multiplies each branch's output before it is added (Granite's residual_multiplier).
    - `residual_from_normed` (BLOOM's apply_residual_connection_post_layernorm): each residual branch starts from
      the normed input instead of the block input.
    - `mlp` is a dense `MLP` or routed experts (`MoE`).
    """

    attn_norm: Norm | None
    attention: Attention
    mlp_norm: Norm | None
    mlp: MLP | MoE
    residual_from_normed: bool = False
    parallel: bool = False
    attn_post_norm: Norm | None = None
    mlp_post_norm: Norm | None = None
    residual_scale: float = 1.0

    def __post_init__(self) -> None:
        _positive_float(self.residual_scale, "residual multiplier")
        if self.parallel:
            _require(self.attn_norm is not None, "a parallel block needs a norm before its branches")
            _require(not self.residual_from_normed and self.attn_post_norm is None and self.mlp_post_norm is None,
                     "a parallel block takes no post-branch norms and no residual from the normed input")
        if self.residual_from_normed:
            _require(self.attn_norm is not None and self.mlp_norm is not None,
                     "a residual from the normed input needs a norm before each branch")


@dataclass(frozen=True)
class Embedding:
    """Token embedding, multiplied by `scale` in the compute dtype, then optionally normed; or, with learned
    `positions`, plus the position embedding of each token's position (no norm then)."""

    vocab_size: int
    hidden_size: int
    scale: float = 1.0
    norm: Norm | None = None
    positions: LearnedPositions | None = None

    def __post_init__(self) -> None:
        _positive_int(self.vocab_size, "vocab_size")
        _positive_int(self.hidden_size, "hidden_size")
        _positive_float(self.scale, "embedding scale")
        _require(self.positions is None or self.norm is None,
                 "an embedding with learned positions takes no embedding norm")


@dataclass(frozen=True)
class Head:
    """The task head: one linear map of the final hidden states (tied to the embedding or its own tensor).
    Its `bias` is its own tensor `head.bias` even when the weight is tied (transformers ties only the weight:
    a tied Phi lm_head keeps its bias).

    What the outputs mean (vocabulary logits, labels, span start/end) is the task's; a backend only sees
    the linear map. `labels` names the outputs of classification heads. The outputs are then multiplied by
    `logit_scale` (Cohere's logit_scale; Granite divides by logits_scaling) and capped to ±`softcap` as
    `softcap·tanh(out / softcap)` (Gemma 2's final_logit_softcapping) — in core, on every backend's outputs
    (`polylm.numerics.logits`).
    """

    task: Task
    out_features: int
    bias: bool = False
    tied_to_embedding: bool = False
    labels: tuple[str, ...] = ()
    logit_scale: float = 1.0
    softcap: float | None = None

    def __post_init__(self) -> None:
        _positive_float(self.logit_scale, "logit scale")
        if self.softcap is not None:
            _positive_float(self.softcap, "final logit softcap")
        _require(self.task in TASKS, f"unknown task {self.task!r}; supported: {', '.join(TASKS)}")
        _positive_int(self.out_features, "head size (vocab_size or num_labels)")
        _require(not self.labels or len(self.labels) == self.out_features,
                 f"{len(self.labels)} labels for a head of {self.out_features} outputs")


@dataclass(frozen=True)
class Quantization:
    """Weight-only quantization of the block and head matrices, and of the embedding table when
    `embedding_bits` is set (norms stay as they are).

    Symmetric per-group scales over `group_size` consecutive input features (None: one scale per output row),
    stored in `scale_dtype` whatever the compute dtype; `polylm.numerics.quantization` is the reference every
    backend stores exactly. Activations keep the compute dtype; each backend picks its own storage layout.

    `embedding_bits` (None: the table stays unquantized) quantizes the embedding table by `embedding`'s scheme:
    int8 with one scale per row, or int4 with this scheme's group size (32 without one). A tied head is that
    table, so it multiplies with the same codes; an untied embedding is stored quantized too and looked up by
    dequantizing the ids' rows; an untied head keeps `bits`. The presets quantize the table to int8 even for
    int4, as llama.cpp keeps its output tensor at 6 bits: the head matters most for quality.
    """

    bits: Literal[8, 4]
    group_size: int | None = None
    embedding_bits: Literal[8, 4] | None = None

    def __post_init__(self) -> None:
        _require(self.bits in (8, 4), f"quantization bits must be 8 or 4, got {self.bits!r}")
        _require(self.bits == 8 or self.group_size is not None, "int4 quantization needs a group size")
        _require(self.embedding_bits in (None, 8, 4),
                 f"embedding quantization bits must be 8, 4 or None, got {self.embedding_bits!r}")
        if self.group_size is not None:
            _positive_int(self.group_size, "quantization group size")

    @property
    def embedding(self) -> Quantization | None:
        """The embedding table's (and a tied head's) scheme: None when it stays unquantized."""
        if self.embedding_bits is None:
            return None
        return Quantization(8) if self.embedding_bits == 8 else Quantization(4, self.group_size or 32)

    @property
    def qmax(self) -> int:
        """The largest |q|: 127 (int8) or 7 (int4); codes are symmetric, −qmax..qmax."""
        return 2 ** (self.bits - 1) - 1

    @property
    def scale_dtype(self) -> Literal["float32", "bfloat16"]:
        """How scales are stored on every backend: float32 for int8, bfloat16 for int4 (half the bytes where a
        scale serves only 32 weights of half a byte each; what the torch CPU kernels read)."""
        return "float32" if self.bits == 8 else "bfloat16"


#: The `--quantize` presets: the embedding table (a tied head) at int8 for both (see `Quantization`).
QUANTIZATIONS: dict[str, Quantization] = {"int8": Quantization(8, embedding_bits=8),
                                          "int4": Quantization(4, group_size=32, embedding_bits=8)}


@dataclass(frozen=True)
class ModelIR:
    """A whole decoder: embedding, `num_layers` blocks, final norm, task head, and how its weights are quantized
    at load (None: kept as they are).

    Every layer is `block` unless layers differ (Gemma 2/3's local and global attention, Qwen2's
    max_window_layers, transformers' `layer_types`): then `variants` holds the other kinds of block and
    `layer_kinds` says, per layer, which one it is (0: `block`, k: `variants[k - 1]`); `with_layers` builds
    both from a block per layer (MoE families mix dense and expert layers). The kinds share the attention's head
    counts and sizes.
    """

    family: str
    embedding: Embedding
    block: Block
    num_layers: int
    final_norm: Norm
    head: Head
    max_positions: int
    quantization: Quantization | None = None
    variants: tuple[Block, ...] = ()
    layer_kinds: tuple[int, ...] = ()

    def __post_init__(self) -> None:
        _positive_int(self.num_layers, "num_hidden_layers")
        _require(self.num_layers <= MAX_LAYERS, f"num_hidden_layers must be at most {MAX_LAYERS}, got {self.num_layers}")
        _positive_int(self.max_positions, "max_position_embeddings")
        self._check_layers()
        learned = self.embedding.positions
        _require(learned is None or self.context_length <= learned.max_positions,
                 f"a context of {self.context_length} positions needs as many learned position embeddings, "
                 f"got {learned.max_positions if learned else 0}")
        _require(not self.head.tied_to_embedding or self.head.out_features == self.embedding.vocab_size,
                 "a head tied to the embedding must have vocab_size outputs")

    def _check_layers(self) -> None:
        if not self.layer_kinds:
            _require(not self.variants, "block variants need layer_kinds saying which layer is which")
            return
        _require(len(self.layer_kinds) == self.num_layers,
                 f"layer kinds name {len(self.layer_kinds)} layers, the model has {self.num_layers}")
        _require(all(isinstance(k, int) and 0 <= k <= len(self.variants) for k in self.layer_kinds),
                 f"layer kinds must be in 0..{len(self.variants)}, got {self.layer_kinds}")
        _require(set(self.layer_kinds) == set(range(len(self.variants) + 1)), "every block variant must be used")
        attn = self.block.attention
        for variant in self.variants:
            other = variant.attention
            _require((other.num_heads, other.num_kv_heads, other.head_dim, other.qkv_layout)
                     == (attn.num_heads, attn.num_kv_heads, attn.head_dim, attn.qkv_layout),
                     "block variants must share the attention's heads, key/value heads, head_dim and qkv layout")

    def with_layers(self, blocks: "tuple[Block, ...] | list[Block]") -> "ModelIR":
        """This model with `blocks[i]` as layer i (equal blocks become one kind; see the class docstring)."""
        kinds: list[Block] = []
        for block in blocks:
            if block not in kinds:
                kinds.append(block)
        if len(kinds) == 1:
            return replace(self, block=kinds[0], num_layers=len(blocks), variants=(), layer_kinds=())
        return replace(self, block=kinds[0], num_layers=len(blocks), variants=tuple(kinds[1:]),
                       layer_kinds=tuple(kinds.index(block) for block in blocks))

    @property
    def blocks(self) -> tuple[Block, ...]:
        """The kinds of block: `block`, then the variants."""
        return (self.block, *self.variants)

    @property
    def layers(self) -> tuple[Block, ...]:
        """The block of each layer."""
        if not self.layer_kinds:
            return (self.block,) * self.num_layers
        blocks = self.blocks
        return tuple(blocks[kind] for kind in self.layer_kinds)

    @property
    def hidden_size(self) -> int:
        return self.embedding.hidden_size

    @property
    def context_length(self) -> int:
        """The longest sequence this model accepts (dynamic RoPE scaling stretches max_position_embeddings)."""
        position = self.block.attention.position
        if isinstance(position, RoPE) and position.scaling is not None and position.scaling.kind == "dynamic":
            return int(self.max_positions * position.scaling.factor)
        return self.max_positions

    @property
    def attention(self) -> Attention:
        return self.block.attention

    def tensor_shapes(self) -> dict[str, tuple[int, ...]]:
        """Every tensor this model reads, by canonical name, with its shape."""
        hidden = self.hidden_size
        shapes: dict[str, tuple[int, ...]] = {"embed.weight": (self.embedding.vocab_size, hidden)}
        if self.embedding.norm is not None:
            shapes.update(_norm_shapes("embed.norm", self.embedding.norm, hidden))
        if self.embedding.positions is not None:
            shapes["embed.positions.weight"] = (self.embedding.positions.max_positions, hidden)
        for i, block in enumerate(self.layers):
            p, attn, mlp = f"layers.{i}", block.attention, block.mlp
            q_rows, kv_rows = attn.num_heads * attn.head_dim, attn.num_kv_heads * attn.head_dim
            shapes.update(_norm_shapes(f"{p}.attn_norm", block.attn_norm, hidden))
            shapes.update(_norm_shapes(f"{p}.attn_post_norm", block.attn_post_norm, hidden))
            if attn.qk_norm is not None:
                for name, heads in (("q_norm", attn.num_heads), ("k_norm", attn.num_kv_heads)):
                    shapes.update(_norm_shapes(f"{p}.attn.{name}", attn.qk_norm.norm,
                                               *_qk_norm_shape(attn.qk_norm.scope, heads, attn.head_dim)))
            if attn.qkv_layout == "separate":
                for name, rows in (("q", q_rows), ("k", kv_rows), ("v", kv_rows)):
                    shapes[f"{p}.attn.{name}.weight"] = (rows, hidden)
                    if attn.qkv_bias:
                        shapes[f"{p}.attn.{name}.bias"] = (rows,)
            else:
                shapes[f"{p}.attn.qkv.weight"] = (q_rows + 2 * kv_rows, hidden)
                if attn.qkv_bias:
                    shapes[f"{p}.attn.qkv.bias"] = (q_rows + 2 * kv_rows,)
            if attn.sinks:
                shapes[f"{p}.attn.sinks.weight"] = (attn.num_heads,)
            shapes[f"{p}.attn.o.weight"] = (hidden, q_rows)
            if attn.out_bias:
                shapes[f"{p}.attn.o.bias"] = (hidden,)
            shapes.update(_norm_shapes(f"{p}.mlp_norm", block.mlp_norm, hidden))
            shapes.update(_norm_shapes(f"{p}.mlp_post_norm", block.mlp_post_norm, hidden))
            if isinstance(mlp, MoE):
                shapes[f"{p}.mlp.router.weight"] = (mlp.num_experts, hidden)
                if mlp.router_bias:
                    shapes[f"{p}.mlp.router.bias"] = (mlp.num_experts,)
                shapes.update(_mlp_shapes(f"{p}.mlp.experts", mlp.expert, hidden, mlp.num_experts))
                if mlp.shared is not None:
                    shapes.update(_mlp_shapes(f"{p}.mlp.shared", mlp.shared, hidden))
                if mlp.shared_gate:
                    shapes[f"{p}.mlp.shared_gate.weight"] = (1, hidden)
            else:
                shapes.update(_mlp_shapes(f"{p}.mlp", mlp, hidden))
        shapes.update(_norm_shapes("final_norm", self.final_norm, hidden))
        if not self.head.tied_to_embedding:
            shapes["head.weight"] = (self.head.out_features, hidden)
        if self.head.bias:
            shapes["head.bias"] = (self.head.out_features,)
        return shapes


def _mlp_shapes(prefix: str, mlp: MLP, hidden: int, experts: int | None = None) -> dict[str, tuple[int, ...]]:
    """An MLP's projections (gate when gated, up, down) and biases; stacked over `experts` when given."""
    lead = () if experts is None else (experts,)
    projections = (("gate", (mlp.intermediate_size, hidden)),) if mlp.gated else ()
    projections += (("up", (mlp.intermediate_size, hidden)), ("down", (hidden, mlp.intermediate_size)))
    shapes = {}
    for name, shape in projections:
        shapes[f"{prefix}.{name}.weight"] = (*lead, *shape)
        if mlp.bias:
            shapes[f"{prefix}.{name}.bias"] = (*lead, shape[0])
    return shapes


def _norm_shapes(prefix: str, norm: Norm | None, *shape: int) -> dict[str, tuple[int, ...]]:
    if norm is None:
        return {}
    shapes = {f"{prefix}.weight": shape}
    if norm.bias:
        shapes[f"{prefix}.bias"] = shape
    return shapes


def _qk_norm_shape(scope: str, heads: int, head_dim: int) -> tuple[int, ...]:
    """The weight shape of a query or key norm over `heads` heads (see `QKNorm`)."""
    return {"head": (head_dim,), "head_each": (heads, head_dim), "projection": (heads * head_dim,)}[scope]
