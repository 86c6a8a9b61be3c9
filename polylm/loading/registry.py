"""Finds family and backend plugins through the `polylm` entry-point group, each loaded in isolation.

Built-in families and backends are found exactly like third-party ones. A plugin that fails to import,
raises from a hook, or returns records of another API version is recorded in `failures` and skipped.

Several families may claim one `model_type`; all are kept, in the order they are tried: plugins from other
distributions before polylm's built-ins (so a third party can replace a built-in family), then by entry-point
name. The first whose `to_ir` does not raise `Declined` maps the config (`Registry.select`). A warning names
the claimants.
"""

from __future__ import annotations

import importlib.metadata as metadata
import warnings
from dataclasses import dataclass
from functools import lru_cache
from typing import Iterable

import pluggy

from .. import backend as backend_api
from .. import family as family_api
from .. import hookspecs
from ..backend import Backend
from ..config import ConfigView
from ..errors import BackendError, ConfigError, Declined, IRError, PluginError, TaskError
from ..family import Family, Mapped

GROUP = "polylm"
BUILTIN_DISTRIBUTION = "polylm"


@dataclass(frozen=True)
class PluginInfo:
    """Which entry point and distribution registered something."""

    entry_point: str
    distribution: str
    version: str


@dataclass(frozen=True)
class Failure:
    """A plugin that could not be used, and why."""

    entry_point: str
    distribution: str
    error: str


