"""Train the demo model that ships in `polylm/demo_model/` (what `polylm run` uses without `--model`).

The model is a small Helium (`HeliumForCausalLM` from transformers, one of polylm's built-in families) with its
own byte-level BPE tokenizer, trained from scratch with a plain torch loop on the CPU in a few minutes.

Training text: the English prose of the Python documentation's topic pages as they ship with CPython in
`pydoc_data.topics` (the text `help("assert")` shows), copyright the Python Software Foundation, used under the
PSF License Agreement (https://docs.python.org/3/license.html). Only prose paragraphs are kept: indented code
examples, grammar rules, tables, headings and paragraphs dense with quoted code are dropped, and `*emphasis*`
markers removed. Nothing is downloaded.

Reproducible: a fixed seed, fixed step count and two torch threads; run from the repository root with

    python scripts/train_demo_model.py            # writes polylm/demo_model/
    python scripts/train_demo_model.py --steps 50 --out /tmp/demo   # a quick smoke run

transformers is needed here only (it is a test dependency of polylm); polylm itself reads the result like any
other Hugging Face checkpoint.
"""

from __future__ import annotations

import argparse
import json
import math
import random
import re
import time
from pathlib import Path

import torch

SEED = 1234
VOCAB_SIZE = 2048
SPECIAL_TOKENS = ("<pad>", "<s>", "</s>")  # ids 0, 1, 2
PAD_ID, BOS_ID, EOS_ID = range(3)
MODEL_SHAPE = dict(hidden_size=192, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=4, head_dim=48)
MAX_POSITIONS = 512
SEQUENCE_LENGTH = 64
BATCH_SIZE = 16
PEAK_LEARNING_RATE = 3e-3
WARMUP_STEPS = 30
DEFAULT_STEPS = 500
DEFAULT_OUT = Path(__file__).resolve().parent.parent / "polylm" / "demo_model"

_HEADING_UNDERLINE = re.compile(r"[*=\-~^\"#+]{3,}")
_EMPHASIS = re.compile(r"(?<![\w*])(\*\*?)([A-Za-z_][^*\"]*?)\1(?![\w*])")  # *term*, **note** → term, note
_MAX_QUOTED_PER_WORD = 0.05  # the topics quote code as "x"; paragraphs dense with it read as noise


def training_documents() -> list[str]:
    """One document per documentation topic, each its prose paragraphs separated by blank lines."""
    from pydoc_data.topics import topics

    documents = []
    for name in sorted(topics):
        paragraphs = []
        for paragraph in re.split(r"\n\s*\n", topics[name]):
            lines = [line for line in paragraph.split("\n") if line.strip()]
            if not lines or any(line[0].isspace() for line in lines):  # code examples and grammar are indented
                continue
            if _HEADING_UNDERLINE.fullmatch(lines[-1].strip()) or any("|" in line for line in lines):
                continue  # headings and tables
            text = _EMPHASIS.sub(r"\2", " ".join(line.strip() for line in lines))
            words = text.split()
            if len(words) < 6 or sum(w.isalpha() for w in words) < 0.5 * len(words):
                continue  # fragments ("See also:") and symbol-heavy lines
            if text.count('"') / 2 > _MAX_QUOTED_PER_WORD * len(words):
                continue
            paragraphs.append(text)
        if paragraphs:
            documents.append("\n\n".join(paragraphs))
    return documents


