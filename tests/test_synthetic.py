"""Phantom data: determinism, split, file formats, and every label checked against the pixels or the truth.

The expected answers here are computed from truth.jsonl by this test's own rules, not by the
generator's question code, so a generator bug that writes a wrong letter shows up.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter, defaultdict
from dataclasses import replace
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from eyecare_edge.phantom.dataset import _pixel_truth

from eyecare_edge import phantom as S
from eyecare_edge.prompts import (
    CLOSED_QA_INSTRUCTION,
    IMAGE_PLACEHOLDER,
    REPORT_PROMPT,
    format_closed_question,
)

N, SEED = 24, 7
SECTIONS = ("Examination Type:", "Image Description:", "Diagnostic Recommendation:")
BENCH_KEYS = ["id", "images", "modality", "task", "question", "options", "answer", "synthetic"]


def _jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


@pytest.fixture(scope="module")
def phantom(tmp_path_factory: pytest.TempPathFactory) -> S.PhantomDataset:
    return S.make_phantom_dataset(tmp_path_factory.mktemp("phantom") / "a", N, SEED)


@pytest.fixture(scope="module")
def data(phantom: S.PhantomDataset) -> dict:
    truth = {r["image"]: r for r in _jsonl(phantom.truth_jsonl)}
    return {
        "bench": _jsonl(phantom.bench_jsonl),
        "train": json.loads(phantom.train_json.read_text(encoding="utf-8")),
        "truth": truth,
    }


def _files(root: Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------------------------
# Determinism, split, files
# ---------------------------------------------------------------------------------------------


def test_same_seed_gives_byte_identical_files_and_another_seed_differs(phantom, tmp_path):
    again = S.make_phantom_dataset(tmp_path / "b", N, SEED)
    first, second = _files(phantom.root), _files(again.root)
    assert sorted(first) == sorted(second)
    assert [k for k in first if first[k] != second[k]] == []

    other = _files(S.make_phantom_dataset(tmp_path / "c", N, SEED + 1).root)
    assert other["train.json"] != first["train.json"]
    assert other["bench.jsonl"] != first["bench.jsonl"]
    shared = [k for k in first if k.startswith("images/") and k in other]
    assert sum(first[k] != other[k] for k in shared) == len(shared)


def test_split_by_image_is_disjoint_complete_and_as_planned(phantom, data):
    train_images = {s["image"] for s in data["train"]}
    bench_images = {img for r in data["bench"] for img in r["images"]}
    assert train_images.isdisjoint(bench_images)
    assert train_images | bench_images == set(data["truth"])
    for image, rec in data["truth"].items():
        assert rec["split"] == ("bench" if image in bench_images else "train")
    assert len(bench_images) == phantom.n_bench_images
    # Bench drawn per modality: round(share) of each.
    for modality in ("fundus", "oct"):
        recs = [r for r in data["truth"].values() if r["modality"] == modality]
        assert sum(r["split"] == "bench" for r in recs) == round(len(recs) * 0.2)
    assert phantom.n_fundus == round(N * 0.6) and phantom.n_oct == N - phantom.n_fundus
    assert S.plan_split(N, SEED, 0.2, 0.6) == S.plan_split(N, SEED, 0.2, 0.6)


def test_every_referenced_image_exists_decodes_and_is_labelled_synthetic(phantom, data):
    for image, rec in data["truth"].items():
        path = phantom.root / image
        raw = path.read_bytes()
        assert b"SYNTHETIC PHANTOM IMAGE" in raw[:400], path
        img = cv2.imread(str(path), cv2.IMREAD_UNCHANGED)
        assert img is not None, path
        assert img.shape[:2] == (rec["height"], rec["width"])
        assert path.name.startswith("phantom_") and rec["id"].startswith("phantom-")
        if rec["modality"] == "fundus":
            assert path.suffix == ".jpg" and img.ndim == 3
            assert 400 <= rec["width"] <= 1000 and 1.0 <= rec["width"] / rec["height"] <= 1.51
        else:
            assert path.suffix == ".png" and img.ndim == 2
            assert 300 <= rec["width"] <= 800 and 1.0 <= rec["width"] / rec["height"] <= 2.01
        assert rec["synthetic"] is True
    sizes = {(r["width"], r["height"]) for r in data["truth"].values()}
    assert len(sizes) > N // 2  # varied sizes, so anyres grids vary
    assert "SYNTHETIC" in phantom.readme.read_text()


def test_stale_images_from_a_larger_run_are_removed(tmp_path):
    S.make_phantom_dataset(tmp_path, 6, 1)
    ds = S.make_phantom_dataset(tmp_path, 3, 1)
    assert sorted(p.name for p in ds.images_dir.iterdir()) == sorted(
        Path(r["image"]).name for r in _jsonl(ds.truth_jsonl)
    )


# ---------------------------------------------------------------------------------------------
# Record formats
# ---------------------------------------------------------------------------------------------


def test_bench_records_have_the_eyecare_bench_shape(phantom, data):
    assert data["bench"], "no bench items"
    ids = [r["id"] for r in data["bench"]]
    assert len(ids) == len(set(ids))
    counts = Counter(r["task"] for r in data["bench"])
    assert counts == Counter(phantom.bench_counts)
    for r in data["bench"]:
        assert list(r) == BENCH_KEYS
        assert r["synthetic"] is True and r["id"].startswith("phantom-")
        assert r["images"][0] in data["truth"]
        assert r["modality"] == data["truth"][r["images"][0]]["modality"]
        assert "\n" not in r["question"] and "A." not in r["question"]
        if r["task"] == "closed":
            letters = sorted(r["options"])
            assert 2 <= len(letters) <= 4 and letters == list("ABCD"[: len(letters)])
            assert r["answer"] in r["options"]
            assert len(set(r["options"].values())) == len(letters)
        else:
            assert r["options"] is None and len(r["answer"]) > 20
        if r["task"] == "report":
            assert r["question"] == REPORT_PROMPT
    # Each bench image gets exactly one open and one report item.
    per_image = Counter((r["images"][0], r["task"]) for r in data["bench"] if r["task"] != "closed")
    assert set(per_image.values()) == {1}


def _parse_closed(human: str) -> tuple[str, dict[str, str]]:
    lines = human.split("\n")
    assert lines[-1] == CLOSED_QA_INSTRUCTION
    options = dict(line.split(". ", 1) for line in lines[1:-1])
    return lines[0], options


def test_train_samples_are_llava_conversations_formatted_like_the_bench(data):
    assert data["train"]
    for s in data["train"]:
        assert set(s) == {"id", "image", "modality", "synthetic", "conversations"}
        assert s["synthetic"] is True and s["id"].startswith("phantom-")
        turns = s["conversations"]
        assert len(turns) % 2 == 0 and turns
        assert [t["from"] for t in turns] == ["human", "gpt"] * (len(turns) // 2)
        assert turns[0]["value"].startswith(IMAGE_PLACEHOLDER + "\n")
        assert all(IMAGE_PLACEHOLDER not in t["value"] for t in turns[1:])
        for human, gpt in zip(turns[::2], turns[1::2], strict=True):
            text = human["value"].removeprefix(IMAGE_PLACEHOLDER + "\n")
            if text.endswith(CLOSED_QA_INSTRUCTION):
                question, options = _parse_closed(text)
                assert text == format_closed_question(question, options)  # same function as the bench
                letter, _, text = gpt["value"].partition(". ")
                assert letter in options and text == options[letter]  # "B. Left eye (OS)"
            elif text == REPORT_PROMPT:
                assert gpt["value"].startswith(SECTIONS[0])
    tasks = Counter(s["id"].rsplit("-", 1)[1] for s in data["train"])
    n_train_images = len({s["image"] for s in data["train"]})
    assert tasks == {"closed": n_train_images, "open": n_train_images, "report": n_train_images}


def test_single_turn_mode_writes_one_sample_per_closed_question(tmp_path):
    ds = S.make_phantom_dataset(tmp_path, 4, 3, bench_fraction=0.0, multi_turn=False)
    train = json.loads(ds.train_json.read_text())
    assert all(len(s["conversations"]) == 2 for s in train)
    closed = [s for s in train if "-closed-" in s["id"]]
    assert len(closed) == sum(q["task"] == "closed" for r in _jsonl(ds.truth_jsonl) for q in r["questions"])
    assert ds.n_bench_images == 0 and ds.bench_jsonl.read_text() == ""


def test_image_scale_shrinks_the_images_and_keeps_the_truth(tmp_path):
    full = S.make_phantom_dataset(tmp_path / "full", 6, 3)
    half = S.make_phantom_dataset(tmp_path / "half", 6, 3, image_scale=0.5)
    assert half.train_json.read_text() == full.train_json.read_text()
    assert half.bench_jsonl.read_text() == full.bench_jsonl.read_text()
    for a, b in zip(_jsonl(full.truth_jsonl), _jsonl(half.truth_jsonl), strict=True):
        assert b["truth"] == a["truth"] and b["questions"] == a["questions"]
        assert (b["width"], b["height"]) == S.scale_size((a["width"], a["height"]), 0.5)
        assert abs(b["width"] - a["width"] / 2) <= 1 and abs(b["height"] - a["height"] / 2) <= 1
        img = cv2.imread(str(half.root / b["image"]), cv2.IMREAD_UNCHANGED)
        assert img.shape[:2] == (b["height"], b["width"])
        if b["modality"] == "fundus":  # the lesions, disc and macula are where the truth says
            _check_fundus_pixels(img[:, :, ::-1], b)
        else:
            _check_oct_pixels(img, b)
    assert "--image-scale 0.5" in half.readme.read_text()
    with pytest.raises(ValueError, match="image_scale"):
        S.make_phantom_dataset(tmp_path / "bad", 2, 1, image_scale=0.1)


def test_reports_have_exactly_the_three_sections(data):
    reports = [r["answer"] for r in data["bench"] if r["task"] == "report"]
    reports += [s["conversations"][1]["value"] for s in data["train"] if s["id"].endswith("-report")]
    assert len(reports) == N
    for text in reports:
        lines = text.split("\n")
        assert len(lines) == 3
        for line, head in zip(lines, SECTIONS, strict=True):
            assert line.startswith(head + " ") and len(line) > len(head) + 10
        assert "synthetic phantom" in lines[0]


# ---------------------------------------------------------------------------------------------
# Answers are right
# ---------------------------------------------------------------------------------------------


def _expected_answer(kind: str, rec: dict) -> str:
    """The right option text for a question type, from truth.jsonl, by this test's own rules."""
    t = rec["truth"]
    counts = t.get("lesion_counts", {})
    yes_no = {True: "Yes", False: "No"}
    if kind == "modality":
        return (
            "Colour fundus photograph"
            if rec["modality"] == "fundus"
            else "Optical coherence tomography (OCT) B-scan"
        )
    if kind == "eye":
        return "Right eye (OD)" if t["eye"] == "OD" else "Left eye (OS)"
    if kind == "disc_side":
        return "Right side of the image" if t["disc_x"] > 0 else "Left side of the image"
    if kind in ("haemorrhage", "hard_exudate", "cotton_wool_spot", "drusen"):
        return yes_no[counts[kind] > 0]
    if kind == "fundus_diagnosis":
        if t["condition"] == "amd":
            return "Age-related macular degeneration (drusen)"
        return "Diabetic retinopathy" if counts["haemorrhage"] > 0 else "Normal fundus"
    if kind == "dr_grade":
        return {0: "No diabetic retinopathy", 2: "Moderate non-proliferative diabetic retinopathy"}.get(
            t["dr_grade"], "Severe non-proliferative diabetic retinopathy"
        )
    if kind == "oct_diagnosis":
        return {"normal": "Normal retinal structure", "fluid": "Macular fluid (oedema)"}.get(
            t["condition"], "Drusen (RPE elevations)"
        )
    if kind == "oct_fluid":
        return yes_no[bool(t["fluid"])]
    if kind == "oct_drusen":
        return yes_no[bool(t["drusen"])]
    raise AssertionError(f"unexpected question kind {kind}")


