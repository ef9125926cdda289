"""The method registry: one module per pretraining method, one `Method` each (see `sonocl.methods.base`).

Adding a method is one new module that defines ``METHOD`` plus its line in `_MODULES` (``docs/internals.md`` has a
worked example). The CLI's ``--method`` choices, its per-method flags and the presets all come from here.
"""

from __future__ import annotations

import importlib

from sonocl.errors import ConfigError
from sonocl.methods.base import Method
from sonocl.methods.config import Options, option

_MODULES = ("simclr", "uscl", "meta_uscl", "awcl", "ivpp", "moco", "byol", "dino", "mae")
"""The method modules, in the order of ``sonocl pretrain --help`` (the one list to extend)."""

_REGISTRY: dict[str, Method] = {}


def registry() -> dict[str, Method]:
    """Name → `Method` of every registered method (imported on first use: the modules import torch)."""
    if not _REGISTRY:
        for module in _MODULES:
            method = importlib.import_module(f"sonocl.methods.{module}").METHOD
            _REGISTRY[method.name] = method
    return _REGISTRY


def method_names() -> tuple[str, ...]:
    """The registered names (``meta-uscl`` for the module ``meta_uscl``)."""
    return tuple(registry())


def get_method(name: str) -> Method:
    """The registered method ``name``; a `ConfigError` listing the choices otherwise."""
    methods = registry()
    if name not in methods:
        raise ConfigError(f"unknown method {name!r}; choose one of {', '.join(methods)}")
    return methods[name]


__all__ = ["Method", "Options", "get_method", "method_names", "option", "registry"]
