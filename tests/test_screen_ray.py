"""`screen --engine ray` on a local Ray instance of 2 CPUs (started once for the module), with the
tiny trained bundle: the same lines as the local engine, bad files as error lines, a driver
killed with SIGKILL then resumed (every item exactly once), a worker killed mid-run (the job
completes), and a file that kills every worker it meets (bounded retries, then error lines).

Select with `-m ray`; skipped where the `ray` extra is not installed."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from runtime_fixtures import runtime_assets

ray = pytest.importorskip("ray")

from eyecare_edge.cli import main  # noqa: E402
from eyecare_edge.distributed.inputs import resolve_sources  # noqa: E402
from eyecare_edge.distributed.parts import PartsDir, list_parts  # noqa: E402
from eyecare_edge.distributed.ray_engine import RayScreenConfig, run_ray_screen  # noqa: E402
from eyecare_edge.screening import Question  # noqa: E402

pytestmark = pytest.mark.ray

FAST = ["--threads", "1", "--vision-threads", "1", "--no-progress"]
QUESTIONS = ("What is shown?", "Describe the image.", "Is this image normal?")


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


@pytest.fixture(scope="module")
def cluster():
    """One local Ray for the module (about 3 s to start); its address lets subprocess drivers join."""
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


def _images(assets, folder: Path, n: int) -> Path:
    """n files from the fixture's images, cycled under new names when n is larger (each path is
    its own item)."""
    folder.mkdir(parents=True, exist_ok=True)
    pool = assets.images
    for i in range(n):
        p = pool[i % len(pool)]
        name = p.name if i < len(pool) else f"{p.stem}-copy{i // len(pool)}{p.suffix}"
        (folder / name).write_bytes(p.read_bytes())
    return folder


def _raw_lines(out: Path) -> list[dict]:
    """Every line of every part, without the reader's dedupe: duplicates would show here."""
    rows = []
    for part in list_parts(out):
        rows.extend(json.loads(x) for x in part.read_text().splitlines() if x.strip())
    return rows


def test_ray_lines_equal_the_local_engine_and_bad_files_are_error_lines(assets, cluster, tmp_path):
    folder = _images(assets, tmp_path / "imgs", 6)
    (folder / "bad.jpg").write_text("text, not a JPEG")
    (folder / "empty.png").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("path,id\n" + "".join(f"{p},{p.stem}\n" for p in sorted(folder.iterdir())))
    qs = ["-q", QUESTIONS[0], "-q", QUESTIONS[1]]
    common = ["--task", "open", *qs, "--max-tokens", "12", *FAST]
    run = CliRunner().invoke
    r = run(main, ["screen", str(assets.bundle), str(folder), "-o", str(tmp_path / "local.jsonl"), *common])
    assert r.exit_code == 3, r.output  # 3: some items failed
    out = tmp_path / "ray"
    r = run(
        main,
        [
            "screen",
            str(assets.bundle),
            str(manifest),
            "-o",
            str(out),
            *common,
            "--engine",
            "ray",
            "--workers",
            "2",
        ],
    )
    assert r.exit_code == 3, r.output
    assert "14 item(s)" in r.stderr and "12 ok, 2 error(s)" in r.stderr and "items/s" in r.stderr

    local = {x["id"]: x for x in map(json.loads, (tmp_path / "local.jsonl").read_text().splitlines())}
    lines = _raw_lines(out)
    assert len(lines) == 14 == len({x["id"] for x in lines}) and set(local) == {x["id"] for x in lines}
    ray_only = {"source_id", "source_items", "worker", "timings"}
    for x in lines:
        assert {k: v for k, v in x.items() if k not in ray_only} == {
            k: v for k, v in local[x["id"]].items() if k not in ray_only
        }
        assert x["source_id"] == Path(x["path"]).stem  # the manifest's ids
    errors = {Path(x["path"]).name for x in lines if x["error"]}
    assert errors == {"bad.jpg", "empty.png"}
    assert sum(x["answer"] is not None for x in lines) == 12
    assert len({x["worker"] for x in lines}) == 2  # both actors took work

    ray_cmd = ["screen", str(assets.bundle), str(manifest), "-o", str(out), *common, "--engine", "ray"]
    r = run(main, ray_cmd)
    assert r.exit_code == 2 and "pass --resume" in r.output
    r = run(main, [*ray_cmd, "--resume"])  # nothing left to do: Ray is not even started
    assert r.exit_code == 3 and "14 already done" in r.stderr and "2 earlier error(s) kept" in r.stderr
    assert len(_raw_lines(out)) == 14
    r = run(
        main, ["screen", str(assets.bundle), str(folder), "-o", str(tmp_path / "x.jsonl"), "--workers", "2"]
    )
    assert r.exit_code == 2 and "need --engine ray" in r.output


# With the fixture model that answers in a few tokens, 16 files finished inside the driver's first
# part on an idle machine (48 of 48 lines before the kill): more files keep the kill mid-run.
N_KILL = 64


