"""The `polylm` command line. User errors print one line on stderr and exit 2; bugs keep their traceback."""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import warnings
from pathlib import Path
from typing import Sequence

from ..errors import InputError, PolylmError
from ..family import FamilyNote

EXIT_USER_ERROR = 2
INSPECT_DESCRIPTION = """\
Describe a checkpoint from config.json and its safetensors headers alone (no tensor data is read): family and
plugin, the IR as a tree, parameters per part (as transformers' num_parameters() counts them), weight bytes per
stored dtype and under --quantize int8/int4, KV-cache bytes, the backend `auto` picks here, tokenizer and chat
template.

--json prints one object with the keys:
  model, directory, model_type, family, task, notes   as given / found; notes: the family's notes
  plugin            {entry_point, distribution, version} that registered the family
  ir                the IR (polylm.ir.ModelIR) as data; each position has a "type": "rope" or "alibi"
  parameters        {embedding, attention, mlp, norms, head, total}; a tied head counts in the embedding
  weights           {bytes_by_dtype: {dtype: bytes}, bytes, quantized_bytes: {int8|int4: {dtype|int8|int4: bytes}}}
  kv_cache          {dtype, bytes_per_token, context_length, bytes_at_context}; a windowed layer holds its window
  backend           {auto: the backend `auto` picks or null, reason: its state or why none runs,
                     backends: [{name, priority, available, auto, reason, dtypes}] in auto order}
  tokenizer         whether tokenizer.json exists
  chat_template     where the default chat template comes from, or null"""
EXIT_INTERRUPTED = 130


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting, so bad flags look like every other user error, and that takes no
    abbreviation of a flag (`--max-new-token` is an error, not `--max-new-tokens`)."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, allow_abbrev=False, **kwargs)

    def error(self, message: str) -> None:  # type: ignore[override]
        raise InputError(message)


def _formatter(prog: str) -> argparse.HelpFormatter:
    return argparse.RawDescriptionHelpFormatter(prog, max_help_position=32)


