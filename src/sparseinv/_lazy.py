"""Package attributes imported on first use (PEP 562), so ``sparseinv --help`` never loads torch."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable


def lazy_exports(package: str, exports: dict[str, str]) -> tuple[Callable[[str], object], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for ``package`` whose ``name`` lives in module ``exports[name]``.

    The first access imports the module and stores the value on the package, so later
    accesses (and ``monkeypatch.setattr`` in tests) see an ordinary attribute.
    """

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
