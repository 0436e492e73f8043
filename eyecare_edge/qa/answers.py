"""Read the chosen option out of a free-text answer to a multiple-choice question.

Models answer closed questions in many styles ("B", "(B)", "Answer: B", "**B**", "B. Left eye",
"Left eye", "Yes, ..."); scoring by exact string match would measure formatting, not knowledge.
`parse_choice` maps all of them to a letter, or to None when no answer is committed (which the
scorer counts as wrong and reports as "unparseable").

The rule when a text mentions several letters or options: patterns are tried in a fixed order
of how committed they are, and the first pattern that yields a valid letter decides; within one
pattern the earliest match in the text wins (except "final answer", where the last one wins):

1. the whole answer is one letter, possibly wrapped: "B", "B.", "(B)", "b)", "**B**", "[B]";
2. "final answer: X" (the last one: chain-of-thought answers revise themselves);
3. an answer marker: "Answer: B", "The answer is B.", "correct option is (C)", "I choose B",
   "Option B: Left eye", "It's B";
4. a letter declared right: "B is correct", "(C) is the best answer";
5. a leading letter: "B. Left eye", "b) left eye", "C: ...", "A - ...";
6. a letter in parentheses anywhere: "... so (B) fits";
7. an option's text: case- and punctuation-insensitive, whole words; an option whose text only
   occurs inside a longer option's occurrence does not count (options "Cataract" vs "Congenital
   cataract"); among the rest the earliest occurrence wins, ties going to the longer text. Yes/no
   questions are the case where the options are "Yes"/"No".

A letter that is not one of the options ("E" when only A-D exist) never counts. Lower-case
letters count only where they cannot be an article or a word ("b)", "answer: b"), so "the answer
is a cataract" is not read as A. A letter that contradicts the text after it ("B. Right eye" when
B is "Left eye") follows the letter: the letter is the committed part.
"""

from __future__ import annotations

import re
import string
from collections.abc import Mapping

# Letters accepted when no options are given.
_DEFAULT_LETTERS = "ABCDEFGH"

# A letter token: upper case not glued to a word, or lower case followed by closing punctuation /
# the end of the text (so "a" the article and "I" the pronoun in prose are not letters).
_LETTER = r"(?:(?P<u>[A-Z])(?![A-Za-z0-9'’])|(?P<l>[a-z])(?=\s*(?:[).:,\]]|$)))"

_WHOLE = re.compile(r"^[\s(\[{<'\"]*([A-Za-z])[\s)\]}>'\".:,;!]*$")
# Words linking a marker to its letter: "is", "would be", ":", "=", "-" (any number of them).
_LINK = r"(?:\s*(?i:is|would\s+be|should\s+be|[:=\-–]))*\s*(?:(?i:option|choice)\s*)?[(\[]?\s*"
# Case-sensitive on purpose (the letter token decides case itself); the marker words are scoped (?i:).
_FINAL = re.compile(r"(?i:final\s+answer)" + _LINK + _LETTER)
_MARKER = re.compile(
    r"(?i:\banswer|\bcorrect\s+(?:option|choice)|\boption|\bchoice|\bchoose|\bselect|\bpick|\bgo\s+with"
    r"|\bit(?:'s|’s|\s+is|\s+must\s+be|\s+should\s+be))" + _LINK + _LETTER
)
# "B is correct", "(C) is the right answer".
_IS_CORRECT = re.compile(
    r"(?<![A-Za-z])[(\[]?([A-Z])[)\]]?\s+(?i:is\s+(?:the\s+)?(?:correct|right|best|answer|true))"
)
_LEADING = re.compile(r"^[\s(\[]*([A-Za-z])(?:\s*[)\].:,]|\s*$|\s*\n|\s+[-–—])")
_PAREN = re.compile(r"[(\[]\s*([A-Za-z])\s*[)\]]")
_MARKDOWN = re.compile(r"\*\*|__|`|^#+\s*", re.MULTILINE)
_PUNCT = str.maketrans(dict.fromkeys(string.punctuation + "“”‘’–—", " "))


def _norm(text: str) -> str:
    """Lower case, punctuation to spaces, single spaces: the form option texts are compared in."""
    return " ".join(text.lower().translate(_PUNCT).split())


def _letter_of(m: re.Match[str], *, group: int | None = None) -> str:
    if group is not None:
        return m.group(group).upper()
    return (m.group("u") or m.group("l")).upper()


def _match_option_text(text: str, options: Mapping[str, str]) -> str | None:
    """The letter whose option text the answer states (rule 6 in the module docstring)."""
    haystack = f" {_norm(text)} "
    spans: list[tuple[int, int, str]] = []
    for letter, option in options.items():
        needle = _norm(str(option))
        if not needle:
            continue
        start = haystack.find(f" {needle} ")
        while start != -1:
            spans.append((start + 1, start + 1 + len(needle), letter))
            start = haystack.find(f" {needle} ", start + 1)
    # Drop occurrences nested in a longer occurrence of a *different* option.
    kept = [
        s
        for s in spans
        if not any(
            o[2] != s[2] and o[0] <= s[0] and s[1] <= o[1] and (o[1] - o[0]) > (s[1] - s[0]) for o in spans
        )
    ]
    if not kept:
        return None
    kept.sort(key=lambda s: (s[0], -(s[1] - s[0])))
    return kept[0][2]


def parse_choice(text: str | None, options: Mapping[str, str] | None) -> str | None:
    """The option letter `text` commits to, or None (see the module docstring for the rules).

    `options` maps letter -> option text; without options only letter patterns are tried and
    letters A-H accepted.
    """
    if not text or not text.strip():
        return None
    letters = {k.strip().upper(): v for k, v in (options or {}).items()}
    valid = set(letters) if letters else set(_DEFAULT_LETTERS)
    clean = _MARKDOWN.sub("", text).strip()

    m = _WHOLE.match(clean)
    if m and m.group(1).upper() in valid:
        # A one-letter answer that is also an option's text ("a" for option "A") is still that letter.
        return m.group(1).upper()

    finals = [_letter_of(f) for f in _FINAL.finditer(clean)]
    finals = [f for f in finals if f in valid]
    if finals:
        return finals[-1]

    for rx, group in ((_MARKER, None), (_IS_CORRECT, 1), (_LEADING, 1), (_PAREN, 1)):
        for m in rx.finditer(clean):
            letter = _letter_of(m, group=group)
            if letter in valid:
                return letter

    if letters:
        return _match_option_text(clean, letters)
    return None


_YES_NO = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


def parse_yes_no(text: str | None) -> str | None:
    """ "yes" / "no" for a yes/no question asked without options: the first standalone yes or no
    word ("No, there is no leakage" -> "no", "There is no drusen" -> "no"); None if neither occurs."""
    m = _YES_NO.search(text or "")
    return m.group(1).lower() if m else None
