"""Checks that say "passed" only when something was compared: an export with validate=False and a
TensorRT engine validated against a bundle without an FP32 ONNX record `passed: None`, never True;
`info` prints them as n/a. Closed-answer agreement never counts two unparseable answers."""

from __future__ import annotations

import numpy as np
from click.testing import CliRunner
from runtime_fixtures import runtime_assets

from eyecare_edge.bench.by_kind import agreement, by_kind
from eyecare_edge.bundle import read_manifest
from eyecare_edge.cli import main
from eyecare_edge.qa.records import BenchResult


def test_unvalidated_export_is_not_recorded_as_passed(tmp_path_factory):
    assets = runtime_assets(tmp_path_factory)  # exported with validate=False
    v = read_manifest(assets.bundle).validation["export"]
    assert v["validated"] is False and v["passed"] is None
    out = CliRunner().invoke(main, ["info", str(assets.bundle)])
    assert out.exit_code == 0, out.output
    assert "n/a  export" in out.output and "ok   export" not in out.output


def test_engine_without_fp32_onnx_is_not_validated(tmp_path_factory, monkeypatch):
    """Fake only the GPU engine runner (no GPU here); the comparison logic is the real one."""
    from eyecare_edge.vision import engine_build as te

    class FakeRunner:
        def __init__(self, path, device=0):
            pass

        def __enter__(self):
            return lambda tiles: np.zeros((tiles.shape[0], 4, 8), dtype=np.float32)

        def __exit__(self, *exc):
            return False

    monkeypatch.setattr(te, "EngineRunner", FakeRunner)
    manifest = read_manifest(runtime_assets(tmp_path_factory).bundle)
    manifest.files = [f for f in manifest.files if not (f.role == "vision" and f.precision == "fp32")]
    fig = te.validate_engine("unused", manifest, "engine.plan", "fp16", opt_tiles=1)
    assert fig["passed"] is None and fig["validated"] is False and "not validated" in fig["note"]


def _r(system, rid, pred, ref="A", error=None, kind_opts=None):
    opts = kind_opts or {"A": "Yes", "B": "No"}
    return BenchResult(system, rid, "closed", "fundus", pred, ref, opts, error=error)


def test_agreement_and_by_kind_never_count_unparseable_or_errors():
    ref = [_r("pytorch", "1", "A"), _r("pytorch", "2", "blurry"), _r("pytorch", "3", "B")]
    bun = [_r("b", "1", "A"), _r("b", "2", "I cannot tell"), _r("b", "3", None, error="RuntimeError: x")]
    assert agreement(bun, ref) == (1, 3)
    rows, totals = by_kind([*ref, *bun], {"1": "eye", "2": "eye", "3": "modality"}, reference="pytorch")
    assert [r.kind for r in rows] == ["eye", "modality", "all"]
    assert rows[-1].accuracy == {"pytorch": 1 / 3, "b": 1 / 3} and rows[-1].agreement == {"b": 1 / 3}
    assert totals["b"]["n_errors"] == 1 and totals["b"]["unparseable"] == 1 and totals["pytorch"]["unparseable"] == 1
    assert rows[0].chance == 0.5
