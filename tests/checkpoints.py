"""Tiny random checkpoints of every built-in family, built and cached by `polylm.testing`, and variants of them
whose config or tensor names were edited afterwards."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

from polylm import testing

FAMILIES = ("helium", "arcee", "bloom", "gemma", "nemotron")

BASE_CONFIGS = {
    "helium": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                   num_key_value_heads=2, head_dim=16, max_position_embeddings=256, rms_norm_eps=1e-6),
    "arcee": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
    "bloom": dict(hidden_size=64, n_layer=2, n_head=4),
    "gemma": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                  num_key_value_heads=1, head_dim=16, max_position_embeddings=256),
    "nemotron": dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                     num_key_value_heads=2, head_dim=16, max_position_embeddings=256),
}


def hf_model(family: str, task: str = "causal-lm", seed: int = 0, **overrides):
    """The transformers model that `build(…, family, task, seed=seed, **overrides)` saves."""
    return testing.tiny_model(family, task, seed=seed, **{**BASE_CONFIGS[family], **overrides})


def build(root: Path, family: str, task: str = "causal-lm", *, dtype: str = "float32", shard_size: str | None = None,
          seed: int = 0, edit_config=None, rename=None, **overrides) -> Path:
    """A tiny checkpoint under `root`, once per distinct set of arguments; `edit_config(config_dict)` and
    `rename(tensor_name)` then change a copy of it."""
    directory = testing.tiny_checkpoint(root, family, task, dtype=dtype, shard_size=shard_size, seed=seed,
                                        **{**BASE_CONFIGS[family], **overrides})
    if edit_config is None and rename is None:
        return directory
    variant = directory.with_name(f"{directory.name}-{getattr(edit_config, '__name__', '')}-"
                                  f"{getattr(rename, '__name__', '')}")
    if variant.exists():
        return variant
    shutil.copytree(directory, variant)
    if rename is not None:
        _rename_tensors(variant, rename)
    if edit_config is not None:
        path = variant / "config.json"
        config = json.loads(path.read_text())
        edit_config(config)
        path.write_text(json.dumps(config, indent=2))
    return variant


def edited(directory: Path, tmp_path: Path, edit) -> Path:
    """A copy of checkpoint `directory` whose config.json is `edit(config)`."""
    changed = tmp_path / "changed"
    shutil.copytree(directory, changed)
    config = json.loads((changed / "config.json").read_text())
    (changed / "config.json").write_text(json.dumps(edit(config)))
    return changed


def _rename_tensors(directory: Path, rename) -> None:
    from safetensors.torch import load_file, save_file

    path = directory / "model.safetensors"
    tensors = load_file(path)
    save_file({rename(k): v.contiguous() for k, v in tensors.items()}, path, metadata={"format": "pt"})
