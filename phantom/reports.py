"""Free text from a phantom truth: image descriptions, diagnostic recommendations and the report.

Each sentence names only what the truth holds, with a little wording variety drawn from the rng;
`questions.open_question` reuses these sentences as open-question answers.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from eyecare_edge.phantom.sampling import choose
from eyecare_edge.phantom.truth import FundusTruth, OctTruth


def _join(words: Sequence[str]) -> str:
    words = list(words)
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _quadrant_phrase(truth: FundusTruth, kind: str) -> str:
    hit = [q for q, c in truth.quadrant_counts(kind).items() if c > 0]
    if len(hit) == 4:
        return "all four quadrants"
    return f"the {_join(hit)} quadrant" + ("s" if len(hit) > 1 else "")


def fundus_lesion_text(truth: FundusTruth, rng: np.random.Generator) -> str:
    """Sentences naming the lesions (or their absence), with a little wording variety."""
    if not truth.lesions:
        return choose(
            rng,
            (
                "The macula and retinal vessels appear normal; no haemorrhages, exudates, cotton-wool spots or drusen are seen.",
                "No haemorrhages, exudates, cotton-wool spots or drusen are seen, and the macula and vessels look normal.",
            ),
        )
    parts = []
    n_h = truth.count("haemorrhage")
    if truth.dr_grade == 3:
        parts.append("Numerous blot haemorrhages are present in all four quadrants.")
    elif n_h:
        lead = choose(rng, ("Several", "Scattered")) if n_h > 4 else "A few"
        parts.append(f"{lead} blot haemorrhages are seen in {_quadrant_phrase(truth, 'haemorrhage')}.")
    if truth.has("microaneurysm"):
        if n_h:
            parts.append("Microaneurysms are also present.")
        else:
            parts.append(
                choose(
                    rng,
                    (
                        "A few microaneurysms are seen as tiny red dots.",
                        "Only a few tiny red microaneurysms are seen.",
                    ),
                )
                + " There are no haemorrhages, exudates or cotton-wool spots."
            )
    if truth.has("hard_exudate"):
        parts.append(
            choose(
                rng,
                (
                    "Clusters of yellow hard exudates are seen in {}.",
                    "Yellow hard exudates form clusters in {}.",
                ),
            ).format(_quadrant_phrase(truth, "hard_exudate"))
        )
    n_c = truth.count("cotton_wool_spot")
    if n_c:
        amount = (
            "A cotton-wool spot is"
            if n_c == 1
            else ("A few cotton-wool spots are" if n_c <= 3 else "Several cotton-wool spots are")
        )
        parts.append(f"{amount} present near the vascular arcades.")
    if truth.has("drusen"):
        parts.append(
            choose(
                rng,
                (
                    "Multiple yellowish drusen are clustered around the macula; there are no haemorrhages or exudates.",
                    "Numerous soft yellow drusen surround the fovea; no haemorrhages or exudates are seen.",
                ),
            )
        )
    return " ".join(parts)


def eye_word(truth: FundusTruth) -> str:
    return "right" if truth.eye == "OD" else "left"


def fundus_description(truth: FundusTruth, rng: np.random.Generator) -> str:
    disc = choose(
        rng,
        (
            "The optic disc lies on the {} side of the image with a sharp margin and a normal cup.",
            "The optic disc is seen on the {} side of the image; its margin is sharp and the cup is normal.",
        ),
    ).format(truth.disc_side)
    return f"{disc} {fundus_lesion_text(truth, rng)}"


def fundus_recommendation(truth: FundusTruth, rng: np.random.Generator) -> str:
    if truth.condition == "amd":
        return choose(
            rng,
            (
                "Drusen consistent with age-related macular degeneration. Macular OCT, Amsler grid self-monitoring and review in 6 to 12 months are recommended.",
                "Findings suggest age-related macular degeneration with drusen. Recommend OCT of the macula and follow-up in 6 to 12 months.",
            ),
        )
    grade = truth.dr_grade
    if grade == 0:
        return choose(
            rng,
            (
                "No diabetic retinopathy or other abnormality is seen. Routine screening in 12 months is recommended.",
                "Normal fundus. Continue routine eye examinations every 12 months.",
            ),
        )
    if grade == 1:
        return choose(
            rng,
            (
                "Mild non-proliferative diabetic retinopathy. Repeat screening in 12 months and optimise blood glucose and blood pressure control.",
                "Mild non-proliferative diabetic retinopathy (microaneurysms only). Annual review with good glycaemic control is advised.",
            ),
        )
    if grade == 2:
        text = choose(
            rng,
            (
                "Moderate non-proliferative diabetic retinopathy. Referral to an ophthalmologist within 3 to 6 months is recommended.",
                "Moderate non-proliferative diabetic retinopathy. Refer to an ophthalmologist for review within 3 to 6 months.",
            ),
        )
        if truth.has("hard_exudate"):
            text += " OCT of the macula is advised to exclude diabetic macular oedema."
        return text
    return choose(
        rng,
        (
            "Severe non-proliferative diabetic retinopathy. Urgent referral to an ophthalmologist is recommended; panretinal photocoagulation may be considered.",
            "Severe non-proliferative diabetic retinopathy with a high risk of progression. Refer urgently to an ophthalmologist.",
        ),
    )


def _oct_location(truth: OctTruth, x: float) -> str:
    d = x - truth.fovea_x
    if abs(d) < 0.06:
        return "beneath the fovea"
    return "to the left of the fovea" if d < 0 else "to the right of the fovea"


def oct_description(truth: OctTruth, rng: np.random.Generator) -> str:
    if truth.condition == "fluid":
        main = truth.fluid[0]
        text = choose(
            rng,
            (
                "A large hyporeflective fluid-filled space is seen within the retina {}, and the retina over it is thickened.",
                "An oval, dark fluid pocket lies within the retina {}, with thickening of the overlying retina.",
            ),
        ).format(_oct_location(truth, main.x))
        if len(truth.fluid) > 1:
            text += " A smaller second pocket lies beside it."
        return text + " The RPE line is continuous."
    if truth.condition == "drusen":
        amount = "two" if len(truth.drusen) == 2 else "several"
        places = _join(sorted({_oct_location(truth, b.x) for b in truth.drusen}))
        return (
            choose(
                rng,
                (
                    "{A} dome-shaped elevations of the retinal pigment epithelium (drusen) are seen {p}.",
                    "The RPE is lifted by {a} dome-shaped drusen {p}.",
                ),
            ).format(A=amount.capitalize(), a=amount, p=places)
            + " There is no intraretinal or subretinal fluid."
        )
    return choose(
        rng,
        (
            "The retinal layers are well defined and the foveal depression is preserved. The RPE is continuous and there is no intraretinal or subretinal fluid.",
            "Normal retinal layering with a preserved foveal contour; the RPE line is continuous and no fluid or drusen are seen.",
        ),
    )


def oct_recommendation(truth: OctTruth, rng: np.random.Generator) -> str:
    options = {
        "normal": (
            "Normal macular OCT. No treatment is needed; routine follow-up.",
            "No macular pathology is seen. Routine follow-up is sufficient.",
        ),
        "fluid": (
            "Findings consistent with macular oedema. Refer to a retina specialist for assessment and possible anti-VEGF treatment.",
            "Macular fluid consistent with macular oedema. Prompt referral to a retina specialist is recommended.",
        ),
        "drusen": (
            "Findings consistent with drusen of age-related macular degeneration. Monitor with OCT every 6 to 12 months and advise Amsler grid self-testing.",
            "Drusen suggesting early age-related macular degeneration. Recommend periodic OCT monitoring and Amsler grid self-testing.",
        ),
    }
    return choose(rng, options[truth.condition])


def report_text(truth: FundusTruth | OctTruth, rng: np.random.Generator) -> str:
    """The three-section report: Examination Type / Image Description / Diagnostic Recommendation."""
    if isinstance(truth, FundusTruth):
        exam = choose(
            rng,
            (
                "Colour fundus photography of the {} eye ({}), posterior pole; synthetic phantom image.",
                "Colour fundus photograph, {} eye ({}), macula-centred; synthetic phantom image.",
            ),
        ).format(eye_word(truth), truth.eye)
        description = fundus_description(truth, rng)
        recommendation = fundus_recommendation(truth, rng)
    else:
        exam = choose(
            rng,
            (
                "Optical coherence tomography (OCT), horizontal B-scan through the macula; synthetic phantom image.",
                "Macular OCT B-scan (horizontal line scan); synthetic phantom image.",
            ),
        )
        description = oct_description(truth, rng)
        recommendation = oct_recommendation(truth, rng)
    return f"Examination Type: {exam}\nImage Description: {description}\nDiagnostic Recommendation: {recommendation}"
