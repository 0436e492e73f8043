"""Bicubic resize that reproduces Pillow's `Image.resize(..., BICUBIC)` on uint8 RGB, in numpy.

Why not OpenCV: `cv2.INTER_CUBIC` uses a different kernel (a = -0.75) and does not widen the
kernel when shrinking, so a 3504-px fundus photo shrunk to 384 px comes out aliased and far from
what SigLIP/LLaVA-OneVision image processors (which call Pillow) fed the model in training.
Why not Pillow itself: the runtime keeps its dependencies to numpy + OpenCV; this file is the whole
cost of that choice.

The algorithm mirrors Pillow's `Resample.c` for 8-bit images: separable convolution, horizontal
pass first, kernel support scaled by the shrink factor, coefficients normalised and converted to
22-bit fixed point, each pass rounded and clipped to uint8. The result equals Pillow's exactly
(tests compare against Pillow on many sizes). Each pass is computed as small banded matrix
products (exact for these integers, see `_pass`): a 3504x2336 photo shrinks to 1152x768 in about
a quarter of a second on a loaded 2-core machine, half of the time a tap-by-tap loop took.

Where Pillow is installed anyway (every training or export environment), `resize_bicubic` lets it
run the two passes, one single-axis `resize` each, which gives the same bytes (a test holds the two
paths equal): on the demo's 416x280 phantoms shrunk to 112 px, 1.0 ms an image against 3.2 ms, and
the demo's stages resize each image 4-5 times. A single two-axis Pillow call would not do: Pillow
13 runs the vertical pass first for some shapes (tall images shrunk to a square), which moves
pixels of photographs by up to 2 levels and of noise by up to 11 from the order used here.
"""

from __future__ import annotations

import math
from functools import lru_cache
from types import ModuleType

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