KIND_WORDS = {
    "modality": ("type of image", "modality"),
    "eye": ("eye",),
    "disc_side": ("optic disc",),
    "haemorrhage": ("haemorrhage",),
    "hard_exudate": ("exudate",),
    "cotton_wool_spot": ("cotton-wool",),
    "drusen": ("drusen",),
    "fundus_diagnosis": ("diagnosis",),
    "dr_grade": ("diabetic retinopathy",),
    "oct_diagnosis": ("oct",),
    "oct_fluid": ("fluid",),
    "oct_drusen": ("drusen",),
}


def test_closed_answers_point_to_the_option_that_matches_the_truth(data):
    kind_of = {q["id"]: q["kind"] for rec in data["truth"].values() for q in rec["questions"]}
    checked = Counter()
    for r in data["bench"]:
        if r["task"] != "closed":
            continue
        kind = kind_of[r["id"]]
        assert any(w in r["question"].lower() for w in KIND_WORDS[kind]), (kind, r["question"])
        rec = data["truth"][r["images"][0]]
        assert r["options"][r["answer"]] == _expected_answer(kind, rec), r
        checked[kind] += 1
    # Train conversations too: their closed turns are in the order truth.jsonl lists them.
    for s in data["train"]:
        if not s["id"].endswith("-closed"):
            continue
        rec = data["truth"][s["image"]]
        kinds = [q["kind"] for q in rec["questions"] if q["task"] == "closed"]
        turns = s["conversations"]
        assert len(kinds) == len(turns) // 2
        for kind, human, gpt in zip(kinds, turns[::2], turns[1::2], strict=True):
            _, options = _parse_closed(human["value"].removeprefix(IMAGE_PLACEHOLDER + "\n"))
            letter, _, text = gpt["value"].partition(". ")
            assert options[letter] == text == _expected_answer(kind, rec)
            checked[kind] += 1
    assert {"modality", "eye", "disc_side", "oct_diagnosis"} <= set(checked)


