"""Closed answers constrained to a protocol's options: score each option letter's first-token
log-probability after the prompt, instead of sampling free text and parsing it.

Why scoring rather than sampling: the answer can then only be one of the options (whose codes
the protocol fixes) or "no valid answer", and the scores say how sure the model was. One
forward pass of the prompt is all it costs (`Pipeline.next_token_logits`), less than generating
even a one-word answer.

"No valid answer": the letters are a restriction, not a belief. When the model's unrestricted
next-token distribution puts less than `Protocol.min_option_probability` on all option letters
together (it wanted to say something else), the best letter would be a guess, so none is
recorded.

A general grammar-constrained decoder (a GBNF argument to `eyecare_edge.llm`, added separately) could
express the same restriction; the two could converge by building this one's allowed-token set
from a one-rule grammar. Scoring stays useful there for the probabilities it reports.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eyecare_edge.clinical.protocol import Protocol, ProtocolQuestion
from eyecare_edge.errors import EyecareError

NO_VALID_ANSWER = "no valid answer"


class ConstraintError(EyecareError, ValueError):
    """The model's tokenizer cannot express an option letter as one token."""


def option_token_ids(
    tokenize: Callable[[str], Sequence[int]], letters: Sequence[str]
) -> dict[str, list[int]]:
    """The single tokens that begin an answer with each letter: "A" and " A" (tokenizers differ
    in whether the answer's first token carries a leading space). Letters sharing a token
    (impossible in a sane vocabulary) are refused, as is a letter with no single-token form."""
    out: dict[str, list[int]] = {}
    owner: dict[int, str] = {}
    for letter in letters:
        ids: list[int] = []
        for text in (letter, " " + letter):
            toks = list(tokenize(text))
            if len(toks) == 1 and toks[0] not in ids:
                ids.append(int(toks[0]))
        if not ids:
            raise ConstraintError(
                f"option letter {letter!r} is not a single token in this model's vocabulary"
            )
        for t in ids:
            if owner.setdefault(t, letter) != letter:
                raise ConstraintError(f"options {owner[t]!r} and {letter!r} share token {t}")
        out[letter] = ids
    return out


@dataclass(frozen=True)
class OptionScores:
    """logprobs: each letter's log-probability as the first answer token (summed over its token
    forms), under the full vocabulary. p_options: their total probability. best: the letter
    with the highest score; p_best: its probability among the options only."""

    logprobs: Mapping[str, float]
    p_options: float
    best: str
    p_best: float


def score_options(logits: np.ndarray, token_ids: Mapping[str, Sequence[int]]) -> OptionScores:
    """Log-softmax over the vocabulary in float64, then each letter's log-sum-exp over its tokens."""
    x = np.asarray(logits, dtype=np.float64).reshape(-1)
    if not np.all(np.isfinite(x)):
        raise ValueError("logits contain NaN or infinite values")
    m = x.max()
    log_z = m + np.log(np.exp(x - m).sum())
    logprobs = {}
    for letter, ids in token_ids.items():
        v = x[list(ids)] - log_z
        vm = v.max()
        logprobs[letter] = float(vm + np.log(np.exp(v - vm).sum()))
    lp = np.array(list(logprobs.values()))
    p_options = float(np.exp(lp).sum())
    best = max(logprobs, key=logprobs.__getitem__)
    p_best = float(np.exp(logprobs[best]) / p_options) if p_options > 0 else 0.0
    return OptionScores(logprobs, p_options, best, p_best)


@dataclass
class ConstrainedAnswer:
    """A closed answer chosen by scoring; the attributes `run_screen` reads of a
    `pipeline.Answer`, plus `record_fields` (the `choice` it adds to the JSONL line).

    text: the option letter, or None for "no valid answer"."""

    text: str | None
    choice: dict[str, Any]
    n_image_tokens: int
    n_prompt_tokens: int
    n_generated: int = 0
    stop_reason: str = "constrained"
    cached_prefix: bool = False
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def record_fields(self) -> dict[str, Any]:
        return {"choice": self.choice}


def choose_option(scores: OptionScores, question: ProtocolQuestion, min_probability: float) -> dict[str, Any]:
    """The `choice` record: the option and its code, or "no valid answer" when the options'
    total probability is below `min_probability`. Never a code outside the protocol."""
    rounded = {k: round(v, 4) for k, v in scores.logprobs.items()}
    base = {"p_options": round(scores.p_options, 4), "logprobs": rounded, "min_probability": min_probability}
    if scores.p_options < min_probability:
        return {"status": NO_VALID_ANSWER, "letter": None, "option": None, "code": None, **base}
    opt = question.option(scores.best)
    code = {"scheme": opt.code.scheme, "value": opt.code.value, "meaning": opt.code.meaning}
    return {
        "status": "answered",
        "letter": opt.letter,
        "option": opt.text,
        "code": code,
        "p_best": round(scores.p_best, 4),
        **base,
    }


class ProtocolAnswerer:
    """`run_screen`'s per-question answer function for a protocol: closed questions by option
    scoring, text questions by `Pipeline.ask`. `pipeline` needs `ask`, `next_token_logits` and
    `lm.tokenize` (a `Pipeline`)."""

    def __init__(self, pipeline: Any, protocol: Protocol, *, max_tokens: int = 256) -> None:
        self.pipeline = pipeline
        self.protocol = protocol
        self.max_tokens = max_tokens
        self._by_prompt = {q.prompt: q for q in protocol.questions}
        tokenize = lambda text: pipeline.lm.tokenize(text, add_bos=False, parse_special=False)  # noqa: E731
        self._tokens = {
            q.qid: option_token_ids(tokenize, [o.letter for o in q.options])
            for q in protocol.questions
            if q.kind == "closed"
        }

    def __call__(self, image: Any, prompt: str) -> Any:
        q = self._by_prompt.get(prompt)
        if q is None or q.kind != "closed":
            return self.pipeline.ask(image, prompt, max_tokens=self.max_tokens)
        logits, first = self.pipeline.next_token_logits(image, prompt)
        choice = choose_option(
            score_options(logits, self._tokens[q.qid]), q, self.protocol.min_option_probability
        )
        return ConstrainedAnswer(
            text=choice["letter"],
            choice=choice,
            n_image_tokens=first.n_image_tokens,
            n_prompt_tokens=first.n_prompt_tokens,
            cached_prefix=first.cached_prefix,
            timings={k: v for k, v in first.timings.items() if k != "generate_ms"},
            stop_reason="constrained" if choice["letter"] else "no_valid_answer",
        )
