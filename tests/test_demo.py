"""`eyecare-edge demo` end to end on a shrunken recipe: every step runs (vision -> align -> sft ->
export -> bench -> screen), the report and screen files are written, a second run reuses every
cached step and repeats no answer, and a bench whose every item errors makes the demo fail."""

from __future__ import annotations

import functools
import json

from click.testing import CliRunner

from eyecare_edge.cli import main
from eyecare_edge.commands import demo as demo_module


def test_demo_runs_every_step_then_reuses_them(tmp_path, monkeypatch):
    small = functools.partial(
        demo_module.DemoRecipe,
        n_images=16,
        vision_steps=2,
        vision_batch=4,
        align_steps=1,
        train_steps=2,
        train_batch=2,
        bench_items=4,
    )
    monkeypatch.setattr(demo_module, "DemoRecipe", small)
    workdir = tmp_path / "demo"
    args = ["demo", "--workdir", str(workdir), "--threads", "2"]

    first = CliRunner().invoke(main, args)
    assert first.exit_code == 0, first.output
    state = json.loads((workdir / "demo_state.json").read_text())
    assert set(state) == {"data", "vision", "align", "sft", "train", "export", "bench", "screen"}
    assert (workdir / "ckpt/tiny-vision/vision_eval.json").is_file()
    assert (workdir / "ckpt/tiny-trained/model.safetensors").is_file()
    assert (workdir / "bundle/manifest.json").is_file()
    rows = json.loads((workdir / "report/report.json").read_text())
    accuracy = {
        r["system"]: r
        for r in rows
        if r["task"] == "closed" and r["modality"] == "all" and r["metric"] == "accuracy"
    }
    assert set(accuracy) == {
        "pytorch",
        "bundle vision=fp32 llm=f16",
        "bundle vision=int8_u8s8 llm=q4_k_m",
    }
    assert all(r["n"] == 4 for r in accuracy.values())
    assert {r["task"] for r in rows} == {"closed"}  # only the task the demo trained is benched
    screened = (workdir / "screen.jsonl").read_text().splitlines()
    assert screened and all(json.loads(line)["error"] is None for line in screened)
    assert "report:" in first.output and "closed-QA accuracy" in first.output

    second = CliRunner().invoke(main, args)
    assert second.exit_code == 0, second.output
    for step in (
        "phantom data: reusing",
        "vision: reusing",
        "align: reusing",
        "sft: reusing",
        "bundle: reusing",
    ):
        assert step in second.output
    assert "already done" in second.output
    assert (workdir / "screen.jsonl").read_text().splitlines() == screened
    results = sorted((workdir / "report/results").glob("*.jsonl"))
    assert len(results) == 3 and all(len(p.read_text().splitlines()) == 4 for p in results)

    by_kind = json.loads((workdir / "report/by_kind.json").read_text())
    assert by_kind["rows"][-1]["kind"] == "all" and by_kind["rows"][-1]["n"] == 4
    assert all(t["n_errors"] == 0 for t in by_kind["totals"].values())

    # a changed recipe retrains sft (a new checkpoint digest): the bench starts afresh, no clash
    monkeypatch.setattr(demo_module, "DemoRecipe", functools.partial(small, train_steps=3))
    retrained = CliRunner().invoke(main, args)
    assert retrained.exit_code == 0, retrained.output
    assert "sft: 3 steps" in retrained.output and "starting" in retrained.output
    assert all(len(p.read_text().splitlines()) == 4 for p in (workdir / "report/results").glob("*.jsonl"))
    assert len((workdir / "screen.jsonl").read_text().splitlines()) == len(screened)

    # every bench item errors (a broken bundle): the demo must not report success
    import shutil

    from eyecare_edge.bench import runner

    def broken(pipeline):
        def answer(images, question, max_tokens):
            raise RuntimeError("broken bundle")

        return answer

    monkeypatch.setattr(runner, "bundle_answerer", broken)
    shutil.rmtree(workdir / "report")
    third = CliRunner().invoke(main, args)
    assert third.exit_code == 3, third.output
    assert "bench items failed" in third.output


def test_training_threads_are_counted_without_the_llama_binding():
    """The demo trains with torch in the process that later runs llama.cpp. Importing the llama.cpp
    binding sets OMP_WAIT_POLICY=PASSIVE, and torch shares that one OpenMP runtime: with passive
    waits the vision stage ran ~40% slower (`eyecare_edge.cpus`). So counting the training threads
    must neither import llama_cpp nor set the policy (checked in a fresh interpreter: this one may
    have imported the binding already)."""
    import subprocess
    import sys

    code = (
        "import os, sys\n"
        "from eyecare_edge.commands.demo import DemoRecipe, _train_threads\n"
        "n = _train_threads(DemoRecipe(), None)\n"
        "assert n >= 1, n\n"
        "assert 'llama_cpp' not in sys.modules, 'the llama.cpp binding was imported'\n"
        "assert 'OMP_WAIT_POLICY' not in os.environ, os.environ['OMP_WAIT_POLICY']\n"
    )
    env = {k: v for k, v in __import__("os").environ.items() if k != "OMP_WAIT_POLICY"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
