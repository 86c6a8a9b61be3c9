"""Test kit for family plugins: tiny random checkpoints built with transformers, and parity of polylm with
transformers on every installed backend (`check_parity`). polylm's own tests use it.

transformers (and torch) are test dependencies, imported only when a function needs them. Triton's backend
runs without a GPU only through Triton's CPU interpreter, in float32 and float16: set `TRITON_INTERPRET=1`
before anything imports triton (at the top of your `conftest.py`, or in the environment), or `check_parity`
lists triton as not run, with the reason.
"""

from .checkpoints import TASK_CLASSES, TOKEN_IDS, VOCAB, save_tokenizer, tiny_checkpoint, tiny_model, tokenizer_json
from .parity import SEQUENCES, ParityReport, check_parity, hf_greedy, hf_outputs, max_diff_padded, padded

__all__ = ["SEQUENCES", "TASK_CLASSES", "TOKEN_IDS", "VOCAB", "ParityReport", "check_parity", "hf_greedy",
           "hf_outputs", "max_diff_padded", "padded", "save_tokenizer", "tiny_checkpoint", "tiny_model",
           "tokenizer_json"]
