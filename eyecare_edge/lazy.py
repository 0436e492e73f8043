"""Names a package exports but imports only on first use (PEP 562), so importing it stays light.

Used by `eyecare_edge` (no OpenCV, ONNX Runtime or llama.cpp until a name needs them),
`eyecare_edge.export` (no torch) and `eyecare_edge.pipeline` (its options dataclass without
llama.cpp, for the CLI's `--help`).
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any


def lazy_exports(
    package: str, where: Mapping[str, str], namespace: dict[str, Any]
) -> tuple[Callable[[str], Any], Callable[[], list[str]]]:
    """The `__getattr__` and `__dir__` of `package`: `where` maps each public name to the module
    that defines it; a name, once imported, is kept in the package's `namespace` (its globals)."""

    def __getattr__(name: str) -> Any:
        module = where.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        value = getattr(importlib.import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return sorted(set(namespace) | set(where))

    return __getattr__, __dir__
