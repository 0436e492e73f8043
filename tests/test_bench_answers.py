"""The closed-QA answer parser on answer styles models actually produce."""

from __future__ import annotations

import pytest

from eyecare_edge.qa.answers import parse_choice, parse_yes_no

EYE = {"A": "Right eye", "B": "Left eye", "C": "Both eyes", "D": "Cannot be determined"}
YES_NO = {"A": "Yes", "B": "No"}
# "Cataract" is a substring of "Congenital cataract".
CATARACT = {"A": "Cataract", "B": "Congenital cataract", "C": "Glaucoma", "D": "Normal"}
# Option A's letter is also the English article "a".
DIAGNOSIS = {"A": "Glaucoma", "B": "Cataract", "C": "Diabetic retinopathy", "D": "Retinal detachment"}
MODALITY = {"A": "Fundus photography", "B": "OCT", "C": "FFA", "D": "ICGA"}

CASES = [
    # bare letters, wrapped
    ("B", EYE, "B"),
    ("B.", EYE, "B"),
    ("(B)", EYE, "B"),
    ("b)", EYE, "B"),
    ("[D]", EYE, "D"),
    ("**B**", EYE, "B"),
    ("  c  ", EYE, "C"),
    # answer markers
    ("Answer: B", EYE, "B"),
    ("answer: c", EYE, "C"),
    ("The answer is B.", EYE, "B"),
    ("The correct answer is (C).", EYE, "C"),
    ("The answer is: (B) Left eye", EYE, "B"),
    ("Option B: Left eye", EYE, "B"),
    ("**Answer:** D", EYE, "D"),
    ("I choose C.", EYE, "C"),
    ("I would go with (B).", EYE, "B"),
    ("It's D.", EYE, "D"),
    ("B is the correct answer.", EYE, "B"),
    ("A is wrong; C is correct.", EYE, "C"),
    # leading letter with the option text and explanations
    ("B. Left eye", EYE, "B"),
    ("C) Both eyes", EYE, "C"),
    ("D: Cannot be determined", EYE, "D"),
    ("A - Right eye", EYE, "A"),
    ("B. Left eye, because the optic disc is on the left side of the image.", EYE, "B"),
    ("B\n\nExplanation: the fovea lies temporal to the disc.", EYE, "B"),
    ("(B) fits best given the disc position", EYE, "B"),
    # the letter is the committed part when it contradicts the text after it
    ("B. Right eye", EYE, "B"),
    # option text alone
    ("Left eye", EYE, "B"),
    ("left eye.", EYE, "B"),
    ("LEFT EYE", EYE, "B"),
    ("The image shows the left eye.", EYE, "B"),
    ("Left eye, as the optic disc lies on the left.", EYE, "B"),
    ("Answer: Diabetic retinopathy", DIAGNOSIS, "C"),
    ("This is an OCT scan of the macula.", MODALITY, "B"),
    # yes / no questions
    ("Yes", YES_NO, "A"),
    ("No.", YES_NO, "B"),
    ("no, there is no leakage", YES_NO, "B"),
    ("Yes, drusen are visible in the macula.", YES_NO, "A"),
    # options that are substrings of others: longest match wins, earliest occurrence decides
    ("Congenital cataract", CATARACT, "B"),
    ("cataract", CATARACT, "A"),
    ("It is congenital cataract, not simple cataract", CATARACT, "B"),
    ("The lens shows a cataract.", CATARACT, "A"),
    # the article "a" is not option A
    ("The answer is a cataract", DIAGNOSIS, "B"),
    ("A cataract is visible in the lens.", DIAGNOSIS, "B"),
    # two letters: the first committed pattern decides
    ("The answer is B, not A.", EYE, "B"),
    ("Not A. The answer is B.", EYE, "B"),
    ("A is tempting, but the final answer: C", EYE, "C"),
    ("Maybe A... Final answer: B", EYE, "B"),
    ("A and C", EYE, None),
    # nothing committed
    ("", EYE, None),
    ("   ", EYE, None),
    (None, EYE, None),
    ("I don't know", EYE, None),
    ("asdfgh qwerty", EYE, None),
    ("The fundus appears unremarkable.", EYE, None),
    # a letter that is not an option
    ("E", EYE, None),
    ("Answer: E", EYE, None),
    ("C", YES_NO, None),
    # no options: letters only
    ("C", None, "C"),
    ("The answer is B", None, "B"),
    ("Left eye", None, None),
]


@pytest.mark.parametrize(("text", "options", "expected"), CASES)
def test_parse_choice(text: str | None, options: dict[str, str] | None, expected: str | None) -> None:
    assert parse_choice(text, options) == expected


def test_table_is_large_enough() -> None:
    assert len(CASES) >= 30


def test_lowercase_option_keys_are_accepted() -> None:
    assert parse_choice("b", {"a": "Right eye", "b": "Left eye"}) == "B"
    assert parse_choice("left eye", {"a": "Right eye", "b": "Left eye"}) == "B"


def test_parse_yes_no() -> None:
    assert parse_yes_no("Yes, drusen are present.") == "yes"
    assert parse_yes_no("NO.") == "no"
    assert parse_yes_no("There is no leakage") == "no"
    assert parse_yes_no("Nothing abnormal") is None
    assert parse_yes_no(None) is None