def build_parser() -> argparse.ArgumentParser:
    from .. import __version__

    parser = _Parser(prog="polylm", description="Run decoder language models on MLX, Triton or torch.",
                     formatter_class=_formatter)
    parser.add_argument("--version", action="version", version=f"polylm {__version__}")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    run = commands.add_parser("run", help="continue a prompt and stream the text", formatter_class=_formatter,
                              epilog='example:\n  polylm run "Once upon a time"        # the built-in demo model\n'
                                     '  polylm run --model ./gemma-2b --max-new-tokens 32 "Once upon a time"')
    _add_model_options(run, default_demo=True)
    run.add_argument("prompt", help="the text to continue")
    _add_sampling_options(run, max_new_tokens=64)
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

    chat = commands.add_parser("chat", help="chat through the checkpoint's chat template",
                               formatter_class=_formatter,
                               epilog="example:\n  polylm chat --model ./gemma-2b-it\n"
                                      "  echo 'Tell me a joke' | polylm chat --model ./gemma-2b-it")
    _add_model_options(chat)
    _add_sampling_options(chat, max_new_tokens=256)
    chat.add_argument("--system", default=None, metavar="TEXT", help="a system message to start with")
    chat.add_argument("--chat-template", default=None, metavar="FILE", help="a Jinja chat template to use")
    chat.set_defaults(handler=_chat)

    bench = commands.add_parser("bench", help="measure load time, time to first token, prefill/decode speed",
                                formatter_class=_formatter,
                                epilog="example:\n  polylm bench --model ./gemma-2b --dtype bfloat16 --quantize int8")
    _add_model_options(bench)
    bench.add_argument("--prompt-tokens", type=int, default=128, metavar="N")
    bench.add_argument("--new-tokens", type=int, default=64, metavar="N")
    bench.add_argument("--threads", type=int, default=None, metavar="N", help="CPU threads (OMP_NUM_THREADS)")
    bench.add_argument("--json", action="store_true", help="print JSON instead of a table")
    bench.set_defaults(handler=_bench)

    serve = commands.add_parser("serve", help="serve an OpenAI-compatible HTTP API (needs polylm[serve])",
                                formatter_class=_formatter,
                                epilog="example:\n  polylm serve --model ./gemma-2b-it --port 8000 --api-key secret")
    _add_model_options(serve)
    serve.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    serve.add_argument("--port", type=int, default=8000, metavar="N", help="TCP port (default 8000; 0 picks a free one)")
    serve.add_argument("--api-key", default=None, metavar="KEY", help="require 'Authorization: Bearer KEY' on /v1")
    serve.add_argument("--max-batch", type=int, default=8, metavar="N", help="requests decoded together (default 8)")
    serve.add_argument("--max-queue", type=int, default=64, metavar="N",
                       help="requests that may wait for a row before new ones get 429 (default 64; 0: none wait, "
                            "requests are taken while a row is free)")
    serve.add_argument("--min-prefix", type=int, default=16, metavar="N",
                       help="shortest cached prompt prefix to reuse, in tokens (default 16; 0 turns reuse off)")
    serve.add_argument("--max-body-bytes", type=int, default=32 * 1024 * 1024, metavar="N",
                       help="largest request body, in bytes; larger ones get 413 (default 33554432: 32 MiB)")
    serve.set_defaults(handler=_serve)

    inspect = commands.add_parser(
        "inspect", help="describe a checkpoint without reading its tensors",
        formatter_class=_formatter, description=INSPECT_DESCRIPTION,
        epilog="example:\n  polylm inspect ./gemma-2b\n  polylm inspect --json google/gemma-2b")
    inspect.add_argument("model_path", nargs="?", default=None, metavar="MODEL",
                         help="model directory or cached Hub repo id (default: the built-in demo model)")
    inspect.add_argument("--model", default=None, metavar="DIR", help="the same as MODEL, as other commands take it")
    inspect.add_argument("--dtype", default=None, metavar="D",
                         help="compute dtype the KV cache is counted in (default: as stored)")
    inspect.add_argument("--json", action="store_true", help="print one JSON object (keys above)")
    inspect.add_argument("--revision", default=None, metavar="REV",
                         help="the Hub revision of an ORG/NAME model (branch, tag or commit; default main)")
    inspect.set_defaults(handler=_inspect)

    convert = commands.add_parser(
        "convert", help="write a checkpoint MLX-quantized (mlx-lm's format), which loads without quantizing",
        formatter_class=_formatter,
        description="Write MODEL into the new directory OUT with its projection matrices and embedding stored as "
                    "MLX's affine\ncodes, scales and biases (exactly as mx.quantize makes them), config.json's "
                    "`quantization` set and the\ntokenizer files and chat template copied: polylm (every backend) "
                    "and mlx-lm load it as it is.",
        epilog="example:\n  polylm convert ./qwen3-0.6b ./qwen3-0.6b-4bit --quantize int4")
    convert.add_argument("model", metavar="MODEL", help="model directory or Hub repo id (downloaded when missing)")
    convert.add_argument("--revision", default=None, metavar="REV",
                         help="the Hub revision of an ORG/NAME model (branch, tag or commit; default main)")
    convert.add_argument("out", metavar="OUT", help="the directory to write (must not exist)")
    convert.add_argument("--quantize", required=True, choices=("int4", "int8"), help="bits per weight")
    convert.add_argument("--group-size", type=int, default=64, choices=(32, 64, 128), metavar="N",
                         help="input features per scale and bias: 32, 64 (default, as mlx-lm) or 128")
    convert.set_defaults(handler=_convert)

    plugins = commands.add_parser("plugins", help="list plugins: families, backends, and failures",
                                  formatter_class=_formatter, epilog="example:\n  polylm plugins")
    plugins.set_defaults(handler=_plugins)

    families = commands.add_parser("families", help="list installed model families", formatter_class=_formatter,
                                   epilog="example:\n  polylm families")
    families.set_defaults(handler=_families)
    backends = commands.add_parser("backends", help="list backends in auto-selection order and whether each runs",
                                   formatter_class=_formatter, epilog="example:\n  polylm backends")
    backends.set_defaults(handler=_backends)
    for command in commands.choices.values():  # `polylm run --quiet …` as well as `polylm --quiet run …`
        command.add_argument("--quiet", action="store_true", default=argparse.SUPPRESS, help="no progress bars")
    return parser


def _add_sampling_options(parser: argparse.ArgumentParser, max_new_tokens: int) -> None:
    parser.add_argument("--max-new-tokens", type=int, default=max_new_tokens, metavar="N")
    parser.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0 (default) is greedy")
    parser.add_argument("--top-k", type=int, default=None, metavar="K")
    parser.add_argument("--top-p", type=float, default=None, metavar="P")
    parser.add_argument("--seed", type=int, default=None, metavar="S")
    parser.add_argument("--min-p", type=float, default=None, metavar="P")
    parser.add_argument("--repetition-penalty", type=float, default=1.0, metavar="R", help="1 (default) is off")


def _sampling(args: argparse.Namespace) -> dict:
    return {"max_new_tokens": args.max_new_tokens, "temperature": args.temperature, "top_k": args.top_k,
            "top_p": args.top_p, "seed": args.seed, "min_p": args.min_p,
            "repetition_penalty": args.repetition_penalty}


