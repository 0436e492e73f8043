"""The curated public API: `from eyecare_edge import Pipeline, ...` and `from eyecare_edge.export import
export_bundle`, imported lazily so `import eyecare_edge` stays light."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("cv2", "onnxruntime", "llama_cpp", "numpy", "pydicom", "torch", "transformers", "openvino")


def _run(code: str) -> None:
    subprocess.run([sys.executable, "-c", code], check=True)


def test_import_is_light_until_a_name_is_used():
    _run(
        "import sys, eyecare_edge\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert 'eyecare_edge.pipeline' not in sys.modules\n"
        "from eyecare_edge import EyecareError, export_formats, __version__\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy  # errors and formats are plain Python\n"
        "from eyecare_edge import Pipeline\n"
        "assert 'llama_cpp' in sys.modules and 'torch' not in sys.modules\n"
    )


def test_export_package_is_lazy_too():
    _run(
        "import sys, eyecare_edge.export as x\n"
        "assert 'eyecare_edge.export.exporter' not in sys.modules and 'torch' not in sys.modules\n"
        "from eyecare_edge.export import export_bundle\n"
        "from eyecare_edge.export.exporter import export_bundle as direct\n"
        "assert export_bundle is direct and 'torch' not in sys.modules\n"
    )


def test_every_public_name_resolves_to_its_definition():
    import eyecare_edge.export

    import eyecare_edge

    assert eyecare_edge.__all__[0] == "__version__" and len(set(eyecare_edge.__all__)) == len(
        eyecare_edge.__all__
    )
    for name in eyecare_edge.__all__:
        value = getattr(eyecare_edge, name)
        if hasattr(value, "__module__") and callable(value):
            assert value.__module__.startswith("eyecare_edge."), name
        assert name in dir(eyecare_edge)
    for name in eyecare_edge.export.__all__:
        assert getattr(eyecare_edge.export, name).__module__ == "eyecare_edge.export.exporter"
    for name in ("Pipeline", "load_image", "read_manifest", "verify_bundle", "run_screen", "EyecareError"):
        assert name in eyecare_edge.__all__
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        eyecare_edge.nope  # noqa: B018
    with pytest.raises(ImportError):
        exec("from eyecare_edge.export import nope")


def test_public_errors_share_the_base():
    import eyecare_edge as ee

    for name in (
        "EyecareUsageError",
        "ItemsFailed",
        "BundleError",
        "ImageError",
        "VisionError",
        "LLMError",
        "ScreenError",
    ):
        assert issubclass(getattr(ee, name), ee.EyecareError), name
    assert ee.EXIT_CODES[ee.ItemsFailed.exit_code].startswith("a batch finished")
    assert next(f.name for f in ee.export_formats() if f.role == "vision") == "fp32"
