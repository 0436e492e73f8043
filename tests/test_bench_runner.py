"""`eyecare-edge bench` end to end: bundle variants + PyTorch reference, report files, resume."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner
from runtime_fixtures import runtime_assets

from eyecare_edge.bench.runner import Variant, parse_variant, select_records
from eyecare_edge.cli import main


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


def test_parse_variant():
    assert parse_variant("vision=int8,llm=q4_k_m") == Variant("int8", "q4_k_m")
    assert parse_variant("llm=F16") == Variant("auto", "f16")
    with pytest.raises(ValueError, match="bad variant"):
        parse_variant("gpu=yes")


def test_bench_cli_reference_and_variants_then_resume(assets, tmp_path):
    out = tmp_path / "report"
    args = [
        "bench",
        str(assets.bundle),
        str(assets.bench),
        "-o",
        str(out),
        "--reference",
        str(assets.checkpoint),
        "--limit",
        "3",
        "--variant",
        "vision=fp32,llm=f32",
        "--variant",
        "vision=int8_u8s8,llm=q4_k_m",
        "--threads",
        "1",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 0, r.output
    rows = json.loads((out / "report.json").read_text())
    systems = {row["system"] for row in rows}
    assert systems >= {"pytorch", "bundle vision=fp32 llm=f32", "bundle vision=int8_u8s8 llm=q4_k_m"}
    assert all(set(row) == {"system", "task", "modality", "metric", "value", "n"} for row in rows)
    assert any(row["modality"] == "all" for row in rows)
    md = (out / "report.md").read_text()
    assert "pytorch" in md and "synthetic" in md.lower()
    results = sorted((out / "results").glob("*.jsonl"))
    counts = {p.name: len(p.read_text().splitlines()) for p in results}
    assert len(results) == 3 and all(n > 0 for n in counts.values())
    # the F32 bundle answers exactly as the PyTorch reference (greedy, F32 KV, no flash attention)
    ref = {
        json.loads(line)["record_id"]: json.loads(line)["prediction"]
        for line in (out / "results/pytorch.jsonl").read_text().splitlines()
    }
    f32 = {
        json.loads(line)["record_id"]: json.loads(line)["prediction"]
        for line in (out / "results/bundle_vision-fp32_llm-f32.jsonl").read_text().splitlines()
    }
    assert ref.keys() == f32.keys()
    assert sum(ref[k] == f32[k] for k in ref) / len(ref) >= 0.98
    # timings are seconds under `_s` names, and the stages add up to no more than the total
    timings = json.loads((out / "results/bundle_vision-fp32_llm-f32.jsonl").read_text().splitlines()[0])[
        "timings"
    ]
    assert timings and all(k.endswith("_s") for k in timings), timings
    assert 0 < timings["prefill_s"] <= timings["total_s"]
    # a second run answers nothing again and rewrites the same report
    again = CliRunner().invoke(main, args)
    assert again.exit_code == 0, again.output
    assert {p.name: len(p.read_text().splitlines()) for p in results} == counts


def test_select_records_limits_per_task(assets):
    from eyecare_edge.qa.loaders import load_bench

    records = load_bench(assets.bench)
    picked = select_records(records, limit=2, tasks=["closed", "report"])
    assert {r.task for r in picked} <= {"closed", "report"}
    assert max(sum(r.task == t for r in picked) for t in ("closed", "report")) <= 2


def test_bench_bad_inputs(assets, tmp_path):
    r = CliRunner().invoke(
        main,
        ["bench", str(assets.bundle), str(assets.bench), "-o", str(tmp_path / "x"), "--variant", "speed=max"],
    )
    assert r.exit_code == 1 and "bad variant" in r.output
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    r = CliRunner().invoke(main, ["bench", str(assets.bundle), str(empty), "-o", str(tmp_path / "y")])
    assert r.exit_code == 1