def _quadrant_counts(t: dict) -> list[int]:
    counts = Counter()
    for les in t["lesions"]:
        if les["kind"] == "haemorrhage":
            superior = les["y"] < t["macula_y"]
            nasal = (les["x"] - t["macula_x"]) * t["disc_x"] > 0
            counts[(superior, nasal)] += 1
    return [counts[(s, n)] for s in (True, False) for n in (True, False)]


def test_dr_grade_follows_the_lesions_and_conditions_stay_visually_apart():
    for seed in range(150):
        rng = np.random.default_rng(seed)
        condition = S.FUNDUS_CONDITIONS[seed % len(S.FUNDUS_CONDITIONS)]
        truth = S.sample_fundus_truth(rng, condition)
        rec = S.truth_record(truth)
        quads = _quadrant_counts(rec)
        n_h = sum(quads)
        expected = {"normal": 0, "amd": 0, "mild_dr": 1, "moderate_dr": 2, "severe_dr": 3}[condition]
        assert truth.dr_grade == expected, (seed, condition, quads)
        if expected == 3:
            assert min(quads) >= 4
        if expected == 2:
            assert 3 <= n_h <= 8  # far from severe's 16+
        if expected < 2:
            assert n_h == 0 and not truth.has("hard_exudate") and not truth.has("cotton_wool_spot")
        assert truth.has("drusen") == (condition == "amd")
        assert truth.disc_side == ("right" if truth.eye == "OD" else "left")


