"""Export room (`eyecare_edge.export`): checkpoint -> bundle (vision ONNX/TensorRT, LLM GGUF), with validation.

    from eyecare_edge.export import export_bundle, ExportOptions
    export_bundle("ckpt/eyecare-3.8b", "bundles/eyecare-3.8b", ExportOptions(llm=("q4_k_m",)))

The names below are imported on first use: `import eyecare_edge.export` alone loads no torch.
"""

from __future__ import annotations

import importlib
from typing import Any

# public name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    "export_bundle": "eyecare_edge.export.exporter",
    "ExportOptions": "eyecare_edge.export.exporter",
    "ExportResult": "eyecare_edge.export.exporter",
    "ExportError": "eyecare_edge.export.exporter",
    "ExportFailed": "eyecare_edge.export.exporter",
}

__all__ = list(_PUBLIC)


def __getattr__(name: str) -> Any:
    """Import a public name's module on first use (PEP 562) and keep the name here."""
    module = _PUBLIC.get(name)
    if module is None:
        raise AttributeError(f"module 'eyecare_edge.export' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
