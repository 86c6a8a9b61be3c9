"""The reference benchmark checkpoints, built once with transformers (random weights) and cached on disk.

gemma-bench: vocab 32000, hidden 1024, intermediate 4096, 12 layers, 16 heads, 1 KV head, head_dim 64
(210M parameters, 421 MB in bf16). bloom-bench: a BLOOM of similar size (hidden 1024, 16 heads, 14 layers).
mixtral-bench: a Mixtral (hidden 768, 12 layers, 12 heads, 4 KV heads, 8 experts of intermediate 1408, top 2):
380M parameters, of which 146M are active per token (the head and embedding counted).
"""

from __future__ import annotations

import os
from pathlib import Path

CACHE = Path(os.environ.get("POLYLM_BENCH_DIR", Path.home() / ".cache" / "polylm" / "bench"))

CONFIGS = {
    "gemma-bench": ("gemma", dict(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=12,
                                  num_attention_heads=16, num_key_value_heads=1, head_dim=64,
                                  max_position_embeddings=4096)),
    "bloom-bench": ("bloom", dict(vocab_size=32000, hidden_size=1024, n_layer=14, n_head=16)),
    "mixtral-bench": ("mixtral", dict(vocab_size=32000, hidden_size=768, intermediate_size=1408, num_hidden_layers=12,
                                      num_attention_heads=12, num_key_value_heads=4, num_local_experts=8,
                                      num_experts_per_tok=2, max_position_embeddings=4096, sliding_window=None)),
}


def random_model(family: str, options: dict, dtype: str, device: str = "cpu"):
    """A transformers causal LM of `family` with seeded random weights (matrices N(0, 0.02)) on `device`."""
    import torch
    import transformers

    config = transformers.AutoConfig.for_model(family, bos_token_id=1, eos_token_id=2, pad_token_id=0, **options)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    with torch.no_grad():
        for param in model.parameters():
            if param.ndim > 1:
                param.normal_(0.0, 0.02)
    return model


def build(name: str, dtype: str = "bfloat16") -> Path:
    """The checkpoint directory for `name`, built on first use (with a byte-level tokenizer)."""
    directory = CACHE / f"{name}-{dtype}"
    if (directory / "config.json").exists():
        return directory
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    family, options = CONFIGS[name]
    model = random_model(family, options, dtype)
    model.save_pretrained(directory)
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.add_special_tokens(["<pad>", "<s>", "</s>"])
    tokenizer.add_tokens(list(pre_tokenizers.ByteLevel.alphabet()))
    tokenizer.save(str(directory / "tokenizer.json"))
    return directory