def test_options_are_canonical_and_answers_balanced_across_classes():
    """Each question type always lists the same options in the same order (see `_closed`), and
    its answers are balanced across classes, so a letter prior alone scores near chance."""
    options: dict[str, set] = defaultdict(set)
    answers: dict[str, Counter] = defaultdict(Counter)
    for i in range(700):
        rng = np.random.default_rng([11, i])
        truth = S.sample_fundus_truth(rng) if i % 5 < 3 else S.sample_oct_truth(rng)
        for item in S.closed_questions(truth, rng):
            options[item.kind].add(tuple(sorted(item.options.items())))
            answers[item.kind][item.answer_text] += 1
            assert item.options[item.answer] == item.answer_text
    for kind, seen in options.items():
        assert len(seen) == 1, (kind, seen)
    for kind, counter in answers.items():
        if kind == "modality":
            continue  # follows the fundus/OCT mix
        total = sum(counter.values())
        k = len(counter)
        assert k >= 2, (kind, counter)
        for text, c in counter.items():
            assert 0.6 / k < c / total < 1.4 / k, (kind, text, counter)


# ---------------------------------------------------------------------------------------------
# Labels are in the pixels
# ---------------------------------------------------------------------------------------------


def _patch_mean(img: np.ndarray, x: float, y: float, r: float) -> np.ndarray:
    r = max(1, round(r))
    xi, yi = round(x), round(y)
    return (
        img[yi - r : yi + r + 1, xi - r : xi + r + 1]
        .reshape(-1, img.shape[-1] if img.ndim == 3 else 1)
        .mean(0)
    )


