"""Chat templates and the prompt texts shared by training, export validation and the runtime.

One module so the text a model was trained on is, byte for byte, the text the bundle is asked with:
training renders conversations with `render_segments` (to know which spans to supervise), the runtime
renders a prompt with `render` and splits it at `IMAGE_PLACEHOLDER` to inject image embeddings.

The templates follow the conversation formats of the LLaVA family of code bases that EyecareGPT
most likely used (`phi3_instruct`, `qwen_2`), plus `chatml` for SmolLM2 (tests and the demo).
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

IMAGE_PLACEHOLDER = "<image>"
# The kinds of question the model is asked (bench records, `screen --task`, training samples):
# closed (options, answered by letter), open (free text), report (the examination report prompt).
TASKS = ("closed", "open", "report")

REPORT_PROMPT = (
    "Write an ophthalmic examination report for this image with three sections: "
    "Examination Type, Image Description and Diagnostic Recommendation."
)

OPEN_QA_DEFAULT_PROMPT = "Describe the findings in this image."

CLOSED_QA_INSTRUCTION = "Answer with the option's letter from the given choices directly."


@dataclass(frozen=True)
class ChatTemplate:
    """How one model family wraps system, user and assistant turns.

    `assistant_suffix` holds the end-of-turn token; training supervises it (the model must learn
    to stop), generation stops on it (`stop_strings`).
    """

    name: str
    bos: str
    system_prefix: str
    system_suffix: str
    user_prefix: str
    user_suffix: str
    assistant_prefix: str
    assistant_suffix: str
    default_system: str
    stop_strings: tuple[str, ...]
    # Separator that follows every end-of-turn token; part of the context, never supervised.
    turn_separator: str = "\n"


TEMPLATES: dict[str, ChatTemplate] = {
    # Phi-3 / Phi-3.5 instruct (HealthGPT's `phi3_instruct`).
    "phi3_instruct": ChatTemplate(
        name="phi3_instruct",
        bos="",
        system_prefix="<|system|>\n",
        system_suffix="<|end|>",
        user_prefix="<|user|>\n",
        user_suffix="<|end|>",
        assistant_prefix="<|assistant|>\n",
        assistant_suffix="<|end|>",
        default_system="You are a helpful assistant.",
        stop_strings=("<|end|>", "<|endoftext|>"),
    ),
    # Qwen2 / Qwen2.5 ChatML (LLaVA-NeXT's `qwen_2`).
    "qwen_2": ChatTemplate(
        name="qwen_2",
        bos="",
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>",
        default_system="You are a helpful assistant.",
        stop_strings=("<|im_end|>", "<|endoftext|>"),
    ),
    # ChatML as SmolLM2-Instruct and our `tiny` tokenizer use it.
    "chatml": ChatTemplate(
        name="chatml",
        bos="",
        system_prefix="<|im_start|>system\n",
        system_suffix="<|im_end|>",
        user_prefix="<|im_start|>user\n",
        user_suffix="<|im_end|>",
        assistant_prefix="<|im_start|>assistant\n",
        assistant_suffix="<|im_end|>",
        default_system="You are a helpful ophthalmology assistant.",
        stop_strings=("<|im_end|>", "<|endoftext|>"),
    ),
}


@dataclass(frozen=True)
class Message:
    role: str  # "system" | "user" | "assistant"
    content: str


def get_template(name: str) -> ChatTemplate:
    try:
        return TEMPLATES[name]
    except KeyError:
        raise ValueError(f"unknown chat template {name!r}; known: {', '.join(sorted(TEMPLATES))}") from None


def render_segments(
    template: ChatTemplate,
    messages: Sequence[Message],
    *,
    system: str | None = None,
    add_generation_prompt: bool = False,
) -> list[tuple[str, bool]]:
    """Render a conversation as `(text, supervised)` pieces whose concatenation is the prompt.

    Supervised pieces are the assistant replies with their end-of-turn token; everything else
    (system, user turns, role headers, separators) is context. A leading system message in
    `messages` wins over `system`, which wins over the template's default; an empty string
    means "no system turn".
    """
    msgs = list(messages)
    if msgs and msgs[0].role == "system":
        system, msgs = msgs[0].content, msgs[1:]
    if system is None:
        system = template.default_system
    out: list[tuple[str, bool]] = []
    head = template.bos
    if system:
        head += template.system_prefix + system + template.system_suffix + template.turn_separator
    if head:
        out.append((head, False))
    for m in msgs:
        if m.role == "user":
            out.append(
                (template.user_prefix + m.content + template.user_suffix + template.turn_separator, False)
            )
        elif m.role == "assistant":
            out.append((template.assistant_prefix, False))
            out.append((m.content + template.assistant_suffix, True))
            out.append((template.turn_separator, False))
        else:
            raise ValueError(
                f"unknown message role {m.role!r} (expected user or assistant after the system turn)"
            )
    if add_generation_prompt:
        out.append((template.assistant_prefix, False))
    return out


def render(
    template: ChatTemplate,
    messages: Sequence[Message],
    *,
    system: str | None = None,
    add_generation_prompt: bool = True,
) -> str:
    """The prompt text for `messages`, ending with the assistant header when generating."""
    return "".join(
        t
        for t, _ in render_segments(
            template, messages, system=system, add_generation_prompt=add_generation_prompt
        )
    )


def strip_special_whitespace(text: str, rstrip: Sequence[str] = (), lstrip: Sequence[str] = ()) -> str:
    """Drop whitespace after `rstrip` tokens and before `lstrip` tokens, as HF tokenizers do.

    Some tokenizers (Phi-3's `<|user|>`, `<|end|>`...) mark special tokens to swallow adjacent
    whitespace. A GGUF has no field for that, so the runtime applies it to the text before
    llama.cpp tokenizes it; the token ids then equal the checkpoint tokenizer's.
    """
    for tok in rstrip:
        text = re.sub(re.escape(tok) + r"\s+", tok, text)
    for tok in lstrip:
        text = re.sub(r"\s+" + re.escape(tok), tok, text)
    return text


def format_closed_question(question: str, options: Mapping[str, str]) -> str:
    """A multiple-choice question as the model sees it (LLaVA's closed-QA convention).

    Used to write training conversations and to ask the bundle at bench time, so both see the
    same text.
    """
    lines = [question.strip()]
    lines += [f"{letter}. {text}" for letter, text in sorted(options.items())]
    lines.append(CLOSED_QA_INSTRUCTION)
    return "\n".join(lines)


def with_image_placeholders(text: str, n_images: int) -> str:
    """Prefix `text` with one `<image>` line per image unless it already places them itself."""
    if n_images == 0 or IMAGE_PLACEHOLDER in text:
        return text
    return "\n".join([IMAGE_PLACEHOLDER] * n_images) + "\n" + text
