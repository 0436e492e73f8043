"""Anyres preprocessing against transformers' LLaVA-OneVision processor (the peer implementation)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from eyecare_edge.preprocess import (
    PreprocessConfig,
    apply_budget,
    grid_pinpoints,
    plan_image,
    preprocess_image,
    preprocess_images,
    preset_preprocess,
)
from eyecare_edge.resize import resize_bicubic, resize_bicubic_numpy
from tests.hf_peers import hf_image_processor, hf_processor

FULL = preset_preprocess("eyecare-3.8b")


def _sizes() -> list[tuple[int, int]]:
    """(height, width): the real sample sizes, extremes, and a seeded spread of odd sizes."""
    fixed = [
        (2336, 3504),
        (496, 512),
        (496, 768),
        (1411, 1411),
        (102, 102),
        (1000, 4000),
        (4000, 1000),
        (384, 384),
        (383, 385),
        (1, 1),
        (1, 5000),
        (5000, 1),
        (768, 1152),
        (1152, 1152),
        (3000, 3000),
    ]
    rng = np.random.default_rng(7)
    return fixed + [tuple(int(v) for v in rng.integers(16, 6000, 2)) for _ in range(60)]


@pytest.mark.parametrize("anyres_max", [4, 9, 1])
def test_visual_token_counts_equal_llava_onevision(anyres_max):
    config = FULL.replace(anyres_max=anyres_max)
    peer = hf_processor(config)
    for h, w in _sizes():
        ours = plan_image((h, w), config).visual_tokens
        theirs = peer._get_number_of_features(h, w, config.tile_size, config.tile_size)
        assert ours == theirs, (h, w)


def test_counts_for_tiny_tiles_and_budgets():
    for config in (preset_preprocess("tiny"), FULL.replace(max_tiles=2), apply_budget(FULL, "fast")):
        peer = hf_processor(config)
        for h, w in _sizes()[:40]:
            assert plan_image((h, w), config).visual_tokens == peer._get_number_of_features(
                h, w, config.tile_size, config.tile_size
            )


def test_real_images_plans(shared_data):
    hrf = plan_image((2336, 3504), FULL)
    assert (
        hrf.grid == (2, 3)
        and hrf.n_tiles == 7
        and hrf.compressed_map == (44, 66)
        and hrf.visual_tokens == 3677
    )
    oct_ = plan_image((496, 512), FULL)
    assert oct_.grid == (2, 2) and oct_.visual_tokens == 3589


def _pil(path) -> np.ndarray:
    return np.asarray(Image.open(path).convert("RGB"))


@pytest.mark.parametrize("config", [FULL, preset_preprocess("tiny")], ids=["384", "112"])
def test_pixels_match_transformers_image_processor(shared_data, config):
    """Golden check: our tiles equal transformers' (Pillow-based) processor within 1/255 per pixel."""
    peer = hf_image_processor(config)
    paths = [
        shared_data / "hrf/images/01_dr.JPG",
        shared_data / "skimage-retina/retina.jpg",
        shared_data / "skimage-retina/microaneurysms.png",
        *sorted((shared_data / "kermany-oct/images").rglob("*.jpeg"))[:3],
    ]
    for path in paths:
        rgb = _pil(path)
        ours = preprocess_image(rgb, config)
        theirs = peer(images=[rgb], return_tensors="np")["pixel_values"][0]
        assert theirs.shape == ours.tiles.shape, path
        # 1/255 of pixel range is 2/255 after normalisation with std 0.5
        assert np.abs(theirs - ours.tiles).max() <= 2 / 255 + 1e-6, path


@pytest.mark.parametrize(
    ("h", "w", "levels"),
    # Pillow >= 13 (python-pillow/Pillow#9549) runs the vertical pass first when the height
    # shrinks much more than the width (tall images -> square global view); we keep the
    # horizontal-first order every earlier Pillow used (and released checkpoints were trained
    # with), which puts such pixels up to 2 levels apart. Landscape images match exactly.
    [(201, 333, 1), (97, 1500, 1), (768, 1152, 1), (480, 1000, 1), (1200, 401, 2), (2000, 700, 2)],
)
def test_pixels_match_on_odd_synthetic_sizes(h, w, levels):
    rng = np.random.default_rng(h * w)
    peer = hf_image_processor(FULL)
    # smooth content, like photographs
    base = rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)
    rgb = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))
    theirs = peer(images=[rgb], return_tensors="np")["pixel_values"][0]
    assert np.abs(theirs - preprocess_image(rgb, FULL).tiles).max() <= levels * 2 / 255 + 1e-6


