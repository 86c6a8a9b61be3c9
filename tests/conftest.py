import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

import checkpoints  # noqa: E402

os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the suite never reaches huggingface.co; test_hub.py serves a fake Hub
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
# The Triton backend is tested through Triton's CPU interpreter, which is read when kernels are defined.
os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(scope="session")
def ckpt_root(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("checkpoints")


@pytest.fixture(scope="session")
def make_ckpt(ckpt_root):
    """make_ckpt(family, task="causal-lm", **options) → directory of a cached tiny checkpoint."""
    def make(family, task="causal-lm", **options):
        return checkpoints.build(ckpt_root, family, task, **options)
    return make
