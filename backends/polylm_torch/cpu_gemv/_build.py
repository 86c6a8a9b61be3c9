"""Build, cache and load the compiled kernels, and pick the instruction set to run them with.

The extension is JIT-built with ``torch.utils.cpp_extension.load`` into
``$POLYLM_CACHE_DIR/kernels/<key>`` (default ``~/.cache/polylm/kernels/<key>``), never into the source tree.
``key`` hashes the sources, the compiler flags, the compiler's identity, torch and Python versions and the
CPU's SIMD features, so a build made for one ISA is never silently reused on another. A finished build is
imported directly, without touching ninja. Any failure (no compiler, no ninja, compile error, not x86-64)
is recorded as the reason returned by :func:`load`; nothing is raised.

Environment:
- ``POLYLM_GEMV_ISA``: ``auto`` (default), ``avx512``, ``avx2``, or ``none`` (use stock torch ops). Read when a
  layer is built, so tests can force the AVX2 path on an AVX-512 machine.
- ``POLYLM_GEMV_VERBOSE=1``: show the compiler's output.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import platform
import shutil
import subprocess
import sys
import threading
import types
import warnings
from pathlib import Path

import torch

_SOURCE_DIR = Path(__file__).resolve().parent
_SOURCES = ("gemv.cpp", "kernels.cpp")
_HEADERS = ("kernels.h", "fused.h")
_CFLAGS = ("-O3", "-ffp-contract=off", "-fopenmp", "-fno-math-errno")
_LDFLAGS = ("-fopenmp",)  # links libgomp.so.1, the same runtime (soname) torch already loaded: one thread pool
_CPU_FLAGS = ("avx2", "fma", "f16c", "avx512f", "avx512bw", "avx512vl", "avx512dq", "avx512_vnni", "avx512_bf16")

ISA_CODES = {"avx2": 1, "avx512": 2}
_ISA_ENV = "POLYLM_GEMV_ISA"

_lock = threading.Lock()
_state: tuple[types.ModuleType | None, str] | None = None


def cpu_flags() -> frozenset[str]:
    """The SIMD feature flags of this CPU that matter to the kernels (from /proc/cpuinfo; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        if line.startswith("flags"):
            return frozenset(line.split(":", 1)[1].split()) & frozenset(_CPU_FLAGS)
    return frozenset()


def cache_root() -> Path:
    """Root of polylm's kernel cache: ``$POLYLM_CACHE_DIR/kernels`` or ``~/.cache/polylm/kernels``."""
    base = os.environ.get("POLYLM_CACHE_DIR")
    if base:
        return Path(base).expanduser() / "kernels"
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg) if xdg else Path.home() / ".cache") / "polylm" / "kernels"


def _compiler() -> tuple[str, str]:
    """(compiler command, its version line); raises FileNotFoundError when there is none."""
    cxx = os.environ.get("CXX", "c++")
    if shutil.which(cxx) is None:
        raise FileNotFoundError(f"C++ compiler {cxx!r} not found on PATH (set CXX or install g++)")
    out = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30)
    return cxx, (out.stdout.splitlines() or [""])[0]


def build_key(compiler_id: str) -> str:
    """Hash of everything that decides what the build produces."""
    h = hashlib.sha256()
    for name in _SOURCES + _HEADERS:
        h.update(name.encode())
        h.update((_SOURCE_DIR / name).read_bytes())
    parts = [
        " ".join(_CFLAGS),
        " ".join(_LDFLAGS),
        compiler_id,
        torch.__version__,
        sys.version.split()[0],
        platform.machine(),
        ",".join(sorted(cpu_flags())),
    ]
    h.update("\n".join(parts).encode())
    return h.hexdigest()[:16]


def _import_built(name: str, directory: Path) -> types.ModuleType | None:
    if name in sys.modules:  # an extension module cannot be initialized twice in one process
        return sys.modules[name]
    path = directory / f"{name}.so"
    if not path.exists():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        assert spec is not None and spec.loader is not None
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        sys.modules[name] = module
        return module
    except ImportError:
        return None  # a half-written or stale library: rebuild


def _build() -> tuple[types.ModuleType | None, str]:
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return None, f"the kernels need an x86-64 CPU with AVX2, this is {platform.machine()}"
    flags = cpu_flags()
    if flags and not {"avx2", "fma", "f16c"} <= flags:
        return None, "this CPU lacks AVX2/FMA/F16C"
    try:
        cxx, version = _compiler()
    except (OSError, subprocess.SubprocessError) as exc:
        return None, f"no usable C++ compiler: {exc}"
    try:
        key = build_key(f"{cxx} {version}")
    except OSError as exc:
        return None, f"kernel sources missing from the installed package: {exc}"
    name = f"polylm_cpu_gemv_{key}"
    directory = cache_root() / key
    module = _import_built(name, directory)
    if module is None:
        verbose = os.environ.get("POLYLM_GEMV_VERBOSE", "") not in ("", "0")
        if not os.environ.get("POLYLM_QUIET"):  # the first run on a machine would sit silent for a while
            print(f"polylm: compiling the CPU kernels for this machine (once; about a minute, cached in {directory})",
                  file=sys.stderr, flush=True)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            from torch.utils import cpp_extension

            with warnings.catch_warnings():
                if not verbose:
                    warnings.simplefilter("ignore")
                module = cpp_extension.load(
                    name=name,
                    sources=[str(_SOURCE_DIR / s) for s in _SOURCES],
                    extra_cflags=list(_CFLAGS),
                    extra_ldflags=list(_LDFLAGS),
                    build_directory=str(directory),
                    verbose=verbose,
                )
            sys.modules[name] = module
        except Exception as exc:  # compile errors, missing ninja, unwritable cache: all mean "unavailable"
            message = str(exc).strip().splitlines()
            return None, f"building the kernels in {directory} failed: {' '.join(message[-3:])[:500]}"
    if not module.cpu_has("avx2"):
        return None, "this CPU lacks AVX2/FMA"
    return module, ""


def load() -> tuple[types.ModuleType | None, str]:
    """The extension module (built on first use, then cached) or None with the reason."""
    global _state
    with _lock:
        if _state is None:
            _state = _build()
        return _state


def reset() -> None:
    """Forget the loaded module so that the next :func:`load` builds/imports again (for tests)."""
    global _state
    with _lock:
        _state = None


def requested_isa() -> str:
    """The ISA asked for through ``POLYLM_GEMV_ISA`` (``auto`` when unset)."""
    return os.environ.get(_ISA_ENV, "auto").strip().lower() or "auto"


def supported_isas(module: types.ModuleType) -> list[str]:
    """The code paths of the built `module` this CPU can run, best first."""
    return [isa for isa in ("avx512", "avx2") if module.cpu_has(isa)]


def select_isa() -> tuple[types.ModuleType | None, str | None, str]:
    """(module, ISA name, reason): the ISA to run new layers with, or None and why not."""
    requested = requested_isa()
    if requested in ("none", "off", "torch"):
        return None, None, f"disabled by {_ISA_ENV}={requested}"
    if requested not in ("auto", *ISA_CODES):
        return None, None, f"{_ISA_ENV}={requested!r} is not one of auto, avx512, avx2, none"
    module, reason = load()
    if module is None:
        return None, None, reason
    supported = supported_isas(module)
    if requested == "auto":
        return module, supported[0], ""
    if requested in supported:
        return module, requested, ""
    return None, None, f"{_ISA_ENV}={requested} but this CPU supports only {', '.join(supported)}"
