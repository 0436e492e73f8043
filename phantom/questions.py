"""Questions about one phantom image: closed (multiple choice), open and report, and the image labels.

Every closed question is decidable from big, high-contrast structures (microaneurysms are drawn and
described but never asked about in closed form; mild DR is never the subject of a grade or diagnosis
question). Closed answers are balanced per question type (an absent finding is asked about only
about as often as a present one), so neither a letter nor a yes/no prior pays; each question type
lists its options in one fixed order (see `_closed`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from eyecare_edge.phantom.reports import (
    eye_word,
    fundus_description,
    fundus_lesion_text,
    fundus_recommendation,
    oct_description,
    oct_recommendation,
    report_text,
)
from eyecare_edge.phantom.sampling import (
    COTTON_WOOL_PROB,
    EXUDATE_PROB,
    FUNDUS_CONDITION_WEIGHTS,
    OCT_CONDITION_WEIGHTS,
    choose,
    sample_fundus_truth,
    sample_oct_truth,
)
from eyecare_edge.phantom.truth import FUNDUS_CONDITIONS, OCT_CONDITIONS, FundusTruth, OctTruth

from eyecare_edge.prompts import OPEN_QA_DEFAULT_PROMPT, REPORT_PROMPT, format_closed_question


@dataclass(frozen=True)
class QAItem:
    """One question about one image. `kind` names the question type (for analysis, not the model)."""

    task: str  # closed | open | report
    kind: str
    question: str
    options: dict[str, str] | None
    answer: str  # the letter for closed QA, free text otherwise

    @property
    def answer_text(self) -> str:
        return self.options[self.answer] if self.options else self.answer

    @property
    def reply(self) -> str:
        """The assistant turn in training data: a closed answer leads with its letter and then
        names the option ("B. Left eye (OS)"); `parse_choice` reads the letter.

        Why the text too: the eye and disc-side questions map one image fact to opposite letters
        (fixed option orders: a right eye has its disc on the right, "A" for one and "B" for the
        other), so with letter-only replies neither the fact nor the question type predicts the
        letter alone, and a random 4-layer LLM stayed at chance on both (an XOR it had no gradient
        into). The option text after the letter depends on the question type by itself, which
        makes the LLM carry the question type to the answer position, and the fact then pays.
        Measured on the demo's trained tower, eye/disc questions only, one per sample, 120 sft
        steps: letters only eye 47% / disc 53%; with the text 82% / 88% (issue 13 note).
        """
        if self.task == "closed" and self.options:
            return f"{self.answer}. {self.answer_text}"
        return self.answer


YES, NO = "Yes", "No"
MODALITY_NAMES = {
    "fundus": "Colour fundus photograph",
    "oct": "Optical coherence tomography (OCT) B-scan",
}
MODALITY_DISTRACTORS = (
    "Fundus fluorescein angiography (FFA)",
    "Ultrasound biomicroscopy (UBM)",
    "Slit-lamp photograph",
)
EYE_OPTIONS = {"OD": "Right eye (OD)", "OS": "Left eye (OS)"}
SIDE_OPTIONS = {"left": "Left side of the image", "right": "Right side of the image"}
FUNDUS_DIAGNOSES = {
    "normal": "Normal fundus",
    "dr": "Diabetic retinopathy",
    "amd": "Age-related macular degeneration (drusen)",
}
GRADE_OPTIONS = {
    0: "No diabetic retinopathy",
    2: "Moderate non-proliferative diabetic retinopathy",
    3: "Severe non-proliferative diabetic retinopathy",
}
OCT_DIAGNOSES = {
    "normal": "Normal retinal structure",
    "fluid": "Macular fluid (oedema)",
    "drusen": "Drusen (RPE elevations)",
}

QUESTION_TEXTS: dict[str, tuple[str, ...]] = {
    "modality": ("What type of image is this?", "Which imaging modality was used to acquire this image?"),
    "eye": ("Which eye is shown in this fundus photograph?", "Is this a right eye or a left eye?"),
    "disc_side": (
        "On which side of the image is the optic disc?",
        "Where is the optic disc located in this image?",
    ),
    "haemorrhage": (
        "Are retinal haemorrhages present in this fundus photograph?",
        "Does this image show retinal haemorrhages?",
    ),
    "hard_exudate": (
        "Are hard exudates present in this fundus photograph?",
        "Does this image show hard exudates?",
    ),
    "cotton_wool_spot": (
        "Are cotton-wool spots present in this fundus photograph?",
        "Does this image show cotton-wool spots?",
    ),
    "drusen": ("Are drusen visible in this fundus photograph?", "Does this image show drusen?"),
    "fundus_diagnosis": (
        "What is the most likely diagnosis?",
        "Which diagnosis best fits this fundus photograph?",
    ),
    "dr_grade": (
        "What is the diabetic retinopathy grade of this eye?",
        "How severe is the diabetic retinopathy in this image?",
    ),
    "oct_diagnosis": (
        "What is the main finding in this OCT B-scan?",
        "Which diagnosis best fits this OCT scan?",
    ),
    "oct_fluid": (
        "Is there fluid within the retina in this OCT scan?",
        "Does this OCT scan show intraretinal fluid?",
    ),
    "oct_drusen": (
        "Are drusen (RPE elevations) visible in this OCT scan?",
        "Does this OCT scan show drusen?",
    ),
}


def _fundus_diagnosis(truth: FundusTruth) -> str | None:
    """The diagnosis class, or None for mild DR (microaneurysms only: not visible enough to ask)."""
    if truth.condition == "amd":
        return "amd"
    grade = truth.dr_grade
    if grade == 1:
        return None
    return "dr" if grade >= 2 else "normal"


def _class_priors() -> dict[str, dict[Any, float]]:
    """Expected answer frequencies per question type under the sampling weights above.

    Used to ask about common answers less often so that every question type is about balanced.
    """
    p = dict(zip(FUNDUS_CONDITIONS, FUNDUS_CONDITION_WEIGHTS, strict=True))
    total = sum(p.values())
    p = {k: v / total for k, v in p.items()}
    dr = p["moderate_dr"] + p["severe_dr"]
    exudate = sum(p[c] * EXUDATE_PROB[c] for c in EXUDATE_PROB)
    cws = sum(p[c] * COTTON_WOOL_PROB[c] for c in COTTON_WOOL_PROB)
    askable = 1.0 - p["mild_dr"]
    po = dict(zip(OCT_CONDITIONS, OCT_CONDITION_WEIGHTS, strict=True))
    po_total = sum(po.values())
    return {
        "haemorrhage": {True: dr, False: 1 - dr},
        "hard_exudate": {True: exudate, False: 1 - exudate},
        "cotton_wool_spot": {True: cws, False: 1 - cws},
        "drusen": {True: p["amd"], False: 1 - p["amd"]},
        "fundus_diagnosis": {"normal": p["normal"] / askable, "dr": dr / askable, "amd": p["amd"] / askable},
        "dr_grade": {
            0: (p["normal"] + p["amd"]) / askable,
            2: p["moderate_dr"] / askable,
            3: p["severe_dr"] / askable,
        },
        "oct_fluid": {True: po["fluid"] / po_total, False: 1 - po["fluid"] / po_total},
        "oct_drusen": {True: po["drusen"] / po_total, False: 1 - po["drusen"] / po_total},
    }


_PRIORS = _class_priors()


def _keep(rng: np.random.Generator, kind: str, answer: Any) -> bool:
    """Ask a question with a probability that evens out its answers (rarest answer: always asked)."""
    priors = _PRIORS[kind]
    return bool(rng.random() < min(priors.values()) / priors[answer])


def _closed(rng: np.random.Generator, kind: str, correct: str, choices: Sequence[str]) -> QAItem:
    """A multiple-choice item; `choices` must contain `correct`.

    Options keep the canonical order of `choices` (Yes before No, the same list per question type),
    so the few-minute `tiny` model is judged on reading the image, not on learning an in-context
    option lookup from scratch (measured: shuffled options keep a random-init 4-layer LLM at chance
    for thousands of samples). Real benchmarks shuffle; the answer parser handles both.
    """
    order = range(len(choices))
    letters = "ABCD"
    options = {letters[i]: choices[j] for i, j in enumerate(order)}
    answer = next(letter for letter, text in options.items() if text == correct)
    return QAItem("closed", kind, choose(rng, QUESTION_TEXTS[kind]), options, answer)


def _yes_no(rng: np.random.Generator, kind: str, present: bool) -> QAItem:
    return _closed(rng, kind, YES if present else NO, (YES, NO))


def _modality_question(rng: np.random.Generator, modality: str) -> QAItem:
    # the same three options every time: both phantom modalities and one distractor
    choices = [*MODALITY_NAMES.values(), MODALITY_DISTRACTORS[0]]
    return _closed(rng, "modality", MODALITY_NAMES[modality], choices)


def closed_questions(truth: FundusTruth | OctTruth, rng: np.random.Generator) -> list[QAItem]:
    """The closed (multiple-choice) questions asked about one image, each decidable from the pixels."""
    items = [_modality_question(rng, truth.modality)]
    if isinstance(truth, FundusTruth):
        items.append(_closed(rng, "eye", EYE_OPTIONS[truth.eye], tuple(EYE_OPTIONS.values())))
        items.append(_closed(rng, "disc_side", SIDE_OPTIONS[truth.disc_side], tuple(SIDE_OPTIONS.values())))
        for kind in ("haemorrhage", "hard_exudate", "cotton_wool_spot", "drusen"):
            present = truth.has(kind)
            if _keep(rng, kind, present):
                items.append(_yes_no(rng, kind, present))
        diagnosis = _fundus_diagnosis(truth)
        if diagnosis is not None:
            if _keep(rng, "fundus_diagnosis", diagnosis):
                items.append(
                    _closed(
                        rng, "fundus_diagnosis", FUNDUS_DIAGNOSES[diagnosis], tuple(FUNDUS_DIAGNOSES.values())
                    )
                )
            grade = truth.dr_grade
            if _keep(rng, "dr_grade", grade):
                items.append(_closed(rng, "dr_grade", GRADE_OPTIONS[grade], tuple(GRADE_OPTIONS.values())))
    else:
        items.append(
            _closed(rng, "oct_diagnosis", OCT_DIAGNOSES[truth.condition], tuple(OCT_DIAGNOSES.values()))
        )
        for kind, present in (("oct_fluid", bool(truth.fluid)), ("oct_drusen", bool(truth.drusen))):
            if _keep(rng, kind, present):
                items.append(_yes_no(rng, kind, present))
    return items


def open_question(truth: FundusTruth | OctTruth, rng: np.random.Generator) -> QAItem:
    """One open question with a free-text answer derived from the truth."""
    if isinstance(truth, FundusTruth):
        choices = [
            ("describe", OPEN_QA_DEFAULT_PROMPT, lambda: fundus_description(truth, rng)),
            (
                "eye",
                "Which eye is shown, and how can you tell?",
                lambda: (
                    f"This is the {eye_word(truth)} eye ({truth.eye}): the optic disc is on the {truth.disc_side} side of the image, nasal to the macula."
                ),
            ),
            (
                "lesions",
                "What lesions are visible in this fundus photograph?",
                lambda: fundus_lesion_text(truth, rng),
            ),
            (
                "diagnosis",
                "What is your diagnosis for this fundus photograph?",
                lambda: fundus_recommendation(truth, rng),
            ),
        ]
    else:
        choices = [
            ("describe", OPEN_QA_DEFAULT_PROMPT, lambda: oct_description(truth, rng)),
            (
                "diagnosis",
                "What is your diagnosis for this OCT scan?",
                lambda: oct_recommendation(truth, rng),
            ),
        ]
    kind, question, answer = choose(rng, choices)
    return QAItem("open", f"open_{kind}", question, None, answer())


def qa_items(truth: FundusTruth | OctTruth, rng: np.random.Generator) -> list[QAItem]:
    """All questions for one image: its closed questions, one open question and the report."""
    closed = closed_questions(truth, rng)
    items = [closed[i] for i in rng.permutation(len(closed))]  # turn order varies between images
    items.append(open_question(truth, rng))
    items.append(QAItem("report", "report", REPORT_PROMPT, None, report_text(truth, rng)))
    return items


def human_text(item: QAItem) -> str:
    """The user turn for an item, exactly as training writes it and the bench asks it."""
    if item.task == "closed":
        return format_closed_question(item.question, item.options or {})
    return item.question


def phantom_labels(truth: FundusTruth | OctTruth) -> dict[str, str | None]:
    """Image-level labels for `train --stage vision`: every attribute a closed question is built
    from, named like the question types, as class names (None: the attribute does not apply)."""
    yn = {True: "yes", False: "no"}
    labels: dict[str, str | None] = dict.fromkeys(LABEL_COLUMNS)
    labels["modality"] = truth.modality
    if isinstance(truth, FundusTruth):
        labels["eye"] = truth.eye
        labels["disc_side"] = truth.disc_side
        for kind in ("haemorrhage", "hard_exudate", "cotton_wool_spot", "drusen"):
            labels[kind] = yn[truth.has(kind)]
        labels["fundus_diagnosis"] = _fundus_diagnosis(truth)
        labels["dr_grade"] = str(truth.dr_grade)
    else:
        labels["oct_diagnosis"] = truth.condition
        labels["oct_fluid"] = yn[bool(truth.fluid)]
        labels["oct_drusen"] = yn[bool(truth.drusen)]
    return labels


# One column per closed question type (QUESTION_TEXTS), in that order.
LABEL_COLUMNS = tuple(QUESTION_TEXTS)


def phantom_texts(n: int, seed: int) -> list[str]:
    """Questions, options, answers and reports of `n` sampled phantom images, without drawing them.

    Used to train the `tiny` preset's tokenizer on the vocabulary its data will use.
    """
    rng = np.random.default_rng(seed)
    texts: list[str] = []
    for i in range(n):
        truth = sample_fundus_truth(rng) if i % 5 < 3 else sample_oct_truth(rng)
        for item in qa_items(truth, rng):
            texts.append(human_text(item))
            texts.append(item.answer_text if item.task == "closed" else item.answer)
    return texts
