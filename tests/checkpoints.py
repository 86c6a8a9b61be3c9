"""Tiny random checkpoints of every built-in family, built with transformers (the test oracle) and cached."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

FAMILIES = ("helium", "arcee", "bloom", "gemma", "nemotron")
TASK_CLASSES = {
    "causal-lm": "AutoModelForCausalLM",
    "sequence-classification": "AutoModelForSequenceClassification",
    "token-classification": "AutoModelForTokenClassification",
    "question-answering": "AutoModelForQuestionAnswering",
}
VOCAB = 320

BASE_CONFIGS = {
    "helium": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6),
    "arcee": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=256),
    "nemotron": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
}
TOKEN_IDS = dict(bos_token_id=1, eos_token_id=2, pad_token_id=0)


def hf_model(family: str, task: str = "causal-lm", seed: int = 0, **overrides):
    """A transformers model with random weights large enough to make logits differ meaningfully."""
    import transformers

    config = transformers.AutoConfig.for_model(family, vocab_size=VOCAB, **TOKEN_IDS,
                                               **{**BASE_CONFIGS[family], **overrides})
    if task != "causal-lm":
        config.num_labels = 3 if task != "question-answering" else 2
        config.id2label = {0: "neg", 1: "neu", 2: "pos"} if task != "question-answering" else config.id2label
        config.label2id = {v: k for k, v in config.id2label.items()}
    torch.manual_seed(seed)
    model = getattr(transformers, TASK_CLASSES[task]).from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.ndim == 1:
                param.add_(torch.randn_like(param) * 0.2)
            else:
                param.normal_(0.0, 0.08)
    return model.eval()


def build(root: Path, family: str, task: str = "causal-lm", *, dtype: str = "float32", shard_size: str | None = None,
          seed: int = 0, edit_config=None, rename=None, **overrides) -> Path:
    """Save a tiny checkpoint (with tokenizer) under `root`, once per distinct set of arguments."""
    key = json.dumps([family, task, dtype, shard_size, seed, overrides, getattr(edit_config, "__name__", None),
                      getattr(rename, "__name__", None)], sort_keys=True, default=str)
    directory = root / f"{family}-{task}-{hashlib.sha1(key.encode()).hexdigest()[:10]}"
    if directory.exists():
        return directory
    model = hf_model(family, task, seed, **overrides)
    model = model.to(getattr(torch, dtype))
    kwargs = {"max_shard_size": shard_size} if shard_size else {}
    model.save_pretrained(directory, **kwargs)
    save_tokenizer(directory)
    if rename is not None:
        _rename_tensors(directory, rename)
    if edit_config is not None:
        path = directory / "config.json"
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config, indent=2))
    return directory


def _rename_tensors(directory: Path, rename) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})


_TOKENIZER_CACHE: dict[str, str] = {}

CORPUS = [
    "Once upon a time there was a little model that could.",
    "The quick brown fox jumps over the lazy dog.",
    "Paris is the capital of France. Berlin is the capital of Germany.",
    "Café, naïve, résumé — déjà vu! 日本語のテキスト。 Emoji: 🙂🚀",
    "def add(a, b):\n    return a + b\n",
] * 20


def tokenizer_json() -> str:
    """A small byte-level BPE tokenizer (vocabulary < VOCAB) with <pad>, <s>, </s> as ids 0, 1, 2."""
    if "json" not in _TOKENIZER_CACHE:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

        tok = Tokenizer(models.BPE())
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=VOCAB - 20, special_tokens=["<pad>", "<s>", "</s>"],
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        tok.train_from_iterator(CORPUS, trainer)
        tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A </s> $B",
                                                           special_tokens=[("<s>", 1), ("</s>", 2)])
        _TOKENIZER_CACHE["json"] = tok.to_str()
    return _TOKENIZER_CACHE["json"]


def save_tokenizer(directory: Path) -> None:
    (directory / "tokenizer.json").write_text(tokenizer_json())
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<s>", "eos_token": "</s>", "pad_token": "<pad>", "tokenizer_class": "PreTrainedTokenizerFast"}))
