"""Tensor parallelism on the MLX backend: two ranks on this machine over mx.distributed's ring backend
(loopback), for every family and a task head of each kind against the single-process MLX run, memory per rank,
and `polylm run --backend mlx --tp 2`.

One two-rank job loads every checkpoint in turn; its ranks get the environment `mlx.launch --backend ring`
gives them (MLX_RANK, MLX_HOSTFILE)."""

import json
import os
import subprocess
import sys
import time

import pytest

import polylm
from polylm.parallel.ranks import free_port
from test_tensor_parallel import (CASES, _case_dir, _env, assert_killed_rank_is_named, assert_matches_one_process,
                                  run_two_ranks)


# Run by both ranks: load each checkpoint sharded; rank 0 records what the tests compare, rank 1 only follows.
WORKER = """
import json, sys
import numpy as np
import polylm
from polylm.parallel import follow, release

cases, out = json.loads(sys.argv[1]), sys.argv[2]
ids, mask, prompt, new = json.loads(sys.argv[3])
ids, mask = np.array(ids), np.array(mask)
results = {}
for name, path in cases.items():
    model = polylm.load(path, backend="mlx", dtype="float32", tensor_parallel=2)
    rank = model.runtime.local.plan.shard.rank
    results[name] = {"held_bytes": model.runtime.local.held_bytes()}
    if rank != 0:
        follow(model)
        continue
    logits = model.forward(ids, mask)
    results[name]["logits"] = ({k: v.tolist() for k, v in logits.items()} if isinstance(logits, dict)
                               else logits.tolist())
    if model.task == "causal-lm":
        results[name]["greedy"] = model.generate(prompt, max_new_tokens=new)
        results[name]["batch"] = model.generate([prompt, prompt[:2]], max_new_tokens=new)
    release(model)
json.dump(results, open(f"{out}/rank{rank}.json", "w"))
"""


@pytest.fixture(scope="module")
def job(make_ckpt, ckpt_root, tmp_path_factory):
    """Results of both ranks of one two-rank ring job over every case."""
    cases = {f"{f}/{t}": str(_case_dir(make_ckpt, ckpt_root, f, t)) for f, t in CASES}
    return cases, run_two_mlx_ranks(cases, tmp_path_factory.mktemp("tp"))


def run_two_mlx_ranks(cases: dict, out) -> list[dict]:
    """`run_two_ranks` with the MLX worker as a two-rank ring job on 127.0.0.1 (its hostfile written in `out`)."""
    port = free_port()
    hostfile = out / "hosts.json"
    hostfile.write_text(json.dumps([[f"127.0.0.1:{port}"], [f"127.0.0.1:{port + 1}"]]))
    return run_two_ranks(WORKER, cases, out, lambda r: dict(MLX_RANK=str(r), MLX_HOSTFILE=str(hostfile)))


@pytest.mark.parametrize("family,task", CASES, ids=[f"{f}-{t}" for f, t in CASES])
def test_two_mlx_ranks_match_one_process(job, family, task):
    cases, (rank0, rank1) = job
    name = f"{family}/{task}"
    single = polylm.load(cases[name], backend="mlx", dtype="float32")
    assert_matches_one_process(rank0[name], single)
    params = single.runtime.params
    tied = single.ir.head.tied_to_embedding
    from polylm_mlx.params import _arrays

    whole = sum(a.nbytes for a in _arrays(params) if not (tied and a is params.head))
    for held in (rank0[name]["held_bytes"], rank1[name]["held_bytes"]):
        assert held < 0.6 * whole, f"a rank holds {held} of {whole} bytes"


def test_cli_mlx_tp_prints_what_one_process_prints(make_ckpt):
    command = [sys.executable, "-m", "polylm", "run", "--backend", "mlx", "--dtype", "float32", "--model",
               str(make_ckpt("bloom")), "--max-new-tokens", "12", "hello"]
    single = subprocess.run(command, capture_output=True, text=True, env=_env(), timeout=60)
    sharded = subprocess.run([*command[:-1], "--tp", "2", "hello"], capture_output=True, text=True, env=_env(),
                             timeout=90)
    assert single.returncode == 0, single.stderr
    assert sharded.returncode == 0, sharded.stderr
    assert sharded.stdout == single.stdout


def test_killed_mlx_rank_ends_the_job_with_a_clear_error(make_ckpt):
    command = [sys.executable, "-m", "polylm", "run", "--backend", "mlx", "--tp", "2", "--model",
               str(make_ckpt("gemma")), "--max-new-tokens", "100000", "hello"]
    assert_killed_rank_is_named(command)


def test_mlx_rank_dying_at_start_up_ends_the_job_within_the_timeout(make_ckpt, tmp_path):
    """mlx holds the GIL while its ring waits for a peer, so rank 0 cannot time itself out: it must still end."""
    (tmp_path / "sitecustomize.py").write_text("import os\nif os.environ.get('MLX_RANK') == '1':\n    os._exit(3)\n")
    env = _env(POLYLM_TP_TIMEOUT="5", PYTHONPATH=os.pathsep.join([str(tmp_path), os.environ.get("PYTHONPATH", "")]))
    started = time.monotonic()
    result = subprocess.run([sys.executable, "-m", "polylm", "run", "--backend", "mlx", "--tp", "2", "--model",
                             str(make_ckpt("gemma")), "hello"], capture_output=True, text=True, env=env, timeout=60)
    assert time.monotonic() - started < 30
    assert result.returncode != 0
    assert "tensor-parallel rank 0 of 2 could not join the ring group" in result.stderr
    assert "within 5 s" in result.stderr