def test_driver_sigkill_then_resume_gives_every_item_exactly_once(assets, cluster, tmp_path):
    folder = _images(assets, tmp_path / "imgs", N_KILL)  # enough work to be killed mid-run
    qfile = tmp_path / "q.txt"
    qfile.write_text("\n".join(QUESTIONS) + "\n")
    out = tmp_path / "ray"
    cmd = [
        sys.executable, "-m", "eyecare_edge.cli", "screen", str(assets.bundle), str(folder), "-o", str(out),
        "--task", "open", "--questions", str(qfile), "--max-tokens", "24", *FAST,
        "--engine", "ray", "--address", cluster, "--workers", "2",
    ]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline and proc.poll() is None and not list_parts(out):
            time.sleep(0.01)
        assert proc.poll() is None, "the run ended before it could be killed: " + proc.stderr.read().decode()
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        proc.stderr.close()
    n_before = len(_raw_lines(out))
    assert 0 < n_before < N_KILL * 3

    r = subprocess.run([*cmd, "--resume"], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    assert f"{n_before} already done" in r.stderr
    lines = _raw_lines(out)
    assert len(lines) == N_KILL * 3 == len({x["id"] for x in lines})
    assert {(Path(x["path"]).name, x["question"]) for x in lines} == {
        (p.name, q) for p in folder.iterdir() for q in QUESTIONS
    }
    assert all(x["error"] is None for x in lines)


def _config(assets, questions, **kw) -> RayScreenConfig:
    from eyecare_edge.pipeline import PipelineOptions

    return RayScreenConfig(
        bundle=str(assets.bundle),
        options=PipelineOptions(),
        questions=questions,
        task="open",
        max_tokens=16,
        workers=2,
        **kw,
    )


def test_a_worker_killed_mid_run_is_restarted_and_the_job_completes(assets, cluster, tmp_path):
    from eyecare_edge.bundle import read_manifest

    folder = _images(assets, tmp_path / "imgs", 12)
    questions = [Question(q, q) for q in QUESTIONS[:2]]
    out = tmp_path / "ray"
    parts = PartsDir(out, digest=read_manifest(assets.bundle).digest(), resume=False)
    killed: list[int] = []

    def kill_first_worker(rows: list[dict]) -> None:
        if not killed:  # the actor that sent these has more batches queued: kill it mid-run
            pid = int(rows[0]["worker"].rsplit(":", 1)[1])
            os.kill(pid, signal.SIGKILL)
            killed.append(pid)

    summary = run_ray_screen(
        _config(assets, questions),
        resolve_sources([str(folder)]),
        parts,
        progress=False,
        on_rows=kill_first_worker,
    )
    lines = _raw_lines(out)
    assert killed and len(lines) == 24 == len({x["id"] for x in lines})
    assert summary.n_ok == 24 and summary.n_errors == 0 and summary.exit_code == 0
    with pytest.raises(ProcessLookupError):
        os.kill(killed[0], 0)


class _Poisoned:
    """Stands in for a pipeline that crashes in native code on one file: the worker process
    dies (os._exit) whenever it is asked about `poison.png`; other files get canned answers."""

    digest = "p" * 64

    def decode(self, source):
        from eyecare_edge.pipeline import decode_source

        if Path(source).name == "poison.png":
            os._exit(1)
        return decode_source(source)

    def ask(self, image, question, *, max_tokens=256):
        from types import SimpleNamespace

        return SimpleNamespace(
            text=f"ok {Path(image.name).name}",
            timings={"total_ms": 1.0},
            n_image_tokens=1,
            n_prompt_tokens=2,
            n_generated=1,
            stop_reason="eog",
            cached_prefix=False,
        )


def test_a_file_that_kills_every_worker_becomes_error_lines_after_bounded_retries(assets, cluster, tmp_path):
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # workers cannot import tests/
    folder = _images(assets, tmp_path / "imgs", 5)
    (folder / "poison.png").write_bytes(assets.images[0].read_bytes())
    out = tmp_path / "ray"
    parts = PartsDir(out, digest=_Poisoned.digest, resume=False)
    config = _config(assets, [Question("Q", "Q")], sources_per_batch=2, max_restarts=4, max_task_retries=1)
    summary = run_ray_screen(
        config, resolve_sources([str(folder)]), parts, progress=False, pipeline_factory=_Poisoned
    )
    lines = {Path(x["path"]).name: x for x in _raw_lines(out)}
    assert len(lines) == 6 and summary.n_crashed_sources == 1 and summary.exit_code == 3
    assert "worker process died on each of 2 tries" in lines["poison.png"]["error"]
    # its batch-mate was lost with the worker too, and then answered on its own
    assert all(x["answer"] == f"ok {name}" for name, x in lines.items() if name != "poison.png")


def test_the_local_engine_imports_no_ray(assets, tmp_path):
    """Ray installed, local engine run (manifest input too): `ray` never enters sys.modules."""
    listing = tmp_path / "list.txt"
    listing.write_text("".join(f"{p}\n" for p in assets.images[:2]))
    args = [
        str(assets.bundle),
        str(listing),
        "-o",
        str(tmp_path / "r.jsonl"),
        "--task",
        "open",
        "--max-tokens",
        "4",
    ]
    code = (
        "import sys\n"
        "from eyecare_edge.cli import main\n"
        "try:\n"
        f"    main(['screen', *{args!r}, *{FAST!r}])\n"
        "except SystemExit as e:\n"
        "    assert e.code == 0, e.code\n"
        "loaded = sorted(m for m in sys.modules if m == 'ray' or m.startswith('ray.'))\n"
        "assert not loaded, loaded\n"
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert len((tmp_path / "r.jsonl").read_text().splitlines()) == 2
