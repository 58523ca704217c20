"""A package's public names, imported when first used (PEP 562).

Django imports every capability package when it loads ``idempotency.models``; a package whose
``__init__`` imported its public names at once would import Celery (the outbox) or DRF (the
HTTP keys) with it, and both are optional extras. Each package's ``__init__`` therefore maps
its public names to the submodules that hold them, and :func:`lazy_names` gives it the module
``__getattr__`` and ``__dir__`` that import a submodule on the first use of one of its names.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from importlib import import_module
from typing import Any


def lazy_names(
    package: str, names: Mapping[str, str]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """``__getattr__`` and ``__dir__`` for *package*; *names* maps each public name to its
    module, relative to the package (``".claiming"``)."""

    def getattr_(name: str) -> Any:
        try:
            module = names[name]
        except KeyError:
            raise AttributeError(f"module {package!r} has no attribute {name!r}") from None
        return getattr(import_module(module, package), name)

    def dir_() -> list[str]:
        return sorted({*vars(sys.modules[package]), *names})

    return getattr_, dir_
