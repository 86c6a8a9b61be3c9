"""`Runtime.forward_top`: what a step's samplers need of each row (the top outputs, the log-normalizer, whole rows
only where asked) equals the reference computed from the full host copy, on every backend; greedy and logprobs
batches then generate exactly what they did from full rows, and a greedy batch copies O(batch) values."""


import numpy as np
import pytest
import torch

import polylm
import polylm.backend
from polylm.backend import Reduce, Reduced, Runtime, Step
from polylm.generate.sampling import Sampling, log_softmax
from polylm.generate.scheduler import Scheduler
from polylm.ir import Head
from polylm.numerics.logits import finish_head, top_rows
from polylm_torch_common import reduce as torch_reduce
from test_batching import PROMPTS, loaded  # noqa: F401 - `loaded` is a fixture
from test_parity import BACKENDS


def prefill(prompts):
    longest = max(map(len, prompts))
    ids = np.zeros((len(prompts), longest), dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=bool)
    for row, prompt in enumerate(prompts):
        ids[row, longest - len(prompt):] = prompt
        mask[row, longest - len(prompt):] = True
    positions = np.maximum(np.cumsum(mask, axis=1) - 1, 0)
    return Step(ids, positions, mask, gather=np.full(len(prompts), longest - 1))


def check_equal(reduced: Reduced, reference: Reduced) -> None:
    np.testing.assert_array_equal(reduced.ids, reference.ids)
    np.testing.assert_array_equal(reduced.values, reference.values)
    np.testing.assert_allclose(reduced.norm, reference.norm, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(reduced.nan, reference.nan)
    np.testing.assert_array_equal(reduced.rows, reference.rows)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family", ["helium", "bloom"])
def test_forward_top_equals_the_reference(make_ckpt, loaded, family, backend):
    runtime = loaded(make_ckpt(family), backend).runtime
    step = prefill(PROMPTS)
    full = finish_head(runtime.ir.head, runtime.forward(step, runtime.new_cache(3, 12)))
    for reduce in (Reduce(1, np.zeros(3, bool)), Reduce(5, np.array([False, True, False]), norm=True)):
        reduced = runtime.forward_top(step, runtime.new_cache(3, 12), reduce)
        check_equal(reduced, Reduced.of(full, reduce))
        assert reduced.ids.shape == (3, reduce.top) and reduced.rows.shape == (reduce.full.sum(), full.shape[1])
    np.testing.assert_array_equal(reduced.ids[:, 0], full.argmax(-1))
    np.testing.assert_allclose(reduced.values - reduced.values[:, :1] - reduced.norm[:, None],
                               np.take_along_axis(log_softmax(full), reduced.ids, -1), rtol=0, atol=1e-6)


def test_a_step_in_several_passes_joins_its_reduced_rows(make_ckpt, loaded, monkeypatch):
    runtime = loaded(make_ckpt("helium"), "torch").runtime
    step = prefill(PROMPTS)
    full = finish_head(runtime.ir.head, runtime.forward(step, runtime.new_cache(3, 12)))
    monkeypatch.setattr(polylm.backend, "PASS_LIMIT", 3)  # rows gather from the second and third passes
    reduce = Reduce(4, np.array([True, False, True]), norm=True)
    check_equal(runtime.forward_top(step, runtime.new_cache(3, 12), reduce), Reduced.of(full, reduce))


def test_reference_top_rows_ties_nan_and_infinities():
    out = np.array([[1, 3, 3, 2], [0, np.nan, 5, 1], [np.inf, 0, np.inf, -np.inf], [-np.inf] * 4], np.float32)
    ids, _, norm, nan = top_rows(out, 2)
    assert ids.tolist() == [[1, 2], [2, 3], [0, 2], [0, 1]]
    assert ids[:, 0].tolist()[:1] == [int(np.argmax(out[0]))]
    assert nan.tolist() == [False, True, False, False]
    np.testing.assert_allclose(norm[[0, 2]], [np.log(np.exp([-2, 0, 0, -1]).sum()), np.log(2)], rtol=1e-12)


def test_torch_reduction_finishes_like_core_with_ties_to_the_lowest_id():
    head = Head("causal-lm", 6, logit_scale=0.5, softcap=3.0)
    out = torch.tensor([[1.0, 7.0, 7.0, 2.0, -1.0, 7.0], [0.5, 0.25, 4.0, 4.0, 9.0, -3.0]])
    reduce = Reduce(3, np.array([False, True]), norm=True)
    reduced = torch_reduce.reduce_outputs(out.to(torch.bfloat16).float(), head, reduce)
    check_equal(reduced, Reduced.of(finish_head(head, out.numpy()), reduce))
    assert reduced.ids.tolist() == [[1, 2, 5], [4, 2, 3]]


@pytest.mark.parametrize("library", ["torch", "mlx"])
def test_device_reductions_cut_ties_at_the_lowest_ids(library):
    """torch.topk / mx.argpartition promise no order among equal values: where the cut falls among them, the
    reductions still keep the lowest ids; and they rank finished outputs (a softcap saturates distinct ones)."""
    rng = np.random.default_rng(0)
    out = np.round(rng.standard_normal((4, 300)) * 2).astype(np.float32)  # many equal values at every cut
    out[2, 40:] = -np.inf  # more -inf than the top leaves room for
    out[3, ::7] = 1e4  # distinct raw values the softcap makes equal
    out[3, ::7] += np.arange(len(out[3, ::7]), dtype=np.float32)
    for head in (Head("causal-lm", 300), Head("causal-lm", 300, softcap=2.0)):
        for top in (1, 7, 60, 299, 300):
            reduce = Reduce(top, np.array([False, True, False, False]), norm=True)
            if library == "torch":
                reduced = torch_reduce.reduce_outputs(torch.from_numpy(out), head, reduce)
            else:
                import mlx.core as mx
                from polylm_mlx import reduce as mlx_reduce
                reduced = mlx_reduce.reduce_outputs(mx.array(out), head, reduce)
            check_equal(reduced, Reduced.of(finish_head(head, out), reduce))


def generate(runtime, samplings):
    scheduler = Scheduler(runtime, max_batch=len(samplings), eos_ids=[])
    requests = [scheduler.submit(p, s) for p, s in zip(PROMPTS, samplings)]
    choices = {r.id: [] for r in requests}
    while scheduler.busy:
        for out in scheduler.step():
            choices[out.request.id].append(out.choice)
    return [choices[r.id] for r in requests]


class FullRows(Runtime):
    """A runtime's reference `forward_top`: the full rows copied to the host, reduced there."""

    def __init__(self, runtime):
        self.inner, self.ir, self.dtype = runtime, runtime.ir, runtime.dtype

    def new_cache(self, batch, capacity):
        return self.inner.new_cache(batch, capacity)

    def forward(self, step, cache=None):
        return self.inner.forward(step, cache)


@pytest.mark.parametrize("backend", BACKENDS)
def test_generation_from_reduced_rows_equals_full_rows(make_ckpt, loaded, backend):
    runtime = loaded(make_ckpt("helium"), backend).runtime
    samplings = [Sampling(6, logprobs=3), Sampling(6), Sampling(6, temperature=0.9, top_k=5, seed=3, logprobs=2)]
    fast, reference = generate(runtime, samplings), generate(FullRows(runtime), samplings)
    for ours, theirs in zip(fast, reference):
        assert [c.token for c in ours] == [c.token for c in theirs]
        for a, b in zip(ours, theirs):
            assert (a.logprob is None) == (b.logprob is None)
            if a.logprob is not None:
                assert abs(a.logprob - b.logprob) <= 1e-6
                assert [t for t, _ in a.top] == [t for t, _ in b.top]
                np.testing.assert_allclose([p for _, p in a.top], [p for _, p in b.top], rtol=0, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_greedy_batch_copies_one_value_per_row(make_ckpt, loaded, backend, monkeypatch):
    runtime = loaded(make_ckpt("helium"), backend).runtime
    copied = []
    of_top = Reduced.of_top.__func__

    def counting(cls, head, ids, raw, norm, nan, rows):
        copied.append(ids.size + raw.size + nan.size + rows.size + (0 if norm is None else norm.size))
        return of_top(cls, head, ids, raw, norm, nan, rows)

    monkeypatch.setattr(Reduced, "of_top", classmethod(counting))
    monkeypatch.setattr(type(runtime), "forward", lambda *a, **k: pytest.fail("a full [batch, vocab] copy"))
    tokens = generate(runtime, [Sampling(4)] * 3)
    assert all(len(t) == 4 for t in tokens)
    assert copied and all(size == 3 * 3 for size in copied)  # id, value and NaN flag per row
