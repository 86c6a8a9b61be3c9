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
    with pytest.raises(ConfigError, match="unknown model_type 'mamba'.*gemma"):
        Registry().family("mamba")


def test_unknown_and_unavailable_backend_errors():
    registry = Registry()
    with pytest.raises(BackendError, match="unknown backend 'cuda'.*torch"):
        registry.backend("cuda")
    assert registry.backend("auto").name in registry.backends


def test_public_listings():
    names = [b["name"] for b in polylm.backends()]
    assert "torch" in names
    assert {row["model_type"] for row in polylm.families()} >= {"helium", "arcee", "bloom", "gemma", "nemotron"}


# -- declining a config variant, and notes ---------------------------------------------------------------------

DECLINING_PLUGINS = {
    "fake_polylm_mqa_averse": """
        from dataclasses import replace
        from polylm.errors import Declined
        from polylm.hookspecs import hookimpl
        from polylm_gemma import FAMILY

        def to_ir(config, task):
            if config.get("num_key_value_heads") == 1:
                raise Declined("multi-query attention is not supported")
            return FAMILY.to_ir(config, task)

        @hookimpl
        def polylm_families():
            return [replace(FAMILY, name="mqa-averse", to_ir=to_ir)]
    """,
    "fake_polylm_noting": """
        from dataclasses import replace
        from polylm.family import Mapped
        from polylm.hookspecs import hookimpl
        from polylm_gemma import FAMILY

        @hookimpl
        def polylm_families():
            return [replace(FAMILY, name="noting", to_ir=lambda config, task: Mapped(
                FAMILY.to_ir(config, task), ("runs without the fused kernel",)))]
    """,
    "fake_polylm_refusing": """
        from dataclasses import replace
        from polylm.errors import Declined
        from polylm.hookspecs import hookimpl
        from polylm_gemma import FAMILY

        def to_ir(config, task):
            raise Declined("refuses everything")

        @hookimpl
        def polylm_families():
            return [replace(FAMILY, name="refusing", to_ir=to_ir)]
    """,
}


@pytest.fixture
def declining(fake_root, monkeypatch):
    """A registry of the built-ins and two gemma plugins: `a_gemma` declines multi-query configs, `b_gemma`
    handles them with a note; `use()` makes it the one `polylm.load` and the CLI see."""
    points = {}
    for dist, entry, module in (("first-plugin", "a_gemma", "fake_polylm_mqa_averse"),
                                ("second-plugin", "b_gemma", "fake_polylm_noting"),
                                ("third-plugin", "c_gemma", "fake_polylm_refusing")):
        # each dist-info in its own folder, off sys.path, so that only `use` sees it; the modules on sys.path
        points[entry] = install_fake_distribution(fake_root / dist, dist, {entry: module})
        (fake_root / f"{module}.py").write_text(textwrap.dedent(DECLINING_PLUGINS[module]))

    def use(*entries, builtins=True):
        with warnings.catch_warnings(record=True):
            warnings.simplefilter("always")
            registry = Registry((builtin_points() if builtins else []) + [p for e in entries for p in points[e]])
        for module in ("polylm.loading.load", "polylm.loading.registry"):  # `load` names the module and a function
            monkeypatch.setattr(sys.modules[module], "registry", lambda: registry)
        return registry
    return use


def test_claimants_are_kept_in_priority_order(declining):
    registry = declining("b_gemma", "a_gemma")
    order = [(info.entry_point, family.name) for family, info in registry.claimants["gemma"]]
    assert order == [("a_gemma", "mqa-averse"), ("b_gemma", "noting"), ("gemma", "gemma")]
    assert registry.families["gemma"][0].name == "mqa-averse"
    assert registry.conflicts[-1] == ("model_type 'gemma' is claimed by a_gemma (first-plugin) and b_gemma "
                                      "(second-plugin) and gemma (polylm); using a_gemma, then the others for "
                                      "configs it declines")


def test_declined_variant_goes_to_the_next_plugin_with_notes(declining, make_ckpt):
    from polylm.family import FamilyNote

    declining("a_gemma", "b_gemma")
    with pytest.warns(FamilyNote) as caught:
        model = polylm.load(make_ckpt("gemma"), backend="torch")  # num_key_value_heads=1
    assert model.notes == ("a_gemma (first-plugin) declined this config (multi-query attention is not "
                           "supported); b_gemma (second-plugin) handles it", "runs without the fused kernel")
    assert [str(w.message) for w in caught] == list(model.notes)
    with warnings.catch_warnings():
        warnings.simplefilter("error", FamilyNote)
        handled_first = polylm.load(make_ckpt("gemma", num_key_value_heads=2), backend="torch")
    assert handled_first.notes == ()


def test_every_plugin_declining_names_file_and_reasons(declining, make_ckpt):
    declining("a_gemma", "c_gemma", builtins=False)
    directory = make_ckpt("gemma")
    message = (f"{directory / 'config.json'}: every family claiming model_type 'gemma' declined this config: "
               "a_gemma (first-plugin): multi-query attention is not supported; c_gemma (third-plugin): "
               "refuses everything")
    with pytest.raises(ConfigError) as error:
        polylm.load(directory, backend="torch")
    assert str(error.value) == message
    with pytest.raises(ConfigError, match="every family claiming"):
        polylm.loading.model_ir(directory)


def test_cli_prints_notes_and_fallbacks(declining, make_ckpt, capsys):
    from polylm.cli import main

    declining("a_gemma", "b_gemma")
    assert main(["run", "--model", str(make_ckpt("gemma")), "--backend", "torch", "--max-new-tokens", "2",
                 "hello"]) == 0
    err = capsys.readouterr().err
    assert "note: a_gemma (first-plugin) declined this config (multi-query attention is not supported)" in err
    assert "note: runs without the fused kernel" in err
    assert "FamilyNote" not in err  # a line for the user, not a Python warning
    assert main(["plugins"]) == 0
    out = capsys.readouterr().out
    assert "  gemma        second-plugin 1.2.3 (entry point b_gemma, for configs the one above declines)" in out
    assert "conflict: model_type 'gemma' is claimed by a_gemma (first-plugin) and b_gemma" in out