def _ring_mean(img: np.ndarray, x: float, y: float, r_in: float, r_out: float) -> np.ndarray:
    x0, y0 = max(0, int(x - r_out)), max(0, int(y - r_out))
    win = img[y0 : int(y + r_out) + 2, x0 : int(x + r_out) + 2]
    yy, xx = np.mgrid[: win.shape[0], : win.shape[1]]
    d = np.hypot(xx + x0 - x, yy + y0 - y)
    inside = win.reshape(win.shape[0], win.shape[1], -1).sum(-1) > 60  # not the black surround
    return win[(d > r_in) & (d < r_out) & inside].mean(0)


def _check_fundus_pixels(rgb: np.ndarray, rec: dict) -> Counter:
    """The disc is the brightest blob on the truth side; lesions look like what truth says they are."""
    px = rec["pixels"]
    disc, field = px["disc"], px["field"]
    lum = cv2.GaussianBlur(rgb.astype(np.float32).mean(2), (0, 0), disc["r"] * 0.5)
    y, x = np.unravel_index(int(np.argmax(lum)), lum.shape)
    assert ("right" if x > field["x"] else "left") == rec["truth"]["disc_side"]
    assert np.hypot(x - disc["x"], y - disc["y"]) < disc["r"], (x, y, disc)

    rgbf = rgb.astype(np.float32)
    seen = Counter()
    for les in px["lesions"]:
        kind, lx, ly, r = les["kind"], les["x"], les["y"], les["r"]
        if kind == "microaneurysm":
            continue  # a few pixels wide: drawn, never asked about in closed form
        core = _patch_mean(rgbf, lx, ly, r * 0.35)
        if kind == "haemorrhage":  # dark red
            ring = _ring_mean(rgbf, lx, ly, r * 1.6, r * 2.6)
            assert core.mean() < 0.75 * ring.mean() and core[0] > 1.8 * core[1], (les, core, ring)
        elif kind == "hard_exudate":  # bright yellow
            assert core[0] > 170 and core[1] > 140 and core[2] < core[1] - 40, (les, core)
        elif kind == "drusen":  # pale yellow, brighter than the retina around
            ring = _ring_mean(rgbf, lx, ly, r * 2.0, r * 3.0)
            assert core[1] > ring[1] + 30 and core[2] < core[1], (les, core, ring)
        elif kind == "cotton_wool_spot":  # whitish
            ring = _ring_mean(rgbf, lx, ly, r * 1.8, r * 2.6)
            assert core[2] > ring[2] + 60 and core[1] > ring[1] + 50, (les, core, ring)
        seen[kind] += 1
    return seen


def _check_oct_pixels(gray: np.ndarray, rec: dict) -> None:
    t, h, w = rec["truth"], rec["height"], rec["width"]
    img = cv2.GaussianBlur(gray.astype(np.float32), (0, 0), 1.5)
    truth = S.truth_from_record(t)
    xs = (np.arange(w) + 0.5) / w
    ilm, rpe = np.asarray(truth.ilm_y(xs)) * h, np.asarray(truth.rpe_y(xs)) * h
    yy = np.arange(h)[:, None]
    retina = (yy > ilm[None] + 2) & (yy < rpe[None] - 2)
    pockets = np.zeros((h, w), bool)
    for p in rec["pixels"]["fluid"]:
        e = ((np.arange(w)[None] - p["x"]) / p["half_width"]) ** 2 + ((yy - p["y"]) / p["half_height"]) ** 2
        inner = e < 0.5**2
        pockets |= e < 1.6**2
        assert img[inner].mean() < 0.5 * img[retina & (e > 1.6**2)].mean(), p
    # Vitreous above the retina is darker than the retina; the RPE is the brightest band.
    assert img[(yy < ilm[None] - 8)].mean() < 0.5 * img[retina & ~pockets].mean()
    for b in rec["pixels"]["drusen"]:
        col = img[:, max(0, round(b["x"]) - 1) : round(b["x"]) + 2].mean(1)
        lo, hi = round(b["bruch_y"] - 2.5 * b["height"]), round(b["bruch_y"] + 4)
        peak = lo + int(np.argmax(col[lo:hi]))
        assert peak < b["bruch_y"] - 0.5 * b["height"], (b, peak)  # the RPE is lifted
    if not rec["pixels"]["drusen"]:
        x = round(t["fovea_x"] * w) + w // 5 if t["fovea_x"] < 0.5 else round(t["fovea_x"] * w) - w // 5
        col = img[:, x - 1 : x + 2].mean(1)
        bruch = float(truth.bruch_y((x + 0.5) / w)) * h
        lo = round(bruch - 0.1 * h)
        peak = lo + int(np.argmax(col[lo : round(bruch + 0.1 * h)]))
        assert abs(peak - bruch) < max(4, 0.03 * h), (peak, bruch)  # a flat RPE on Bruch's membrane


