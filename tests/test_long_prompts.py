"""Long steps run as passes of at most `PASS_LIMIT` new tokens on every cache (`Cache.run`), and a gathering step
computes only its real and gathered new slots (`Step.computed`): both give what one whole pass gives, on every
backend, and the head never sees more than one row per batch entry of a pass."""

import numpy as np
import pytest

import polylm
import polylm.backend
from polylm.backend import Step
from test_parity import BACKENDS

PROMPTS = [list(range(3, 43)), list(range(50, 59))]  # 40 and 9 tokens: several passes of 8, one row padded
TOLERANCE = 1e-5


def left_padded(prompts: list[list[int]]) -> Step:
    longest = max(map(len, prompts))
    ids = np.zeros((len(prompts), longest), dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):], mask[row, longest - len(prompt):] = prompt, True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return Step(ids, positions, mask)


def forward(model, step: Step, gather: bool) -> np.ndarray:
    if gather:
        step = Step(step.input_ids, step.positions, step.mask, np.full(len(step.input_ids), step.mask.shape[1] - 1))
    return model.runtime.forward(step, model.runtime.new_cache(*step.mask.shape))


@pytest.mark.parametrize("gather", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_a_long_prompt_in_passes_equals_one_pass(make_ckpt, backend, gather, monkeypatch):
    model = polylm.load(make_ckpt("helium"), backend=backend)
    step = left_padded(PROMPTS)
    whole = forward(model, step, gather)
    monkeypatch.setattr(polylm.backend, "PASS_LIMIT", 8)
    passes = forward(model, step, gather)
    assert whole.shape == passes.shape == ((2,) if gather else (2, 40)) + (model.ir.embedding.vocab_size,)
    real = slice(None) if gather else step.mask  # a padded slot's output is no token's
    assert np.abs(whole[real] - passes[real]).max() <= TOLERANCE * np.abs(whole[real]).max()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_gathering_step_computes_its_real_slots_only_and_equals_the_whole_step(make_ckpt, backend, monkeypatch):
    model = polylm.load(make_ckpt("helium"), backend=backend)
    runtime, ops = model.runtime, model.runtime.ops
    rows = {"qkv": [], "head": []}
    linear = ops.linear

    def counting(x, weight, bias=None):
        for name, matrix in (("qkv", runtime.params.layers[0].qkv), ("head", runtime.params.head)):
            if weight is matrix:
                rows[name].append(x.numel() // x.shape[-1])
        return linear(x, weight, bias)

    monkeypatch.setattr(ops, "linear", counting)
    step = left_padded(PROMPTS)
    compact = forward(model, step, gather=True)
    assert rows == {"qkv": [49], "head": [2]}  # 40 + 9 real tokens of the 80 slots; one row per batch entry
    monkeypatch.setattr(polylm.backend, "PASS_LIMIT", 8)
    rows["qkv"].clear(), rows["head"].clear()
    forward(model, step, gather=True)
    assert max(rows["qkv"]) <= 2 * 8 and rows["head"] == [2] * 5  # bounded by the pass, whatever the prompt
    monkeypatch.setattr(Step, "computed", lambda self, past: None)  # every slot computed, as before
    monkeypatch.setattr(polylm.backend, "PASS_LIMIT", 512)
    whole = forward(model, step, gather=True)
    assert np.abs(whole - compact).max() <= TOLERANCE * np.abs(whole).max()


def test_computed_lists_real_and_gathered_slots():
    mask = np.array([[False, False, True], [True, True, True], [False, False, False]])
    step = Step(np.zeros((3, 3), dtype=np.int64), np.zeros((3, 3), dtype=np.int64), mask, np.array([2, 2, 2]))
    assert step.computed(0).tolist() == [2, 3, 4, 5, 8]  # row 2 holds no token: only its gathered slot
    assert Step(step.input_ids, step.positions, mask).computed(0) is None  # no gather: every slot's output
    full = np.ones((3, 4), dtype=bool)
    assert Step(step.input_ids, np.zeros((3, 4), np.int64), full, np.array([2, 2, 2])).computed(1) is None
