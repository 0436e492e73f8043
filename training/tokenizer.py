"""A small byte-level BPE tokenizer trained locally, for presets that have no pretrained LLM.

`tiny` (and the full-size presets when built from config alone, for random-weight benchmarks)
need a tokenizer but no hub is reachable. GPT-2-style byte-level BPE covers any text, converts to
GGUF like Qwen2's and SmolLM2's tokenizers, and trains in a second on ophthalmic text.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from eyecare_edge.prompts import TEMPLATES

# Special tokens each chat template needs, end-of-turn token first.
TEMPLATE_SPECIALS: dict[str, list[str]] = {
    "chatml": ["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
    "qwen_2": ["<|im_end|>", "<|im_start|>", "<|endoftext|>"],
    "phi3_instruct": ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>", "<|endoftext|>"],
}

# HF chat templates (jinja) equivalent to eyecare_edge.prompts for the same template name, so a
# checkpoint's tokenizer renders what the bundle's prompts render.
_CHATML_JINJA = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
_PHI3_JINJA = (
    "{% for message in messages %}{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}"
)
JINJA_TEMPLATES = {"chatml": _CHATML_JINJA, "qwen_2": _CHATML_JINJA, "phi3_instruct": _PHI3_JINJA}

# A few hundred words of clinical ophthalmology so the merges know the domain's vocabulary even
# before phantom text is added.
OPHTHALMIC_TEXT = """
Colour fundus photograph of the right eye and the left eye. The optic disc is on the nasal side with a
cup-to-disc ratio of 0.3. The macula and fovea are centred; the foveal reflex is present. Retinal arteries
and veins show normal calibre. Dot and blot haemorrhages, flame-shaped haemorrhages, microaneurysms, hard
exudates and cotton-wool spots are signs of diabetic retinopathy. Drusen at the macula suggest age-related
macular degeneration. Non-proliferative diabetic retinopathy: mild, moderate, severe. Proliferative diabetic
retinopathy with neovascularisation. Glaucomatous optic neuropathy with an enlarged cup. Retinal detachment,
retinal vein occlusion, central serous chorioretinopathy, choroidal neovascularisation, diabetic macular
oedema. Optical coherence tomography B-scan of the macula: retinal layers, retinal pigment epithelium,
ellipsoid zone, external limiting membrane, outer nuclear layer, inner nuclear layer, ganglion cell layer,
nerve fibre layer, choroid. Intraretinal fluid, subretinal fluid, pigment epithelial detachment, drusenoid
deposits. Fundus fluorescein angiography, indocyanine green angiography, ultrasound biomicroscopy, slit-lamp
photograph, fluorescein staining of the cornea, computed tomography of the orbit. Examination Type: Image
Description: Diagnostic Recommendation: Refer to an ophthalmologist. Routine follow-up in twelve months.
Urgent referral. Anti-VEGF treatment may be considered. Laser photocoagulation. Control blood glucose and
blood pressure. Which eye is shown? Is there haemorrhage? What is the diagnosis? Answer with the option's
letter from the given choices directly. A. Yes B. No C. D. Normal Abnormal None present visible mild
moderate severe no evidence of 0 1 2 3 4 5 6 7 8 9 10 mm µm % .,;:!?()[]{}"'-/
"""


def template_text(chat_template: str) -> str:
    """One exchange as the chat template frames it, so the merges learn its role names and default
    system prompt: without them every turn of the demo's training conversations spent 6 tokens on
    "assistant" and 2 on "user", and each sample 14 on the system prompt."""
    t = TEMPLATES[chat_template]
    return "".join(
        (
            t.system_prefix + t.default_system + t.system_suffix + t.turn_separator,
            t.user_prefix + "Question?" + t.user_suffix + t.turn_separator,
            t.assistant_prefix + "Answer." + t.assistant_suffix + t.turn_separator,
        )
    )


def train_bpe_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 2048,
    chat_template: str = "chatml",
) -> PreTrainedTokenizerFast:
    """Train a GPT-2-style byte-level BPE with the chat template's special tokens."""
    if chat_template not in TEMPLATE_SPECIALS:
        raise ValueError(f"no special-token set for chat template {chat_template!r}")
    specials = TEMPLATE_SPECIALS[chat_template]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([OPHTHALMIC_TEXT, template_text(chat_template), *texts], trainer=trainer)
    eot = TEMPLATES[chat_template].assistant_suffix
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token=eot,
        pad_token="<|endoftext|>",
        unk_token=None,
        bos_token=None,
        clean_up_tokenization_spaces=False,
    )
    fast.chat_template = JINJA_TEMPLATES[chat_template]
    return fast
