"""`polylm.load`: model directory → family → IR → weights → backend runtime → `Model`."""

from __future__ import annotations

import warnings
from dataclasses import replace
from pathlib import Path

from ..backend import DTYPES
from ..checkpoint.hub import resolve_model
from ..checkpoint.quantized import read_quantization, unpack_quantized
from ..checkpoint.weights import Checkpoint, Weights, resolve
from ..config import ConfigView
from ..errors import BackendError, TaskError, WeightsError
from ..family import Family, FamilyNote
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
         quantize: str | None = None, tensor_parallel: int | None = None, revision: str | None = None) -> Model:
    """Load a Hugging Face–format checkpoint: a directory, or a Hub repo id (`org/name`, `org/name@revision`, or
    `revision=` a branch, tag or commit), taken from the local Hugging Face cache or downloaded into it (only config,
    tokenizer, chat template and safetensors files; never with `HF_HUB_OFFLINE=1`).

    The family is the first installed one claiming the config's `model_type` that does not decline it; its
    notes (and which families declined) are warned as `polylm.family.FamilyNote` and kept on `Model.notes`.

    `task` defaults to what the checkpoint's `architectures` entry says (causal LM when it says nothing);
    `dtype=None` keeps the checkpoint's dtype. `quantize` ("int8" or "int4") stores the block and head
    matrices as weight-only integers with per-group scales, and the embedding table (a tied head) as int8 with a
    scale per row (`polylm.ir.QUANTIZATIONS`). Nothing in the directory is written.

    `tensor_parallel=N` loads this rank's 1/N of the model in a group of N ranks of the backend's engine
    (torch.distributed: already initialized, or described by torchrun's environment); every rank calls `load`,
    rank 0 uses the model and the others call `polylm.parallel.follow(model)` (see `polylm.parallel`).
    """
    directory = resolve_model(path, revision)
    config = ConfigView.from_dir(directory)
    plugins = registry()
    task = task or infer_task(config)
    if task not in TASKS:
        raise TaskError(f"unknown task {task!r}; choose one of {', '.join(TASKS)}")
    family, mapped = plugins.select(config, task)
    for note in mapped.notes:
        warnings.warn(note, FamilyNote, stacklevel=2)
    if dtype is not None and dtype not in DTYPES:
        raise BackendError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    if quantize is not None and quantize not in QUANTIZATIONS:
        raise BackendError(f"unknown quantization {quantize!r}; choose one of {', '.join(QUANTIZATIONS)}")
    check_supported(quantize, tensor_parallel)
    check_prequantized(config, quantize, tensor_parallel)
    chosen = plugins.backend(backend)
    ir = mapped.ir
    if quantize is not None:
        ir = replace(ir, quantization=QUANTIZATIONS[quantize])
    plan = None
    if tensor_parallel is not None:  # checked before any tensor is read, and before joining the group
        from ..parallel.plan import Shard, plan_shards, timeout_s

        plan_shards(ir, Shard(0, tensor_parallel))
        plan = plan_shards(ir, chosen.join_group(tensor_parallel, timeout_s()))
    weights = checkpoint_weights(directory, config, family, ir, task)
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
    return Model(ir, runtime, tokenizer, backend=chosen.name, path=directory, notes=mapped.notes)


def check_supported(quantize: str | None, tensor_parallel: int | None) -> None:
    """Refuse the combinations no backend runs, before anything is loaded or a group is joined."""
    if quantize is not None and tensor_parallel is not None:
        # a row-parallel slice of a quantized matrix would need scales of its own
        raise BackendError(f"weight-only quantization (quantize={quantize!r}, --quantize) does not run "
                           f"tensor-parallel (tensor_parallel={tensor_parallel}, --tp) yet; drop one of them")


def check_prequantized(config: ConfigView, quantize: str | None, tensor_parallel: int | None) -> None:
    """Refuse quantizing a checkpoint stored quantized (MLX format) once more, or sharding it (not yet), before
    anything is loaded or a group is joined."""
    quantization = read_quantization(config)
    if quantization is None:
        return
    stored = f"{config.path.parent} is stored quantized ({quantization.describe()})"
    if quantize is not None:
        raise BackendError(f"{stored}; quantize={quantize!r} (--quantize) would quantize it twice: drop it")
    if tensor_parallel is not None:
        raise BackendError(f"{stored}; quantized checkpoints do not run tensor-parallel (tensor_parallel="
                           f"{tensor_parallel}, --tp) yet")


def checkpoint_weights(directory: Path, config: ConfigView, family: Family, ir: ModelIR, task: str, *,
                       check_values: bool = True) -> Weights:
    """The checkpoint tensors `ir` reads, matched from the safetensors headers and checked (presence, shapes,
    dtypes, leftovers; with `check_values`, the 1-D tensors' values, the only data read before lowering)."""
    checkpoint = Checkpoint(directory)
    unpack_quantized(checkpoint, read_quantization(config))
    _check_layer_count(ir, checkpoint, config)
    others = {t: m for t, m in family.head_names.items() if t != task and m != family.head_names[task]}
    return resolve(checkpoint, ir.tensor_shapes(), family.module_names, family.head_names[task],
                   family.base_prefixes, family.ignored_tensors, others, check_values=check_values)


def model_ir(path: str | Path, *, task: str | None = None, revision: str | None = None) -> ModelIR:
    """The IR of a checkpoint, from its config alone (no tensor is read)."""
    directory = resolve_model(path, revision)
    config = ConfigView.from_dir(directory)
    return registry().select(config, task or infer_task(config))[1].ir


def _check_layer_count(ir: ModelIR, checkpoint: Checkpoint, config: ConfigView) -> None:
    """Refuse a config declaring more layers than the checkpoint could hold, before enumerating them."""
    per_kind = []
    for block in ir.blocks:
        one, two = (len(replace(ir, block=block, num_layers=n, variants=(), layer_kinds=()).tensor_shapes())
                    for n in (1, 2))
        per_kind.append(two - one)
    outside = one - per_kind[-1]
    expected = outside + (sum(per_kind[k] for k in ir.layer_kinds) if ir.layer_kinds else
                          ir.num_layers * per_kind[0])
    if expected - len(checkpoint.tensors) >= min(per_kind):  # at least a whole layer's tensors are absent
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
