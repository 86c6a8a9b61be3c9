"""Tensor parallelism over two ranks on this machine (gloo, loopback): every family and a task head of each kind
against the single-process run, memory per rank, launch from the command line, and failures that must end the
job with a clear error instead of hanging.

One two-rank job loads every checkpoint in turn (a test per process would spend its time importing torch)."""

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

import checkpoints
import polylm
from polylm.errors import ParallelError
from polylm.ir import ModelIR
from polylm.parallel.plan import Shard, TensorSlice, plan_shards
from polylm.parallel.ranks import free_port
from test_heads import qa_checkpoint

CASES = [(family, "causal-lm") for family in checkpoints.FAMILIES] + [
    ("bloom", "sequence-classification"), ("helium", "token-classification"), ("gemma", "question-answering")]
IDS = np.array([[1, 5, 9, 44, 21, 7, 300], [0, 0, 1, 33, 2, 8, 19]])
MASK = np.array([[1, 1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1, 1]])
PROMPT, NEW_TOKENS = [1, 17, 250, 3, 99], 10
JOB_TIMEOUT_S = 120

# Run by both ranks: load each checkpoint sharded; rank 0 records what the tests compare, rank 1 only follows.
WORKER = """
import json, sys
import numpy as np
import torch.distributed as dist
import polylm
from polylm.parallel import follow, release

cases, out = json.loads(sys.argv[1]), sys.argv[2]
ids, mask, prompt, new = json.loads(sys.argv[3])
ids, mask = np.array(ids), np.array(mask)
dist.init_process_group("gloo")
rank = dist.get_rank()
results = {}
for name, path in cases.items():
    model = polylm.load(path, backend="torch", tensor_parallel=2)
    if rank != 0:
        follow(model)
        results[name] = {"held_bytes": model.runtime.local.held_bytes()}
        continue
    logits = model.forward(ids, mask)
    results[name] = {"held_bytes": model.runtime.local.held_bytes(),
                     "logits": {k: v.tolist() for k, v in logits.items()} if isinstance(logits, dict)
                     else logits.tolist()}
    if model.task == "causal-lm":
        results[name]["greedy"] = model.generate(prompt, max_new_tokens=new)
        results[name]["batch"] = model.generate([prompt, prompt[:2]], max_new_tokens=new)
    release(model)
json.dump(results, open(f"{out}/rank{rank}.json", "w"))
dist.destroy_process_group()  # the group this script made, it leaves
"""


def _case_dir(make_ckpt, ckpt_root, family, task):
    return qa_checkpoint(ckpt_root, family) if task == "question-answering" else make_ckpt(family, task)


def _env(**extra) -> dict:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "POLYLM_QUIET": "1", "POLYLM_TP_TIMEOUT": "30", **extra}
    env.pop("TRITON_INTERPRET", None)
    return env


