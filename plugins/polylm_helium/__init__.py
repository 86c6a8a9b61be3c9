"""Kyutai's Helium: Llama-like with RMSNorm, a SiLU-gated MLP and RoPE over interleaved pairs."""

from polylm.config import ConfigView
from polylm.family import LLAMA_MODULE_NAMES, Family, llama_like
from polylm.hookspecs import hookimpl
from polylm.ir import ModelIR, Norm


def to_ir(config: ConfigView, task: str) -> ModelIR:
    return llama_like(config, task, family="helium", norm=Norm("rms", 1e-8), default_theta=100000.0,
                      interleaved=True, context_default=4096)


FAMILY = Family("helium", ("helium",), to_ir, LLAMA_MODULE_NAMES)


@hookimpl
def polylm_families() -> list[Family]:
    return [FAMILY]
