"""Properties: whatever is in config.json or a safetensors header, loading succeeds or raises PolylmError;
whatever JSON body a client sends, the server's parser gives Params or a 4xx ApiError; whatever sampling
settings meet whatever logits, a token in range is picked or a typed PolylmError is raised."""

import json
import shutil
import struct
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import polylm
from polylm.errors import GenerationError
from polylm.generate.sampling import Sampler, Sampling
from polylm.serve.schema import ApiError, load_json, parse
from polylm.testing import VOCAB

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-2, 40), max_size=3),
    st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "rope_theta", "x"]),
                    st.one_of(st.integers(-2, 9), st.floats(-2, 9), st.text(max_size=6)), max_size=3),
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)
FUZZ_MORE = settings(FUZZ, max_examples=400)  # cheap properties: more examples


def load_or_polylm_error(directory: Path) -> None:
    try:
        model = polylm.load(directory, backend="torch")
    except polylm.PolylmError:
        return
    model.forward([[1, 2, 3]])


def load_mutated(source: Path, name: str, content: bytes) -> None:
    """Load a copy of `source` whose file `name` holds `content` (the copy is removed afterwards)."""
    directory = Path(tempfile.mkdtemp()) / "model"
    shutil.copytree(source, directory)
    (directory / name).write_bytes(content)
    try:
        load_or_polylm_error(directory)
    finally:
        shutil.rmtree(directory.parent)


def split_safetensors(source: Path) -> tuple[bytes, bytes]:
    """(header, data) of a checkpoint's model.safetensors."""
    raw = (source / "model.safetensors").read_bytes()
    (length,) = struct.unpack("<Q", raw[:8])
    return raw[8:8 + length], raw[8 + length:]


@FUZZ
@given(data=st.data())
def test_config_mutations(make_ckpt, data):
    source = make_ckpt("nemotron")
    config = json.loads((source / "config.json").read_text())
    key = data.draw(st.sampled_from(sorted(config) + ["rope_scaling", "partial_rotary_factor"]))
    if data.draw(st.booleans()):
        config[key] = data.draw(JSON_VALUES)
    else:
        config.pop(key, None)
    load_mutated(source, "config.json", json.dumps(config).encode())


@FUZZ
@given(data=st.data())
def test_safetensors_header_mutations(make_ckpt, data):
    source = make_ckpt("bloom")
    raw_header, tensors = split_safetensors(source)
    header, length = bytearray(raw_header), len(raw_header)
    for _ in range(data.draw(st.integers(1, 4))):
        header[data.draw(st.integers(0, length - 1))] = data.draw(st.integers(0, 255))
    new_length = data.draw(st.sampled_from([length, length, length - 1, length + 3, 0]))
    load_mutated(source, "model.safetensors", struct.pack("<Q", new_length) + bytes(header) + tensors)


@FUZZ
@given(data=st.data())
def test_safetensors_header_field_mutations(make_ckpt, data):
    source = make_ckpt("bloom")
    raw_header, tensors = split_safetensors(source)
    header = json.loads(raw_header)
    name = data.draw(st.sampled_from(sorted(k for k in header if k != "__metadata__")))
    field = data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))
    header[name][field] = data.draw(st.one_of(JSON_VALUES, st.lists(st.integers(-5, 10**6), max_size=3),
                                              st.sampled_from(["F16", "BF16", "I8", "F64", "U8"])))
    blob = json.dumps(header).encode()
    load_mutated(source, "model.safetensors", struct.pack("<Q", len(blob)) + blob + tensors)


# -- tokenizer side files and RoPE parameters (files-rel) ---------------------------------------------------

TEMPLATE_PIECES = st.sampled_from([
    "{{ messages[0]['content'] }}", "{% for m in messages %}{{ m.role }}{% endfor %}", "{{ bos_token }}",
    "{% if add_generation_prompt %}A:{% endif %}", "{{ 'x' * 7 }}", "{{ raise_exception('no') }}", "{% for %}",
    "{{ messages|tojson }}", "{{ 1 / 0 }}", "{{ range(3)|join(',') }}", "{{ x.y.z }}", "{% set a = 2 %}{{ a ~ a }}",
    "{{ '\u00e9' }}", "{{", "%}", "{# c #}", "{{ messages|length * 2 }}", "{{ 'ab'|center(9) }}",
])
SETTINGS_VALUES = st.one_of(JSON_VALUES, st.dictionaries(st.sampled_from(["content", "name", "x"]), JSON_VALUES,
                                                         max_size=2),
                            st.lists(st.dictionaries(st.sampled_from(["name", "template"]),
                                                     st.one_of(st.text(max_size=8), TEMPLATE_PIECES), max_size=2),
                                     max_size=2))


def chat_or_polylm_error(directory: Path) -> None:
    """Load and render a chat prompt: either works or raises a PolylmError, and never writes the directory."""
    try:
        polylm.load(directory, backend="torch").chat_prompt([{"role": "user", "content": "hi"}])
    except polylm.PolylmError:
        pass


