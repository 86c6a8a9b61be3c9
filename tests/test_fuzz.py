"""Property: whatever is in config.json or a safetensors header, loading succeeds or raises PolylmError."""

import json
import shutil
import struct
import tempfile
from pathlib import Path

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import polylm

JSON_VALUES = st.one_of(
    st.none(), st.booleans(), st.integers(-3, 10**12), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=6), st.lists(st.integers(-2, 40), max_size=3),
    st.dictionaries(st.sampled_from(["rope_type", "type", "factor", "rope_theta", "x"]),
                    st.one_of(st.integers(-2, 9), st.floats(-2, 9), st.text(max_size=6)), max_size=3),
)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck), derandomize=True)


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
