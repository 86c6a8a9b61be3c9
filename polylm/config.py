"""Typed reading of a checkpoint's config.json, shared by every family mapping.

Every accessor names the file and key in its error, and knows the config forms found on the Hub and
written by transformers v4 and v5 (top-level `rope_theta` / `rope_scaling` / `partial_rotary_factor` /
`original_max_position_embeddings`, or v5's `rope_parameters`; legacy `type` beside `rope_type`, `su` for
`longrope`).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable

from .checkpoint.files import read_json
from .errors import ConfigError, IRError
from .ir import TASKS, Head, RoPE, RopeScaling

_MISSING = object()
#: RoPE keys a config may give at its top level, beside `rope_scaling` / `rope_parameters` (Phi-3 gives
#: original_max_position_embeddings there).
_TOP_LEVEL_ROPE_KEYS = ("rope_theta", "partial_rotary_factor", "original_max_position_embeddings")
#: Legacy rope type names and what they mean now.
_ROPE_TYPE_ALIASES = {"su": "longrope"}
_TYPE_NAMES = {int: "an integer", float: "a number", bool: "true or false", str: "a string", dict: "an object",
               list: "a list"}


class ConfigView:
    """A config.json mapping with typed accessors that raise `ConfigError` naming the file and key."""

    def __init__(self, data: Any, path: Path | str = "config.json") -> None:
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: expected a JSON object, found {type(data).__name__}")
        self.data = data
        self.path = Path(path)

    @classmethod
    def from_dir(cls, directory: Path) -> "ConfigView":
        path = directory / "config.json"
        return cls(read_json(path, missing=" (a model directory needs config.json)"), path)

    def has(self, key: str) -> bool:
        return self.data.get(key) is not None

    def get(self, *keys: str, kind: type = int, default: Any = _MISSING) -> Any:
        """The value of the first of `keys` present (and not null), checked to be of `kind`."""
        for key in keys:
            if self.data.get(key) is not None:
                return self._check(key, self.data[key], kind)
        if default is _MISSING:
            raise ConfigError(f"{self.path}: missing key {' / '.join(repr(k) for k in keys)}")
        return default

    def _check(self, key: str, value: Any, kind: type) -> Any:
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if kind is float and ok and not math.isfinite(value):
            ok = False
        if not ok:
            raise ConfigError(f"{self.path}: key {key!r} must be {_TYPE_NAMES.get(kind, kind.__name__)}, "
                              f"found {value!r}")
        return value

    def positive(self, *keys: str, default: Any = _MISSING) -> int:
        """A positive integer size."""
        value = self.get(*keys, kind=int, default=default)
        if value is not None and value <= 0:
            raise ConfigError(f"{self.path}: key {keys[0]!r} must be a positive integer, found {value}")
        return value

    def sub(self, key: str) -> "ConfigView":
        return ConfigView(self.get(key, kind=dict), f"{self.path}:{key}")

    def rope_parameters(self) -> "ConfigView":
        """v5 `rope_parameters` merged with the legacy top-level keys and `rope_scaling` (whose `type` means
        `rope_type`). A key two of them give different values is refused, naming both: neither wins silently."""
        sources = [("the top level", {k: self.data[k]}) for k in _TOP_LEVEL_ROPE_KEYS if self.has(k)]
        dicts = [key for key in ("rope_scaling", "rope_parameters") if self.has(key)]
        sources += [(repr(key), self.get(key, kind=dict)) for key in dicts]
        merged: dict[str, Any] = {}
        origin: dict[str, str] = {}
        for source, params in sources:
            for key, value in params.items():
                key = "rope_type" if key == "type" and "rope_type" not in params else key
                if key in merged and merged[key] != value:
                    raise ConfigError(f"{self.path}: {key!r} is {merged[key]!r} in {origin[key]} but {value!r} in "
                                      f"{source}; give it once, or the same in both")
                merged[key], origin[key] = value, source
        return ConfigView(merged, f"{self.path}:{'+'.join(dicts)}" if dicts else self.path)


def read_rope(config: ConfigView, *, interleaved: bool = False, default_theta: float = 10000.0,
              default_fraction: float = 1.0) -> RoPE:
    """The RoPE description from any config form; an invalid value raises `IRError` naming the file and key."""
    params = config.rope_parameters()
    kind = params.get("rope_type", kind=str, default="default")
    kind = _ROPE_TYPE_ALIASES.get(kind, kind)
    max_positions = config.positive("max_position_embeddings", default=2048)
    scaling = None
    try:
        if kind != "default":
            scaling = _read_scaling(params, kind, max_positions)
        return RoPE(theta=params.get("rope_theta", kind=float, default=default_theta), max_positions=max_positions,
                    rotary_fraction=params.get("partial_rotary_factor", kind=float, default=default_fraction),
                    interleaved=interleaved, scaling=scaling)
    except IRError as exc:
        raise IRError(f"{params.path}: {exc}") from None


def _read_scaling(params: ConfigView, kind: str, max_positions: int) -> RopeScaling:
    known = ("linear", "dynamic", "yarn", "llama3", "longrope")
    if kind not in known:
        raise ConfigError(f"{params.path}: unsupported rope type {kind!r}; supported: default, {', '.join(known)} "
                          f"(and su, the old name of longrope)")
    original = params.positive("original_max_position_embeddings", default=None)
    factor = params.get("factor", kind=float, default=None)
    if kind == "yarn" and factor is None and original:
        factor = max_positions / original
    longrope = {}
    if kind == "longrope":
        original = original or max_positions  # as transformers fills it in
        # factor only sets the default attention factor, which is 1 for any factor ≤ 1 (as for 1)
        factor = factor if factor is not None else max(1.0, max_positions / original)
        longrope = {name: tuple(params.get(name, kind=list)) for name in ("short_factor", "long_factor")}
    if factor is None:
        raise ConfigError(f"{params.path}: rope type {kind!r} needs 'factor'")
    if kind == "llama3" and original is None:
        raise ConfigError(f"{params.path}: rope type 'llama3' needs 'original_max_position_embeddings'")
    return RopeScaling(
        kind=kind, factor=factor, original_max_positions=original,
        low_freq_factor=params.get("low_freq_factor", kind=float, default=1.0),
        high_freq_factor=params.get("high_freq_factor", kind=float, default=4.0),
        beta_fast=params.get("beta_fast", kind=float, default=32.0),
        beta_slow=params.get("beta_slow", kind=float, default=1.0),
        attention_factor=params.get("attention_factor", kind=float, default=None),
        mscale=params.get("mscale", kind=float, default=None),
        mscale_all_dim=params.get("mscale_all_dim", kind=float, default=None),
        truncate=params.get("truncate", kind=bool, default=True), **longrope,
    )


def read_head(config: ConfigView, task: str, *, vocab_size: int, tie_default: bool) -> Head:
    """The task head as transformers' `…For<Task>` classes build it from config.json."""
    if task not in TASKS:
        from .errors import TaskError
        raise TaskError(f"unknown task {task!r}; supported: {', '.join(TASKS)}")
    if task == "causal-lm":
        return Head(task, vocab_size, tied_to_embedding=config.get("tie_word_embeddings", kind=bool,
                                                                     default=tie_default))
    if task == "question-answering":
        return Head(task, 2, bias=True, labels=("start", "end"))
    labels = _labels(config)
    bias = task == "token-classification" and config.get("token_classification_bias", kind=bool, default=True)
    return Head(task, len(labels), bias=bias, labels=labels)


