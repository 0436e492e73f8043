"""EyecareGPT in torch: SigLIP tower + Layer-wise Dense Connector + projector + any HF causal LM.

Structure (and weight names) follow the LLaVA family so released checkpoints map on directly:
`vision_tower.{embeddings,encoder.layers.N}` (SigLIP without post-LayerNorm/head, LLaVA's
"drop the last block" convention), `mm_projector.{0,2}` (Linear-GELU-Linear), `image_newline`,
and the LLM under `language_model` as a complete `*ForCausalLM` (so export writes it to GGUF as is).

The heavy part, `encode_tiles` (pixels -> per-tile embeddings), is exactly what export turns into
one ONNX graph; the image-dependent layout afterwards is `training.layout` (torch mirror of
`eyecare_edge.layout`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from eyecare_edge.training.config import EyecareGPTConfig
from eyecare_edge.training.layout import layout_image
from eyecare_edge.training.reduce import reduce_image
from torch import nn
from transformers import AutoModelForCausalLM, PreTrainedModel
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.models.siglip.modeling_siglip import (
    SiglipEncoder,
    SiglipPreTrainedModel,
    SiglipVisionEmbeddings,
)

from eyecare_edge.preprocess import TilePlan, plan_image
from eyecare_edge.reduce import TokenBudget


class SiglipTower(SiglipPreTrainedModel):
    """SigLIP vision encoder returning every hidden state (no post-LayerNorm, no pooling head).

    A `SiglipPreTrainedModel` so a random tower gets SigLIP's own initialisation.
    """

    def __init__(self, config) -> None:
        super().__init__(config)
        self.embeddings = SiglipVisionEmbeddings(config)
        self.encoder = SiglipEncoder(config)
        self.post_init()

    def forward(self, pixel_values: torch.Tensor) -> list[torch.Tensor]:
        h = self.embeddings(pixel_values.to(self.embeddings.patch_embedding.weight.dtype))
        states = [h]
        for layer in self.encoder.layers:
            h = layer(h, None)
            states.append(h)
        return states


class DenseConnector(nn.Module):
    """Layer-wise Dense Connector (Dense Connector's DCI) + `mlp2x_gelu` projector.

    Channels are [h[last], mean(h[fine]), mean(h[coarse])] in that order; empty groups are
    skipped, which is LLaVA's plain single-layer connector.
    """

    def __init__(self, config: EyecareGPTConfig) -> None:
        super().__init__()
        self.fine = list(config.ldc_fine_layers)
        self.coarse = list(config.ldc_coarse_layers)
        self.last = config.ldc_last_layer
        d = config.text_config.hidden_size
        self.mm_projector = nn.Sequential(
            nn.Linear(config.connector_in_features, d),
            ACT2FN[config.projector_hidden_act],
            nn.Linear(d, d),
        )

    def channels(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        """The projector's input per token: [h[last], mean(h[fine]), mean(h[coarse])]."""
        feats = [hidden_states[self.last]]
        for group in (self.fine, self.coarse):
            if group:
                feats.append(torch.stack([hidden_states[i] for i in group], dim=0).mean(dim=0))
        return torch.cat(feats, dim=-1)

    def forward(self, hidden_states: Sequence[torch.Tensor]) -> torch.Tensor:
        x = self.channels(hidden_states)
        return self.mm_projector(x.to(self.mm_projector[0].weight.dtype))


class EyecareGPTPreTrainedModel(PreTrainedModel):
    config: EyecareGPTConfig
    config_class = EyecareGPTConfig
    base_model_prefix = ""
    main_input_name = "input_ids"
    input_modalities = ("image", "text")
    supports_gradient_checkpointing = True
    _supports_sdpa = True
    _supports_attention_backend = True
    _no_split_modules = ["SiglipEncoderLayer", "LlamaDecoderLayer", "Phi3DecoderLayer", "Qwen2DecoderLayer"]

    @torch.no_grad()
    def _init_weights(self, module: nn.Module) -> None:
        super()._init_weights(module)
        if isinstance(module, EyecareGPTForConditionalGeneration):
            # LLaVA-NeXT's scale for the newline vector: that of a unit-variance embedding.
            d = module.image_newline.shape[0]
            init.normal_(module.image_newline, mean=0.0, std=1.0 / math.sqrt(d))


class EyecareGPTForConditionalGeneration(EyecareGPTPreTrainedModel):
    def __init__(self, config: EyecareGPTConfig) -> None:
        super().__init__(config)
        config.vision_config._attn_implementation = "eager"
        self.vision_tower = SiglipTower(config.vision_config)
        self.connector = DenseConnector(config)
        self.image_newline = nn.Parameter(torch.zeros(config.text_config.hidden_size))
        self.language_model = AutoModelForCausalLM.from_config(config.text_config)
        self.post_init()

    # -- embeddings ---------------------------------------------------------------------------
    def get_input_embeddings(self) -> nn.Module:
        return self.language_model.get_input_embeddings()

    def set_input_embeddings(self, value: nn.Module) -> None:
        self.language_model.set_input_embeddings(value)

    def get_output_embeddings(self) -> nn.Module:
        return self.language_model.get_output_embeddings()

    # -- vision --------------------------------------------------------------------------------
    def encode_tiles(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Normalised tiles [T, 3, S, S] -> per-tile embeddings [T, n, d] (the exported graph)."""
        return self.connector(self.vision_tower(pixel_values))

    def plans_for(self, image_sizes: torch.Tensor, image_n_tiles: torch.Tensor) -> list[TilePlan]:
        """Recompute each image's plan from its size; a single tile means multi-image mode."""
        cfg = self.config.preprocess_config()
        plans = []
        for (h, w), t in zip(image_sizes.tolist(), image_n_tiles.tolist(), strict=True):
            plan = plan_image((int(h), int(w)), cfg, single=int(t) == 1)
            if plan.n_tiles != int(t):
                raise ValueError(f"image {h}x{w} plans {plan.n_tiles} tiles but {t} were given")
            plans.append(plan)
        return plans

    def image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        image_n_tiles: torch.Tensor,
        budget: TokenBudget | None = None,
    ) -> list[torch.Tensor]:
        """Visual token sequences, one [visual_tokens, d] tensor per image, in input order;
        with a token `budget`, the reduced sequences the runtime reads (`training.reduce`)."""
        plans = self.plans_for(image_sizes, image_n_tiles)
        embeds = self.encode_tiles(pixel_values)
        chunks = torch.split(embeds, [p.n_tiles for p in plans], dim=0)
        if budget is not None:
            return [
                reduce_image(c, p, self.image_newline, budget) for c, p in zip(chunks, plans, strict=True)
            ]
        return [layout_image(c, p, self.image_newline) for c, p in zip(chunks, plans, strict=True)]

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_n_tiles: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings with each image's visual tokens spliced in at its placeholder ids."""
        mask = input_ids == self.config.image_token_index
        embeds = self.get_input_embeddings()(input_ids.masked_fill(mask, 0))
        n_slots = int(mask.sum())
        if pixel_values is None:
            if n_slots:
                raise ValueError(f"input_ids hold {n_slots} image positions but no pixel_values were given")
            return embeds
        feats = torch.cat(self.image_features(pixel_values, image_sizes, image_n_tiles), dim=0)
        if feats.shape[0] != n_slots:
            raise ValueError(f"{feats.shape[0]} visual tokens for {n_slots} image positions in input_ids")
        return embeds.masked_scatter(mask.unsqueeze(-1), feats.to(embeds.dtype))

    # -- text ----------------------------------------------------------------------------------
    def forward(
        self,
        input_ids: torch.Tensor | None = None,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_n_tiles: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs,
    ):
        if inputs_embeds is None:
            inputs_embeds = self.embed_inputs(input_ids, pixel_values, image_sizes, image_n_tiles)
        return self.language_model(
            inputs_embeds=inputs_embeds, attention_mask=attention_mask, labels=labels, **kwargs
        )

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        pixel_values: torch.Tensor | None = None,
        image_sizes: torch.Tensor | None = None,
        image_n_tiles: torch.Tensor | None = None,
        **generate_kwargs,
    ) -> torch.Tensor:
        """Generate with the LLM from spliced embeddings; returns only the new token ids."""
        embeds = self.embed_inputs(input_ids, pixel_values, image_sizes, image_n_tiles)
        if attention_mask is None:
            attention_mask = torch.ones(embeds.shape[:2], dtype=torch.long, device=embeds.device)
        return self.language_model.generate(
            inputs_embeds=embeds, attention_mask=attention_mask, **generate_kwargs
        )
