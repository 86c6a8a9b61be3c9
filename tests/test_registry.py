"""Plugin discovery through entry points: isolation of broken plugins, conflicts, API versions."""

import importlib.metadata as metadata
import sys
import textwrap
import warnings

import pytest

import polylm
from polylm.errors import BackendError, ConfigError
from polylm.loading.registry import Registry


def install_fake_distribution(root, name, entry_points, modules=None):
    """Lay out a dist-info (and modules) under `root` as pip would, and return its entry points."""
    dist = root / f"{name}-1.2.3.dist-info"
    dist.mkdir(parents=True)
    (dist / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {name}\nVersion: 1.2.3\n")
    lines = "\n".join(f"{k} = {v}" for k, v in entry_points.items())
    (dist / "entry_points.txt").write_text(f"[polylm]\n{lines}\n")
    for module, source in (modules or {}).items():
        (root / f"{module}.py").write_text(textwrap.dedent(source))
    found = list(metadata.distributions(path=[str(root)]))
    return [ep for d in found for ep in d.entry_points if ep.group == "polylm"]


@pytest.fixture
def fake_root(tmp_path, monkeypatch):
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in [m for m in sys.modules if m.startswith("fake_polylm_")]:
        del sys.modules[name]


def builtin_points():
    return list(metadata.entry_points(group="polylm"))


def test_builtins_register_through_entry_points():
    registry = Registry()
    assert {"helium", "arcee", "bloom", "gemma", "nemotron"} <= set(registry.families)
    assert "torch" in registry.backends
    assert registry.families["gemma"][1].distribution == "polylm"


def test_broken_plugin_is_reported_and_others_still_load(fake_root):
    points = install_fake_distribution(fake_root, "broken-plugin", {
        "missing": "fake_polylm_does_not_exist",
        "raises": "fake_polylm_raises",
    }, {"fake_polylm_raises": "raise RuntimeError('boom at import')\n"})
    registry = Registry(builtin_points() + points)
    errors = {f.entry_point: f.error for f in registry.failures}
    assert "ModuleNotFoundError" in errors["missing"]
    assert "boom at import" in errors["raises"]
    assert {f.distribution for f in registry.failures if f.entry_point in ("missing", "raises")} == {"broken-plugin"}
    assert "gemma" in registry.families and "torch" in registry.backends


def test_hook_that_raises_or_has_wrong_api_version_is_isolated(fake_root):
    points = install_fake_distribution(fake_root, "odd-plugin", {"odd": "fake_polylm_odd"}, {"fake_polylm_odd": """
        from dataclasses import replace
        from polylm.hookspecs import hookimpl
        from polylm_helium import FAMILY

        @hookimpl
        def polylm_families():
            return [replace(FAMILY, name="old", model_types=("old",), api_version=0)]

        @hookimpl
        def polylm_backends():
            raise ValueError("backend hook exploded")
    """})
    registry = Registry(builtin_points() + points)
    messages = " | ".join(f.error for f in registry.failures if f.entry_point == "odd")
    assert "plugin API 0" in messages and "upgrade the plugin" in messages
    assert "backend hook exploded" in messages
    assert "old" not in registry.families


def test_misspelled_hook_is_reported(fake_root):
    points = install_fake_distribution(fake_root, "typo-plugin", {"typo": "fake_polylm_typo"}, {"fake_polylm_typo": """
        from polylm.hookspecs import hookimpl

        @hookimpl
        def polylm_familes():
            return []
    """})
    registry = Registry(builtin_points() + points)
    assert any("polylm_familes" in f.error for f in registry.failures)


def test_third_party_family_overrides_builtin_with_warning(fake_root):
    points = install_fake_distribution(fake_root, "better-gemma", {"gemma2x": "fake_polylm_gemma"}, {
        "fake_polylm_gemma": """
        from dataclasses import replace
        from polylm.hookspecs import hookimpl
        from polylm_gemma import FAMILY

        @hookimpl
        def polylm_families():
            return [replace(FAMILY, name="better-gemma")]
    """})
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        registry = Registry(builtin_points() + points)
    assert registry.families["gemma"][0].name == "better-gemma"
    assert any("claimed by" in str(w.message) for w in caught)


def test_unknown_model_type_lists_installed():
    with pytest.raises(ConfigError, match="unknown model_type 'llama'.*gemma"):
        Registry().family("llama")


def test_unknown_and_unavailable_backend_errors():
    registry = Registry()
    with pytest.raises(BackendError, match="unknown backend 'cuda'.*torch"):
        registry.backend("cuda")
    assert registry.backend("auto").name in registry.backends


def test_public_listings():
    names = [b["name"] for b in polylm.backends()]
    assert "torch" in names
    assert {row["model_type"] for row in polylm.families()} >= {"helium", "arcee", "bloom", "gemma", "nemotron"}
