"""eyecare-edge: EyecareGPT from training to fast, validated edge inference.

The runtime package (`eyecare_edge` proper) never imports torch or transformers; the rooms that do
(`eyecare_edge.training`, `eyecare_edge.export`, `eyecare_edge.calibration`) are imported only by
the commands that need them. See ARCHITECTURE.md.

The names a camera-software or clinic engineer needs are here, each imported on first use so that
`import eyecare_edge` stays light (no OpenCV, ONNX Runtime or llama.cpp until a name needs them):

    from eyecare_edge import Pipeline, load_image
    with Pipeline.load("bundles/eyecare-3.8b") as pipe:
        print(pipe.ask(load_image("fundus.jpg"), "Is there diabetic retinopathy?").text)

Export (needs the `export` extra: torch) is `from eyecare_edge.export import export_bundle`.
"""

from __future__ import annotations

from eyecare_edge.lazy import lazy_exports

__version__ = "0.1.0"

# public name -> the module that defines it (imported when the name is first used).
_PUBLIC: dict[str, str] = {
    # run a bundle
    "Pipeline": "eyecare_edge.pipeline",
    "PipelineOptions": "eyecare_edge.pipeline",
    "Answer": "eyecare_edge.pipeline",
    # images
    "load_image": "eyecare_edge.images",
    "load_images": "eyecare_edge.images",
    "DecodedImage": "eyecare_edge.image_types",
    # bundles
    "read_manifest": "eyecare_edge.bundle",
    "verify_bundle": "eyecare_edge.bundle",
    "Manifest": "eyecare_edge.bundle",
    # batch screening (what `eyecare-edge screen` runs)
    "run_screen": "eyecare_edge.screening",
    "scan_inputs": "eyecare_edge.screening",
    "load_questions": "eyecare_edge.screening",
    "default_questions": "eyecare_edge.screening",
    "Question": "eyecare_edge.screening",
    "ResultsFile": "eyecare_edge.screening",
    "ScreenSummary": "eyecare_edge.screening",
    # formats and presets
    "export_formats": "eyecare_edge.formats",
    "ExportFormat": "eyecare_edge.formats",
    "PRESETS": "eyecare_edge.presets",
    # errors: catch EyecareError for all of them; exit_code says what the CLI would exit with
    "EyecareError": "eyecare_edge.errors",
    "EyecareUsageError": "eyecare_edge.errors",
    "ItemsFailed": "eyecare_edge.errors",
    "EXIT_CODES": "eyecare_edge.errors",
    "BundleError": "eyecare_edge.bundle",
    "ImageError": "eyecare_edge.image_types",
    "VisionError": "eyecare_edge.vision",
    "LLMError": "eyecare_edge.llm",
    "ScreenError": "eyecare_edge.screening",
}

__all__ = ["__version__", *_PUBLIC]


__getattr__, __dir__ = lazy_exports(__name__, _PUBLIC, globals())