def test_multi_image_mode_matches_transformers():
    rng = np.random.default_rng(1)
    imgs = [
        np.asarray(Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8)).resize(s, Image.BILINEAR))
        for s in [(500, 300), (200, 640)]
    ]
    ours = preprocess_images(imgs, FULL)
    theirs = hf_image_processor(FULL)(images=[imgs], return_tensors="np")["pixel_values"].reshape(
        -1, 3, 384, 384
    )
    assert [p.plan.mode for p in ours] == ["single", "single"]
    assert all(p.plan.visual_tokens == FULL.tokens_per_tile + 1 for p in ours)
    stacked = np.concatenate([p.tiles for p in ours])
    assert np.abs(theirs - stacked).max() <= 2 / 255 + 1e-6


def test_tiles_layout_global_first_then_row_major():
    """Tile k (k >= 1) is the canvas block at row (k-1)//cols, col (k-1)%cols."""
    config = preset_preprocess("tiny")
    h, w = 224, 336  # exactly a 2x3 canvas: no resize beyond identity, no padding
    rgb = np.zeros((h, w, 3), dtype=np.uint8)
    for r in range(2):
        for c in range(3):
            rgb[r * 112 : (r + 1) * 112, c * 112 : (c + 1) * 112] = 40 * (r * 3 + c) + 10
    out = preprocess_image(rgb, config)
    assert out.plan.grid == (2, 3) and out.tiles.shape == (7, 3, 112, 112)
    means = [(out.tiles[k, 0].mean() * 0.5 + 0.5) * 255 for k in range(1, 7)]
    np.testing.assert_allclose(means, [40 * i + 10 for i in range(6)], atol=0.5)