def _labels(config: ConfigView) -> tuple[str, ...]:
    id2label = config.get("id2label", kind=dict, default=None)
    if id2label is None:
        count = config.positive("num_labels", default=2)
        return tuple(f"LABEL_{i}" for i in range(count))
    try:
        by_index = {int(k): str(v) for k, v in id2label.items()}
    except ValueError:
        raise ConfigError(f"{config.path}: key 'id2label' must map integer ids to labels") from None
    if sorted(by_index) != list(range(len(by_index))) or not by_index:
        raise ConfigError(f"{config.path}: key 'id2label' must have ids 0..n-1, found {sorted(by_index)}")
    return tuple(by_index[i] for i in range(len(by_index)))


def read_heads(config: ConfigView, hidden_size: int, *, heads_keys: tuple[str, ...] = ("num_attention_heads",)
               ) -> tuple[int, int, int]:
    """(num_heads, num_kv_heads, head_dim) with the usual defaults: kv heads = heads, head_dim derived."""
    heads = config.positive(*heads_keys)
    kv_heads = config.positive("num_key_value_heads", default=heads)
    head_dim = config.positive("head_dim", default=None)
    if head_dim is None:
        if hidden_size % heads:
            raise ConfigError(f"{config.path}: hidden_size ({hidden_size}) is not divisible by "
                              f"{heads_keys[0]} ({heads}) and no head_dim is given")
        head_dim = hidden_size // heads
    return heads, kv_heads, head_dim


#: transformers' `layer_types` values polylm's IR expresses: whether a layer's attention slides.
LAYER_TYPES = {"full_attention": False, "sliding_attention": True}


def read_sliding_layers(config: ConfigView, num_layers: int, default: Callable[[int], bool]) -> tuple[bool, ...]:
    """Which layers use sliding-window attention: as transformers' `layer_types` says ("full_attention" or
    "sliding_attention" per layer) when the config has it, else `default(layer index)`."""
    if not config.has("layer_types"):
        return tuple(default(i) for i in range(num_layers))
    types = config.get("layer_types", kind=list)
    if len(types) != num_layers:
        raise ConfigError(f"{config.path}: key 'layer_types' names {len(types)} layers, num_hidden_layers is "
                          f"{num_layers}")
    unknown = sorted({str(t) for t in types if t not in LAYER_TYPES})
    if unknown:
        raise ConfigError(f"{config.path}: key 'layer_types' has {', '.join(map(repr, unknown))}; supported: "
                          f"{', '.join(LAYER_TYPES)}")
    return tuple(LAYER_TYPES[t] for t in types)


#: transformers' ACT2FN names → IR activations (gelu_new / gelu_fast are the same tanh approximation).
HF_ACTIVATIONS = {"silu": "silu", "swish": "silu", "gelu": "gelu", "gelu_pytorch_tanh": "gelu_tanh",
                  "gelu_new": "gelu_tanh", "gelu_fast": "gelu_tanh", "relu": "relu", "relu2": "relu2"}


def read_activation(config: ConfigView, *keys: str, default: str, legacy: dict[str, str] | None = None) -> str:
    """An IR activation from an HF activation name; `legacy` remaps names a family reads differently."""
    name = config.get(*keys, kind=str, default=default)
    name = (legacy or {}).get(name, name)
    if name in HF_ACTIVATIONS.values():
        return name
    if name not in HF_ACTIVATIONS:
        raise ConfigError(f"{config.path}: unsupported activation {name!r} (key {keys[0]!r}); supported: "
                          f"{', '.join(HF_ACTIVATIONS)}")
    return HF_ACTIVATIONS[name]
