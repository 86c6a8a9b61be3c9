"""The demo model shipped inside the package: what `polylm run` uses when no `--model` is given.

A 2.2M-parameter Helium checkpoint with its own byte-level BPE tokenizer, trained by
`scripts/train_demo_model.py` on the prose of the Python documentation (`pydoc_data.topics`, PSF License).
It writes English in the style of the Python reference manual; it knows nothing else. See
`polylm/demo_model/README.md` for its source, license and how it was made.
"""

from __future__ import annotations

from pathlib import Path

#: Directory of the embedded checkpoint (config.json, model.safetensors, tokenizer.json, …).
DEMO_MODEL: Path = Path(__file__).resolve().parent / "demo_model"

__all__ = ["DEMO_MODEL"]