class Registry:
    """The families and backends installed here."""

    def __init__(self, entry_points: Iterable[metadata.EntryPoint] | None = None) -> None:
        self.manager = pluggy.PluginManager(hookspecs.PROJECT)
        self.manager.add_hookspecs(hookspecs)
        self.claimants: dict[str, list[tuple[Family, PluginInfo]]] = {}
        self.backends: dict[str, tuple[Backend, PluginInfo]] = {}
        self.failures: list[Failure] = []
        self.conflicts: list[str] = []
        points = metadata.entry_points(group=GROUP) if entry_points is None else entry_points
        for point in sorted(points, key=lambda p: p.name):
            self._load(point)

    def _load(self, point: metadata.EntryPoint) -> None:
        dist = point.dist.metadata["Name"] if point.dist is not None else "?"
        info = PluginInfo(point.name, dist, point.dist.version if point.dist is not None else "?")
        try:
            module = point.load()
            self.manager.register(module, name=f"{dist}:{point.name}")
            self.manager.check_pending()
        except Exception as exc:  # noqa: BLE001 - any plugin failure is isolated and reported
            self._fail(point, dist, exc)
            return
        for hook, adder in ((self.manager.hook.polylm_families, self._add_family),
                            (self.manager.hook.polylm_backends, self._add_backend)):
            for impl in hook.get_hookimpls():
                if impl.plugin_name != f"{dist}:{point.name}":
                    continue
                try:
                    for record in impl.function() or ():
                        adder(record, info)
                except Exception as exc:  # noqa: BLE001
                    self._fail(point, dist, exc)

    def _fail(self, point: metadata.EntryPoint, dist: str, exc: Exception) -> None:
        self.failures.append(Failure(point.name, dist, f"{type(exc).__name__}: {exc}"))

    @property
    def families(self) -> dict[str, tuple[Family, PluginInfo]]:
        """The family tried first for each model_type."""
        return {model_type: claimants[0] for model_type, claimants in self.claimants.items()}

    def _add_family(self, family: Family, info: PluginInfo) -> None:
        _check_version(family, family_api.API_VERSION, "family", info)
        for model_type in family.model_types:
            claimants = self.claimants.setdefault(model_type, [])
            claimants.append((family, info))
            # stable: entry points arrive sorted by name
            claimants.sort(key=lambda claimant: claimant[1].distribution == BUILTIN_DISTRIBUTION)
            if len(claimants) > 1:
                names = [f"{i.entry_point} ({i.distribution})" for _, i in claimants]
                message = (f"model_type {model_type!r} is claimed by {' and '.join(names)}; using "
                           f"{claimants[0][1].entry_point}, then the others for configs it declines")
                self.conflicts.append(message)
                warnings.warn(message, stacklevel=2)

    def _add_backend(self, backend: Backend, info: PluginInfo) -> None:
        _check_version(backend, backend_api.API_VERSION, "backend", info)
        if backend.name in self.backends:
            message = f"backend {backend.name!r} registered twice; keeping {self.backends[backend.name][1].entry_point}"
            self.conflicts.append(message)
            warnings.warn(message, stacklevel=2)
            return
        self.backends[backend.name] = (backend, info)

    def family(self, model_type: str, where: str = "config.json") -> Family:
        """The family for `model_type`, or a `ConfigError` listing the installed ones."""
        if model_type not in self.families:
            known = ", ".join(sorted(self.families)) or "none"
            raise ConfigError(f"{where}: unknown model_type {model_type!r}; installed families handle: {known}")
        return self.families[model_type][0]

    def select(self, config: ConfigView, task: str) -> tuple[Family, Mapped]:
        """The first family claiming config.json's `model_type` that offers `task` and does not decline the
        config, with its mapping; its notes start with one per family that declined. A `TaskError` when no
        claimant offers the task; a `ConfigError` naming each claimant's reason when all decline."""
        model_type = config.get("model_type", kind=str)
        self.family(model_type, str(config.path))  # refuses an unknown model_type
        claimants = self.claimants[model_type]
        if not any(task in family.tasks for family, _ in claimants):
            first = claimants[0][0]
            raise TaskError(f"task {task!r} is not supported by family {first.name!r}; supported: "
                            f"{', '.join(first.tasks)}")
        declined = []
        for family, info in claimants:
            who = f"{info.entry_point} ({info.distribution})"
            if task not in family.tasks:
                declined.append((who, f"does not offer task {task!r}"))
                continue
            try:
                mapped = family.map(config, task)
            except Declined as exc:
                declined.append((who, str(exc)))
                continue
            except IRError as exc:  # an IR node refused a value: name the config it came from
                if str(exc).startswith(str(config.path)):
                    raise
                raise IRError(f"{config.path}: {exc}") from None
            notes = tuple(f"{other} declined this config ({why}); {who} handles it" for other, why in declined)
            return family, Mapped(mapped.ir, notes + mapped.notes)
        reasons = "; ".join(f"{who}: {why}" for who, why in declined)
        raise ConfigError(f"{config.path}: every family claiming model_type {model_type!r} declined this "
                          f"config: {reasons}")

    def ranked_backends(self) -> list[Backend]:
        """Backends by decreasing priority (the order `auto` tries them in)."""
        return sorted((b for b, _ in self.backends.values()), key=lambda b: (-b.priority, b.name))

    def names(self) -> list[str]:
        """The installed backends' names, in auto-selection order."""
        return [b.name for b in self.ranked_backends()]

    def _unavailable(self) -> list[str]:
        """Why each installed backend does not run here, with how to install what it needs."""
        reasons = []
        for candidate in self.ranked_backends():
            state = candidate.availability()
            needs_install = candidate.install_hint and not state.installed
            hint = f" (install with: {candidate.install_hint})" if needs_install else ""
            reasons.append(f"{candidate.name}: {state.reason}{hint}")
        return reasons or ["none is installed"]

    def backend(self, name: str) -> Backend:
        """The named backend if it is available here, or the best available one for `auto`."""
        if name == "auto":
            for candidate in self.ranked_backends():
                state = candidate.availability()
                if state.available and state.auto:
                    return candidate
            raise BackendError("no backend is available: " + "; ".join(self._unavailable()))
        if name not in self.backends:
            known = ", ".join(sorted(self.backends)) or "none"
            raise BackendError(f"unknown backend {name!r}; installed backends: {known}")
        chosen = self.backends[name][0]
        state = chosen.availability()
        if not state.available:
            hint = f"; install with: {chosen.install_hint}" if chosen.install_hint and not state.installed else ""
            raise BackendError(f"backend {name!r} is not available here: {state.reason}{hint}")
        return chosen


def _check_version(record: object, expected: int, kind: str, info: PluginInfo) -> None:
    found = getattr(record, "api_version", None)
    if found != expected:
        raise PluginError(f"{kind} record {getattr(record, 'name', record)!r} from {info.distribution} targets "
                          f"polylm plugin API {found}, this polylm speaks API {expected}; upgrade the plugin")


@lru_cache(maxsize=1)
def registry() -> Registry:
    """The process-wide registry (built on first use)."""
    return Registry()
