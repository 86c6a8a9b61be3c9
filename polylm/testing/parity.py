"""Parity of polylm with transformers on one checkpoint: padded batches against each row's own unpadded run,
and greedy ids, on every installed backend that runs here."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..config import ConfigView
from ..loading import infer_task, load
from ..loading.registry import registry
from ..model import Model
from .checkpoints import TASK_CLASSES, require

SEQUENCES = [[1, 5, 9, 44, 21, 7, 100, 3, 250, 17, 64], [1, 33, 2, 8], [1, 70, 71, 72, 73, 74, 300]]
SIDES = ("left", "right")


def padded(sequences: Sequence[Sequence[int]], side: str, pad_id: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """A [batch, longest] id array and its attention mask, padded on `side` ("left" or "right")."""
    longest = max(map(len, sequences))
    ids = np.full((len(sequences), longest), pad_id, dtype=np.int64)
    mask = np.zeros_like(ids)
    for row, seq in enumerate(sequences):
        span = slice(longest - len(seq), longest) if side == "left" else slice(0, len(seq))
        ids[row, span], mask[row, span] = seq, 1
    return ids, mask


def hf_outputs(hf: Any, seq: Sequence[int], task: str) -> np.ndarray | dict[str, np.ndarray]:
    """transformers' outputs for one unpadded sequence, shaped like `Model.forward`'s for one row."""
    torch = require("torch")
    with torch.no_grad():
        out = hf(torch.tensor([list(seq)]))
    if task == "question-answering":
        return {"start_logits": out.start_logits[0].float().numpy(), "end_logits": out.end_logits[0].float().numpy()}
    return out.logits[0].float().numpy()


def max_diff_padded(model: Model, hf: Any, task: str, side: str, sequences: Sequence[Sequence[int]] = SEQUENCES
                    ) -> float:
    """Largest |polylm − transformers| over the real tokens of a batch padded on `side`, each row against
    transformers' run of that sequence alone."""
    ids, mask = padded(sequences, side)
    ours = model.forward(ids, mask)
    worst = 0.0
    for row, seq in enumerate(sequences):
        ref = hf_outputs(hf, seq, task)
        slots = np.flatnonzero(mask[row])[:len(seq)]
        if task == "question-answering":
            for key in ref:
                worst = max(worst, float(np.abs(ours[key][row, slots] - ref[key]).max()))
        elif task == "sequence-classification":
            worst = max(worst, float(np.abs(ours[row] - ref).max()))
        else:
            worst = max(worst, float(np.abs(ours[row, slots] - ref).max()))
    return worst


def hf_greedy(hf: Any, prompt: Sequence[int], new_tokens: int, eos_id: int | Sequence[int]) -> list[int]:
    """Greedy continuation by transformers (full recompute each step), stopping before an eos id."""
    torch = require("torch")
    stop = {eos_id} if isinstance(eos_id, int) else set(eos_id)
    ids, out = list(prompt), []
    with torch.no_grad():
        for _ in range(new_tokens):
            token = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            if token in stop:
                break
            ids.append(token)
            out.append(token)
    return out


@dataclass
class ParityReport:
    """What `check_parity` measured: per backend, the largest |polylm − transformers| per padding side and
    the greedy ids (causal LM); the backends it could not run, and why. `str()` is a table."""

    task: str
    dtype: str
    tolerance: float
    max_diff: dict[str, dict[str, float]] = field(default_factory=dict)
    greedy: dict[str, list[list[int]]] = field(default_factory=dict)
    reference_greedy: list[list[int]] = field(default_factory=list)
    unavailable: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        lines = [f"parity with transformers: {self.task}, {self.dtype}, tolerance {self.tolerance:g}"]
        for backend, diffs in self.max_diff.items():
            sides = "  ".join(f"{side} {diff:.2e}" for side, diff in diffs.items())
            greedy = (f"  greedy {'same' if self.greedy[backend] == self.reference_greedy else 'DIFFERENT'} "
                      f"({sum(map(len, self.reference_greedy))} ids)" if backend in self.greedy else "")
            lines.append(f"  {backend:<8} {sides}{greedy}")
        lines += [f"  {backend:<8} not run: {why}" for backend, why in self.unavailable.items()]
        return "\n".join(lines)


def check_parity(directory: str | Path, *, task: str | None = None, backends: Sequence[str] | None = None,
                 dtype: str = "float32", tolerance: float = 1e-4, new_tokens: int = 12,
                 prompts: Sequence[Sequence[int]] = (SEQUENCES[0], SEQUENCES[2]), hf: Any = None) -> ParityReport:
    """Compare `polylm.load(directory, backend=b, task=task, dtype=dtype)` with transformers on each backend `b`
    (default: every installed one) and return the measurements.

    - logits (every head output) of `SEQUENCES` padded on the left and on the right, each row against its own
      unpadded run, must stay within `tolerance`;
    - for a causal LM, `generate(prompts, max_new_tokens=new_tokens)` (one batch) must give transformers'
      greedy ids, prompt by prompt (`new_tokens=0` skips this).

    `hf` is the reference model (default: the task's transformers auto class loaded from `directory` in
    float32). A backend that does not run here, or not in `dtype`, is not checked but listed in
    `ParityReport.unavailable` with the reason, so the caller decides. Raises AssertionError naming each
    backend and check that failed, with the measured difference, after measuring every backend.
    """
    task = task or infer_task(ConfigView.from_dir(Path(directory)))
    if hf is None:
        transformers, torch = require("transformers"), require("torch")
        hf = getattr(transformers, TASK_CLASSES[task]).from_pretrained(directory, dtype=torch.float32).eval()
    report = ParityReport(task, dtype, tolerance)
    generates = task == "causal-lm" and new_tokens > 0
    if generates:
        eos = hf.config.eos_token_id
        report.reference_greedy = [hf_greedy(hf, p, new_tokens, eos if eos is not None else []) for p in prompts]
    failures = []
    for name in _runnable(backends, dtype, report.unavailable):
        model = load(directory, backend=name, task=task, dtype=dtype)
        report.max_diff[name] = {side: max_diff_padded(model, hf, task, side) for side in SIDES}
        failures += [f"{name}: {side}-padded {task} outputs differ from transformers by {diff:.3g} > {tolerance:g}"
                     for side, diff in report.max_diff[name].items() if not diff <= tolerance]
        if generates:
            report.greedy[name] = model.generate([list(p) for p in prompts], max_new_tokens=new_tokens)
            failures += [f"{name}: greedy ids of prompt {i} are {got}, transformers gives {want}"
                         for i, (got, want) in enumerate(zip(report.greedy[name], report.reference_greedy))
                         if got != want]
    if failures:
        raise AssertionError("\n".join(failures) + f"\n{report}")
    return report


def _runnable(names: Sequence[str] | None, dtype: str, unavailable: dict[str, str]) -> list[str]:
    """The backends among `names` (default: all installed) that run here in `dtype`; the rest go to
    `unavailable` with the reason."""
    plugins = registry()
    runnable = []
    for name in names if names is not None else [b.name for b in plugins.ranked_backends()]:
        if name not in plugins.backends:
            unavailable[name] = f"not installed (installed: {', '.join(sorted(plugins.backends)) or 'none'})"
            continue
        backend = plugins.backends[name][0]
        state = backend.availability()
        if not state.available:
            unavailable[name] = state.reason
        elif dtype not in backend.dtypes:
            unavailable[name] = f"cannot compute in {dtype} here (it does {', '.join(backend.dtypes)})"
        else:
            runnable.append(name)
    return runnable
