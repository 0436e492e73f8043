"""Export room (`eyecare_edge.export`): checkpoint -> bundle (vision ONNX/TensorRT, LLM GGUF), with validation.

    from eyecare_edge.export import export_bundle, ExportOptions
    export_bundle("ckpt/eyecare-3.8b", "bundles/eyecare-3.8b", ExportOptions(llm=("q4_k_m",)))

The names below are imported on first use: `import eyecare_edge.export` alone loads no torch.
"""

from __future__ import annotations

from eyecare_edge.lazy import lazy_exports

# public name -> the module that defines it.
_PUBLIC: dict[str, str] = {
    "export_bundle": "eyecare_edge.export.exporter",
    "ExportOptions": "eyecare_edge.export.exporter",
    "ExportResult": "eyecare_edge.export.exporter",
    "ExportError": "eyecare_edge.export.exporter",
    "ExportFailed": "eyecare_edge.export.exporter",
}

__all__ = list(_PUBLIC)


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, globals())
