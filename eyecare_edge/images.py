"""Image loading: JPEG, PNG, TIFF, BMP (OpenCV) and DICOM (pydicom) to RGB uint8.

Everything the model sees enters through here, so loading is strict and explicit. This module is
the public entry; the work is split by job: :mod:`~eyecare_edge.image_source` (opening regular
files only, format sniffing, the pixel and decoded-bytes limits), :mod:`~eyecare_edge.image_headers`
(raster headers), :mod:`~eyecare_edge.dicom_decode` (DICOM) and :mod:`~eyecare_edge.pixel_convert`.

* The format is found from the file's first bytes (its signature), never from the suffix: a text
  file named ``.jpg`` is reported as text, a DICOM without a suffix still loads, and a DICOM whose
  preamble holds a TIFF header is a DICOM. Only regular files are opened (a FIFO named ``.jpg``
  is refused from ``os.stat``, never opened for reading).
* Width, height, frames, channels and bit depth are read from the header *before* any pixel is
  decoded. We parse PNG IHDR, JPEG SOFn, TIFF IFDs and the BMP info header ourselves, and read
  DICOM with ``stop_before_pixels``. Two limits are checked on that header: ``max_pixels`` (100 MP
  by default) and ``max_decoded_bytes`` (1 GiB by default, sized for a 4 GB Jetson: bit depth x
  channels x pixels plus the conversion's working copies), so a decompression bomb is refused
  before OpenCV could allocate it; a file whose header we cannot read is never handed to OpenCV.
* The data present must be able to hold what the header claims (a 629-byte JPEG claiming
  10000x10000, a 614-byte DICOM claiming ten million frames are refused, not decoded to grey),
  and only the bytes the header needs are read (a JPEG followed by a gigabyte of zeros is read up
  to its end-of-image marker).
* Every failure is an :class:`ImageError` naming the file and a specific reason (never a raw
  OpenCV assertion), so a batch screener can record it per file and go on.
* The result is always ``(H, W, 3)`` uint8 RGB, C-contiguous, one :class:`DecodedImage` per frame.

Conversion rules (the *why* is next to each function):

* 16-bit raster images (PNG/TIFF) are scaled by their nominal range (``round(v * 255 / 65535)``),
  not stretched per image.
* Alpha is composited onto black (transparent = black, like the surround of a fundus photo).
* CMYK JPEG/TIFF: OpenCV's libjpeg/libtiff converts to RGB (Adobe-inverted CMYK is handled).
* A JPEG cut short (no end-of-image marker) is refused. Damaged entropy-coded data inside a
  complete JPEG is *not* detectable here: libjpeg resynchronises, prints a warning to stderr and
  OpenCV returns the image with the damaged blocks.
* JPEG EXIF orientation is applied (what every viewer shows); PNG/TIFF/BMP are taken as stored.
* DICOM: see :mod:`eyecare_edge.dicom_decode` (windowing, MONOCHROME1, YBR, palette, which
  transfer syntaxes need which decoder: 12-bit JPEG, 16-bit lossless JPEG, JPEG-LS and signed
  JPEG 2000 need the ``dicom`` extra, and a refusal names the transfer syntax and the decoder).

The fundus field-of-view crop (:func:`crop_fundus_fov`) is a separate, optional step.
"""

from __future__ import annotations

import math
import os
from typing import Any

import cv2
import numpy as np

from eyecare_edge.dicom_decode import decode_dicom, dicom_header, read_dataset
from eyecare_edge.image_headers import HEADER_PARSERS, check_not_oversized
from eyecare_edge.image_source import (
    DEFAULT_MAX_DECODED_BYTES,
    DEFAULT_MAX_PIXELS,
    BytesSource,
    Source,
    check_limit_args,
    check_limits,
    open_file,
    sniff,
)
from eyecare_edge.image_types import DecodedImage, ImageError, ImageHeader, InvalidImage, display_name
from eyecare_edge.pixel_convert import to_rgb8

__all__ = [
    "DEFAULT_MAX_DECODED_BYTES",
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_SUFFIXES",
    "UNSUPPORTED_IMAGE_SUFFIXES",
    "DecodedImage",
    "ImageError",
    "ImageHeader",
    "crop_fundus_fov",
    "decode_image_bytes",
    "display_name",
    "fundus_fov_bbox",
    "load_image",
    "load_images",
    "read_header",
]

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".dib", ".dcm", ".dicom"}
)
"""Suffixes a folder scan should pick up. Loading itself ignores the suffix (DICOM files from
PACS exports often have none, e.g. ``IM000001``; sniff those with :func:`read_header`)."""

