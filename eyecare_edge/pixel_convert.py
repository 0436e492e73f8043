"""Decoded pixels of any depth and layout -> C-contiguous RGB uint8 (shared by every format)."""

from __future__ import annotations

import cv2
import numpy as np

from eyecare_edge.image_types import InvalidImage


def to_rgb8(arr: np.ndarray, bit_depth: int) -> np.ndarray:
    """OpenCV's BGR/BGRA/gray output of any depth -> C-contiguous RGB uint8."""
    arr = scale_to_uint8(arr, bit_depth)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]
    if arr.ndim == 2:
        return cv2.cvtColor(arr, cv2.COLOR_GRAY2RGB)
    channels = arr.shape[2]
    if channels == 2:  # gray + alpha
        gray = _composite_on_black(arr[:, :, :1], arr[:, :, 1])
        return cv2.cvtColor(gray[:, :, 0], cv2.COLOR_GRAY2RGB)
    if channels == 3:
        return cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
    if channels == 4:
        return np.ascontiguousarray(_composite_on_black(arr[:, :, 2::-1], arr[:, :, 3]))
    raise InvalidImage(f"unsupported number of channels after decoding: {channels}")


def _composite_on_black(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over black: ``round(c * a / 255)``.

    Compositing rather than dropping alpha means transparent pixels become black whatever
    colour the encoder left in them, matching the black surround of fundus photos.
    """
    c = color.astype(np.uint16)  # one working copy, updated in place (a 25 MP RGBA: 150 MB)
    np.multiply(c, alpha[:, :, None], out=c)
    c += 127
    c //= 255
    return c.astype(np.uint8)


def scale_to_uint8(arr: np.ndarray, bit_depth: int) -> np.ndarray:
    """Reduce any decoded depth to uint8.

    Unsigned integers are scaled by their *nominal* range, ``round(v * 255 / (2**bits - 1))``
    (bits = the header's bit depth when it is 9..16, else the dtype's). We do not stretch each
    image's min..max: that would change contrast from image to image, blow up noise in dark or
    flat OCT scans and make a 16-bit export look different from the 8-bit export of the same
    scan; nominal scaling is also what viewers (and PIL) show. Float images (TIFF) already in
    [0, 1] are multiplied by 255; any other float or signed data has no nominal range and is
    stretched min..max.
    """
    if arr.dtype == np.uint8:
        return arr
    if arr.dtype == np.uint16:  # a 64 KiB lookup table: no 4-byte-per-sample temporary
        peak = (1 << bit_depth) - 1 if 8 < bit_depth <= 16 else 65535
        lut = ((np.minimum(np.arange(65536, dtype=np.uint32), peak) * 255 + peak // 2) // peak).astype(
            np.uint8
        )
        return lut[arr]
    values = arr.astype(np.float64)
    finite = values[np.isfinite(values)]
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if arr.dtype.kind == "f" and finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    return stretch_to_uint8(values)


def stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """min..max -> 0..255; a constant image becomes 0. ``values`` (a float working copy) is overwritten."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    out = values  # in place: no second full-size float array
    out -= lo
    out *= 255.0 / (hi - lo)
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)
