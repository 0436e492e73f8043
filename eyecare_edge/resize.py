"""Bicubic resize that reproduces Pillow's `Image.resize(..., BICUBIC)` on uint8 RGB, in numpy.

Why not OpenCV: `cv2.INTER_CUBIC` uses a different kernel (a = -0.75) and does not widen the
kernel when shrinking, so a 3504-px fundus photo shrunk to 384 px comes out aliased and far from
what SigLIP/LLaVA-OneVision image processors (which call Pillow) fed the model in training.
Why not Pillow itself: the runtime keeps its dependencies to numpy + OpenCV; this file is the whole
cost of that choice.

The algorithm mirrors Pillow's `Resample.c` for 8-bit images: separable convolution, horizontal
pass first, kernel support scaled by the shrink factor, coefficients normalised and converted to
22-bit fixed point, each pass rounded and clipped to uint8. The result equals Pillow's exactly
(tests compare against Pillow on many sizes).
"""

from __future__ import annotations

import math

import numpy as np

_PRECISION_BITS = 32 - 8 - 2
_BICUBIC_A = -0.5
_BICUBIC_SUPPORT = 2.0


def _bicubic(x: np.ndarray) -> np.ndarray:
    x = np.abs(x)
    a = _BICUBIC_A
    near = ((a + 2.0) * x - (a + 3.0)) * x * x + 1.0
    far = (((x - 5.0) * x + 8.0) * x - 4.0) * a
    return np.where(x < 1.0, near, np.where(x < 2.0, far, 0.0))


def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray]:
    """Fixed-point taps for one axis: `(index[out, k], weight[out, k])`, Pillow's rules.

    Taps past a row's window get weight 0 and a valid (clamped) index, so a pass is a plain
    gather-multiply-add over k.
    """
    scale = in_size / out_size
    filterscale = max(scale, 1.0)
    support = _BICUBIC_SUPPORT * filterscale
    ksize = math.ceil(support) * 2 + 1

    centers = (np.arange(out_size, dtype=np.float64) + 0.5) * scale
    # Pillow truncates (C cast) `center -/+ support + 0.5`; both are >= 0 after the clamp below.
    xmin = np.maximum((centers - support + 0.5).astype(np.int64), 0)
    xmax = np.minimum((centers + support + 0.5).astype(np.int64), in_size) - xmin
    taps = np.arange(ksize)
    pos = xmin[:, None] + taps[None, :]
    w = _bicubic((pos - centers[:, None] + 0.5) / filterscale)
    w = np.where(taps[None, :] < xmax[:, None], w, 0.0)
    total = w.sum(axis=1, keepdims=True)
    w = np.divide(w, total, out=np.zeros_like(w), where=total != 0)
    fixed = np.where(
        w < 0, np.trunc(-0.5 + w * (1 << _PRECISION_BITS)), np.trunc(0.5 + w * (1 << _PRECISION_BITS))
    )
    return np.minimum(pos, in_size - 1), fixed.astype(np.int32)


def _pass(img: np.ndarray, out_size: int, axis: int) -> np.ndarray:
    """One separable pass along `axis` (0 = rows/vertical, 1 = columns/horizontal)."""
    index, weight = _coefficients(img.shape[axis], out_size)
    shape = [1, 1, 1]
    shape[axis] = out_size
    acc = np.full(
        [out_size if a == axis else s for a, s in enumerate(img.shape)],
        1 << (_PRECISION_BITS - 1),
        dtype=np.int32,
    )
    for k in range(index.shape[1]):
        wk = weight[:, k]
        if not wk.any():
            continue
        acc += np.take(img, index[:, k], axis=axis).astype(np.int32) * wk.reshape(shape)
    return np.clip(acc >> _PRECISION_BITS, 0, 255).astype(np.uint8)


def resize_bicubic(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to (height, width) exactly as Pillow's BICUBIC does."""
    if rgb.dtype != np.uint8 or rgb.ndim != 3:
        raise ValueError(f"resize_bicubic expects an (H, W, C) uint8 array, got {rgb.dtype} {rgb.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    out = rgb
    # Pillow skips a pass whose size does not change (and then copies).
    if width != rgb.shape[1]:
        out = _pass(out, width, axis=1)
    if height != rgb.shape[0]:
        out = _pass(out, height, axis=0)
    return np.ascontiguousarray(out) if out is not rgb else rgb.copy()
