"""The public names of spectrakit, and a check that each is documented with its parameters.

Used by the docs build (``docs/_hooks/checks.py``) and by the test suite. A public name
is one listed in the ``__all__`` of a documented module. A function or class passes when
it has a docstring and every one of its parameters (other than ``self``, ``cls``,
``*args`` and ``**kwargs``, and private ``_fields``) is named in its own docstring. For
a class that is the docstring of the class or its ``__init__``, or of a base class for
the parameters the base class defines (``include``/``exclude`` of every penalty).
"""

from __future__ import annotations

import importlib
import inspect
import re
from collections.abc import Iterator
from typing import Any

DOCUMENTED_MODULES = (
    "spectrakit",
    "spectrakit.linalg",
    "spectrakit.weights",
    "spectrakit.analyze",
    "spectrakit.regularize",
    "spectrakit.adapt",
    "spectrakit.compress",
    "spectrakit.optimize",
    "spectrakit.data",
    "spectrakit.reference",
)


def documented_modules() -> list[str]:
    """The modules whose ``__all__`` makes up the API reference (those that import here)."""
    found = []
    for name in DOCUMENTED_MODULES:
        try:
            importlib.import_module(name)
        except ModuleNotFoundError as error:
            if error.name != name:
                raise
            continue
        found.append(name)
    return found


def public_objects(module_name: str) -> Iterator[tuple[str, Any]]:
    """Yield ``(qualified name, object)`` for the functions and classes in a module's ``__all__``."""
    module = importlib.import_module(module_name)
    for name in getattr(module, "__all__", ()):
        value = getattr(module, name)
        if inspect.isclass(value) or inspect.isfunction(value):
            yield f"{module_name}.{name}", value


def _named(parameter: str, text: str) -> bool:
    return re.search(rf"(?<![\w]){re.escape(parameter)}(?![\w])", text) is not None


def undocumented(qualname: str, value: Any) -> list[str]:
    """Problems with one public object's documentation: a missing docstring or unnamed parameters."""
    own = inspect.getdoc(value) or ""
    if not own.strip() or (inspect.isclass(value) and value.__doc__ is None):
        return [f"{qualname}: no docstring"]
    context = own
    target = value
    if inspect.isclass(value):
        init = value.__dict__.get("__init__")
        if init is None:
            return []
        for klass in value.__mro__:
            if klass.__module__.startswith("spectrakit"):
                own_init = klass.__dict__.get("__init__")
                context += "\n" + (klass.__doc__ or "") + "\n" + (getattr(own_init, "__doc__", None) or "")
        target = init
    try:
        signature = inspect.signature(target)
    except (TypeError, ValueError):
        return []
    skipped_kinds = (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD)
    missing = [p.name for p in signature.parameters.values()
               if p.name not in ("self", "cls") and not p.name.startswith("_") and p.kind not in skipped_kinds
               and not _named(p.name, context)]
    return [f"{qualname}: parameter {name!r} is not described in its docstring" for name in missing]


def all_problems() -> list[str]:
    """Every documentation problem of every public name."""
    problems: list[str] = []
    seen: set[int] = set()
    for module_name in documented_modules():
        for qualname, value in public_objects(module_name):
            if id(value) in seen:
                continue
            seen.add(id(value))
            problems += undocumented(qualname, value)
    return problems


if __name__ == "__main__":
    found = all_problems()
    print("\n".join(found) or "every public name is documented")
    raise SystemExit(1 if found else 0)