def with_files(source: Path, files: dict[str, bytes], check) -> None:
    directory = Path(tempfile.mkdtemp()) / "model"
    shutil.copytree(source, directory)
    for name, content in files.items():
        (directory / name).write_bytes(content)
    try:
        check(directory)
    finally:
        shutil.rmtree(directory.parent)


@FUZZ
@given(data=st.data())
def test_tokenizer_config_mutations(make_ckpt, data):
    source = make_ckpt("gemma")
    settings = json.loads((source / "tokenizer_config.json").read_text())
    key = data.draw(st.sampled_from(sorted(settings) + ["chat_template", "bos_token", "eos_token", "pad_token"]))
    if data.draw(st.booleans()):
        settings[key] = data.draw(SETTINGS_VALUES if key != "chat_template" else
                                  st.one_of(SETTINGS_VALUES, st.lists(TEMPLATE_PIECES, max_size=4).map("".join)))
    else:
        settings.pop(key, None)
    with_files(source, {"tokenizer_config.json": json.dumps(settings).encode()}, chat_or_polylm_error)


@FUZZ
@given(name=st.sampled_from(["chat_template.jinja", "chat_template.json"]),
       pieces=st.lists(TEMPLATE_PIECES, max_size=5), noise=st.binary(max_size=6), as_json=st.sampled_from(
           ["object", "list", "number", "raw"]))
def test_chat_template_file_mutations(make_ckpt, name, pieces, noise, as_json):
    template = "".join(pieces)
    if name.endswith(".json"):
        content = {"object": json.dumps({"chat_template": template}),
                   "list": json.dumps([{"name": "default", "template": template}]),
                   "number": "5", "raw": template}[as_json].encode() + noise
    else:
        content = template.encode() + noise
    with_files(make_ckpt("gemma"), {name: content}, chat_or_polylm_error)


PLAUSIBLE = st.one_of(st.floats(1.0, 64.0), st.integers(1, 64), st.sampled_from([1.0, 2.0, 4.0, 32.0, 0.707]))
EXTREME = st.one_of(st.floats(allow_nan=True, allow_infinity=True), st.integers(-3, 10**6),
                    st.sampled_from([0, 1, -1.0, 1e-310, 1e300, 0.5, 1.0000001, 10 / 1.386]))
ROPE_NUMBERS = st.one_of(PLAUSIBLE, PLAUSIBLE, EXTREME)  # mostly loadable, so the logits get checked too
ROPE_SCALING = st.fixed_dictionaries(
    {"rope_type": st.sampled_from(["linear", "dynamic", "yarn", "llama3", "default"]), "factor": ROPE_NUMBERS,
     "original_max_position_embeddings": st.one_of(*[st.integers(8, 512)] * 4, EXTREME)},
    optional={key: ROPE_NUMBERS for key in ("rope_theta", "low_freq_factor", "high_freq_factor", "beta_fast",
                                             "beta_slow", "mscale", "mscale_all_dim", "attention_factor")} |
    {"partial_rotary_factor": st.sampled_from([0.25, 0.5, 1.0, 0.3, 0.0, 2.0]),
     "truncate": st.one_of(*[st.booleans()] * 4, st.integers(0, 1))})


@settings(FUZZ, max_examples=150)
@given(scaling=ROPE_SCALING, legacy=st.booleans())
def test_rope_parameter_mutations(make_ckpt, scaling, legacy):
    """Random RoPE parameters: load raises a PolylmError, or the model's logits are finite (past the context
    too, where dynamic scaling changes the frequencies)."""
    source = make_ckpt("arcee")
    config = json.loads((source / "config.json").read_text())
    config.pop("rope_parameters", None)
    if legacy:
        config["rope_scaling"] = {("type" if k == "rope_type" else k): v for k, v in scaling.items()}
    else:
        config["rope_parameters"] = scaling

    def check(directory: Path) -> None:
        try:
            model = polylm.load(directory, backend="torch")
        except polylm.PolylmError:
            return
        length = min(model.ir.context_length, 300)
        logits = model.forward([list(range(1, length + 1))])
        assert np.isfinite(logits).all()

    with_files(source, {"config.json": json.dumps(config).encode()}, check)


# -- the server's request parser and sampling settings -----------------------------------------------------------

TEXT = st.one_of(st.text(max_size=8), st.sampled_from(["\ud800", "a\udfffb", "Once upon", "", "é🙂"]))
NUMBERS = st.one_of(st.integers(-3, 40), st.integers(-10**30, 10**30), st.floats(allow_nan=True, allow_infinity=True),
                    st.sampled_from([0, 1, 1e-320, 5e-324, 1e308, -0.0, 2, 20, 21]))
