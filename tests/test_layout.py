"""Visual token layout: numpy (runtime) == torch (training) == transformers' LLaVA-OneVision."""

from __future__ import annotations

import types

import numpy as np
import pytest
import torch
from eyecare_edge.training.layout import layout_image as layout_image_torch
from transformers.models.llava_onevision.modeling_llava_onevision import LlavaOnevisionModel

from eyecare_edge.layout import bilinear_resize, layout_image
from eyecare_edge.preprocess import plan_image, preset_preprocess

SIZES = [
    (2336, 3504),
    (496, 512),
    (496, 768),
    (1411, 1411),
    (1000, 4000),
    (4000, 1000),
    (300, 500),
    (97, 1500),
    (112, 112),
]


def _embeds(plan, d, seed):
    return (
        np.random.default_rng(seed)
        .standard_normal((plan.n_tiles, plan.tokens_per_tile, d))
        .astype(np.float32)
    )


@pytest.mark.parametrize("preset", ["tiny", "eyecare-3.8b"])
def test_numpy_layout_equals_torch_layout(preset):
    config = preset_preprocess(preset)
    d = 16
    newline = np.random.default_rng(0).standard_normal(d).astype(np.float32)
    for i, size in enumerate(SIZES):
        for single in (False, True):
            plan = plan_image(size, config, single=single)
            e = _embeds(plan, d, i)
            ours = layout_image(e, plan, newline)
            theirs = layout_image_torch(torch.from_numpy(e), plan, torch.from_numpy(newline)).numpy()
            assert ours.shape == (plan.visual_tokens, d)
            np.testing.assert_allclose(ours, theirs, atol=1e-5, rtol=0)


def test_numpy_layout_equals_transformers_pack_image_features():
    """The peer: LlavaOnevisionModel.pack_image_features on the same tile embeddings."""
    config = preset_preprocess("tiny")
    side = config.tokens_per_side
    fake = types.SimpleNamespace(
        config=types.SimpleNamespace(
            vision_config=types.SimpleNamespace(image_size=config.tile_size, patch_size=config.patch_size),
            image_grid_pinpoints=[list(p) for p in config.pinpoints],
        )
    )
    d = 8
    newline = np.random.default_rng(1).standard_normal(d).astype(np.float32)
    for i, size in enumerate(SIZES):
        plan = plan_image(size, config)
        e = _embeds(plan, d, 100 + i)
        packed, lens = LlavaOnevisionModel.pack_image_features(
            fake,
            [torch.from_numpy(e)],
            torch.tensor([list(size)]),
            torch.from_numpy(newline),
            vision_aspect_ratio=f"anyres_max_{config.anyres_max}",
        )
        assert side * side == plan.tokens_per_tile
        assert int(lens[0]) == plan.visual_tokens
        np.testing.assert_allclose(layout_image(e, plan, newline), packed[0].numpy(), atol=1e-5, rtol=0)


def test_bilinear_resize_matches_torch():
    rng = np.random.default_rng(2)
    for (h, w), (oh, ow) in [
        ((54, 81), (44, 66)),
        ((81, 81), (54, 54)),
        ((7, 3), (5, 2)),
        ((10, 10), (10, 3)),
    ]:
        x = rng.standard_normal((h, w, 4)).astype(np.float32)
        ref = torch.nn.functional.interpolate(
            torch.from_numpy(x).permute(2, 0, 1)[None], size=(oh, ow), mode="bilinear", align_corners=False
        )
        np.testing.assert_allclose(bilinear_resize(x, oh, ow), ref[0].permute(1, 2, 0).numpy(), atol=1e-6)


def test_layout_rejects_mismatched_embeddings():
    plan = plan_image((500, 300), preset_preprocess("tiny"))
    with pytest.raises(ValueError, match="do not match the plan"):
        layout_image(
            np.zeros((plan.n_tiles + 1, plan.tokens_per_tile, 4), np.float32), plan, np.zeros(4, np.float32)
        )
