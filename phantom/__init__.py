"""Phantom room (`eyecare_edge.phantom`): procedurally drawn colour-fundus photographs and OCT B-scans
with exact ground truth.

Why it exists: training, export, the runtime and the bench all need images whose right answers are
known, that anyone can regenerate bit for bit from a seed, and that carry no patient data. Everything
written here is labelled synthetic (see `dataset`).

Only numpy and OpenCV (plus `eyecare_edge.prompts`), never torch, so the CLI (`synth`, `demo`,
`perf`) can make data on a runtime-only install; training reads the files it writes.

Design rules, because a tiny model trained for minutes on a CPU must answer the closed questions from
112–336-px views of these images:

- every closed question is decidable from big, high-contrast structures: the side of the optic disc,
  lesions sized relative to the fundus field, OCT fluid pockets and RPE bumps sized relative to the
  scan. Microaneurysms are tiny: they are drawn and described, never asked about in closed form;
- the DR grade is *derived* from the drawn lesions (`derive_dr_grade`), and the sampler keeps the
  grades visibly apart (moderate: at most 8 haemorrhages; severe: at least 4 in every quadrant). Mild
  DR (microaneurysms only) is never the subject of a grade or diagnosis question;
- closed answers are balanced per question type (an absent finding is asked about only about as
  often as a present one), so neither a letter nor a yes/no prior pays; each question type lists
  its options in one fixed order (see `questions`);
- image size and aspect ratio are drawn independently of the label: size must never be a cue.

Modules, one job each: `truth` (what an image shows, its JSON record), `sampling` (random truths and
sizes), `drawing` (truth + size -> pixels), `reports` (free-text descriptions and reports),
`questions` (closed/open/report items, image labels), `dataset` (writing a whole labelled set).
"""

from eyecare_edge.phantom.dataset import (
    PHANTOM_VERSION,
    SYNTHETIC_NOTICE,
    PhantomDataset,
    encode_image,
    make_phantom_dataset,
    plan_split,
    scale_size,
)
from eyecare_edge.phantom.drawing import (
    draw_fundus,
    draw_oct,
    fundus_geometry,
    make_phantom_fundus,
    make_phantom_fundus_truth,
)
from eyecare_edge.phantom.questions import (
    LABEL_COLUMNS,
    QAItem,
    closed_questions,
    human_text,
    open_question,
    phantom_labels,
    phantom_texts,
    qa_items,
)
from eyecare_edge.phantom.reports import report_text
from eyecare_edge.phantom.sampling import (
    sample_fundus_size,
    sample_fundus_truth,
    sample_oct_size,
    sample_oct_truth,
)
from eyecare_edge.phantom.truth import (
    FUNDUS_CONDITIONS,
    OCT_CONDITIONS,
    FluidPocket,
    FundusTruth,
    Lesion,
    OctTruth,
    RpeBump,
    derive_dr_grade,
    truth_from_record,
    truth_record,
)

__all__ = [
    "FUNDUS_CONDITIONS",
    "LABEL_COLUMNS",
    "OCT_CONDITIONS",
    "PHANTOM_VERSION",
    "SYNTHETIC_NOTICE",
    "FluidPocket",
    "FundusTruth",
    "Lesion",
    "OctTruth",
    "PhantomDataset",
    "QAItem",
    "RpeBump",
    "closed_questions",
    "derive_dr_grade",
    "draw_fundus",
    "draw_oct",
    "encode_image",
    "fundus_geometry",
    "human_text",
    "make_phantom_dataset",
    "make_phantom_fundus",
    "make_phantom_fundus_truth",
    "open_question",
    "phantom_labels",
    "phantom_texts",
    "plan_split",
    "qa_items",
    "report_text",
    "sample_fundus_size",
    "sample_fundus_truth",
    "sample_oct_size",
    "sample_oct_truth",
    "scale_size",
    "truth_from_record",
    "truth_record",
]
