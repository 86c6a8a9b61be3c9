"""Top-1 agreement of weight-only int8/int4 with bf16 over 256 positions, on gemma-bench by default.

Every model predicts the next token at each of 256 positions of one sequence (teacher forcing) and the
argmaxes are compared. For the random-weight benchmark models the sequence is random tokens (their own greedy
continuation repeats one token, which would make agreement trivial) — and still uninformative, since their
predictions follow the input embedding. `--model demo` measures the embedded trained model (`polylm.demo`) on
in-distribution text: the Python manual's own prose (`pydoc_data.topics`, what it was trained on).

    python benchmarks/quant_agreement.py [--model gemma-bench|bloom-bench|demo] [--tokens 256] [--backend torch]
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np
from pydoc_data.topics import topics

sys.path.insert(0, str(Path(__file__).parent))
from models import CONFIGS, build  # noqa: E402

import polylm  # noqa: E402
from polylm.demo import DEMO_MODEL  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="gemma-bench", choices=sorted(CONFIGS) + ["demo"])
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--backend", default="torch")
    args = parser.parse_args()
    path = DEMO_MODEL if args.model == "demo" else build(args.model)
    reference = polylm.load(path, backend=args.backend, dtype="bfloat16")
    if args.model == "demo":
        text = " ".join(topics[key] for key in sorted(topics))
        sequence = np.array([reference.tokenizer.encode(text[:20 * args.tokens])[:args.tokens]])
    else:
        sequence = np.random.default_rng(0).integers(3, reference.ir.embedding.vocab_size, (1, args.tokens))
    expected = reference.forward(sequence)[0].argmax(-1)
    for quantize in ("int8", "int4"):
        model = polylm.load(path, backend=args.backend, dtype="bfloat16", quantize=quantize)
        got = model.forward(sequence)[0].argmax(-1)
        print(f"{args.model} {quantize}: top-1 agreement with bf16 over {len(expected)} tokens: "
              f"{(got == expected).mean():.1%} ({len(set(expected.tolist()))} distinct predicted tokens)")


if __name__ == "__main__":
    main()
