"""DICOM display pipeline: one decoded frame (stored values, or RGB) -> RGB uint8.

Modality LUT (RescaleSlope/Intercept or a Modality LUT Sequence) first, then the VOI window
(WindowCenter/Width and VOILUTFunction, also from enhanced multi-frame functional groups), else a
min/max stretch of the frame for data wider than 8 bits; data under 8 bits is scaled by its nominal
range; MONOCHROME1 is inverted; PALETTE COLOR is looked up; wider colour samples are scaled by
their nominal range. Malformed display attributes become InvalidImage, never another exception.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from eyecare_edge.image_types import ImageHeader, InvalidImage
from eyecare_edge.pixel_convert import scale_to_uint8, stretch_to_uint8


def exc_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


def frame_to_rgb8(arr: np.ndarray, ds: Any, frame: int, header: ImageHeader) -> np.ndarray:
    """Display pipeline for one frame; malformed LUT/rescale/window attributes become InvalidImage."""
    try:
        return _dicom_to_rgb8(arr, ds, frame, header)
    except (InvalidImage, MemoryError):
        raise
    except Exception as exc:
        raise InvalidImage(f"corrupt DICOM display attributes in frame {frame} ({exc_text(exc)})") from None


def _dicom_to_rgb8(arr: np.ndarray, ds: Any, frame: int, header: ImageHeader) -> np.ndarray:
    pi = (header.mode or "").upper()
    bits = header.bit_depth or 8
    if pi in ("MONOCHROME1", "MONOCHROME2") or (arr.ndim == 2 and pi != "PALETTE COLOR"):
        gray = _dicom_gray_to_uint8(arr, ds, frame, bits)
        if pi == "MONOCHROME1":  # MONOCHROME1: the lowest value is displayed white
            gray = 255 - gray
        return np.ascontiguousarray(np.repeat(gray[:, :, None], 3, axis=2))
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise InvalidImage(f"unexpected DICOM pixel array shape {arr.shape} for {pi}")
    if arr.dtype != np.uint8:  # 16-bit colour: nominal range of the stored bits
        arr = scale_to_uint8(arr.astype(np.uint16) if arr.dtype.kind == "u" else arr, bits)
    return np.ascontiguousarray(arr)


def _dicom_gray_to_uint8(arr: np.ndarray, ds: Any, frame: int, bits: int) -> np.ndarray:
    """Modality LUT (rescale) then VOI window; min/max stretch when there is no window.

    Data of under 8 bits with no rescale and no window is scaled by its nominal range
    (``round(v * 255 / (2**bits - 1))``: a 1-bit mask becomes 0/255, not 0/1). 8-bit unsigned
    data with no rescale and no window is taken as is (fundus and most ophthalmic photography);
    wider data without a window gets the frame's min..max, the usual "auto window" of DICOM
    viewers. The float64 work is done in place on one copy (8 bytes per pixel; a 16 MP CT frame
    peaked at 583 MB with fresh temporaries per operation, see ``estimated_decode_bytes``).
    """
    slope = _frame_attr(ds, frame, "RescaleSlope", "PixelValueTransformationSequence")
    intercept = _frame_attr(ds, frame, "RescaleIntercept", "PixelValueTransformationSequence")
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        values = apply_modality_lut(arr, ds).astype(np.float64)
    else:
        values = arr.astype(np.float64)
        values *= slope
        values += intercept
    center = _frame_attr(ds, frame, "WindowCenter", "FrameVOILUTSequence")
    width = _frame_attr(ds, frame, "WindowWidth", "FrameVOILUTSequence")
    function = _frame_attr(ds, frame, "VOILUTFunction", "FrameVOILUTSequence") or "LINEAR"
    if center is not None and width is not None:
        windowed = _window_to_uint8(values, _first(center), _first(width), str(function))
        if windowed is not None:
            return windowed
    plain = slope == 1.0 and intercept == 0.0 and "ModalityLUTSequence" not in ds
    if plain and bits < 8 and arr.dtype.kind == "u":  # e.g. 1-bit segmentations: 0/1 -> 0/255
        peak = (1 << max(bits, 1)) - 1
        return ((np.minimum(arr, peak).astype(np.uint16) * 255 + peak // 2) // peak).astype(np.uint8)
    if plain and (arr.dtype == np.uint8 or (bits <= 8 and arr.dtype.kind == "u")):
        return arr.astype(np.uint8)
    return stretch_to_uint8(values)


def _window_to_uint8(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """DICOM VOI window (PS3.3 C.11.2.1.2) straight to 0..255; None for an invalid window.

    ``values`` (float64) is overwritten when a window is applied, and left as is when None.

    LINEAR:       y = ((x - (c - 0.5)) / (w - 1) + 0.5) * 255, clipped (w >= 1)
    LINEAR_EXACT: y = ((x - c) / w + 0.5) * 255, clipped (w > 0)
    SIGMOID:      y = 255 / (1 + exp(-4 (x - c) / w)) (w > 0)
    """
    f = function.strip().upper()
    if f == "SIGMOID":
        if width <= 0:
            return None
        out = 255.0 / (1.0 + np.exp(-4.0 * (values - center) / width))
    elif f == "LINEAR_EXACT":
        if width <= 0:
            return None
        out = values  # in place (the caller's working copy): the same operations, no temporaries
        out -= center
        out /= width
        out += 0.5
        out *= 255.0
    else:
        if width < 1:
            return None
        if width == 1:  # a step at c - 0.5
            return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
        out = values
        out -= center - 0.5
        out /= width - 1.0
        out += 0.5
        out *= 255.0
    np.rint(out, out=out)
    np.clip(out, 0, 255, out=out)
    return out.astype(np.uint8)


def _frame_attr(ds: Any, frame: int, keyword: str, macro: str) -> Any:
    """An attribute from the top level, else the frame's or the shared functional group."""
    if keyword in ds:
        return ds[keyword].value
    for seq_name, index in (
        ("PerFrameFunctionalGroupsSequence", frame),
        ("SharedFunctionalGroupsSequence", 0),
    ):
        groups = ds.get(seq_name)
        if groups and len(groups) > index:
            items = groups[index].get(macro)
            if items and keyword in items[0]:
                return items[0][keyword].value
    return None


def _first(value: Any) -> float:
    """DICOM multi-valued window attributes: use the first (default) window."""
    if isinstance(value, list | tuple) or (hasattr(value, "__len__") and not isinstance(value, str)):
        value = value[0]
    return float(value)
