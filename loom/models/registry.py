"""The model families loom knows: each registers its :class:`~loom.models.spec.ModelSpec` when its
package is imported (``loom.models`` imports them all)."""

from __future__ import annotations

from loom.errors import ConfigError
from loom.models.spec import ModelSpec

_FAMILIES: dict[str, ModelSpec] = {}


def register(spec: ModelSpec) -> ModelSpec:
    """Make ``spec`` the family ``model.arch={spec.name}``; its presets join the others'."""
    if spec.name in _FAMILIES and _FAMILIES[spec.name] is not spec:
        raise ValueError(f"a model family named {spec.name!r} is already registered")
    if spec.pipeline.tied:
        raise ValueError(f"family {spec.name!r} lists tied pairs in its pipeline split; they depend on the "
                         "config: give them as ModelSpec.tied(cfg)")
    taken = {p: f.name for f in _FAMILIES.values() if f is not spec for p in f.presets}
    clash = sorted(set(spec.presets) & set(taken))
    if clash:
        raise ValueError(f"family {spec.name!r} redefines presets of {taken[clash[0]]!r}: {', '.join(clash)}")
    _FAMILIES[spec.name] = spec
    return spec


def families() -> dict[str, ModelSpec]:
    """Every registered family by name, in registration order."""
    return dict(_FAMILIES)


def spec_of(cfg_or_arch) -> ModelSpec:
    """The spec of a model config's family (or of a family name)."""
    arch = cfg_or_arch if isinstance(cfg_or_arch, str) else cfg_or_arch.arch
    if arch not in _FAMILIES:
        raise ConfigError(f"model.arch={arch!r} is not a known model family; valid: {', '.join(_FAMILIES)}")
    return _FAMILIES[arch]


def presets() -> dict[str, dict]:
    """Every family's presets by name (each holds its ``arch``)."""
    return {name: {"arch": f.name, **shape} for f in _FAMILIES.values() for name, shape in f.presets.items()}


def published_params() -> dict[str, float]:
    """Parameter counts as their papers publish them, by preset."""
    return {name: n for f in _FAMILIES.values() for name, n in f.published_params.items()}
