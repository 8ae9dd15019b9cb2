"""The methods by name: each method module registers its class with :func:`register`, and
:func:`method_class` finds it.

Discovery instead of a hand-kept list: on the first lookup every module of the
:mod:`imgx3d.methods` package is imported (so a new method is one new file there), lazily, so
that ``imgx3d --help`` stays fast. A module of its own at the bottom of the package: the config
resolves ``method.name`` to its config dataclass here without importing the methods package
(which imports the config).
"""

from __future__ import annotations

import importlib
import pkgutil

from imgx3d.errors import ConfigError

METHOD_PACKAGE = "imgx3d.methods"
METHODS: dict[str, type] = {}  # name → the registered Method subclass


def register(cls: type) -> type:
    """Class decorator of a method module: make the method available by its ``name``."""
    METHODS[cls.name] = cls
    return cls


def discover() -> None:
    """Import every module of :data:`METHOD_PACKAGE` (each registers its methods)."""
    package = importlib.import_module(METHOD_PACKAGE)
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"{METHOD_PACKAGE}.{module.name}")


def method_class(name: str) -> type:
    """The registered class of method ``name`` (a one-line config error naming the available ones)."""
    if name not in METHODS:
        discover()
    if name not in METHODS:
        raise ConfigError(f"config key 'method.name': unknown method '{name}'; available: {', '.join(sorted(METHODS))}")
    return METHODS[name]
