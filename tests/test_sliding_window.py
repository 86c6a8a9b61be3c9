"""Sliding-window attention on ring-buffer caches: Mistral and StarCoder2 against transformers on every backend
and task, with prompts and generations several windows long, padded batches, passes split by core, continuous
batching and the server, and two ranks; a windowed layer's cache holds its window whatever the context."""

from concurrent.futures import ThreadPoolExecutor

import openai
import pytest
from transformers import AutoModelForCausalLM

import polylm
import polylm.backend
from polylm import testing
from polylm.generate.sampling import Sampling
from polylm.generate.scheduler import Scheduler
from polylm.loading import model_ir
from polylm.loading.registry import registry
from polylm.parallel.ranks import free_port
from polylm.testing.parity import hf_greedy
from test_batching import alone, run
from test_heads import qa_reference, with_qa_head
from test_parity import BACKENDS, assert_parity
from test_server import NAME, running
from test_tensor_parallel import WORKER, assert_matches_one_process, run_two_ranks

SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=256)
#: Each value differs from the family's default and moves the logits; the windows are shorter than every prompt.
QUIRKS = {
    "mistral": dict(sliding_window=4, head_dim=24, rms_norm_eps=1e-2, rope_parameters={"rope_type": "default",
                                                                                        "rope_theta": 100.0}),
    "starcoder2": dict(sliding_window=5, norm_epsilon=1e-2, use_bias=False, tie_word_embeddings=False,
                       hidden_act="gelu"),
}
PASS_LIMIT = 3


@pytest.fixture
def short_passes(monkeypatch):
    """Rings of window + 2 slots and passes of 3 new tokens: every prompt wraps its rings, in several passes."""
    monkeypatch.setattr(polylm.backend, "PASS_LIMIT", PASS_LIMIT)


def checkpoint(root, family: str, task: str):
    """(directory, reference model or None for transformers' own class)."""
    try:
        return testing.tiny_checkpoint(root, family, task, **SMALL, **QUIRKS[family]), None
    except polylm.errors.TaskError:  # no transformers class: the base model and a QA head (as for Helium)
        base = testing.tiny_checkpoint(root, family, **SMALL, **QUIRKS[family])
        directory = with_qa_head(base, root / f"{base.name}-qa")
        return directory, qa_reference(directory)


CASES = [(f, t) for f in QUIRKS for t in registry().families[f][0].tasks]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,task", CASES)
def test_matches_transformers_past_the_window(ckpt_root, short_passes, family, task, backend):
    directory, hf = checkpoint(ckpt_root, family, task)
    ir = model_ir(directory, task=task)
    assert ir.family == family and {b.attention.window for b in ir.layers} == {QUIRKS[family]["sliding_window"]}
    assert_parity(directory, task, backend, hf=hf)  # prompts of 4-11 tokens, 12 greedy tokens each


@pytest.mark.parametrize("backend", ["torch", "mlx"])
def test_a_windowed_layer_holds_its_window_and_one_pass_whatever_the_context(ckpt_root, backend):
    model = polylm.load(checkpoint(ckpt_root, "mistral", "causal-lm")[0], backend=backend)
    cache = model.runtime.new_cache(2, 100_000)
    ring = 4 + polylm.backend.PASS_LIMIT - 1
    assert [keys.shape[2] for keys in cache.keys] == [ring + 1] * 2  # and the spare slot
    assert model.runtime.new_cache(2, 3).windows == (None, None)  # a window as long as the cache: a plain cache
    qwen = testing.tiny_checkpoint(ckpt_root, "qwen2", **SMALL, use_sliding_window=True, sliding_window=4,
                                   max_window_layers=1)
    mixed = polylm.load(qwen, backend=backend).runtime.new_cache(1, 1000)
    assert [keys.shape[2] for keys in mixed.keys] == [1000, ring + 1]


def test_long_generation_matches_transformers(ckpt_root, short_passes):
    """70 tokens of a window-4 model: the rings wrap many times over."""
    directory, _ = checkpoint(ckpt_root, "mistral", "causal-lm")
    reference = AutoModelForCausalLM.from_pretrained(directory).eval()
    prompt = [1, 5, 9, 44, 21, 7, 100, 3]
    for backend in ("torch", "mlx"):
        model = polylm.load(directory, backend=backend)
        assert model.generate(prompt, max_new_tokens=70) == hf_greedy(reference, prompt, 70, eos_id=[])


@pytest.mark.parametrize("backend", BACKENDS)
def test_continuous_batching_with_windows_equals_one_at_a_time(ckpt_root, short_passes, backend):
    """A request joins mid-flight (masked slots in the running row, written to no ring slot), a follow-up reuses
    its finished predecessor's prefix when its ring still holds it, and not when later tokens overwrote it."""
    model = polylm.load(checkpoint(ckpt_root, "mistral", "causal-lm")[0], backend=backend)
    prompts = [[1, 5, 9, 44, 21, 7, 100], [1, 33, 2, 8, 9, 10, 11, 12, 13], [1, 70]]
    first = alone(model, prompts[0], 6)
    scheduler = Scheduler(model.runtime, max_batch=2, capacity=80, eos_ids=(), min_prefix=3)
    a = scheduler.submit(prompts[0], Sampling(6))
    run(scheduler, steps=2)
    b = scheduler.submit(prompts[1], Sampling(6))
    run(scheduler)
    close = scheduler.submit(prompts[0] + first[:4] + [17], Sampling(5))  # 1 of the row's slots masked out
    run(scheduler)
    far = scheduler.submit(prompts[0] + [18, 19], Sampling(5))  # 10 masked out: more than the ring's 2 spare
    run(scheduler)
    assert [r.tokens for r in (a, b, close, far)] == [first, alone(model, prompts[1], 6),
                                                      alone(model, close.prompt, 5), alone(model, far.prompt, 5)]
    assert close.reused_tokens == len(prompts[0]) + 4 and far.reused_tokens == 0


def test_server_streams_windowed_requests_as_alone(ckpt_root):
    model = polylm.load(checkpoint(ckpt_root, "mistral", "causal-lm")[0], backend="torch")
    prompts = ["Once upon a time there was", "The quick brown fox", "Paris is the capital of France. Berlin"]
    expected = [model.generate(p, max_new_tokens=16) for p in prompts]
    with running(model) as (url, _):
        client = openai.OpenAI(base_url=url + "/v1", api_key="none", max_retries=0, timeout=60)

        def stream(prompt):
            chunks = client.completions.create(model=NAME, prompt=prompt, max_tokens=16, temperature=0, stream=True)
            return "".join(c.choices[0].text for c in chunks)

        with ThreadPoolExecutor(3) as pool:
            assert list(pool.map(stream, prompts)) == expected


def test_two_ranks_match_one_process(ckpt_root, tmp_path):
    directory = checkpoint(ckpt_root, "starcoder2", "causal-lm")[0]
    port = str(free_port())
    rank0, _ = run_two_ranks(WORKER, {"starcoder2": str(directory)}, tmp_path, lambda r: dict(
        RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    assert_matches_one_process(rank0["starcoder2"], polylm.load(directory, backend="torch"))