def train_tokenizer(documents: list[str]):
    """Byte-level BPE with <pad>, <s>, </s>; encoding adds <s> in front, as Llama-style tokenizers do."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=list(SPECIAL_TOKENS), min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tokenizer.train_from_iterator(documents, trainer)
    assert [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS] == [PAD_ID, BOS_ID, EOS_ID]
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                             special_tokens=[("<s>", BOS_ID)])
    return tokenizer


def token_stream(tokenizer, documents: list[str]) -> torch.Tensor:
    """All documents as one stream: <s> text </s> <s> text </s> …"""
    ids: list[int] = []
    for encoding in tokenizer.encode_batch(documents):
        ids.extend(encoding.ids + [EOS_ID])
    return torch.tensor(ids, dtype=torch.long)


def build_model():
    from transformers import HeliumConfig, HeliumForCausalLM

    config = HeliumConfig(vocab_size=VOCAB_SIZE, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=True,
                          rope_parameters={"rope_type": "default", "rope_theta": 10000.0}, rms_norm_eps=1e-6,
                          pad_token_id=PAD_ID, bos_token_id=BOS_ID, eos_token_id=EOS_ID, **MODEL_SHAPE)
    config.architectures = ["HeliumForCausalLM"]
    return HeliumForCausalLM(config)


def learning_rate(step: int, steps: int) -> float:
    """Linear warm-up, then cosine decay to a tenth of the peak."""
    if step < WARMUP_STEPS:
        return PEAK_LEARNING_RATE * (step + 1) / WARMUP_STEPS
    progress = (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)
    return PEAK_LEARNING_RATE * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress)))


def train(model, stream: torch.Tensor, steps: int) -> float:
    """Random windows of the token stream, AdamW; returns the mean loss of the last 20 steps."""
    generator = torch.Generator().manual_seed(SEED)
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    optimizer = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                                  lr=PEAK_LEARNING_RATE, betas=(0.9, 0.95))
    model.train()
    recent: list[float] = []
    start = time.perf_counter()
    for step in range(steps):
        starts = torch.randint(0, len(stream) - SEQUENCE_LENGTH, (BATCH_SIZE,), generator=generator)
        batch = torch.stack([stream[s:s + SEQUENCE_LENGTH] for s in starts.tolist()])
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(step, steps)
        loss = model(input_ids=batch, labels=batch).loss  # transformers shifts the labels
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        recent = (recent + [loss.item()])[-20:]
        if step % 50 == 0 or step == steps - 1:
            print(f"step {step:4d}  loss {loss.item():.3f}  lr {learning_rate(step, steps):.2e}  "
                  f"{time.perf_counter() - start:6.1f}s", flush=True)
    model.eval()
    return sum(recent) / len(recent)


def save(model, tokenizer, out: Path) -> None:
    from transformers import GenerationConfig

    out.mkdir(parents=True, exist_ok=True)  # README.md there is kept; the checkpoint files are overwritten
    for stale in out.glob("model*.safetensors*"):
        stale.unlink()
    model.generation_config = GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID)
    model.to(torch.bfloat16).save_pretrained(out, safe_serialization=True)
    tokenizer.save(str(out / "tokenizer.json"))
    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<s>", "eos_token": "</s>",
                "pad_token": "<pad>", "model_max_length": MAX_POSITIONS, "clean_up_tokenization_spaces": False}
    (out / "tokenizer_config.json").write_text(json.dumps(settings, indent=2) + "\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--out", type=Path, default=DEFAULT_OUT)
    args = parser.parse_args()

    random.seed(SEED)
    torch.manual_seed(SEED)
    torch.set_num_threads(2)
    started = time.perf_counter()
    documents = training_documents()
    tokenizer = train_tokenizer(documents)
    stream = token_stream(tokenizer, documents)
    model = build_model()
    parameters = sum(p.numel() for p in model.parameters())
    print(f"{len(documents)} documents, {sum(map(len, documents))} characters, {len(stream)} tokens; "
          f"{parameters / 1e6:.2f}M parameters")
    final_loss = train(model, stream, args.steps)
    save(model, tokenizer, args.out)
    size = sum(f.stat().st_size for f in args.out.iterdir())
    print(f"final loss {final_loss:.3f}; {time.perf_counter() - started:.0f}s; {size / 1e6:.2f} MB in {args.out}")


if __name__ == "__main__":
    main()
