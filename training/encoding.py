"""Conversation text -> token ids with image slots and training labels.

The runtime (llama.cpp, `eyecare_edge.llm`) renders a prompt with `eyecare_edge.prompts.render`,
splits it at `<image>` and tokenizes each text chunk on its own, with the image embeddings placed
between the chunks. Training must see the same token boundaries, so it does the same: each
`<image>` becomes `visual_tokens` copies of `config.image_token_index` (-200, never looked up in
the vocabulary; the model splices the image features in there) and the text around it is
tokenized chunk by chunk.

Which tokens are supervised is decided by `render_segments` alone: the assistant replies with their
end-of-turn token. A reply is tokenized apart from the context before it, exactly as at generation
time, when the prompt ends with the assistant header and the model produces the reply token by
token; so no token ever straddles context and reply.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from eyecare_edge.errors import EyecareError
from eyecare_edge.prompts import IMAGE_PLACEHOLDER, ChatTemplate, Message, render_segments

IGNORE_INDEX = -100  # label of positions that carry no loss (PyTorch cross-entropy's default)


class EncodingError(EyecareError, ValueError):
    """A conversation that cannot be turned into a training sample (the message says why)."""


@dataclass(frozen=True)
class Encoded:
    """Token ids (image positions hold `image_token_index`) and labels of one sample."""

    input_ids: list[int]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.input_ids)

    @property
    def n_supervised(self) -> int:
        return sum(label != IGNORE_INDEX for label in self.labels)


def _runs(segments: Sequence[tuple[str, bool]]) -> list[tuple[str, bool]]:
    """Consecutive pieces with the same supervision joined: the units that are tokenized."""
    out: list[tuple[str, bool]] = []
    for text, supervised in segments:
        if out and out[-1][1] == supervised:
            out[-1] = (out[-1][0] + text, supervised)
        elif text:
            out.append((text, supervised))
    return out


def _tokenize(tokenizer, text: str) -> list[int]:
    # Special tokens in the text ("<|im_start|>") are parsed as specials by HF fast tokenizers;
    # nothing is added around the text (the template's own text carries any BOS).
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def encode_segments(
    segments: Sequence[tuple[str, bool]],
    tokenizer,
    visual_tokens: Sequence[int],
    image_token_index: int,
) -> Encoded:
    """Token ids and labels for rendered `(text, supervised)` pieces.

    `visual_tokens[k]` is the number of visual tokens the preprocessing plans for the k-th
    `<image>` in the text; the counts must match the placeholders one to one.
    """
    n_placeholders = sum(text.count(IMAGE_PLACEHOLDER) for text, _ in segments)
    if n_placeholders != len(visual_tokens):
        raise EncodingError(
            f"the text has {n_placeholders} <image> placeholder(s) for {len(visual_tokens)} image(s)"
        )
    ids: list[int] = []
    labels: list[int] = []
    k = 0
    for text, supervised in _runs(segments):
        parts = text.split(IMAGE_PLACEHOLDER)
        if supervised and len(parts) > 1:
            raise EncodingError("an assistant reply holds an <image> placeholder")
        for j, part in enumerate(parts):
            if j > 0:
                ids += [image_token_index] * visual_tokens[k]
                labels += [IGNORE_INDEX] * visual_tokens[k]
                k += 1
            if part:
                tok = _tokenize(tokenizer, part)
                ids += tok
                labels += tok if supervised else [IGNORE_INDEX] * len(tok)
    return Encoded(ids, labels)


def encode_conversation(
    messages: Sequence[Message],
    template: ChatTemplate,
    tokenizer,
    visual_tokens: Sequence[int],
    *,
    image_token_index: int,
    system: str | None = None,
) -> Encoded:
    """A whole training conversation; labels supervise only the assistant replies (+ end token)."""
    if not any(m.role == "assistant" for m in messages):
        raise EncodingError("the conversation has no assistant reply to learn from")
    segments = render_segments(template, messages, system=system)
    return encode_segments(segments, tokenizer, visual_tokens, image_token_index)


def encode_prompt(
    messages: Sequence[Message],
    template: ChatTemplate,
    tokenizer,
    visual_tokens: Sequence[int],
    *,
    image_token_index: int,
    system: str | None = None,
) -> list[int]:
    """Prompt ids ending with the assistant header: what generation starts from."""
    segments = render_segments(template, messages, system=system, add_generation_prompt=True)
    return encode_segments(segments, tokenizer, visual_tokens, image_token_index).input_ids