def run_two_ranks(worker: str, cases: dict, out, rank_env) -> list[dict]:
    """Run `worker` as ranks 0 and 1 (environment `rank_env(rank)`) over `cases`; each rank's JSON results."""
    script = out / "worker.py"
    script.write_text(worker)
    args = [json.dumps(cases), str(out), json.dumps([IDS.tolist(), MASK.tolist(), PROMPT, NEW_TOKENS])]
    ranks = [subprocess.Popen([sys.executable, str(script), *args], stderr=subprocess.PIPE, text=True,
                              env=_env(**rank_env(r))) for r in range(2)]
    errors = []
    for rank, process in enumerate(ranks):
        try:
            _, err = process.communicate(timeout=JOB_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            for p in ranks:
                p.kill()
            pytest.fail(f"two-rank job did not finish in {JOB_TIMEOUT_S} s")
        if process.returncode:
            errors.append(f"rank {rank} exited with {process.returncode}:\n{err[-3000:]}")
    assert not errors, "\n".join(errors)
    return [json.loads((out / f"rank{r}.json").read_text()) for r in range(2)]


@pytest.fixture(scope="module")
def job(make_ckpt, ckpt_root, tmp_path_factory):
    """Results of both ranks of one two-rank job over every case."""
    cases = {f"{f}/{t}": str(_case_dir(make_ckpt, ckpt_root, f, t)) for f, t in CASES}
    port = str(free_port())
    results = run_two_ranks(WORKER, cases, tmp_path_factory.mktemp("tp"), lambda r: dict(
        RANK=str(r), WORLD_SIZE="2", MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
    return cases, results


def assert_matches_one_process(result: dict, single) -> None:
    """Rank 0's `result` equals the single-process model's logits (1e-5) and greedy ids."""
    expected = single.forward(IDS, MASK)
    got = result["logits"]
    if isinstance(expected, dict):
        for key in expected:
            assert np.abs(np.array(got[key]) - expected[key]).max() <= 1e-5
    else:
        assert np.array(got).shape == expected.shape
        assert np.abs(np.array(got) - expected).max() <= 1e-5
    if single.task == "causal-lm":
        assert result["greedy"] == single.generate(PROMPT, max_new_tokens=NEW_TOKENS)
        assert result["batch"] == single.generate([PROMPT, PROMPT[:2]], max_new_tokens=NEW_TOKENS)


@pytest.mark.parametrize("family,task", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_two_ranks_match_one_process(job, family, task):
    from polylm_torch_common.parallel import param_bytes

    cases, (rank0, rank1) = job
    name = f"{family}/{task}"
    single = polylm.load(cases[name], backend="torch")
    assert_matches_one_process(rank0[name], single)
    whole = param_bytes(single.runtime.params)
    for held in (rank0[name]["held_bytes"], rank1[name]["held_bytes"]):
        assert held < 0.6 * whole, f"a rank holds {held} of {whole} bytes"


def _ir(make_ckpt, family, **changes) -> ModelIR:
    from polylm.loading import model_ir

    ir = model_ir(make_ckpt(family))
    return replace(ir, **changes) if changes else ir


def test_plan_slices_heads_mlp_and_vocabulary(make_ckpt):
    ir = _ir(make_ckpt, "helium")  # 4 heads, 2 KV heads, head_dim 16, intermediate 128
    ir = replace(ir, embedding=replace(ir.embedding, vocab_size=321), head=replace(ir.head, out_features=321),
                 block=replace(ir.block, mlp=replace(ir.block.mlp, intermediate_size=129)))
    plans = [plan_shards(ir, Shard(rank, 2)) for rank in range(2)]
    assert [p.heads for p in plans] == [range(0, 2), range(2, 4)]
    assert [p.kv_heads for p in plans] == [range(0, 1), range(1, 2)]
    assert plans[1].part("layers.0.attn.q.weight") == TensorSlice(0, 32, 64)
    assert plans[1].part("layers.0.attn.o.weight") == TensorSlice(1, 32, 64)
    # uneven intermediate and vocabulary split into ranges differing by one, covering everything once
    assert [p.local_ir.block.mlp.intermediate_size for p in plans] == [64, 65]
    assert [p.part("layers.0.mlp.down.weight") for p in plans] == [TensorSlice(1, 0, 64), TensorSlice(1, 64, 129)]
    assert [len(p.vocab) for p in plans] == [160, 161]
    assert plans[0].head_sizes == (160, 161)
    assert plans[1].part("embed.weight") == TensorSlice(0, 160, 321)
    assert plans[0].part("final_norm.weight") is None and plans[0].reads("final_norm.weight")


def test_plan_replicates_kv_heads_and_splits_bloom_fused_qkv(make_ckpt):
    gemma = _ir(make_ckpt, "gemma")  # 4 heads, 1 KV head
    plans = [plan_shards(gemma, Shard(rank, 4)) for rank in range(4)]
    assert all(p.kv_heads == range(0, 1) for p in plans)
    assert [p.part("layers.1.attn.k.weight") for p in plans] == [TensorSlice(0, 0, 16)] * 4
    bloom = _ir(make_ckpt, "bloom")  # fused rows [heads, 3, head_dim], biases on every projection
    plan = plan_shards(bloom, Shard(1, 2))
    assert plan.part("layers.0.attn.qkv.weight") == TensorSlice(0, 96, 192)
    assert not plan.reads("layers.0.attn.o.bias") and not plan.reads("layers.0.mlp.down.bias")
    assert plan_shards(bloom, Shard(0, 2)).reads("layers.0.attn.o.bias")


def test_world_size_not_dividing_heads_fails_before_loading(make_ckpt, tmp_path):
    with pytest.raises(ParallelError, match=r"4 heads \(4 % 3 = 1\)"):
        polylm.load(make_ckpt("helium"), backend="torch", tensor_parallel=3)
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "polylm", "run", "--tp", "3", "--backend", "torch", "--model",
                             str(make_ckpt("helium")), "hi"], capture_output=True, text=True, env=_env(), timeout=60)
    assert result.returncode == 2 and "4 heads (4 % 3 = 1)" in result.stderr
    assert time.monotonic() - started < 30


def test_load_outside_a_process_group_is_a_clear_error(make_ckpt, monkeypatch):
    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(ParallelError, match="process group"):
        polylm.load(make_ckpt("helium"), backend="torch", tensor_parallel=2)


def _cli(make_ckpt, *extra: str) -> list[str]:
    return [sys.executable, "-m", "polylm", "run", "--backend", "torch", "--model", str(make_ckpt("gemma")),
            *extra, "hello"]


def test_cli_starts_its_ranks_and_prints_what_one_process_prints(make_ckpt):
    single = subprocess.run(_cli(make_ckpt, "--max-new-tokens", "12"), capture_output=True, text=True,
                            env=_env(), timeout=60)
    sharded = subprocess.run(_cli(make_ckpt, "--max-new-tokens", "12", "--tp", "2"), capture_output=True,
                             text=True, env=_env(), timeout=90)
    assert single.returncode == 0 and sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == single.stdout


def test_cli_ranks_are_not_shadowed_by_a_polylm_folder_in_the_working_directory(make_ckpt, tmp_path):
    (tmp_path / "polylm").mkdir()  # e.g. the directory holding a clone of polylm
    (tmp_path / "polylm" / "__init__.py").write_text("raise ImportError('the folder in the working directory')\n")
    console_script = "import sys; del sys.path[0]; from polylm.cli import main; sys.exit(main())"  # as rank 0
    single = subprocess.run(_cli(make_ckpt, "--max-new-tokens", "12"), capture_output=True, text=True,
                            env=_env(), timeout=60)
    sharded = subprocess.run([sys.executable, "-c", console_script,
                              *_cli(make_ckpt, "--max-new-tokens", "12", "--tp", "2")[3:]],
                             capture_output=True, text=True, env=_env(), timeout=90, cwd=tmp_path)
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == single.stdout


def test_killed_rank_ends_the_job_with_a_clear_error(make_ckpt):
    assert_killed_rank_is_named(_cli(make_ckpt, "--max-new-tokens", "100000", "--tp", "2"))


def assert_killed_rank_is_named(command: list[str]) -> None:
    """Kill rank 1 of a two-rank `polylm run` while rank 0 generates: the job must end with exit 2 and name it."""
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=_env())
    try:
        process.stdout.read(1)  # rank 0 is generating
        children = Path(f"/proc/{process.pid}/task/{process.pid}/children").read_text().split()
        assert len(children) == 1
        os.kill(int(children[0]), signal.SIGKILL)
        _, err = process.communicate(timeout=30)
    finally:
        process.kill()
    assert process.returncode == 2
    assert f"rank 1 of 2 (pid {children[0]}) was killed by signal 9" in err