def test_resize_matches_pillow():
    """Pillow's fixed-point bicubic, horizontal pass first (every Pillow before 13). Pillow 13
    sometimes runs the vertical pass first, which moves a few pixels of photographs by 1-2 levels."""
    rng = np.random.default_rng(3)
    exact = 0
    for _ in range(25):
        h, w = (int(v) for v in rng.integers(20, 1500, 2))
        oh, ow = max(1, h // int(rng.integers(1, 6))), max(1, w // int(rng.integers(1, 6)))
        base = rng.integers(0, 256, (12, 12, 3), dtype=np.uint8)
        img = np.asarray(Image.fromarray(base).resize((w, h), Image.BILINEAR))
        ref = np.asarray(Image.fromarray(img).resize((ow, oh), Image.BICUBIC)).astype(int)
        diff = np.abs(resize_bicubic(img, oh, ow).astype(int) - ref)
        assert diff.max() <= 2, (h, w, oh, ow)
        exact += diff.max() == 0
    assert exact >= 12


def test_resize_single_axis_equals_pillow():
    rng = np.random.default_rng(4)
    img = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
    for oh, ow in [(37, 200), (300, 53), (37, 7), (5, 53)]:
        assert np.array_equal(
            resize_bicubic(img, oh, ow), np.asarray(Image.fromarray(img).resize((ow, oh), Image.BICUBIC))
        )


@pytest.mark.parametrize(
    ("h", "w", "oh", "ow", "c"),
    # tall images shrunk to a square: where one two-axis Pillow 13 call runs the vertical pass first
    [
        (1200, 401, 384, 384, 3),
        (2000, 700, 112, 112, 3),
        (280, 416, 112, 112, 3),
        (31, 47, 301, 17, 3),
        (97, 1500, 40, 60, 3),
        (201, 333, 77, 91, 1),
        (5, 5, 5, 5, 3),
    ],
)
def test_resize_by_pillow_passes_equals_numpy(h, w, oh, ow, c):
    """The Pillow-backed path (where Pillow is installed) gives the numpy path's bytes."""
    import eyecare_edge.resize as resize

    assert resize._pillow_image() is not None  # else this would compare numpy with itself
    rng = np.random.default_rng(h + w + c)
    img = rng.integers(0, 256, (h, w, c), dtype=np.uint8)
    img[::9] = 255  # hard edges: negative lobes and clipping at both ends
    fast, ours = resize_bicubic(img, oh, ow), resize_bicubic_numpy(img, oh, ow)
    assert fast.shape == ours.shape == (oh, ow, c) and fast.dtype == np.uint8
    np.testing.assert_array_equal(fast, ours)


@pytest.mark.parametrize("numpy_only", [False, True], ids=["pillow", "numpy"])
def test_resize_returns_a_new_writable_array(monkeypatch, numpy_only):
    """Callers may write into the result: never the input, never read-only, even at the same size;
    four channels (Pillow premultiplies alpha) go to numpy; empty images are refused."""
    import eyecare_edge.resize as resize

    if numpy_only:
        monkeypatch.setattr(resize, "_pillow_image", lambda: None)
    img = np.random.default_rng(1).integers(0, 256, (20, 30, 3), dtype=np.uint8)
    img.flags.writeable = False
    for out in (resize_bicubic(img, 20, 30), resize_bicubic(img, 10, 15)):
        assert out.flags.writeable and out.flags.c_contiguous and not np.shares_memory(out, img)
    assert np.array_equal(resize_bicubic(img, 20, 30), img)
    rgba = np.random.default_rng(2).integers(0, 256, (40, 50, 4), dtype=np.uint8)
    np.testing.assert_array_equal(resize_bicubic(rgba, 17, 23), resize_bicubic_numpy(rgba, 17, 23))
    with pytest.raises(ValueError, match="empty image"):
        resize_bicubic(np.zeros((5, 0, 3), np.uint8), 3, 3)


def test_an_old_pillow_is_not_used(monkeypatch):
    import PIL

    import eyecare_edge.resize as resize

    resize._pillow_image.cache_clear()
    try:
        monkeypatch.setattr(PIL, "__version__", "9.5.0")
        assert resize._pillow_image() is None
        resize._pillow_image.cache_clear()
        monkeypatch.setattr(PIL, "__version__", "10.4.0")
        assert resize._pillow_image() is not None
    finally:
        resize._pillow_image.cache_clear()


def test_preprocess_without_pillow_gives_the_same_tiles(monkeypatch):
    """Where Pillow is not installed (a camera PC's runtime), numpy resizes, to the same tiles."""
    import eyecare_edge.resize as resize

    rng = np.random.default_rng(7)
    rgb = rng.integers(0, 256, (333, 517, 3), dtype=np.uint8)
    with_pillow = preprocess_image(rgb, FULL).tiles
    monkeypatch.setattr(resize, "_pillow_image", lambda: None)
    calls = []
    monkeypatch.setattr(resize, "_pass", lambda *a, _p=resize._pass: calls.append(1) or _p(*a))
    np.testing.assert_array_equal(preprocess_image(rgb, FULL).tiles, with_pillow)
    assert calls  # the numpy passes ran


def test_config_round_trip_and_validation():
    cfg = FULL.replace(max_tiles=4)
    assert PreprocessConfig.from_dict(cfg.to_dict()) == cfg
    assert all((h // 384) * (w // 384) <= 4 for h, w in cfg.allowed_pinpoints())
    with pytest.raises(ValueError, match="multiple of tile_size"):
        PreprocessConfig(pinpoints=((384, 500),))
    with pytest.raises(ValueError, match="unknown preprocessing fields"):
        PreprocessConfig.from_dict({"tile": 3})
    with pytest.raises(ValueError, match="unknown token budget"):
        apply_budget(FULL, "turbo")
    assert grid_pinpoints(112, 1, 2) == ((112, 112), (112, 224))


def test_bad_input_rejected():
    with pytest.raises(ValueError, match="RGB uint8"):
        preprocess_image(np.zeros((10, 10), dtype=np.uint8), FULL)
    with pytest.raises(ValueError, match="RGB uint8"):
        preprocess_image(np.zeros((10, 10, 3), dtype=np.float32), FULL)
