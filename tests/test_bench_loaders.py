"""Loading Eyecare-Bench records from the project's JSONL, LLaVA conversations and OmniMedVQA records."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest

from eyecare_edge.prompts import IMAGE_PLACEHOLDER, REPORT_PROMPT, format_closed_question
from eyecare_edge.qa.loaders import (
    BenchFormatError,
    load_bench,
    normalize_modality,
    normalize_task,
    split_closed_question,
)
from eyecare_edge.qa.records import BenchRecord, BenchResult, read_results, write_results

REPORT = (
    "Examination Type: Fundus fluorescein angiography\n"
    "Image Description: Hyperfluorescent leakage at the optic disc in the late phase.\n"
    "Diagnostic Recommendation: Suspected papillitis; refer to neuro-ophthalmology."
)
EYE = {"A": "Right eye", "B": "Left eye"}


def _write_jsonl(path: Path, records: list[dict]) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records), encoding="utf-8")
    return path


# --- the project's JSONL -------------------------------------------------------------------------


def _project_records() -> list[dict]:
    return [
        {
            "id": "q1",
            "images": ["img/a.png"],
            "modality": "fundus",
            "task": "closed",
            "question": "Which eye is shown?",
            "options": EYE,
            "answer": "B",
            "synthetic": True,
        },
        {
            "id": "q2",
            "images": "img/b.png",
            "modality": "OCT",
            "task": "open",
            "question": "<image>\nWhat is the main finding?",
            "options": None,
            "answer": "Subretinal fluid.",
        },
        {
            "id": "q3",
            "images": ["img/c.png", "/abs/d.png"],
            "modality": "FFA",
            "task": "report",
            "question": "",
            "options": None,
            "answer": REPORT,
        },
        # unknown modality and task are kept, normalised
        {
            "id": "q4",
            "images": [],
            "modality": "Anterior Segment OCT",
            "task": "Grounding",
            "question": "Where is the lesion?",
            "options": None,
            "answer": "inferior",
        },
        # a closed answer given as option text is mapped to its letter
        {
            "id": "q5",
            "images": ["img/e.png"],
            "modality": "slit-lamp",
            "task": "closed_qa",
            "question": "Which eye?",
            "options": EYE,
            "answer": "right eye",
        },
    ]


def test_project_jsonl(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "bench" / "items.jsonl", _project_records())
    recs = load_bench(path)
    assert [r.id for r in recs] == ["q1", "q2", "q3", "q4", "q5"]
    q1, q2, q3, q4, q5 = recs
    base = tmp_path / "bench"
    assert q1 == BenchRecord(
        id="q1",
        images=[str(base / "img" / "a.png")],
        modality="fundus",
        task="closed",
        question="Which eye is shown?",
        options=EYE,
        answer="B",
        meta={"synthetic": True},
    )
    assert q1.synthetic and not q2.synthetic
    assert q2.images == [str(base / "img" / "b.png")] and q2.modality == "oct" and q2.task == "open"
    assert q3.images == [str(base / "img" / "c.png"), os.path.normpath("/abs/d.png")]
    assert (q3.modality, q3.task) == ("ffa", "report")
    assert (q4.modality, q4.task) == ("anterior_segment_oct", "grounding")
    assert (q5.modality, q5.task, q5.answer) == ("slit_lamp", "closed", "A")


def test_prompt_text(tmp_path: Path) -> None:
    q1, q2, q3, q4, _ = load_bench(_write_jsonl(tmp_path / "b.jsonl", _project_records()))
    assert q1.prompt_text() == format_closed_question("Which eye is shown?", EYE)
    assert q2.prompt_text() == "What is the main finding?"  # no <image> placeholder
    assert IMAGE_PLACEHOLDER not in q2.prompt_text()
    assert q3.prompt_text() == REPORT_PROMPT  # empty report question -> the shared report prompt
    assert q4.prompt_text() == "Where is the lesion?"


def test_project_json_list_and_images_root(tmp_path: Path) -> None:
    path = tmp_path / "items.json"
    path.write_text(json.dumps(_project_records(), indent=2), encoding="utf-8")
    root = tmp_path / "elsewhere"
    recs = load_bench(path, images_root=root)
    assert recs[0].images == [str(root / "img" / "a.png")]
    assert recs[2].images[1] == os.path.normpath("/abs/d.png")  # absolute paths stay


def test_folder_of_files(tmp_path: Path) -> None:
    recs = _project_records()
    _write_jsonl(tmp_path / "d" / "1.jsonl", recs[:2])
    _write_jsonl(tmp_path / "d" / "2.jsonl", recs[2:])
    (tmp_path / "d" / "notes.txt").write_text("not a bench file")
    assert [r.id for r in load_bench(tmp_path / "d")] == ["q1", "q2", "q3", "q4", "q5"]


# --- errors --------------------------------------------------------------------------------------


def test_bad_json_line_names_file_and_line(tmp_path: Path) -> None:
    recs = _project_records()
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(recs[0]) + "\n\n" + '{"id": "q2", "images": [\n' + json.dumps(recs[2]) + "\n")
    with pytest.raises(BenchFormatError, match=rf"{path}:3: bad JSON line"):
        load_bench(path)


def test_missing_field_names_file_line_and_field(tmp_path: Path) -> None:
    recs = _project_records()
    del recs[1]["answer"]
    path = _write_jsonl(tmp_path / "missing.jsonl", recs)
    with pytest.raises(BenchFormatError, match=rf"{path}:2: missing required field 'answer'"):
        load_bench(path)


def test_closed_answer_not_an_option(tmp_path: Path) -> None:
    recs = _project_records()
    recs[0]["answer"] = "C"
    path = _write_jsonl(tmp_path / "x.jsonl", recs)
    with pytest.raises(BenchFormatError, match=rf"{path}:1: answer 'C' is neither"):
        load_bench(path)


def test_closed_without_options(tmp_path: Path) -> None:
    recs = _project_records()
    recs[0]["options"] = None
    path = _write_jsonl(tmp_path / "x.jsonl", recs)
    with pytest.raises(BenchFormatError, match=r"x.jsonl:1: a closed question needs options"):
        load_bench(path)


def test_duplicate_ids(tmp_path: Path) -> None:
    recs = _project_records()
    recs[3]["id"] = "q1"
    path = _write_jsonl(tmp_path / "dup.jsonl", recs)
    with pytest.raises(BenchFormatError, match=rf"{path}:4: duplicate id 'q1' \(first at {path}:1\)"):
        load_bench(path)


def test_bad_json_list_names_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.json"
    path.write_text('[\n {"id": 1},\n {"id": 2,,}\n]\n')
    with pytest.raises(BenchFormatError, match=rf"{path}:3: bad JSON"):
        load_bench(path)


def test_format_override_and_unknown_shape(tmp_path: Path) -> None:
    path = _write_jsonl(tmp_path / "p.jsonl", _project_records())
    with pytest.raises(BenchFormatError, match=r"p.jsonl:1: missing required field 'conversations'"):
        load_bench(path, fmt="llava")
    with pytest.raises(ValueError, match="unknown bench format"):
        load_bench(path, fmt="csv")
    odd = _write_jsonl(tmp_path / "odd.jsonl", [{"foo": 1}])
    with pytest.raises(BenchFormatError, match=r"cannot tell the record shape.*pass fmt="):
        load_bench(odd)
    with pytest.raises(FileNotFoundError):
        load_bench(tmp_path / "nope.jsonl")


# --- LLaVA / Eyecare-100K ------------------------------------------------------------------------


def test_llava_multi_turn(tmp_path: Path) -> None:
    closed_q = format_closed_question("Which eye is shown?", EYE)
    data = [
        {
            "id": "ec-1",
            "image": "FFA/0001.jpg",
            "source": "eyecare100k",
            "conversations": [
                {"from": "human", "value": f"<image>\n{closed_q}"},
                {"from": "gpt", "value": "B. Left eye"},
                {"from": "human", "value": "What does the late phase show?"},
                {"from": "gpt", "value": "Leakage at the optic disc."},
                {"from": "human", "value": "Write a report."},
                {"from": "gpt", "value": REPORT},
            ],
        },
        {
            "id": "ec-2",
            "image": ["fundus/0002.jpg", "fundus/0003.jpg"],
            "modality": "Fundus Photography",
            "conversations": [
                {
                    "from": "human",
                    "value": "<image>\n<image>\nIs there a haemorrhage?\nA. Yes\nB. No\nAnswer briefly.",
                },
                {"from": "gpt", "value": "No"},
            ],
        },
    ]
    path = tmp_path / "eyecare100k.json"
    path.write_text(json.dumps(data))
    recs = load_bench(path)
    assert [r.id for r in recs] == ["ec-1_0", "ec-1_1", "ec-1_2", "ec-2_0"]
    closed, open_, report, yesno = recs
    assert closed.task == "closed" and closed.options == EYE and closed.answer == "B"
    assert closed.question == "Which eye is shown?"
    assert closed.prompt_text() == closed_q  # round trip through format_closed_question
    assert closed.modality == "ffa"  # inferred from the image folder
    assert closed.images == [str(tmp_path / "FFA" / "0001.jpg")]
    assert closed.meta == {"source": "eyecare100k", "turn": 0, "answer_text": "B. Left eye"}
    assert open_.task == "open" and open_.answer == "Leakage at the optic disc." and open_.options is None
    assert report.task == "report" and report.answer == REPORT and report.meta["turn"] == 2
    assert yesno.modality == "fundus" and yesno.task == "closed"
    assert yesno.options == {"A": "Yes", "B": "No"} and yesno.answer == "B"
    assert yesno.question == "Is there a haemorrhage?"
    assert yesno.meta["instruction"] == "Answer briefly."  # not our instruction: kept
    assert len(yesno.images) == 2


def test_llava_jsonl_given_task_and_unmapped_answer(tmp_path: Path) -> None:
    recs = [
        {
            "id": 7,
            "image": "x.png",
            "task": "report",
            "modality": "ICGA",
            "conversations": [
                {"from": "human", "value": "<image>\nDescribe."},
                {"from": "gpt", "value": "Short."},
            ],
        },
        {
            "id": 8,
            "image": "scans/y.png",
            "conversations": [
                {"from": "human", "value": "Which layer?\nA. RPE\nB. ILM"},
                {"from": "gpt", "value": "Not sure."},
            ],
        },
    ]
    path = _write_jsonl(tmp_path / "conv.jsonl", recs)
    given, unmapped = load_bench(path)
    assert (given.id, given.task, given.modality, given.question) == ("7_0", "report", "icga", "Describe.")
    assert unmapped.modality == "unknown"
    assert unmapped.task == "closed" and unmapped.answer == "Not sure." and unmapped.meta["answer_unmapped"]


def test_llava_turn_errors(tmp_path: Path) -> None:
    rec = {"id": "z", "image": "a.png", "conversations": [{"from": "human", "value": "Q?"}]}
    path = _write_jsonl(tmp_path / "z.jsonl", [rec])
    with pytest.raises(BenchFormatError, match=r"z.jsonl:1: the last human turn has no gpt answer"):
        load_bench(path)


def test_split_closed_question() -> None:
    assert split_closed_question("What is it?") is None
    assert split_closed_question("Pick:\nA. only one") is None
    q, opts, instr = split_closed_question(
        "<image>\nWhat is shown?\nOptions:\nA. OCT\nB. FFA\nC. UBM\nPick one."
    )
    assert (q, opts, instr) == ("What is shown?", {"A": "OCT", "B": "FFA", "C": "UBM"}, "Pick one.")


# --- OmniMedVQA ----------------------------------------------------------------------------------


def test_omnimedvqa(tmp_path: Path) -> None:
    data = [
        {
            "dataset": "ACRIMA",
            "question_id": "ACRIMA_0001",
            "question_type": "Disease Diagnosis",
            "question": "What is the diagnosis?",
            "gt_answer": "Glaucoma",
            "image_path": "Images/ACRIMA/Im001.png",
            "option_A": "Normal",
            "option_B": "Glaucoma",
            "modality_type": "Fundus Photography",
        },
        {
            "dataset": "OCTID",
            "question_id": "OCTID_0002",
            "question_type": "Modality Recognition",
            "question": "What imaging is this?",
            "gt_answer": "optical coherence tomography.",
            "image_path": "Images/OCTID/2.jpg",
            "option_A": "X-ray",
            "option_B": "MRI",
            "option_C": "Optical coherence tomography",
            "option_D": "CT",
            "modality_type": "Optical Coherence Tomography (OCT)",
        },
        {
            "dataset": "Misc",
            "question_id": "MISC_3",
            "question": "Which organ?",
            "gt_answer": "Liver",
            "image_path": "Images/Misc/3.jpg",
            "option_A": "Kidney",
            "option_B": "Lung",
            "option_C": None,
            "modality_type": "X-Ray",
        },
    ]
    path = tmp_path / "omni" / "QA.json"
    path.parent.mkdir()
    path.write_text(json.dumps(data))
    root = tmp_path / "OmniMedVQA"
    a, b, c = load_bench(path, images_root=root)
    assert a == BenchRecord(
        id="ACRIMA_0001",
        images=[str(root / "Images" / "ACRIMA" / "Im001.png")],
        modality="fundus",
        task="closed",
        question="What is the diagnosis?",
        options={"A": "Normal", "B": "Glaucoma"},
        answer="B",
        meta={"dataset": "ACRIMA", "question_id": "ACRIMA_0001", "question_type": "Disease Diagnosis"},
    )
    assert b.modality == "oct" and b.answer == "C" and len(b.options) == 4
    # gt_answer matching no option: kept, answer left as the text, flagged
    assert c.options == {"A": "Kidney", "B": "Lung"} and c.answer == "Liver" and c.meta["gt_unmatched"]
    assert c.modality == "x_ray"  # unknown modality kept, snake_case
    # without images_root, paths are relative to the file
    assert load_bench(path)[0].images == [str(tmp_path / "omni" / "Images" / "ACRIMA" / "Im001.png")]


def test_omnimedvqa_needs_options(tmp_path: Path) -> None:
    rec = {"question": "Q?", "gt_answer": "x", "image_path": "a.png", "option_A": "x", "modality_type": "CT"}
    path = _write_jsonl(tmp_path / "o.jsonl", [rec])
    with pytest.raises(BenchFormatError, match=r"o.jsonl:1: an OmniMedVQA record needs at least two"):
        load_bench(path)


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("Fundus Photography", "fundus"),
        ("Optical Coherence Tomography (OCT)", "oct"),
        ("CT(Computed Tomography)", "ct"),
        ("Fundus Fluorescein Angiography", "ffa"),
        ("FFA", "ffa"),
        ("Indocyanine Green Angiography", "icga"),
        ("Ultrasound Biomicroscopy (UBM)", "ubm"),
        ("slit lamp", "slit_lamp"),
        ("Fluorescein Staining", "fluorescein_staining"),
        ("MR (Mag-netic Resonance Imaging)", "mr_mag_netic_resonance_imaging"),
        ("", "unknown"),
        (None, "unknown"),
    ],
)
def test_normalize_modality(name: str | None, expected: str) -> None:
    assert normalize_modality(name) == expected


def test_normalize_task() -> None:
    assert [normalize_task(t) for t in ("Closed QA", "open-qa", "Report Generation", "VQA grounding")] == [
        "closed",
        "open",
        "report",
        "vqa_grounding",
    ]


# --- results JSONL -------------------------------------------------------------------------------


def test_result_round_trip(tmp_path: Path) -> None:
    (rec,) = load_bench(_write_jsonl(tmp_path / "b.jsonl", _project_records()[:1]))
    ok = BenchResult.for_record("bundle-q4", rec, "Answer: B", timings={"total_s": 0.5})
    failed = BenchResult.for_record("bundle-q4", rec, None, error="RuntimeError: out of memory")
    assert ok.reference == "B" and ok.options == EYE and ok.meta == {"synthetic": True}
    path = write_results(tmp_path / "out" / "results.jsonl", [ok, failed])
    assert read_results(path) == [ok, failed]
    assert BenchResult.from_json(json.loads(ok.to_json())) == ok
    path.write_text(ok.to_json() + "\n" + '{"system": "x"}\n')
    with pytest.raises(ValueError, match=rf"{path}:2: bench result lacks record_id"):
        read_results(path)
