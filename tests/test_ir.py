"""Building an IR validates it and names what is wrong."""

import numpy as np
import pytest

from polylm.config import ConfigView, read_rope
from polylm.errors import ConfigError, IRError
from polylm.ir import MLP, ALiBi, Attention, Norm, RoPE
from polylm.numerics.positions import alibi_slopes


def rope():
    return RoPE(theta=10000.0, max_positions=128)


@pytest.mark.parametrize("build,message", [
    (lambda: Attention(6, 4, 16, rope()), "divisible by num_key_value_heads"),
    (lambda: Attention(4, 2, 10, RoPE(10000.0, 128, rotary_fraction=0.3)), "must be even"),
    (lambda: Attention(0, 1, 16, rope()), "num_attention_heads must be a positive integer"),
    (lambda: Attention(4, 4, -2, rope()), "head_dim must be a positive integer"),
    (lambda: MLP(64, "swishy", gated=True), "unknown activation 'swishy'"),
    (lambda: Norm("batch", 1e-5), "norm kind"),
    (lambda: Norm("rms", 0.0), "epsilon"),
    (lambda: RoPE(10000.0, 128, rotary_fraction=1.5), "partial_rotary_factor"),
])
def test_invalid_nodes_raise_ir_error(build, message):
    with pytest.raises(IRError, match=message):
        build()


def test_unknown_rope_type_names_the_key():
    config = ConfigView({"rope_scaling": {"type": "wobbly", "factor": 2.0}}, "x/config.json")
    with pytest.raises(ConfigError, match="unsupported rope type 'wobbly'"):
        read_rope(config)


def test_wrong_value_type_names_file_and_key():
    config = ConfigView({"hidden_size": "64"}, "x/config.json")
    with pytest.raises(ConfigError, match=r"x/config.json: key 'hidden_size' must be an integer"):
        config.positive("hidden_size")


@pytest.mark.parametrize("heads", [4, 6, 12, 30])
def test_alibi_slopes_match_bloom(heads):
    import torch
    from transformers.models.bloom.modeling_bloom import build_alibi_tensor

    mask = torch.ones(1, 3)
    reference = build_alibi_tensor(mask, heads, torch.float32)[:, 0, 1].numpy()  # slope × position 1
    assert np.allclose(alibi_slopes(Attention(heads, heads, 8, ALiBi())), reference, rtol=1e-6)
