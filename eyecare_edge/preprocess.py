"""The one image preprocessing of EyecareGPT: anyres tiling, shared by training, export and runtime.

An image becomes a plan (which grid, which sizes, how many visual tokens) and float32 tiles:
tile 0 is the global view (the whole image squashed to one tile), tiles 1.. are the canvas cut
row-major. This reproduces transformers' LLaVA-OneVision image processor (Pillow bicubic,
rescale 1/255, normalise) so checkpoints trained with it see the same pixels, and its token
count equals `LlavaOnevisionProcessor` for the same pinpoints, tile size and `anyres_max_N`.

Pure functions and frozen dataclasses only: the plan is data the layout code (and the training
model) consume, so train and runtime cannot drift.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field

import numpy as np

from eyecare_edge.presets import get_preset
from eyecare_edge.resize import resize_bicubic

SIGLIP_MEAN = (0.5, 0.5, 0.5)
SIGLIP_STD = (0.5, 0.5, 0.5)


def grid_pinpoints(tile_size: int, max_rows: int = 3, max_cols: int = 3) -> tuple[tuple[int, int], ...]:
    """Canvas sizes (height, width) = (i·tile, j·tile) for 1 <= i <= max_rows, 1 <= j <= max_cols."""
    return tuple(
        (i * tile_size, j * tile_size) for i in range(1, max_rows + 1) for j in range(1, max_cols + 1)
    )


@dataclass(frozen=True)
class PreprocessConfig:
    """Everything that decides pixels and token counts; stored in checkpoints and bundle manifests."""

    tile_size: int = 384
    patch_size: int = 14
    image_mean: tuple[float, float, float] = SIGLIP_MEAN
    image_std: tuple[float, float, float] = SIGLIP_STD
    # Canvas candidates as (height, width), multiples of tile_size.
    pinpoints: tuple[tuple[int, int], ...] = field(default_factory=lambda: grid_pinpoints(384))
    # Compression cap N of `anyres_max_N`: the merged patch map is shrunk to about N tiles' worth
    # of tokens when it exceeds that by more than 10%. 0 disables compression.
    anyres_max: int = 4
    # Token budget: only canvases of at most this many tiles (None = all pinpoints).
    max_tiles: int | None = None
    # Several images in one prompt: each is padded to a square with the mean colour (as
    # LLaVA-OneVision does) and becomes one tile plus one newline token.
    multi_image: str = "pad_square"

    def __post_init__(self) -> None:
        if self.patch_size < 1 or self.tile_size < self.patch_size:
            raise ValueError(f"tile_size {self.tile_size} must be at least patch_size {self.patch_size}")
        for h, w in self.pinpoints:
            if h % self.tile_size or w % self.tile_size or h <= 0 or w <= 0:
                raise ValueError(
                    f"pinpoint {(h, w)} is not a positive multiple of tile_size {self.tile_size}"
                )
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ValueError(f"max_tiles must be >= 1, got {self.max_tiles}")
        if self.multi_image != "pad_square":
            raise ValueError(f"unknown multi_image mode {self.multi_image!r} (only 'pad_square')")
        if not self.allowed_pinpoints():
            raise ValueError(f"no pinpoint has at most max_tiles={self.max_tiles} tiles")

    @property
    def tokens_per_side(self) -> int:
        # A stride-`patch_size` convolution drops the remainder: 384 px / 14 -> 27 patches.
        return self.tile_size // self.patch_size

    @property
    def tokens_per_tile(self) -> int:
        return self.tokens_per_side**2

    def allowed_pinpoints(self) -> tuple[tuple[int, int], ...]:
        if self.max_tiles is None:
            return tuple(self.pinpoints)
        s = self.tile_size
        return tuple((h, w) for h, w in self.pinpoints if (h // s) * (w // s) <= self.max_tiles)

    def replace(self, **changes: object) -> PreprocessConfig:
        data = asdict(self)
        data.update(changes)
        return PreprocessConfig.from_dict(data)

    def to_dict(self) -> dict:
        d = asdict(self)
        d["image_mean"] = list(self.image_mean)
        d["image_std"] = list(self.image_std)
        d["pinpoints"] = [list(p) for p in self.pinpoints]
        return d

    @classmethod
    def from_dict(cls, d: dict) -> PreprocessConfig:
        known = {f for f in cls.__dataclass_fields__}
        unknown = set(d) - known
        if unknown:
            raise ValueError(f"unknown preprocessing fields: {sorted(unknown)}")
        d = dict(d)
        if "image_mean" in d:
            d["image_mean"] = tuple(float(x) for x in d["image_mean"])
        if "image_std" in d:
            d["image_std"] = tuple(float(x) for x in d["image_std"])
        if "pinpoints" in d:
            d["pinpoints"] = tuple((int(h), int(w)) for h, w in d["pinpoints"])
        return cls(**d)


def preset_preprocess(preset: str) -> PreprocessConfig:
    """Preprocessing of a named preset, known without loading torch (for `inspect`)."""
    p = get_preset(preset)
    return PreprocessConfig(
        tile_size=p.tile_size,
        patch_size=p.patch_size,
        pinpoints=grid_pinpoints(p.tile_size),
        anyres_max=p.anyres_max,
    )


# Named token budgets for `--budget`: CPU-only clinics trade detail for time-to-first-token.
BUDGETS: dict[str, dict[str, int | None]] = {
    "full": {"max_tiles": None},
    "balanced": {"max_tiles": 4},
    "fast": {"max_tiles": 2, "anyres_max": 1},
    "minimal": {"max_tiles": 1, "anyres_max": 1},
}


def apply_budget(config: PreprocessConfig, budget: str) -> PreprocessConfig:
    try:
        return config.replace(**BUDGETS[budget])
    except KeyError:
        raise ValueError(f"unknown token budget {budget!r}; known: {', '.join(BUDGETS)}") from None


@dataclass(frozen=True)
class TilePlan:
    """What one image costs and how its tiles map back to a token map.

    Sizes are (height, width). `grid` is (rows, cols) of patch tiles (not counting the global
    view); `feature_map` is the merged patch-token map after unpadding, `compressed_map` the map
    after `anyres_max` compression (equal when not compressed).
    """

    mode: str  # "anyres" | "single"
    image_size: tuple[int, int]
    canvas: tuple[int, int]
    resized: tuple[int, int]
    grid: tuple[int, int]
    n_tiles: int
    tokens_per_tile: int
    feature_map: tuple[int, int]
    compressed_map: tuple[int, int]
    visual_tokens: int

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


def select_best_resolution(
    image_size: tuple[int, int], candidates: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """LLaVA-NeXT's canvas choice: most effective (downscaled) pixels, then least wasted canvas."""
    h, w = image_size
    best, best_eff, best_waste = None, 0, math.inf
    for ch, cw in candidates:
        scale = min(cw / w, ch / h)
        eff = min(int(w * scale) * int(h * scale), w * h)
        waste = ch * cw - eff
        if eff > best_eff or (eff == best_eff and waste < best_waste):
            best, best_eff, best_waste = (ch, cw), eff, waste
    if best is None:
        raise ValueError("no canvas candidates")
    return best


