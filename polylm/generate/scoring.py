"""A prompt's own token log-probabilities (what OpenAI's `echo` with `logprobs` reports): the prompt runs through
the model in passes of bounded size, and each position's next-token distribution is `log_softmax` of its logits,
as for generated tokens."""

from __future__ import annotations

from typing import Sequence

import numpy as np

from ..backend import Runtime, Step
from ..numerics.logits import finish_head
from .sampling import TokenChoice, check_logits, log_softmax, scored_choice

#: The most logits (tokens × vocabulary, float32) one pass holds: a longer prompt runs as several passes.
MAX_PASS_LOGITS = 1 << 24
#: Rows of logits turned into float64 log-probabilities at once.
_BLOCK = 64


def prompt_logprobs(runtime: Runtime, prompt: Sequence[int], top: int,
                    max_pass_logits: int = MAX_PASS_LOGITS) -> list[TokenChoice]:
    """Each token of `prompt` with its log-probability given the tokens before it and the `top` most likely
    tokens there; the first token, which follows nothing, has none (logprob None). The last token's logits are
    not computed. `GenerationError` when logits hold NaN or rule out every token."""
    ids = np.asarray(prompt, dtype=np.int64)[None]
    fed = ids.shape[1] - 1  # the last token predicts nothing in the prompt
    choices = [TokenChoice(int(ids[0, 0]))]
    if fed == 0:
        return choices
    size = max(1, max_pass_logits // runtime.ir.embedding.vocab_size)
    cache = runtime.new_cache(1, fed)
    positions, mask = np.arange(fed, dtype=np.int64)[None], np.ones((1, fed), dtype=bool)
    for start in range(0, fed, size):
        stop = min(start + size, fed)
        step = Step(ids[:, start:stop], positions[:, :stop], mask[:, :stop])
        logits = finish_head(runtime.ir.head, runtime.forward(step, cache))[0]
        best = logits.max(axis=-1)
        check_logits(float(np.nan if np.isnan(best).any() else best.min()))
        for block in range(0, stop - start, _BLOCK):
            logprobs = log_softmax(logits[block:block + _BLOCK])
            for row, scores in enumerate(logprobs, start + block + 1):
                choices.append(scored_choice(scores, int(ids[0, row]), top))
    return choices
