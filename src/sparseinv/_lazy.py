"""Package attributes imported on first use (PEP 562), so ``sparseinv --help`` never loads torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys
import types
from collections.abc import Callable


class _LazyPackage(types.ModuleType):
    """A package whose exported names win over its sub-modules of the same name.

    ``sparseinv.quant`` exports the function ``calibrate`` and holds the module
    ``calibrate.py``; importing the module makes Python bind it on the package, which
    would hide the function from ``from sparseinv.quant import calibrate``. That binding is
    skipped, so the name resolves to the exported object on first use, as it did when the
    package imported everything at start-up.
    """

    _exports: dict[str, str] = {}

    def __setattr__(self, name: str, value: object) -> None:
        if name in self._exports and isinstance(value, types.ModuleType) and value.__name__ == f"{self.__name__}.{name}":
            return
        super().__setattr__(name, value)


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose ``name`` lives in module ``exports[name]``.

    The first access imports the module and stores the value on the package, so later
    accesses (and ``monkeypatch.setattr`` in tests) see an ordinary attribute.
    """
    module_object = sys.modules[package]
    module_object.__class__ = type("LazyPackage", (_LazyPackage,), {"_exports": exports})

    def __getattr__(name: str) -> object:
        module = exports.get(name)
        if module is None:
            # A sub-package or module (``sparseinv.quant``) is an attribute once imported, as it was
            # when the package imported everything at start-up.
            if importlib.util.find_spec(f"{package}.{name}") is None:
                raise AttributeError(f"module {package!r} has no attribute {name!r}")
            return importlib.import_module(f"{package}.{name}")
        value = getattr(importlib.import_module(module), name)
        setattr(sys.modules[package], name, value)
        return value

    def __dir__() -> list[str]:
        return sorted({*vars(sys.modules[package]), *exports})

    return __getattr__, __dir__


def moved_to(module: str) -> Callable[[str], object]:
    """``__getattr__`` for a module's older path: every name is ``module``'s, imported on first use.

    The old module names its new home as a string only, so a layer that once held it (the
    inversion engine, distillation) imports nothing from the runs layer above it.
    """

    def __getattr__(name: str) -> object:
        return getattr(importlib.import_module(module), name)

    return __getattr__