def fit_size(image_size: tuple[int, int], canvas: tuple[int, int]) -> tuple[int, int]:
    """Aspect-preserving size of the image on the canvas (transformers' `get_patch_output_size`)."""
    h, w = image_size
    ch, cw = canvas
    scale_w, scale_h = cw / w, ch / h
    if scale_w < scale_h:
        return min(math.ceil(h * scale_w), ch), cw
    return ch, min(math.ceil(w * scale_h), cw)


def unpadded_map(image_size: tuple[int, int], map_size: tuple[int, int]) -> tuple[int, int, int, int]:
    """Rows/cols of a padded token map that hold image, as LLaVA-NeXT's `unpad_image`.

    Returns (top, bottom, left, right) slice bounds into the (height, width) map.
    """
    oh, ow = image_size
    mh, mw = map_size
    if ow / oh > mw / mh:
        new_h = int(round(oh * (mw / ow), 7))
        pad = (mh - new_h) // 2
        return pad, mh - pad, 0, mw
    new_w = int(round(ow * (mh / oh), 7))
    pad = (mw - new_w) // 2
    return 0, mh, pad, mw - pad


def compressed_size(map_size: tuple[int, int], anyres_max: int, tokens_per_tile: int) -> tuple[int, int]:
    """`anyres_max_N` compression target for a (height, width) token map (unchanged below 1.1x)."""
    h, w = map_size
    if anyres_max <= 0:
        return h, w
    ratio = math.sqrt(h * w / (anyres_max * tokens_per_tile))
    if ratio > 1.1:
        return int(h // ratio), int(w // ratio)
    return h, w


def plan_image(image_size: tuple[int, int], config: PreprocessConfig, *, single: bool = False) -> TilePlan:
    """The anyres plan for an image of `image_size` (height, width); `single` = multi-image mode."""
    h, w = image_size
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {h}x{w}")
    s, n = config.tile_size, config.tokens_per_side
    if single:
        side = max(h, w)
        return TilePlan("single", (h, w), (side, side), (h, w), (1, 1), 1, n * n, (n, n), (n, n), n * n + 1)
    canvas = select_best_resolution((h, w), config.allowed_pinpoints())
    resized = fit_size((h, w), canvas)
    rows, cols = canvas[0] // s, canvas[1] // s
    top, bottom, left, right = unpadded_map((h, w), (rows * n, cols * n))
    fmap = (bottom - top, right - left)
    cmap = compressed_size(fmap, config.anyres_max, n * n)
    tokens = n * n + cmap[0] * cmap[1] + cmap[0]
    return TilePlan(
        "anyres", (h, w), canvas, resized, (rows, cols), 1 + rows * cols, n * n, fmap, cmap, tokens
    )


def _normalize(tiles_u8: np.ndarray, config: PreprocessConfig) -> np.ndarray:
    """uint8 [T, S, S, 3] -> float32 [T, 3, S, S]: x/255, then (x - mean) / std per channel."""
    x = tiles_u8.astype(np.float32) * np.float32(1.0 / 255.0)
    mean = np.asarray(config.image_mean, dtype=np.float32)
    std = np.asarray(config.image_std, dtype=np.float32)
    x = (x - mean) / std
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


def tile_pixels(rgb: np.ndarray, plan: TilePlan, config: PreprocessConfig) -> np.ndarray:
    """uint8 tiles [T, S, S, 3] for `rgb` under `plan` (global view first, then row-major)."""
    s = config.tile_size
    if plan.mode == "single":
        h, w = rgb.shape[:2]
        side = max(h, w)
        fill = np.array([int(m * 255) for m in config.image_mean], dtype=np.uint8)
        square = np.empty((side, side, 3), dtype=np.uint8)
        square[:] = fill
        y0, x0 = (side - h) // 2, (side - w) // 2
        square[y0 : y0 + h, x0 : x0 + w] = rgb
        return resize_bicubic(square, s, s)[None]
    global_view = resize_bicubic(rgb, s, s)
    rh, rw = plan.resized
    resized = resize_bicubic(rgb, rh, rw)
    ch, cw = plan.canvas
    canvas = np.zeros((ch, cw, 3), dtype=np.uint8)
    y0, x0 = (ch - rh) // 2, (cw - rw) // 2
    canvas[y0 : y0 + rh, x0 : x0 + rw] = resized
    rows, cols = plan.grid
    tiles = canvas.reshape(rows, s, cols, s, 3).transpose(0, 2, 1, 3, 4).reshape(rows * cols, s, s, 3)
    return np.concatenate([global_view[None], tiles], axis=0)


@dataclass(frozen=True)
class PreprocessedImage:
    tiles: np.ndarray  # float32 [T, 3, S, S], normalised
    plan: TilePlan


def preprocess_image(rgb: np.ndarray, config: PreprocessConfig, *, single: bool = False) -> PreprocessedImage:
    """RGB uint8 (H, W, 3) -> normalised tiles and their plan."""
    if rgb.ndim != 3 or rgb.shape[2] != 3 or rgb.dtype != np.uint8:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {rgb.dtype} {rgb.shape}")
    plan = plan_image(rgb.shape[:2], config, single=single)
    return PreprocessedImage(_normalize(tile_pixels(rgb, plan, config), config), plan)


def preprocess_images(images: Sequence[np.ndarray], config: PreprocessConfig) -> list[PreprocessedImage]:
    """One image -> anyres tiles; several images in one prompt -> one padded tile each."""
    single = len(images) > 1
    return [preprocess_image(im, config, single=single) for im in images]
