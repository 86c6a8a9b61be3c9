"""The one error hierarchy: every user-facing failure is a `PolylmError` naming where and what."""

from __future__ import annotations


class PolylmError(Exception):
    """Base class of every error polylm raises on bad input or an unusable environment."""


class ConfigError(PolylmError):
    """config.json (or another JSON file of the checkpoint) is missing, malformed or inconsistent."""


class HubError(ConfigError):
    """A Hub repo id cannot be resolved: not cached while offline, gated, missing, or the Hub unreachable. The
    message names the repo and what to do."""


class Declined(ConfigError):
    """A family's `to_ir` does not handle this config variant; the next family claiming its `model_type` is
    tried. The message says why (it is shown when every family declines)."""


class IRError(ConfigError):
    """A model description is internally inconsistent (e.g. heads not divisible by KV heads)."""


class WeightsError(PolylmError):
    """A weight file is missing, corrupt, or holds tensors that do not match the model description."""


class TokenizerError(PolylmError):
    """tokenizer.json (or its companion files) is missing or unreadable."""


class TemplateError(TokenizerError):
    """A chat template cannot be read or compiled, or fails or passes polylm's bounds while rendering."""


class PluginError(PolylmError):
    """A family or backend plugin is missing, broken, or claims something it cannot do."""


class BackendError(PolylmError):
    """A backend is unknown, unavailable here, or cannot run what was asked (e.g. a dtype)."""


class TaskError(PolylmError):
    """The checkpoint holds no head for the requested task, or the task is unknown."""


class InputError(PolylmError):
    """Bad input to a model call: token ids, prompts, shapes or generation settings."""


class ParallelError(PolylmError):
    """A model cannot be sharded over the asked number of ranks, or a rank of a tensor-parallel job failed."""


class GenerationError(PolylmError):
    """A model's logits leave no token to pick (NaN, or every token -inf): broken weights or an overflow."""