def test_dataset_images_show_their_labels(phantom, data):
    seen = Counter()
    for image, rec in data["truth"].items():
        if rec["modality"] == "fundus":
            bgr = cv2.imread(str(phantom.root / image), cv2.IMREAD_COLOR)
            seen += _check_fundus_pixels(bgr[..., ::-1], rec)
        else:
            _check_oct_pixels(cv2.imread(str(phantom.root / image), cv2.IMREAD_GRAYSCALE), rec)
    assert seen, "no lesions in the test dataset"


@pytest.mark.parametrize("condition", ["moderate_dr", "severe_dr", "amd", "normal"])
def test_every_fundus_lesion_kind_is_visible_where_truth_says(condition):
    seen = Counter()
    for seed in range(3):
        rng = np.random.default_rng([5, seed])
        truth = S.sample_fundus_truth(rng, condition)
        size = (720 + 60 * seed, 540)
        img = S.draw_fundus(rng, truth, size)
        assert img.shape == (540, size[0], 3) and img.dtype == np.uint8
        assert (img[:3, :3] == 0).all()  # black surround in the corners
        rec = {"truth": S.truth_record(truth), "pixels": _pixel_truth(truth, size)}
        seen += _check_fundus_pixels(img, rec)
    expected = {
        "moderate_dr": {"haemorrhage"},
        "severe_dr": {"haemorrhage", "hard_exudate", "cotton_wool_spot"},
        "amd": {"drusen"},
        "normal": set(),
    }[condition]
    assert expected <= set(seen)


@pytest.mark.parametrize("condition", S.OCT_CONDITIONS)
def test_oct_conditions_are_visible_where_truth_says(condition):
    for seed in range(3):
        rng = np.random.default_rng([6, seed])
        truth = S.sample_oct_truth(rng, condition)
        size = (480 + 120 * seed, 360)
        img = S.draw_oct(rng, truth, size)
        assert img.shape == (360, size[0]) and img.dtype == np.uint8
        rec = {
            "truth": S.truth_record(truth),
            "pixels": _pixel_truth(truth, size),
            "height": 360,
            "width": size[0],
        }
        _check_oct_pixels(img, rec)
        assert bool(truth.fluid) == (condition == "fluid") and bool(truth.drusen) == (condition == "drusen")


def test_big_phantom_fundus_for_benchmarks():
    img = S.make_phantom_fundus((3504, 2336), seed=1)
    assert img.shape == (2336, 3504, 3) and img.dtype == np.uint8
    _, truth = S.make_phantom_fundus_truth(1)
    size = (3504, 2336)
    small = cv2.resize(img, (876, 584), interpolation=cv2.INTER_AREA)
    rec = {"truth": S.truth_record(truth), "pixels": _pixel_truth(truth, (876, 584))}
    _check_fundus_pixels(small, rec)
    assert (img[:5, :5] == 0).all() and img[size[1] // 2, size[0] // 2].sum() > 60
    a, b = S.make_phantom_fundus((400, 300), 3), S.make_phantom_fundus((400, 300), 3)
    assert np.array_equal(a, b) and not np.array_equal(a, S.make_phantom_fundus((400, 300), 4))


# ---------------------------------------------------------------------------------------------
# Errors, CLI, imports
# ---------------------------------------------------------------------------------------------


def test_bad_input_is_refused_with_a_clear_message(tmp_path):
    with pytest.raises(ValueError, match="n must be a positive integer"):
        S.make_phantom_dataset(tmp_path, 0, 1)
    with pytest.raises(ValueError, match="seed must be a non-negative integer"):
        S.make_phantom_dataset(tmp_path, 5, -1)
    with pytest.raises(ValueError, match="bench_fraction"):
        S.make_phantom_dataset(tmp_path, 5, 1, bench_fraction=1.0)
    with pytest.raises(ValueError, match="fundus_fraction"):
        S.make_phantom_dataset(tmp_path, 5, 1, fundus_fraction=1.5)
    blocker = tmp_path / "file"
    blocker.write_text("x")
    with pytest.raises(NotADirectoryError, match="file"):
        S.make_phantom_dataset(blocker, 2, 1)
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="at least 64x64"):
        S.draw_fundus(rng, S.sample_fundus_truth(rng), (10, 10))
    with pytest.raises(ValueError, match=r"\(width, height\)"):
        S.draw_oct(rng, S.sample_oct_truth(rng), (100,))
    with pytest.raises(ValueError, match="unknown fundus condition 'glaucoma'"):
        S.sample_fundus_truth(rng, "glaucoma")


