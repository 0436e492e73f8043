"""The runtime package must never pull in torch, transformers or gguf (Jetson/camera installs lack them)."""

from __future__ import annotations

import subprocess
import sys

import pytest

RUNTIME_MODULES = [
    "eyecare_edge",
    "eyecare_edge.cli",
    "eyecare_edge.images",
    "eyecare_edge.preprocess",
    "eyecare_edge.layout",
    "eyecare_edge.reduce",
    "eyecare_edge.bundle",
    "eyecare_edge.gguf_header",
    "eyecare_edge.costs",
    "eyecare_edge.prefill_estimate",
    "eyecare_edge.prompts",
    "eyecare_edge.qa.loaders",
    "eyecare_edge.bench.metrics",
    "eyecare_edge.bench.report",
    "eyecare_edge.bench.runner",
    "eyecare_edge.llm",
    "eyecare_edge.vision",
    "eyecare_edge.pipeline",
    "eyecare_edge.screening",
    "eyecare_edge.vision.tensorrt",
    "eyecare_edge.vision.engines",
    "eyecare_edge.versions",
    "eyecare_edge.doctor",
    "eyecare_edge.commands.doctor",
    "eyecare_edge.commands.ask",
    "eyecare_edge.commands.screen",
    "eyecare_edge.commands.bench",
    "eyecare_edge.commands.build_engine",
    "eyecare_edge.clinical",
    "eyecare_edge.clinical.sr",
    "eyecare_edge.clinical.fhir",
    "eyecare_edge.grammar",
    "eyecare_edge.prefix_cache",
    "eyecare_edge.serve.app",
    "eyecare_edge.serve.screen",
    "eyecare_edge.serve.screen_schema",
    "eyecare_edge.commands.serve",
    "eyecare_edge.phantom",
    "eyecare_edge.commands.synth",
]


@pytest.mark.parametrize("module", RUNTIME_MODULES)
def test_runtime_module_imports_without_torch(module):
    code = (
        f"import sys, importlib; importlib.import_module({module!r}); "
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate', 'gguf') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cli_help_lists_commands_without_torch():
    code = (
        "import sys; from click.testing import CliRunner; from eyecare_edge.cli import main; "
        "r = CliRunner().invoke(main, ['--help']); assert r.exit_code == 0, r.output; "
        "assert 'inspect' in r.output and 'export' in r.output; "
        "r = CliRunner().invoke(main, ['inspect', '--help']); assert r.exit_code == 0; "
        "assert 'torch' not in sys.modules"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_vision_import_loads_no_backend_library():
    """onnxruntime, OpenVINO and TensorRT are imported when a backend is opened, not with the
    package: a camera PC without TensorRT or a Jetson without OpenVINO imports it cheaply."""
    code = (
        "import sys, eyecare_edge.vision, eyecare_edge.vision.engines, eyecare_edge.vision.engine_build; "
        "loaded = [m for m in ('tensorrt', 'onnxruntime', 'openvino', 'torch') if m in sys.modules]; "
        "assert not loaded, loaded"
    )
    subprocess.run([sys.executable, "-c", code], check=True)
