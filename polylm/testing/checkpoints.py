"""Tiny random checkpoints built with transformers (the reference), cached on disk by their arguments."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Any

from ..errors import TaskError

#: transformers' auto class of each task's model.
TASK_CLASSES: dict[str, str] = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}
#: The default vocabulary size; the tiny tokenizer's ids stay below `VOCAB - 20`.
VOCAB = 320
TOKEN_IDS = {"bos_token_id": 1, "eos_token_id": 2, "pad_token_id": 0}
CLASS_LABELS = {0: "neg", 1: "neu", 2: "pos"}


def require(module: str) -> Any:
    """Import a test dependency (transformers, torch), or an ImportError saying how to install it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise ImportError(f"polylm.testing needs {module} ({exc}); it is a test dependency: "
                          f"pip install 'polylm[test]'", name=module) from None


def tiny_model(model_type: str, task: str = "causal-lm", *, seed: int = 0, **config: Any) -> Any:
    """A transformers model of `model_type` for `task`, float32, with random weights large enough that logits
    differ meaningfully. `config` is passed to `AutoConfig.for_model` (over a vocabulary of `VOCAB` and the
    token ids <pad>=0, <s>=1, </s>=2); classifiers get 3 labels (neg, neu, pos)."""
    transformers, torch = require("transformers"), require("torch")
    if task not in TASK_CLASSES:
        raise TaskError(f"unknown task {task!r}; choose one of {', '.join(TASK_CLASSES)}")
    hf_config = transformers.AutoConfig.for_model(model_type, **{"vocab_size": VOCAB, **TOKEN_IDS, **config})
    if task != "causal-lm":
        hf_config.num_labels = 3 if task != "question-answering" else 2
        if task != "question-answering":
            hf_config.id2label = dict(CLASS_LABELS)
        hf_config.label2id = {v: k for k, v in hf_config.id2label.items()}
    torch.manual_seed(seed)
    try:
        model = getattr(transformers, TASK_CLASSES[task]).from_config(hf_config, dtype=torch.float32)
    except ValueError as exc:  # transformers has no such class for this model type
        raise TaskError(f"transformers has no {TASK_CLASSES[task]} for model_type {model_type!r}: {exc}") from None
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.2)
            else:
                param.normal_(0.0, 0.08)
    return model.eval()


def tiny_checkpoint(root: str | Path, model_type: str, task: str = "causal-lm", *, dtype: str = "float32",
                    seed: int = 0, shard_size: str | None = None, **config: Any) -> Path:
    """The directory of `tiny_model(model_type, task, seed=seed, **config)` saved under `root` in `dtype`
    (config.json, model.safetensors — sharded at `shard_size`, e.g. "60KB" — and a tiny tokenizer).

    Built once per distinct set of arguments: a later call with the same ones returns the same directory.
    """
    key = json.dumps([model_type, task, dtype, shard_size, seed, config], sort_keys=True, default=str)
    directory = Path(root) / f"{model_type}-{task}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if directory.exists():
        return directory
    torch = require("torch")
    model = tiny_model(model_type, task, seed=seed, **config).to(getattr(torch, dtype))
    partial = directory.with_name(f"{directory.name}.partial-{os.getpid()}")
    model.save_pretrained(partial, **({"max_shard_size": shard_size} if shard_size else {}))
    save_tokenizer(partial)
    try:
        partial.rename(directory)
    except OSError:  # another process finished the same checkpoint first
        shutil.rmtree(partial)
    return directory


_CORPUS = [
    "Once upon a time there was a little model that could.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Café, naïve, résumé — déjà vu! 日本語のテキスト。 Emoji: 🙂🚀",
    "def add(a, b):\n    return a + b\n",
] * 20
_TOKENIZER: dict[str, str] = {}


def tokenizer_json() -> str:
    """A small byte-level BPE tokenizer (ids < `VOCAB - 20`) with <pad>, <s>, </s> as ids 0, 1, 2."""
    if "json" not in _TOKENIZER:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=["<pad>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(_CORPUS, trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B",
                                                           special_tokens=[("<s>", 1), ("</s>", 2)])
        _TOKENIZER["json"] = tok.to_str()
    return _TOKENIZER["json"]


def save_tokenizer(directory: str | Path) -> None:
    """Write the tiny tokenizer (tokenizer.json, tokenizer_config.json) into a checkpoint directory."""
    directory = Path(directory)
    (directory / "tokenizer.json").write_text(tokenizer_json())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}))
