"""`polylm.load`: model directory → family → IR → weights → backend runtime → `Model`."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

from ..backend import DTYPES
from ..checkpoint.hub import resolve_model
from ..checkpoint.weights import Checkpoint, resolve
from ..config import ConfigView
from ..errors import BackendError, IRError, TaskError, WeightsError
from ..generate.tokenizer import Tokenizer
from ..ir import QUANTIZATIONS, TASKS, ModelIR
from ..model import Model
from .registry import registry

_ARCHITECTURE_SUFFIXES = {
    "ForCausalLM": "causal-lm",
    "LMHeadModel": "causal-lm",
    "ForSequenceClassification": "sequence-classification",
    "ForTokenClassification": "token-classification",
    "ForQuestionAnswering": "question-answering",
}


def load(path: str | Path, *, backend: str = "auto", task: str | None = None, dtype: str | None = None,
         quantize: str | None = None, tensor_parallel: int | None = None) -> Model:
    """Load a Hugging Face–format checkpoint: a directory, or a Hub repo id in the local HF cache.

    `task` defaults to what the checkpoint's `architectures` entry says (causal LM when it says nothing);
    `dtype=None` keeps the checkpoint's dtype. `quantize` ("int8" or "int4") stores the block and head
    matrices as weight-only integers with per-group scales. Nothing in the directory is written.

    `tensor_parallel=N` loads this rank's 1/N of the model in a group of N ranks of the backend's engine
    (torch.distributed: already initialized, or described by torchrun's environment); every rank calls `load`,
    rank 0 uses the model and the others call `polylm.parallel.follow(model)` (see `polylm.parallel`).
    """
    directory = resolve_model(path)
    config = ConfigView.from_dir(directory)
    plugins = registry()
    family = plugins.family(config.get("model_type", kind=str), str(config.path))
    task = task or infer_task(config)
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    if task not in family.tasks:
        raise TaskError(f"task {task!r} is not supported by family {family.name!r}; supported: "
                        f"{', '.join(family.tasks)}")
    if dtype is not None and dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise BackendError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    check_supported(quantize, tensor_parallel)
    chosen = plugins.backend(backend)
    ir = _to_ir(family, config, task)
    if quantize is not None:
        ir = replace(ir, quantization=QUANTIZATIONS[quantize])
    plan = None
    if tensor_parallel is not None:  # checked before any tensor is read, and before joining the group
        from ..parallel.plan import Shard, plan_shards, timeout_s

        plan_shards(ir, Shard(0, tensor_parallel))
        plan = plan_shards(ir, chosen.join_group(tensor_parallel, timeout_s()))
    checkpoint = Checkpoint(directory)
    _check_layer_count(ir, checkpoint, config)
    others = {t: m for t, m in family.head_names.items() if t != task and m != family.head_names[task]}
    weights = resolve(checkpoint, ir.tensor_shapes(), family.module_names, family.head_names[task],
                      family.base_prefixes, family.ignored_tensors, others)
    dtype = dtype or weights["embed.weight"].dtype
    if dtype not in chosen.dtypes:
        raise BackendError(f"backend {chosen.name!r} cannot compute in {dtype}; it supports "
                           f"{', '.join(chosen.dtypes)}")
    if plan is None:
        runtime = chosen.lower(ir, weights, dtype)
    else:
        from ..parallel.driver import wrap

        runtime = wrap(chosen.lower_shard(ir, weights, dtype, plan))
    has_tokenizer = (directory / "tokenizer.json").exists() and (plan is None or plan.shard.rank == 0)
    tokenizer = Tokenizer(directory, config) if has_tokenizer else None
    return Model(ir, runtime, tokenizer, backend=chosen.name, path=directory)


def check_supported(quantize: str | None, tensor_parallel: int | None) -> None:
    """Refuse the combinations no backend runs, before anything is loaded or a group is joined."""
    if quantize is not None and tensor_parallel is not None:
        # a row-parallel slice of a quantized matrix would need scales of its own
        raise BackendError(f"weight-only quantization (quantize={quantize!r}, --quantize) does not run "
                           f"tensor-parallel (tensor_parallel={tensor_parallel}, --tp) yet; drop one of them")


def model_ir(path: str | Path, *, task: str | None = None) -> ModelIR:
    """The IR of a checkpoint, from its config alone (no tensor is read)."""
    directory = resolve_model(path)
    config = ConfigView.from_dir(directory)
    family = registry().family(config.get("model_type", kind=str), str(config.path))
    return _to_ir(family, config, task or infer_task(config))


def _to_ir(family, config: ConfigView, task: str) -> ModelIR:
    """The family's IR of `config`; an IR error that does not name the config file yet is made to."""
    try:
        return family.to_ir(config, task)
    except IRError as exc:
        if str(exc).startswith(str(config.path)):
            raise
        raise IRError(f"{config.path}: {exc}") from None


def _check_layer_count(ir: ModelIR, checkpoint: Checkpoint, config: ConfigView) -> None:
    """Refuse a config declaring more layers than the checkpoint could hold, before enumerating them."""
    one, two = (len(replace(ir, num_layers=n).tensor_shapes()) for n in (1, 2))
    expected = one + (ir.num_layers - 1) * (two - one)
    if expected - len(checkpoint.tensors) >= two - one:  # at least a whole layer's tensors are absent
        raise WeightsError(f"{config.path}: declares {ir.num_layers} layers, which need {expected} tensors, but "
                           f"the checkpoint in {checkpoint.directory} holds {len(checkpoint.tensors)}")


def infer_task(config: ConfigView) -> str:
    """The task named by config.json's `architectures` (causal LM when absent)."""
    architectures = config.get("architectures", kind=list, default=[])
    for name in architectures:
        for suffix, task in _ARCHITECTURE_SUFFIXES.items():
            if isinstance(name, str) and name.endswith(suffix):
                return task
    return TASKS[0]