def _coefficients(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Fixed-point taps for one axis, Pillow's rules: `(first[out], count[out], weight[out, k])`.

    Output `o` reads input positions first[o] + k for k < count[o] with weight[o, k]; taps at
    k >= count[o] have weight 0.
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
    return xmin, np.maximum(xmax, 0), fixed


# Float32 is exact for the split weights while a pass has at most this many taps (see `_pass`);
# wider kernels (shrinking more than ~16x) use float64.
_MAX_F32_TAPS = 64
_SPLIT = 2048.0


def _weight_matrices(in_size: int, out_size: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, bool]:
    """The pass as banded (parts, out, in) matrices of integer weights, each output's input
    window [first, end), and whether float32 is exact (then parts = (hi, lo) with
    weight = hi * 2048 + lo and |lo| <= 1024; else one float64 matrix)."""
    first, count, fixed = _coefficients(in_size, out_size)
    rows, taps = np.nonzero(np.arange(fixed.shape[1])[None, :] < count[:, None])
    cols = first[rows] + taps
    w = fixed[rows, taps]
    use32 = fixed.shape[1] <= _MAX_F32_TAPS
    if use32:
        hi = np.round(w / _SPLIT)
        mats = np.zeros((2, out_size, in_size), dtype=np.float32)
        mats[0, rows, cols] = hi
        mats[1, rows, cols] = w - hi * _SPLIT
    else:
        mats = np.zeros((1, out_size, in_size), dtype=np.float64)
        mats[0, rows, cols] = w
    return mats, first, first + count, use32


def _pass(img: np.ndarray, out_size: int) -> np.ndarray:
    """One separable pass along axis 0 of an (n, ...) uint8 array.

    Each output row is S = sum_k w_k * p_k, rounded as Pillow does: floor((S + 2^21) / 2^22),
    clipped to 0..255. S comes from BLAS matrix products over a few output rows at a time (the
    weight matrix is banded, so a block reads only its window of input rows), and it is exact,
    not an approximation: with the weights split as w = hi * 2048 + lo, every product and partial
    sum of `hi @ p` and of `lo @ p` is an integer below 2^24 while there are at most 64 taps
    (|lo| <= 1024, p <= 255), which float32 holds exactly in any summation order; S is then
    recombined in float64 (integers below 2^53). Wider kernels use float64 products directly.

    Blocks stay small (a few output rows) on purpose: numpy's BLAS runs such products on one
    thread, while larger ones start its thread pool, which is slower for these thin products
    and much slower on a loaded machine. Input rows are converted to float in chunks that
    blocks reuse, so each pixel is converted about once.
    """
    in_size = img.shape[0]
    mats, first, end, use32 = _weight_matrices(in_size, out_size)
    dtype = np.float32 if use32 else np.float64
    n = int(np.prod(img.shape[1:]))
    out = np.empty((out_size, n), dtype=np.uint8)
    block = max(1, (8 * out_size) // in_size)  # about 8 fresh input rows per block
    half = float(1 << (_PRECISION_BITS - 1))
    inv = 1.0 / (1 << _PRECISION_BITS)
    c0 = c1 = 0
    chunk = np.empty((0, n), dtype=dtype)
    for o0 in range(0, out_size, block):
        o1 = min(o0 + block, out_size)
        a, b = int(first[o0]), int(end[o0:o1].max())
        if a < c0 or b > c1:
            c0, c1 = a, min(in_size, max(b, a + 128))
            chunk = img[c0:c1].astype(dtype, order="C").reshape(c1 - c0, n)
        x = chunk[a - c0 : b - c0]
        if use32:
            acc = (mats[0, o0:o1, a:b] @ x).astype(np.float64)
            acc *= _SPLIT
            acc += mats[1, o0:o1, a:b] @ x
        else:
            acc = mats[0, o0:o1, a:b] @ x
        acc += half
        acc *= inv
        np.floor(acc, out=acc)
        np.clip(acc, 0.0, 255.0, out=acc)
        out[o0:o1] = acc
    return out.reshape((out_size, *img.shape[1:]))


# Pillow releases whose single-axis BICUBIC pass the tests hold equal to `_pass` (the `train`
# extra's floor); an older system Pillow on a camera PC gets the numpy path.
_MIN_PILLOW = (10, 0)


@lru_cache(maxsize=1)
def _pillow_image() -> ModuleType | None:
    """PIL.Image where Pillow >= 10 is installed (it is not a runtime dependency), else None."""
    try:
        import PIL
        from PIL import Image
    except ImportError:
        return None
    try:
        version = tuple(int(p) for p in PIL.__version__.split(".")[:2])
    except ValueError:
        return None
    return Image if version >= _MIN_PILLOW else None


def _check(rgb: np.ndarray, height: int, width: int) -> None:
    if rgb.dtype != np.uint8 or rgb.ndim != 3:
        raise ValueError(f"resize_bicubic expects an (H, W, C) uint8 array, got {rgb.dtype} {rgb.shape}")
    if height < 1 or width < 1:
        raise ValueError(f"target size must be positive, got {height}x{width}")
    if rgb.shape[0] < 1 or rgb.shape[1] < 1:
        raise ValueError(f"cannot resize an empty image ({rgb.shape[0]}x{rgb.shape[1]})")


def resize_bicubic(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """Resize an (H, W, C) uint8 image to (height, width) exactly as Pillow's BICUBIC does
    (horizontal pass first); by Pillow's own passes where it is installed, else in numpy."""
    _check(rgb, height, width)
    image = _pillow_image()
    if image is None or rgb.shape[2] not in (1, 3):  # Pillow premultiplies alpha: not the same
        return _resize_numpy(rgb, height, width)
    squeeze = rgb.shape[2] == 1
    im = image.fromarray(np.ascontiguousarray(rgb[..., 0] if squeeze else rgb))
    # One axis per call, horizontal first: Pillow skips the pass whose size does not change.
    bicubic = image.Resampling.BICUBIC
    if width != rgb.shape[1]:
        im = im.resize((width, rgb.shape[0]), bicubic)
    if height != rgb.shape[0]:
        im = im.resize((width, height), bicubic)
    out = np.array(im, dtype=np.uint8)
    return out[..., None] if squeeze else out


def resize_bicubic_numpy(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    """`resize_bicubic` in numpy alone: what runs where Pillow is not installed."""
    _check(rgb, height, width)
    return _resize_numpy(rgb, height, width)


def _resize_numpy(rgb: np.ndarray, height: int, width: int) -> np.ndarray:
    out = rgb
    # Pillow skips a pass whose size does not change (and then copies). The horizontal pass
    # runs on the transposed view (columns as rows), so both passes are the same row pass.
    if width != rgb.shape[1]:
        out = _pass(out.transpose(1, 0, 2), width).transpose(1, 0, 2)
    if height != rgb.shape[0]:
        out = _pass(out, height)
    return np.ascontiguousarray(out) if out is not rgb else rgb.copy()
