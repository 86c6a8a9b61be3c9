"""Helpers comparing polylm with transformers on the same tiny checkpoint."""

from __future__ import annotations

import numpy as np
import torch

SEQUENCES = [[1, 5, 9, 44, 21, 7, 100, 3, 250, 17, 64], [1, 33, 2, 8], [1, 70, 71, 72, 73, 74, 300]]


def padded(sequences, side: str, pad_id: int = 0):
    """A [batch, longest] id array and its mask, padded on `side`."""
    longest = max(map(len, sequences))
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(sequences):
        span = slice(longest - len(seq), longest) if side == "left" else slice(0, len(seq))
        ids[row, span], mask[row, span] = seq, 1
    return ids, mask


def real_slots(mask_row, length):
    return np.flatnonzero(mask_row)[:length]


@torch.no_grad()
def hf_outputs(hf, seq, task):
    """transformers' outputs for one unpadded sequence, shaped like polylm's."""
    out = hf(torch.tensor([seq]))
    if task == "question-answering":
        return {"start_logits": out.start_logits[0].numpy(), "end_logits": out.end_logits[0].numpy()}
    return out.logits[0].numpy()


def max_diff_padded(model, hf, task, side, sequences=SEQUENCES) -> float:
    """Largest |polylm − transformers| over real tokens of a padded batch, each row against its own run."""
    ids, mask = padded(sequences, side)
    ours = model.forward(ids, mask)
    worst = 0.0
    for row, seq in enumerate(sequences):
        ref = hf_outputs(hf, seq, task)
        slots = real_slots(mask[row], len(seq))
        if task == "question-answering":
            for key in ref:
                worst = max(worst, float(np.abs(ours[key][row, slots] - ref[key]).max()))
        elif task == "sequence-classification":
            worst = max(worst, float(np.abs(ours[row] - ref).max()))
        else:
            worst = max(worst, float(np.abs(ours[row, slots] - ref).max()))
    return worst


@torch.no_grad()
def hf_greedy(hf, prompt, new_tokens: int, eos_id: int):
    """Greedy continuation by transformers (full recompute each step, stopping at eos)."""
    ids = list(prompt)
    out = []
    for _ in range(new_tokens):
        token = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
        if token == eos_id:
            break
        ids.append(token)
        out.append(token)
    return out
