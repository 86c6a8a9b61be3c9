"""The `polylm` command line. User errors print one line on stderr and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from typing import Sequence

from .errors import InputError, PolylmError

EXIT_USER_ERROR = 2
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so bad flags look like every other user error."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = _Parser(prog="polylm", description="Run decoder language models on MLX, Triton or torch.",
                     formatter_class=_formatter)
    parser.add_argument("--version", action="version", version=f"polylm {__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    run = commands.add_parser("run", help="continue a prompt and stream the text", formatter_class=_formatter,
                              epilog='example:\n  polylm run --model ./gemma-2b --max-new-tokens 32 "Once upon a time"')
    _add_model_options(run)
    run.add_argument("prompt", help="the text to continue")
    run.add_argument("--max-new-tokens", type=int, default=64, metavar="N")
    run.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default) is greedy")
    run.add_argument("--top-k", type=int, default=None, metavar="K")
    run.add_argument("--top-p", type=float, default=None, metavar="P")
    run.add_argument("--seed", type=int, default=None, metavar="S")
    run.set_defaults(handler=_run)

    classify = commands.add_parser("classify", help="label texts with a sequence-classification checkpoint",
                                   formatter_class=_formatter,
                                   epilog='example:\n  polylm classify --model ./sentiment "great film" "dull plot"')
    _add_model_options(classify)
    classify.add_argument("texts", nargs="+", metavar="TEXT")
    classify.add_argument("--json", action="store_true", help="print JSON instead of a table")
    classify.set_defaults(handler=_classify)

    tag = commands.add_parser("tag", help="label each token with a token-classification checkpoint",
                              formatter_class=_formatter,
                              epilog='example:\n  polylm tag --model ./ner "Ada Lovelace lived in London"')
    _add_model_options(tag)
    tag.add_argument("text", metavar="TEXT")
    tag.add_argument("--json", action="store_true", help="print JSON instead of a table")
    tag.set_defaults(handler=_tag)

    answer = commands.add_parser("answer", help="extract an answer span with a question-answering checkpoint",
                                 formatter_class=_formatter,
                                 epilog='example:\n  polylm answer --model ./qa --question "Where?" '
                                        '--context "Ada lived in London."')
    _add_model_options(answer)
    answer.add_argument("--question", required=True, metavar="Q")
    answer.add_argument("--context", required=True, metavar="C")
    answer.add_argument("--json", action="store_true", help="print JSON instead of text")
    answer.set_defaults(handler=_answer)

    families = commands.add_parser("families", help="list installed model families", formatter_class=_formatter,
                                   epilog="example:\n  polylm families")
    families.set_defaults(handler=_families)
    backends = commands.add_parser("backends", help="list backends in auto-selection order and whether each runs",
                                   formatter_class=_formatter, epilog="example:\n  polylm backends")
    backends.set_defaults(handler=_backends)
    return parser


def _add_model_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, metavar="DIR", help="model directory (config.json, *.safetensors)")
    parser.add_argument("--backend", default="auto", metavar="NAME", help="auto (default), torch, mlx or triton")
    parser.add_argument("--dtype", default=None, metavar="D", help="float32, bfloat16 or float16 (default: as stored)")


def _run(args: argparse.Namespace) -> None:
    model = _load(args)
    pieces = model.generate(args.prompt, max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                            top_k=args.top_k, top_p=args.top_p, seed=args.seed, stream=True)
    for piece in pieces:
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")


def _load(args: argparse.Namespace):
    from .loading import load

    return load(args.model, backend=args.backend, dtype=args.dtype)


def _print_records(records: list, as_json: bool, line) -> None:
    if as_json:
        print(json.dumps([dataclasses.asdict(r) for r in records], ensure_ascii=False))
    else:
        for record in records:
            print(line(record))


def _classify(args: argparse.Namespace) -> None:
    labels = _load(args).classify(args.texts)
    if args.json:
        _print_records(labels, True, None)
        return
    for text, label in zip(args.texts, labels):
        print(f"{label.label}\t{label.score:.4f}\t{text}")


def _tag(args: argparse.Namespace) -> None:
    _print_records(_load(args).tag(args.text), args.json, lambda t: f"{t.text!r}\t{t.label}\t{t.score:.4f}")


def _answer(args: argparse.Namespace) -> None:
    result = _load(args).answer(args.question, args.context)
    if args.json:
        print(json.dumps(dataclasses.asdict(result), ensure_ascii=False))
    else:
        print(f"{result.answer}\t(score {result.score:.4f}, characters {result.start}-{result.end})")


def _families(args: argparse.Namespace) -> None:
    from . import families

    for row in families():
        print(f"{row['model_type']:<12} {row['distribution']} {row['version']}  tasks: {', '.join(row['tasks'])}")


def _backends(args: argparse.Namespace) -> None:
    from . import backends

    for rank, row in enumerate(backends(), 1):
        state = "available" if row["available"] else "unavailable"
        auto = "" if row["auto"] or not row["available"] else " (by name only)"
        print(f"{rank}. {row['name']:<8} {state}{auto}: {row['reason']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `polylm` console script; returns the exit status."""
    try:
        args = build_parser().parse_args(argv)
        args.handler(args)
    except PolylmError as exc:
        print(f"polylm: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print("polylm: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except BrokenPipeError:
        return 0
    return 0


if __name__ == "__main__":
    sys.exit(main())