LEAVES = st.one_of(st.none(), st.booleans(), NUMBERS, TEXT)
JSON = st.recursive(LEAVES, lambda inner: st.one_of(st.lists(inner, max_size=4),
                                                    st.dictionaries(TEXT, inner, max_size=3)), max_leaves=12)
MESSAGE = st.fixed_dictionaries({"role": st.one_of(st.sampled_from(["user", "system", "assistant"]), JSON)},
                                optional={"content": st.one_of(TEXT, JSON, st.lists(st.fixed_dictionaries(
                                    {"type": st.sampled_from(["text", "image_url"]), "text": JSON}), max_size=2))})
#: each field's plausible values (a valid body is the start), then anything
PLAUSIBLE = {
    "model": st.just("tiny"), "prompt": st.one_of(TEXT, st.lists(st.integers(-2, 400), max_size=5), st.lists(TEXT)),
    "messages": st.lists(MESSAGE, max_size=3), "max_tokens": st.integers(-1, 20),
    "max_completion_tokens": st.integers(-1, 20), "temperature": st.one_of(st.floats(0, 2), NUMBERS),
    "top_p": st.one_of(st.floats(0, 1), NUMBERS), "top_k": st.integers(-2, 400), "min_p": st.floats(0, 1),
    "repetition_penalty": st.one_of(st.floats(1e-320, 1e300), NUMBERS), "seed": st.integers(-2**70, 2**70),
    "stop": st.one_of(TEXT, st.lists(TEXT, max_size=3)), "n": st.integers(0, 2), "logprobs": st.one_of(
        st.booleans(), st.integers(-1, 21)), "top_logprobs": st.integers(-1, 21), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({}, optional={"include_usage": st.one_of(st.booleans(), JSON)}),
    "echo": st.booleans(), "suffix": TEXT, "best_of": st.integers(0, 2), "logit_bias": JSON,
    "presence_penalty": NUMBERS, "frequency_penalty": NUMBERS,
}


@pytest.fixture(scope="module")
def chat_model(make_ckpt, tmp_path_factory):
    directory = tmp_path_factory.mktemp("fuzz") / "helium"
    shutil.copytree(make_ckpt("helium"), directory)
    (directory / "chat_template.jinja").write_text(
        "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>")
    return polylm.load(directory, backend="torch")


@FUZZ_MORE
@given(data=st.data(), chat=st.booleans())
def test_request_parser(chat_model, data, chat):
    """Whatever JSON a client sends, parsing gives Params or an ApiError with a 4xx status, never another error."""
    body = {"model": "tiny", **({"messages": [{"role": "user", "content": "Once"}]} if chat else {"prompt": "Once"})}
    for key in data.draw(st.lists(st.sampled_from(sorted(PLAUSIBLE)), max_size=5, unique=True)):
        body[key] = data.draw(st.one_of(PLAUSIBLE[key], PLAUSIBLE[key], JSON))
    if data.draw(st.booleans()):
        del body[data.draw(st.sampled_from(sorted(body)))]
    try:
        params = parse(load_json(json.dumps(body).encode()), chat_model, "tiny", chat=chat)
    except ApiError as exc:
        event(f"ApiError {exc.status}")
        assert 400 <= exc.status < 500 and exc.message.encode("utf-8")
        return
    event("parsed")
    assert params.prompts and all(0 <= t < VOCAB for p in params.prompts for t in p)


LOGITS = st.one_of(st.floats(allow_nan=False, width=32), st.sampled_from([np.inf, -np.inf, 3e38, -3e38, 0.0]),
                   st.floats(allow_nan=True, allow_infinity=True, width=32))


@FUZZ_MORE
@given(settings_=st.fixed_dictionaries({}, optional={
    "temperature": st.one_of(NUMBERS, st.floats(0, 2)), "top_k": st.one_of(st.integers(-1, 40), NUMBERS),
    "top_p": NUMBERS, "min_p": NUMBERS, "repetition_penalty": NUMBERS, "seed": st.integers(-1, 2**70),
    "logprobs": st.integers(-1, 21)}),
    logits=st.lists(LOGITS, min_size=1, max_size=24), seen=st.lists(st.integers(0, 30), max_size=6),
    dtype=st.sampled_from([np.float32, np.float64]))
def test_sampling_settings_and_logits(settings_, logits, seen, dtype):
    """Any Sampling settings on any logits: a token id in range, or a typed PolylmError; never NaN trouble."""
    try:
        sampling = Sampling(max_new_tokens=4, **settings_)
    except polylm.PolylmError:
        return
    row = np.array(logits, dtype=dtype)
    try:
        choice = Sampler(sampling, seen).pick(row)
    except GenerationError:
        assert np.isnan(row).any() or np.isneginf(row).all()
        return
    assert 0 <= choice.token < len(row) and row[choice.token] > -np.inf
    if choice.logprob is not None:
        assert not np.isnan(choice.logprob) and all(not np.isnan(lp) for _, lp in choice.top)
