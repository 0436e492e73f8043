"""`EyecareGPTConfig`: every architectural choice of EyecareGPT as a field.

The released model's exact values are not public; each choice (dense-connector layer groups,
projector type, anyres settings, chat template) is a field so a checkpoint with other values still
loads. Sub-configs follow transformers' composite-config convention (`vision_config`,
`text_config`), so `save_pretrained`/`from_pretrained` round-trip through one `config.json`.
"""

from __future__ import annotations

from huggingface_hub.dataclasses import strict
from transformers.configuration_utils import PreTrainedConfig, SubConfigSpec
from transformers.models.auto.configuration_auto import AutoConfig

from eyecare_edge.preprocess import PreprocessConfig

# LLaVA's convention for "an image goes here" in input_ids: a negative id never looked up in the
# embedding table, so no tokenizer needs an extra token and no vocabulary is resized.
IMAGE_TOKEN_INDEX = -200


def default_ldc_layers(num_layers: int) -> tuple[list[int], list[int], int]:
    """Dense Connector (DCI) groups for a tower whose hidden_states has `num_layers + 1` entries.

    For SigLIP-so400m with its last block dropped (26 blocks): fine = h[0..12], coarse = h[13..25],
    last = h[26].
    """
    half = num_layers // 2
    return list(range(0, half)), list(range(half, num_layers)), num_layers


@strict
class EyecareGPTConfig(PreTrainedConfig):
    model_type = "eyecare_gpt"
    sub_configs_defaults = {
        "vision_config": SubConfigSpec(config_class=AutoConfig, model_type="siglip_vision_model"),
        "text_config": SubConfigSpec(config_class=AutoConfig, model_type="llama"),
    }

    vision_config: dict | PreTrainedConfig | None = None
    text_config: dict | PreTrainedConfig | None = None
    image_token_index: int = IMAGE_TOKEN_INDEX
    # Layer-wise Dense Connector: indices into the tower's hidden_states (0 = embeddings).
    # Empty fine/coarse groups give a plain single-layer connector (LLaVA's mlp2x_gelu).
    ldc_fine_layers: list[int] | None = None
    ldc_coarse_layers: list[int] | None = None
    ldc_last_layer: int | None = None
    projector_type: str = "mlp2x_gelu"
    projector_hidden_act: str = "gelu"
    # eyecare_edge.preprocess.PreprocessConfig as a dict: tile size, pinpoints, anyres_max...
    preprocess: dict | None = None
    chat_template_name: str = "chatml"
    system_prompt: str | None = None
    preset: str | None = None
    # True while the tower holds `init`'s random weights (no pretrained SigLIP given): the vision
    # stage then starts its position table as sin-cos codes (`init_position_embedding_sincos`)
    # and clears the flag (so do align/sft with --train-vision). Never true for a pretrained or
    # imported tower, so the table is never overwritten there (`--patch-init` is the user's call).
    vision_tower_random: bool = False
    initializer_range: float = 0.02
    tie_word_embeddings: bool = False

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        n = self.vision_config.num_hidden_layers
        fine, coarse, last = default_ldc_layers(n)
        if self.ldc_fine_layers is None:
            self.ldc_fine_layers = fine
        if self.ldc_coarse_layers is None:
            self.ldc_coarse_layers = coarse
        if self.ldc_last_layer is None:
            self.ldc_last_layer = last
        for i in [*self.ldc_fine_layers, *self.ldc_coarse_layers, self.ldc_last_layer]:
            if not 0 <= i <= n:
                raise ValueError(f"dense-connector layer {i} is outside the tower's hidden states 0..{n}")
        if self.projector_type != "mlp2x_gelu":
            raise ValueError(f"unsupported projector_type {self.projector_type!r} (only 'mlp2x_gelu')")
        if self.preprocess is None:
            s = self.vision_config.image_size
            self.preprocess = PreprocessConfig(
                tile_size=s, patch_size=self.vision_config.patch_size
            ).to_dict()
        else:
            self.preprocess = self.preprocess_config().to_dict()  # validates
        if not self.tie_word_embeddings and getattr(self.text_config, "tie_word_embeddings", False):
            self.tie_word_embeddings = True

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    @property
    def connector_in_features(self) -> int:
        groups = 1 + bool(self.ldc_fine_layers) + bool(self.ldc_coarse_layers)
        return groups * self.vision_config.hidden_size


# Let transformers' Auto* classes (AutoTokenizer reads config.json) recognise our checkpoints.
AutoConfig.register(EyecareGPTConfig.model_type, EyecareGPTConfig, exist_ok=True)