def test_cli_writes_the_files_and_prints_a_summary(tmp_path):
    from eyecare_edge.cli import main

    runner = CliRunner()
    out = tmp_path / "ph"
    res = runner.invoke(main, ["synth", "--out", str(out), "--n", "8", "--seed", "3"])
    assert res.exit_code == 0, res.output
    assert "8 images" in res.output and "synthetic" in res.output and "closed" in res.output
    for name in ("train.json", "bench.jsonl", "truth.jsonl", "README.txt"):
        assert (out / name).is_file()
    assert len(list((out / "images").iterdir())) == 8

    res = runner.invoke(
        main, ["synth", "--out", str(out), "--n", "5", "--seed", "3", "--json", "--bench-fraction", "0.4"]
    )
    assert res.exit_code == 0, res.output
    summary = json.loads(res.output)
    assert summary["images"] == 5 and summary["synthetic"] is True and summary["bench_images"] == 2

    help_text = runner.invoke(main, ["synth", "--help"]).output
    assert "Example" in help_text and "eyecare-edge synth --out" in help_text
    assert runner.invoke(main, ["synth", "--out", str(out), "--n", "0"]).exit_code == 2
    assert runner.invoke(main, ["synth", "--n", "3"]).exit_code == 2
    bad = runner.invoke(main, ["synth", "--out", str(out), "--n", "2", "--image-scale", "5"])
    assert bad.exit_code == 2 and "--image-scale" in bad.output and "image_scale must be in [0.25, 2.0]" in bad.output


def test_generator_and_command_import_no_torch():
    code = (
        "import sys, eyecare_edge.commands.synth, eyecare_edge.phantom;"
        "heavy = [m for m in ('torch', 'transformers', 'peft', 'accelerate') if m in sys.modules];"
        "assert not heavy, heavy"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_truth_records_round_trip(data):
    for rec in data["truth"].values():
        truth = S.truth_from_record(rec["truth"])
        assert json.loads(json.dumps(S.truth_record(truth))) == rec["truth"]
    with pytest.raises(ValueError, match="modality"):
        S.truth_from_record({"modality": "ffa"})


def test_pixel_checks_catch_wrong_labels():
    """Negative control: the pixel checks above fail for a mislabelled image (they are not vacuous)."""
    size = (640, 480)
    rng = np.random.default_rng(21)
    truth = S.sample_fundus_truth(rng, "severe_dr")
    img = S.draw_fundus(rng, truth, size)
    flipped = replace(truth, disc_x=-truth.disc_x)
    haemorrhages = [les for les in truth.lesions if les.kind == "haemorrhage"]
    moved = replace(truth, lesions=tuple(replace(les, y=-les.y) for les in haemorrhages))
    for wrong in (flipped, moved):
        with pytest.raises(AssertionError):
            _check_fundus_pixels(img, {"truth": S.truth_record(wrong), "pixels": _pixel_truth(wrong, size)})

    rng = np.random.default_rng(22)
    oct_truth = S.sample_oct_truth(rng, "normal")
    oct_img = S.draw_oct(rng, oct_truth, (500, 300))
    fake = replace(oct_truth, drusen=(S.RpeBump(oct_truth.fovea_x + 0.2, 0.04, 0.05),))
    rec = {
        "truth": S.truth_record(fake),
        "pixels": _pixel_truth(fake, (500, 300)),
        "height": 300,
        "width": 500,
    }
    with pytest.raises(AssertionError):
        _check_oct_pixels(oct_img, rec)