def _backend_help() -> str:
    """The --backend help: auto and the installed backends, in auto-selection order."""
    from ..loading.registry import registry

    return ", ".join(["auto (default)", *registry().names()])


def _add_model_options(parser: argparse.ArgumentParser, default_demo: bool = False) -> None:
    parser.add_argument("--model", required=not default_demo, metavar="DIR|ORG/NAME",
                        help="model directory (config.json, *.safetensors), or Hub repo id (ORG/NAME[@REVISION]), "
                             "downloaded into the Hugging Face cache unless it is there or HF_HUB_OFFLINE=1"
                             + ("; default: polylm's small built-in demo model" if default_demo else ""))
    parser.add_argument("--revision", default=None, metavar="REV",
                        help="branch, tag or commit of a Hub repo id (default: its main branch)")
    parser.add_argument("--backend", default="auto", metavar="NAME", help=_backend_help())
    parser.add_argument("--dtype", default=None, metavar="D", help="float32, bfloat16 or float16 (default: as stored)")
    parser.add_argument("--quantize", default=None, choices=["int8", "int4"], help="weight-only quantization")
    parser.add_argument("--tp", type=int, default=1, metavar="N",
                        help="tensor parallelism: shard the model over N ranks (started here, or by torchrun)")


def _run(args: argparse.Namespace) -> None:
    model = _load(args)
    _write_stream(model.generate(args.prompt, stream=True, **_sampling(args)))


def _write_stream(pieces, shown: list[str] | None = None) -> str:
    """Write streamed text pieces to stdout as they come and return them joined; each is also appended to `shown`,
    which keeps what was written when Ctrl-C stops the stream."""
    shown = [] if shown is None else shown
    for piece in pieces:
        shown.append(piece)
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    return "".join(shown)


def _chat(args: argparse.Namespace) -> None:
    template = Path(args.chat_template) if args.chat_template else None  # read (safely) by the model
    model = _load(args)
    messages = [{"role": "system", "content": args.system}] if args.system else []
    if not sys.stdin.isatty():
        messages.append({"role": "user", "content": sys.stdin.read()})
        _write_stream(model.chat(messages, template=template, stream=True, **_sampling(args)))
        return
    model.chat_prompt(messages + [{"role": "user", "content": "hi"}], template=template)  # fail early
    while True:
        try:
            line = input("you> ")
        except (EOFError, KeyboardInterrupt):  # Ctrl-D or Ctrl-C at the prompt ends the chat
            sys.stdout.write("\n")
            return
        if not line.strip():
            continue
        sys.stdout.write("assistant> ")
        turn, shown = [{"role": "user", "content": line}], []
        try:
            _write_stream(model.chat(messages + turn, template=template, stream=True, **_sampling(args)), shown)
        except KeyboardInterrupt:  # Ctrl-C stops the reply, not the chat
            sys.stdout.write("\n")
            if not shown:  # stopped before its first piece: the question is taken back too
                continue
        messages += turn + [{"role": "assistant", "content": "".join(shown)}]


def _bench(args: argparse.Namespace) -> None:
    if args.tp != 1:
        raise InputError("polylm bench runs one process; benchmarks/bench_tp.py measures tensor parallelism")
    if args.threads is not None:
        if args.threads < 1:
            raise InputError(f"--threads must be ≥ 1, got {args.threads}")
        os.environ["OMP_NUM_THREADS"] = str(args.threads)  # read by the frameworks when they start
    for name in ("prompt_tokens", "new_tokens"):
        if getattr(args, name) < 1:
            raise InputError(f"--{name.replace('_', '-')} must be ≥ 1, got {getattr(args, name)}")
    from .bench import bench

    result = bench(str(_model_dir(args)), backend=args.backend, dtype=args.dtype, quantize=args.quantize,
                   prompt_tokens=args.prompt_tokens, new_tokens=args.new_tokens)
    if args.json:
        print(json.dumps(result.as_dict()))
        return
    print(f"backend {result.backend}, {result.dtype}{', ' + args.quantize if args.quantize else ''}: "
          f"prompt {result.prompt_tokens} tokens, {result.new_tokens} new")
    print(f"import          {result.import_s:8.2f} s")
    print(f"load            {result.load_s:8.2f} s")
    print(f"first token     {result.ttft_s * 1000:8.1f} ms")
    print(f"prefill         {result.prefill_tok_s:8.1f} tok/s")
    if result.decode_tok_s is not None:  # a task head makes no tokens
        print(f"decode          {result.decode_tok_s:8.1f} tok/s")
    print(f"peak RSS        {result.peak_rss_mb:8.0f} MB")
    if result.model_rss_mb is not None:
        print(f"model RSS       {result.model_rss_mb:8.0f} MB  (peak above the RSS before the load)")