UNSUPPORTED_IMAGE_SUFFIXES: dict[str, str] = {
    ".heic": "HEIC",
    ".heif": "HEIF",
    ".avif": "AVIF",
    ".webp": "WebP",
    ".gif": "GIF",
    ".jp2": "JPEG 2000",
    ".j2k": "JPEG 2000",
    ".jpx": "JPEG 2000",
    ".jpf": "JPEG 2000",
    ".jxl": "JPEG XL",
    ".exr": "OpenEXR",
    ".svg": "SVG",
    ".ico": "ICO",
    ".psd": "Photoshop",
    ".dng": "camera raw",
    ".cr2": "camera raw",
    ".nef": "camera raw",
    ".arw": "camera raw",
}
"""Image suffixes a folder scan recognises but does not load (it lists them as skipped)."""

FORMATS = ("jpeg", "png", "tiff", "bmp", "dicom")


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def read_header(path: str | os.PathLike[str]) -> ImageHeader:
    """Read format, size, frames, channels and bit depth without decoding pixels.

    The header is also checked for consistency with the data present (a file too short for the
    image it claims is an ImageError here already).
    """
    name = os.fspath(path)
    with open_file(name) as src:
        return _parse_header(src, name)


def load_images(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> list[DecodedImage]:
    """Decode a file to RGB uint8, one :class:`DecodedImage` per frame.

    A multi-frame DICOM (or multi-page TIFF) gives one item per frame; everything else gives one.
    Raises :class:`ImageError` for anything unreadable, and when the header's width * height *
    frames exceeds ``max_pixels`` or its estimated decoding memory exceeds ``max_decoded_bytes``
    (both checked before decoding).
    """
    name = os.fspath(path)
    check_limit_args(max_pixels, max_decoded_bytes)
    with open_file(name) as src:
        return _load(src, name, max_pixels, max_decoded_bytes, single=False)


def load_image(
    path: str | os.PathLike[str],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> DecodedImage:
    """Decode a single-image file; a multi-frame file raises ImageError (use :func:`load_images`)."""
    name = os.fspath(path)
    check_limit_args(max_pixels, max_decoded_bytes)
    with open_file(name) as src:
        return _load(src, name, max_pixels, max_decoded_bytes, single=True)[0]


def decode_image_bytes(
    data: bytes | bytearray | memoryview,
    name: str = "<memory>",
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_decoded_bytes: int = DEFAULT_MAX_DECODED_BYTES,
) -> list[DecodedImage]:
    """Decode an in-memory encoded image (e.g. from camera software) with the same rules as a file.

    ``name`` is used in error messages and as ``DecodedImage.path``.
    """
    check_limit_args(max_pixels, max_decoded_bytes)
    return _load(BytesSource(data), name, max_pixels, max_decoded_bytes, single=False)


def read_dicom_header(source: str | os.PathLike[str] | bytes, name: str = "<memory>") -> Any | None:
    """The pydicom data set of a DICOM file (or its bytes, called `name`), pixel data unread,
    read exactly as the decoder reads it (with or without the 128-byte preamble); None when the
    file is not DICOM. For callers that need its identifiers (the clinical SR/FHIR outputs)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _dicom_header_or_none(BytesSource(bytes(source)), name)
    name = os.fspath(source)
    with open_file(name) as src:
        return _dicom_header_or_none(src, name)


def _dicom_header_or_none(src: Source, name: str) -> Any | None:
    try:
        if sniff(src.read(0, 132)) != "dicom":
            return None
    except InvalidImage:
        return None  # not an image format at all: not DICOM either
    try:
        return read_dataset(src)[0]
    except InvalidImage as exc:
        raise ImageError(name, str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Loading: header -> limits -> decode -> RGB uint8
# ---------------------------------------------------------------------------------------------


def _parse_header(src: Source, name: str) -> ImageHeader:
    if src.size == 0:
        raise ImageError(name, "empty file (0 bytes)")
    try:
        fmt = sniff(src.read(0, 132))
        fields = dicom_header(src) if fmt == "dicom" else HEADER_PARSERS[fmt](src)
        if fmt in ("tiff", "bmp"):
            check_not_oversized(src, fields, fmt)
    except InvalidImage as exc:
        raise ImageError(name, str(exc)) from None
    fields.setdefault("encoded_bytes", src.size)
    return ImageHeader(path=name, format=fmt, **fields)


def _load(src: Source, name: str, max_pixels: int, max_decoded_bytes: int, *, single: bool) -> list[DecodedImage]:
    header = _parse_header(src, name)
    check_limits(header, max_pixels, max_decoded_bytes)
    if single and header.frames > 1:
        raise ImageError(name, f"has {header.frames} frames; use load_images() to get one image per frame")
    try:
        if header.format == "dicom":
            return decode_dicom(src, header)
        return _decode_raster(src.read(0, header.encoded_bytes or src.size), header)
    except InvalidImage as exc:
        raise ImageError(name, str(exc)) from None
    except cv2.error as exc:  # never a raw C++ assertion to the user
        raise ImageError(name, f"OpenCV could not convert the image ({_cv2_message(exc)})") from None


# OpenCV flags per format. JPEG: ANYCOLOR|ANYDEPTH keeps gray as gray and 12-bit as 16-bit, turns
# CMYK/YCCK into BGR and applies the EXIF orientation (IMREAD_UNCHANGED would skip it). PNG/TIFF:
# UNCHANGED keeps 16-bit and alpha. BMP: alpha dropped, because the 4th byte of a 32-bit BMP is
# very often undefined (zero) and compositing it would blacken the image.
_IMREAD_FLAGS = {
    "jpeg": cv2.IMREAD_ANYCOLOR | cv2.IMREAD_ANYDEPTH,
    "png": cv2.IMREAD_UNCHANGED,
    "tiff": cv2.IMREAD_UNCHANGED,
    "bmp": cv2.IMREAD_COLOR,
}


def _decode_raster(data: bytes, header: ImageHeader) -> list[DecodedImage]:
    buf = np.frombuffer(data, dtype=np.uint8)
    flags = _IMREAD_FLAGS[header.format]
    try:
        if header.frames > 1:
            ok, pages = cv2.imdecodemulti(buf, flags)
            pages = list(pages) if ok else []
        else:
            page = cv2.imdecode(buf, flags)
            pages = [] if page is None else [page]
    except cv2.error as exc:
        raise InvalidImage(f"OpenCV could not decode the {header.format.upper()} ({_cv2_message(exc)})") from None
    if not pages:
        raise InvalidImage(_decode_failure_reason(data, header))
    if len(pages) != header.frames:
        raise InvalidImage(f"decoded {len(pages)} of the {header.frames} pages listed in the TIFF header")
    _check_decoded_size(pages[0], header)
    return [
        DecodedImage(
            rgb=to_rgb8(page, header.bit_depth or 8),
            path=header.path,
            frame=i if header.frames > 1 else None,
            format=header.format,
            source_mode=header.mode or "",
            bit_depth=header.bit_depth or 8,
        )
        for i, page in enumerate(pages)
    ]


def _decode_failure_reason(data: bytes, header: ImageHeader) -> str:
    if header.format == "png" and data.rfind(b"IEND") < 0:
        return f"truncated PNG: no IEND chunk (the file ends after {len(data)} bytes)"
    if header.format == "jpeg":  # completeness was checked on the header
        return "corrupt JPEG data (the decoder rejected it)"
    if header.format == "tiff":
        return "corrupt or truncated TIFF data, or a TIFF compression OpenCV cannot read (the decoder rejected it)"
    return f"corrupt or truncated {header.format.upper()} data (the decoder rejected it)"


def _check_decoded_size(page: np.ndarray, header: ImageHeader) -> None:
    h, w = page.shape[:2]
    expected = {(header.height, header.width)}
    if header.format == "jpeg":  # EXIF orientation may swap the axes
        expected.add((header.width, header.height))
    if (h, w) not in expected:
        raise InvalidImage(f"decoded size {w}x{h} differs from the header's {header.width}x{header.height}")


def _cv2_message(exc: cv2.error) -> str:
    text = str(getattr(exc, "err", "") or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Fundus field-of-view crop
# ---------------------------------------------------------------------------------------------

_FOV_WORK_SIZE = 512  # the field is found on a copy this large (long side); enough for a box


def fundus_fov_bbox(rgb: np.ndarray, *, threshold: int | None = None) -> tuple[int, int, int, int] | None:
    """Bounding box ``(x0, y0, x1, y1)`` (x1, y1 exclusive) of the circular field of a fundus photo.

    Works on the brightest channel per pixel (the field is bright in red even where vessels are
    dark in green), downscaled with area averaging and median-blurred so JPEG noise and
    compression ringing in the black surround do not matter. Pixels above ``threshold`` form a
    mask; its largest connected component is the field. With ``threshold=None`` the threshold is
    set from the image: background = median of the four corners (outside the circle), field =
    median of the central region, threshold = background + max(8, 10% of the difference).

    Returns None when there is no dark surround to remove (corners not darker than the centre by
    at least 20 levels, or the field fills the frame), or when the bright region does not look
    like a field (under 5% of the image, or filling under half its own box: e.g. an OCT band).
    Meant for colour fundus photos; do not apply it to OCT.
    """
    img = _fov_input(rgb)
    h, w = img.shape[:2]
    scale = min(1.0, _FOV_WORK_SIZE / max(h, w))
    if scale < 1.0:  # shrink first: area averaging is fast and already smooths JPEG noise
        size = (max(1, round(w * scale)), max(1, round(h * scale)))
        img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
    bright = img.max(axis=2) if img.ndim == 3 else img
    small = cv2.medianBlur(bright, 5) if min(bright.shape) >= 5 else bright
    sh, sw = small.shape
    if threshold is None:
        threshold = _auto_fov_threshold(small)
        if threshold is None:
            return None
    mask = (small > threshold).astype(np.uint8)
    mask = cv2.morphologyEx(mask, cv2.MORPH_OPEN, np.ones((3, 3), np.uint8))
    n, _, stats, _ = cv2.connectedComponentsWithStats(mask, connectivity=8)
    if n <= 1:
        return None
    best = 1 + int(np.argmax(stats[1:, cv2.CC_STAT_AREA]))
    x, y, bw, bh, area = (int(v) for v in stats[best])
    if area < 0.05 * sh * sw or area < 0.5 * bw * bh:
        return None
    sx, sy = w / sw, h / sh
    x0, y0 = max(0, math.floor(x * sx)), max(0, math.floor(y * sy))
    x1, y1 = min(w, math.ceil((x + bw) * sx)), min(h, math.ceil((y + bh) * sy))
    if (x0, y0, x1, y1) == (0, 0, w, h) or x1 <= x0 or y1 <= y0:
        return None
    return (x0, y0, x1, y1)


def crop_fundus_fov(rgb: np.ndarray, *, threshold: int | None = None, margin: int = 0) -> np.ndarray:
    """Crop a colour fundus photo to its circular field of view (the black surround removed).

    ``margin`` pixels are kept around the field (clamped to the image). Returns ``rgb`` itself
    when no surround is found (see :func:`fundus_fov_bbox`); never an empty array. The crop is
    a C-contiguous copy.
    """
    if margin < 0:
        raise ValueError(f"margin must be >= 0, got {margin}")
    box = fundus_fov_bbox(rgb, threshold=threshold)
    if box is None:
        return rgb
    x0, y0, x1, y1 = box
    h, w = rgb.shape[:2]
    x0, y0 = max(0, x0 - margin), max(0, y0 - margin)
    x1, y1 = min(w, x1 + margin), min(h, y1 + margin)
    return np.ascontiguousarray(rgb[y0:y1, x0:x1])


def _fov_input(rgb: np.ndarray) -> np.ndarray:
    """Validate a uint8 (H, W, 3|4) or (H, W) image; returns RGB (alpha dropped) or gray."""
    if not isinstance(rgb, np.ndarray) or rgb.dtype != np.uint8:
        raise ValueError("expected a uint8 numpy image")
    if rgb.size == 0:
        raise ValueError("empty image")
    if rgb.ndim == 3 and rgb.shape[2] in (3, 4):
        return np.ascontiguousarray(rgb[:, :, :3])
    if rgb.ndim == 2:
        return rgb
    raise ValueError(f"expected an (H, W, 3) RGB or (H, W) gray image, got shape {rgb.shape}")


def _auto_fov_threshold(small: np.ndarray) -> float | None:
    sh, sw = small.shape
    k = max(2, round(0.04 * min(sh, sw)))
    corners = np.concatenate(
        [small[:k, :k].ravel(), small[:k, -k:].ravel(), small[-k:, :k].ravel(), small[-k:, -k:].ravel()]
    )
    background = float(np.median(corners))
    centre = float(np.median(small[sh // 4 : sh - sh // 4, sw // 4 : sw - sw // 4]))
    if centre - background < 20:
        return None
    return background + max(8.0, 0.1 * (centre - background))
