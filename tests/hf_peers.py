"""transformers' own LLaVA-OneVision pieces, built offline, as peers for our preprocessing/layout."""

from __future__ import annotations

from tokenizers import Tokenizer, models
from transformers import LlavaOnevisionProcessor, PreTrainedTokenizerFast
from transformers.models.llava_onevision.image_processing_pil_llava_onevision import (
    LlavaOnevisionImageProcessorPil,
)

from eyecare_edge.preprocess import PreprocessConfig


class _OfflineProcessor(LlavaOnevisionProcessor):
    # Without torchvision, transformers cannot resolve the (unused) video processor's base class.
    def check_argument_for_proper_class(self, argument_name, argument):
        return None if argument is None else super().check_argument_for_proper_class(argument_name, argument)


def hf_image_processor(config: PreprocessConfig) -> LlavaOnevisionImageProcessorPil:
    s = config.tile_size
    return LlavaOnevisionImageProcessorPil(
        image_grid_pinpoints=[list(p) for p in config.allowed_pinpoints()],
        size={"height": s, "width": s},
        image_mean=list(config.image_mean),
        image_std=list(config.image_std),
    )


def hf_processor(config: PreprocessConfig) -> LlavaOnevisionProcessor:
    vocab = {"<unk>": 0, "<image>": 1, "<video>": 2}
    tok = PreTrainedTokenizerFast(
        tokenizer_object=Tokenizer(models.WordLevel(vocab, unk_token="<unk>")), unk_token="<unk>"
    )
    return _OfflineProcessor(
        image_processor=hf_image_processor(config),
        tokenizer=tok,
        num_image_tokens=config.tokens_per_tile,
        vision_feature_select_strategy="full",
        vision_aspect_ratio=f"anyres_max_{config.anyres_max}",
    )