def _serve(args: argparse.Namespace) -> None:
    for name, low in (("port", 0), ("max_batch", 1), ("max_queue", 0), ("min_prefix", 0), ("max_body_bytes", 1)):
        if getattr(args, name) < low or (name == "port" and args.port > 65535):
            raise InputError(f"--{name.replace('_', '-')} must be ≥ {low}{' and ≤ 65535' if name == 'port' else ''}, "
                             f"got {getattr(args, name)}")
    try:
        from ..serve.app import bind, serve
    except ImportError as exc:
        raise InputError(f"polylm serve needs starlette and uvicorn ({exc.name} is missing): "
                         "pip install 'polylm[serve]'") from None
    bind(args.host, args.port).close()  # a busy port or a bad host fails before the model loads
    model = _load(args)
    serve(model, model_name=args.model, host=args.host, port=args.port, api_key=args.api_key,
          max_batch=args.max_batch, max_queue=args.max_queue, min_prefix=args.min_prefix or None,
          max_body_bytes=args.max_body_bytes)


def _inspect(args: argparse.Namespace) -> None:
    from ..loading.inspect import inspect
    from .inspect import render

    if args.model_path is not None and args.model is not None:
        raise InputError("give the model once: as MODEL or as --model")
    if args.model_path is not None:
        args.model = args.model_path
    report = inspect(_model_dir(args), dtype=args.dtype)
    print(json.dumps(report.as_dict(), ensure_ascii=False) if args.json else render(report))


def _convert(args: argparse.Namespace) -> None:
    from ..loading.convert import convert

    out = convert(_model_dir(args), args.out, quantize=args.quantize, group_size=args.group_size)
    print(f"wrote {out} ({args.quantize}, groups of {args.group_size})", file=sys.stderr)


def _plugins(args: argparse.Namespace) -> None:
    from ..loading.registry import registry

    plugins = registry()
    print("families:")
    for model_type, claimants in sorted(plugins.claimants.items()):
        for rank, (_, info) in enumerate(claimants):
            fallback = ", for configs the one above declines" if rank else ""
            print(f"  {model_type:<12} {info.distribution} {info.version} (entry point {info.entry_point}{fallback})")
    print("backends:")
    for name, (_, info) in sorted(plugins.backends.items()):
        print(f"  {name:<12} {info.distribution} {info.version} (entry point {info.entry_point})")
    if plugins.failures:
        print("failed to load:")
        for failure in plugins.failures:
            print(f"  {failure.entry_point:<12} {failure.distribution}: {failure.error}")
    for conflict in plugins.conflicts:
        print(f"conflict: {conflict}")


def _model_dir(args: argparse.Namespace) -> Path:
    """`--model` as a directory: a Hub repo id's files are downloaded here, once, before any load or rank starts."""
    from ..checkpoint.hub import resolve_model

    if args.model is None:  # only `run` and `inspect` let the model be left out
        from ..demo import DEMO_MODEL

        args.model = str(DEMO_MODEL)
    return resolve_model(args.model, args.revision)


def _load(args: argparse.Namespace):
    from ..loading import load

    directory = _model_dir(args)
    with warnings.catch_warnings():  # a family's notes are printed below as one line each
        warnings.simplefilter("ignore", FamilyNote)
        if args.tp != 1:
            from ..parallel.launch import load_ranked

            model = load_ranked(str(directory), args.tp, args.argv, backend=args.backend, dtype=args.dtype,
                                quantize=args.quantize)
        else:
            model = load(directory, backend=args.backend, dtype=args.dtype, quantize=args.quantize)
    for note in model.notes:
        print(f"note: {note}", file=sys.stderr)
    return model


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
    from .. import families

    for row in families():
        print(f"{row['model_type']:<12} {row['distribution']} {row['version']}  tasks: {', '.join(row['tasks'])}")


def _backends(args: argparse.Namespace) -> None:
    from .. import backends

    for rank, row in enumerate(backends(), 1):
        state = "available" if row["available"] else "unavailable"
        auto = "" if row["auto"] or not row["available"] else " (by name only)"
        print(f"{rank}. {row['name']:<8} {state}{auto}: {row['reason']}")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `polylm` console script; returns the exit status."""
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        if args.command is None:  # bare `polylm`: what it can do
            parser.print_help()
            return 0
        args.argv = list(sys.argv[1:] if argv is None else argv)  # what ranks started by --tp run
        if args.quiet:
            os.environ["POLYLM_QUIET"] = "1"
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
