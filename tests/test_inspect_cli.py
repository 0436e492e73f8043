"""`eyecare-edge inspect` on real images and broken files."""

from __future__ import annotations

import json

from click.testing import CliRunner

from eyecare_edge.cli import main


def test_inspect_real_images_json(shared_data, tmp_path):
    broken = tmp_path / "broken.jpg"
    broken.write_text("not an image")
    fundus = shared_data / "hrf/images/01_dr.JPG"
    oct_scan = sorted((shared_data / "kermany-oct/images").rglob("*.jpeg"))[0]
    result = CliRunner().invoke(main, ["inspect", str(fundus), str(oct_scan), str(broken), "--json"])
    assert result.exit_code == 3, result.output
    assert result.stderr == "error: 1 of 3 images failed\n"  # ItemsFailed: the JSON stays on stdout
    rows = json.loads(result.stdout)
    assert rows[0]["width"] == 3504 and rows[0]["height"] == 2336
    assert rows[0]["grid"] == [3, 2] and rows[0]["tiles"] == 7 and rows[0]["visual_tokens"] == 3677
    assert rows[1]["visual_tokens"] > 729 and rows[1]["format"] == "jpeg"
    assert rows[2]["path"] == str(broken) and "error" in rows[2]


def test_inspect_budget_and_presets(shared_data):
    fundus = str(shared_data / "hrf/images/01_dr.JPG")
    full = json.loads(CliRunner().invoke(main, ["inspect", fundus, "--json"]).output)[0]
    fast = json.loads(CliRunner().invoke(main, ["inspect", fundus, "--json", "--max-tiles", "2"]).output)[0]
    tiny = json.loads(CliRunner().invoke(main, ["inspect", fundus, "--json", "--preset", "tiny"]).output)[0]
    assert fast["visual_tokens"] < full["visual_tokens"] and fast["tiles"] <= 3
    assert tiny["visual_tokens"] < 400
    text = CliRunner().invoke(main, ["inspect", fundus])
    assert text.exit_code == 0 and "visual tokens" in text.output


def test_inspect_usage_errors(shared_data):
    r = CliRunner().invoke(main, ["inspect", str(shared_data / "hrf/images/01_dr.JPG"), "--preset", "nope"])
    assert r.exit_code == 2 and "unknown preset" in r.output


def test_inspect_kept_tokens_and_prefill_estimate_follow_the_budget(shared_data):
    fundus = str(shared_data / "hrf/images/01_dr.JPG")

    def row(*args):
        r = CliRunner().invoke(main, ["inspect", fundus, "--json", *args])
        assert r.exit_code == 0, r.output
        return json.loads(r.output)[0]

    full, quarter, fast = row(), row("--visual-tokens", "25%"), row("--budget", "fast")
    assert full["kept_tokens"] == full["visual_tokens"] == 3677 and full["token_reduction"] is None
    assert quarter["tiles"] == 7 and quarter["kept_tokens"] <= 0.25 * 3677
    assert fast["tiles"] <= 3 and fast["kept_tokens"] < quarter["kept_tokens"]
    assert 0 < fast["estimated_prefill_s"] < quarter["estimated_prefill_s"] < full["estimated_prefill_s"]
    bad = CliRunner().invoke(main, ["inspect", fundus, "--visual-tokens", "lots"])
    assert bad.exit_code == 2 and "count" in bad.output
