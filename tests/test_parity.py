"""Parity with transformers: every family × backend × task, fp32, padded on both sides, greedy ids
(`polylm.testing.check_parity`)."""

import pytest

import checkpoints
from polylm.config import ConfigView
from polylm.loading import infer_task
from polylm.testing import TASK_CLASSES, check_parity

BACKENDS = ["torch", "mlx", "triton"]
TASKS = list(TASK_CLASSES)
TOLERANCE = 1e-4


def hf_has(family, task):
    """Whether transformers has this family × task (QA for Helium and Gemma it has not)."""
    return not (task == "question-answering" and family in ("helium", "gemma"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("family,task", [(f, t) for f in checkpoints.FAMILIES for t in TASKS if hf_has(f, t)])
def test_matches_transformers(make_ckpt, family, backend, task):
    directory = make_ckpt(family, task)
    assert infer_task(ConfigView.from_dir(directory)) == task  # from the checkpoint's `architectures`
    assert_parity(directory, task, backend)


def assert_parity(directory, task, backend, hf=None, new_tokens=12):
    """Logits of left- and right-padded batches against transformers (or the model `hf`) on `backend`; for
    causal LMs also `new_tokens` greedy tokens of a batch of 2 prompts."""
    report = check_parity(directory, task=task, backends=[backend], tolerance=TOLERANCE, hf=hf,
                          new_tokens=new_tokens)
    assert report.task == task and report.unavailable == {}
    assert set(report.max_diff[backend]) == {"left", "right"}
    assert max(report.max_diff[backend].values()) <= TOLERANCE
    if task == "causal-lm":
        assert report.greedy[backend] == report.reference_greedy
        assert sum(len(g) for g in report.reference_greedy) >= new_tokens
    return report
