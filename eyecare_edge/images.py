"""Image loading: JPEG, PNG, TIFF, BMP (OpenCV) and DICOM (pydicom) to RGB uint8.

Everything the model sees enters through here, so this module is strict and explicit:

* The format is found from the file's first bytes (its signature), never from the suffix: a text
  file named ``.jpg`` is reported as text, a DICOM without a suffix still loads.
* Width, height and frame count are read from the header *before* any pixel is decoded. We parse
  PNG IHDR, JPEG SOFn, TIFF IFDs and the BMP info header ourselves, and read DICOM with
  ``stop_before_pixels``. A pixel-count limit (``max_pixels``, 100 MP by default) is checked on
  that header, so a decompression bomb (a 30000x30000 PNG of a few hundred bytes) is refused
  before OpenCV could allocate it; a file whose header we cannot read is never handed to OpenCV.
* Every failure is an :class:`ImageError` naming the file and a specific reason, so a batch
  screener can record it per file and go on.
* The result is always ``(H, W, 3)`` uint8 RGB, C-contiguous, one :class:`DecodedImage` per frame.

Conversion rules (the *why* is next to each function below):

* 16-bit raster images (PNG/TIFF) are scaled by their nominal range (``round(v * 255 / 65535)``),
  not stretched per image.
* Alpha is composited onto black (transparent = black, like the surround of a fundus photo).
* CMYK JPEG/TIFF: OpenCV's libjpeg/libtiff converts to RGB (Adobe-inverted CMYK is handled).
* A JPEG cut short (no end-of-image marker) is refused. Damaged entropy-coded data inside a
  complete JPEG is *not* detectable here: libjpeg resynchronises, prints a warning to stderr and
  OpenCV returns the image with the damaged blocks.
* JPEG EXIF orientation is applied (what every viewer shows); PNG/TIFF/BMP are taken as stored.
* DICOM: Modality LUT (RescaleSlope/Intercept) first, then the VOI window (WindowCenter/Width,
  also from enhanced multi-frame functional groups), else a min/max stretch of the frame for data
  wider than 8 bits; MONOCHROME1 is inverted; YBR_* are converted to RGB; PALETTE COLOR is looked
  up. JPEG Baseline and JPEG 2000 DICOM frames are decoded by OpenCV (no extra plugin needed);
  other compressed transfer syntaxes use pydicom's plugins, and a missing plugin is an
  ImageError saying which transfer syntax and what to install.

The fundus field-of-view crop (:func:`crop_fundus_fov`) is a separate, optional step.
"""

from __future__ import annotations

import io
import math
import os
import struct
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO, Protocol

import cv2
import numpy as np

__all__ = [
    "DEFAULT_MAX_PIXELS",
    "SUPPORTED_SUFFIXES",
    "DecodedImage",
    "ImageError",
    "ImageHeader",
    "crop_fundus_fov",
    "decode_image_bytes",
    "fundus_fov_bbox",
    "load_image",
    "load_images",
    "read_header",
]

DEFAULT_MAX_PIXELS = 100_000_000
"""Default limit on width * height * frames; 100 MP is ~4x a 45-degree 24 MP fundus photo."""

SUPPORTED_SUFFIXES: frozenset[str] = frozenset(
    {".jpg", ".jpeg", ".jpe", ".jfif", ".png", ".tif", ".tiff", ".bmp", ".dib", ".dcm", ".dicom"}
)
"""Suffixes a folder scan should pick up. Loading itself ignores the suffix (DICOM files from
PACS exports often have none, e.g. ``IM000001``; sniff those with :func:`read_header`)."""

FORMATS = ("jpeg", "png", "tiff", "bmp", "dicom")

_MAX_TIFF_PAGES = 10_000
_MAX_TIFF_TAGS = 4_096  # real files have tens; a huge count is a corrupt (or hostile) directory
_DICOM_META_KEYS = (
    "Modality",
    "ImageLaterality",
    "Laterality",
    "PhotometricInterpretation",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "StudyDate",
)


# ---------------------------------------------------------------------------------------------
# Public data types
# ---------------------------------------------------------------------------------------------


class ImageError(Exception):
    """An image could not be read; ``str(e)`` is ``"<path>: <reason>"``."""

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{path}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep (path, reason) through pickling, so errors survive multiprocessing workers.
        return (type(self), (self.path, self.reason))


@dataclass(frozen=True)
class ImageHeader:
    """What the file's header says, read without decoding any pixel.

    ``width``/``height`` are of the first frame as stored (before EXIF orientation).
    ``channels`` are samples per stored pixel (a palette image has 1). ``mode`` is a short
    description of the stored pixels ("gray16", "rgba8", "cmyk8", "palette8", or the DICOM
    PhotometricInterpretation). ``total_pixels`` is the sum over all frames, which the pixel
    limit is checked against (pages of a multi-page TIFF may differ in size).
    """

    path: str
    format: str
    width: int
    height: int
    frames: int = 1
    channels: int | None = None
    bit_depth: int | None = None
    mode: str | None = None
    total_pixels: int | None = None

    @property
    def pixel_count(self) -> int:
        """Pixels over all frames (what ``max_pixels`` limits)."""
        if self.total_pixels is not None:
            return self.total_pixels
        return self.width * self.height * self.frames


@dataclass
class DecodedImage:
    """One decoded frame as RGB uint8 plus where it came from.

    ``frame`` is the frame/page index for multi-frame DICOM and multi-page TIFF, else None.
    ``source_mode`` is the stored pixel kind ("gray8", "gray16", "rgb8", "rgba8", "cmyk8",
    "MONOCHROME1", "YBR_FULL_422", ...), ``bit_depth`` the stored bits per sample.
    ``meta`` holds a few DICOM attributes (never patient identifiers); empty for other formats.
    """

    rgb: np.ndarray
    path: str
    frame: int | None
    format: str
    source_mode: str
    bit_depth: int
    meta: dict[str, str] = field(default_factory=dict)

    def __post_init__(self) -> None:
        a = self.rgb
        if a.ndim != 3 or a.shape[2] != 3 or a.dtype != np.uint8 or not a.flags.c_contiguous:
            raise ValueError(
                f"DecodedImage.rgb must be a C-contiguous (H, W, 3) uint8 array, got {a.shape} {a.dtype}"
            )

    @property
    def width(self) -> int:
        return int(self.rgb.shape[1])

    @property
    def height(self) -> int:
        return int(self.rgb.shape[0])


# ---------------------------------------------------------------------------------------------
# Public functions
# ---------------------------------------------------------------------------------------------


def read_header(path: str | os.PathLike[str]) -> ImageHeader:
    """Read format, size, frames, channels and bit depth without decoding pixels."""
    name = os.fspath(path)
    with _open_file(name) as src:
        return _parse_header(src, name)


def load_images(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> list[DecodedImage]:
    """Decode a file to RGB uint8, one :class:`DecodedImage` per frame.

    A multi-frame DICOM (or multi-page TIFF) gives one item per frame; everything else gives one.
    Raises :class:`ImageError` for anything unreadable, and when width * height * frames from the
    header exceeds ``max_pixels`` (checked before decoding).
    """
    name = os.fspath(path)
    _check_max_pixels(max_pixels)
    with _open_file(name) as src:
        return _load(src, name, max_pixels, single=False)


def load_image(path: str | os.PathLike[str], *, max_pixels: int = DEFAULT_MAX_PIXELS) -> DecodedImage:
    """Decode a single-image file; a multi-frame file raises ImageError (use :func:`load_images`)."""
    name = os.fspath(path)
    _check_max_pixels(max_pixels)
    with _open_file(name) as src:
        return _load(src, name, max_pixels, single=True)[0]


def decode_image_bytes(
    data: bytes | bytearray | memoryview, name: str = "<memory>", *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[DecodedImage]:
    """Decode an in-memory encoded image (e.g. from camera software) with the same rules as a file.

    ``name`` is used in error messages and as ``DecodedImage.path``.
    """
    _check_max_pixels(max_pixels)
    return _load(_BytesSource(data), name, max_pixels, single=False)


def read_dicom_header(source: str | os.PathLike[str] | bytes, name: str = "<memory>") -> Any | None:
    """The pydicom data set of a DICOM file (or its bytes, called `name`), pixel data unread,
    read exactly as the decoder reads it (with or without the 128-byte preamble); None when the
    file is not DICOM. For callers that need its identifiers (the clinical SR/FHIR outputs)."""
    if isinstance(source, (bytes, bytearray, memoryview)):
        return _dicom_header_or_none(_BytesSource(source), name)
    name = os.fspath(source)
    with _open_file(name) as src:
        return _dicom_header_or_none(src, name)


def _dicom_header_or_none(src: _Source, name: str) -> Any | None:
    head = src.read(0, 132)
    if not (head[128:132] == b"DICM" or _looks_like_bare_dicom(head)):
        return None
    try:
        return _dicom_read(src, pixels=False)
    except _Invalid as exc:
        raise ImageError(name, str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Byte sources: header parsers read small pieces at offsets, so a huge file is not read whole
# just to learn that it is too large.
# ---------------------------------------------------------------------------------------------


class _Source(Protocol):
    size: int

    def read(self, offset: int, n: int) -> bytes: ...

    def stream(self) -> BinaryIO: ...


class _BytesSource:
    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self.size = len(self._view)

    def read(self, offset: int, n: int) -> bytes:
        return bytes(self._view[offset : offset + n])

    def stream(self) -> BinaryIO:
        return io.BytesIO(self._view)


class _FileSource:
    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.size = os.fstat(f.fileno()).st_size

    def read(self, offset: int, n: int) -> bytes:
        self._f.seek(offset)
        return self._f.read(n)

    def stream(self) -> BinaryIO:
        self._f.seek(0)
        return self._f

    def __enter__(self) -> _FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


def _open_file(name: str) -> _FileSource:
    try:
        return _FileSource(open(name, "rb"))
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageError(name, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read the file ({exc.strerror or exc})") from None


class _Invalid(Exception):
    """Internal: a reason why the bytes are not a readable image (the caller adds the path)."""


def _check_max_pixels(max_pixels: int) -> None:
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, int) or max_pixels <= 0:
        raise ValueError(f"max_pixels must be a positive int, got {max_pixels!r}")


# ---------------------------------------------------------------------------------------------
# Format detection by signature
# ---------------------------------------------------------------------------------------------

_SUPPORTED_NAMES = "JPEG, PNG, TIFF, BMP, DICOM"
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_BMP_INFO_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
# Formats we recognise but do not load, so the message can say what the file is.
_OTHER_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 (JP2)"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (0, b"%PDF", "PDF"),
    (0, b"PK\x03\x04", "ZIP archive"),
    (0, b"\x1f\x8b", "gzip archive"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\x76\x2f\x31\x01", "OpenEXR"),
)


def _sniff(head: bytes) -> str:
    """Format name from the first bytes, or raise _Invalid saying what the file looks like."""
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(_PNG_SIGNATURE):
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack_from("<I", head, 14)[0] in _BMP_INFO_SIZES:
        return "bmp"
    if head[128:132] == b"DICM" or _looks_like_bare_dicom(head):
        return "dicom"
    for offset, magic, what in _OTHER_SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            raise _Invalid(f"unsupported format {what} (supported: {_SUPPORTED_NAMES})")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        raise _Invalid(f"unsupported format WebP (supported: {_SUPPORTED_NAMES})")
    sample = head[:64].rstrip(b"\x00")
    if sample and all(32 <= c < 127 or c in (9, 10, 13) for c in sample):
        text = sample.decode("ascii", "replace")[:40]
        raise _Invalid(f"not a supported image: no known image signature; the file is text ({text!r}...)")
    raise _Invalid(f"not a supported image: no known image signature (first bytes {head[:8].hex(' ')})")


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble (older modalities do this).

    It starts with a group 0002 or 0008 element tag followed by an explicit VR or a plausible
    implicit length; this is specific enough not to catch text or other binaries.
    """
    if len(head) < 8:
        return False
    group, element = struct.unpack_from("<HH", head, 0)
    if group not in (0x0002, 0x0008) or element > 0x0100:
        return False
    if head[4:6] in _DICOM_VRS:
        return True
    (length,) = struct.unpack_from("<I", head, 4)
    return length < 1024


# ---------------------------------------------------------------------------------------------
# Header parsers (no pixel decoding)
# ---------------------------------------------------------------------------------------------


def _parse_header(src: _Source, name: str) -> ImageHeader:
    if src.size == 0:
        raise ImageError(name, "empty file (0 bytes)")
    try:
        fmt = _sniff(src.read(0, 132))
        fields = _HEADER_PARSERS[fmt](src)
    except _Invalid as exc:
        raise ImageError(name, str(exc)) from None
    return ImageHeader(path=name, format=fmt, **fields)


# PNG colour type -> (mode prefix, stored samples, allowed bit depths)
_PNG_KINDS = {
    0: ("gray", 1, (1, 2, 4, 8, 16)),
    2: ("rgb", 3, (8, 16)),
    3: ("palette", 1, (1, 2, 4, 8)),
    4: ("graya", 2, (8, 16)),
    6: ("rgba", 4, (8, 16)),
}


def _png_header(src: _Source) -> dict[str, Any]:
    b = src.read(0, 33)
    if len(b) < 33:
        raise _Invalid(f"truncated PNG: the file ends inside the header ({src.size} bytes)")
    length, ctype = struct.unpack_from(">I4s", b, 8)
    if ctype != b"IHDR" or length != 13:
        raise _Invalid("corrupt PNG header: the first chunk is not a valid IHDR")
    if zlib.crc32(b[12:29]) != struct.unpack_from(">I", b, 29)[0]:
        raise _Invalid("corrupt PNG header: IHDR checksum mismatch")
    width, height, depth, color = struct.unpack_from(">IIBB", b, 16)
    if color not in _PNG_KINDS or depth not in _PNG_KINDS[color][2]:
        raise _Invalid(f"corrupt PNG header: invalid colour type {color} / bit depth {depth}")
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise _Invalid(f"corrupt PNG header: invalid size {width}x{height}")
    kind, channels, _ = _PNG_KINDS[color]
    return dict(width=width, height=height, channels=channels, bit_depth=depth, mode=f"{kind}{depth}")


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 DHT, C8 JPG, CC DAC
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def _jpeg_frame(src: _Source) -> tuple[dict[str, Any], int]:
    """Walk the marker segments up to the first scan; return the frame header and scan offset."""
    pos, frame = 2, None
    while True:
        m = src.read(pos, 4)
        if len(m) < 2:
            raise _Invalid(f"truncated JPEG: the file ends inside the header ({src.size} bytes)")
        if m[0] != 0xFF:
            raise _Invalid(f"corrupt JPEG header: expected a marker at byte {pos}")
        marker = m[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9):
            raise _Invalid("corrupt JPEG: unexpected start/end-of-image marker before the image data")
        if len(m) < 4:
            raise _Invalid(f"truncated JPEG: the file ends inside the header ({src.size} bytes)")
        (seglen,) = struct.unpack_from(">H", m, 2)
        if seglen < 2:
            raise _Invalid(f"corrupt JPEG header: bad segment length at byte {pos}")
        if marker in _JPEG_SOF:
            b = src.read(pos + 4, 6)
            if len(b) < 6:
                raise _Invalid(f"truncated JPEG: the file ends inside the header ({src.size} bytes)")
            precision, height, width, ncomp = struct.unpack(">BHHB", b)
            if height == 0:
                raise _Invalid("JPEG whose height is given by a later DNL marker is not supported")
            if width == 0 or ncomp not in (1, 3, 4):
                raise _Invalid(f"corrupt JPEG frame header ({width}x{height}, {ncomp} components)")
            kind = {1: "gray", 3: "rgb", 4: "cmyk"}[ncomp]
            frame = dict(
                width=width, height=height, channels=ncomp, bit_depth=precision, mode=f"{kind}{precision}"
            )
        if marker == 0xDA:
            if frame is None:
                raise _Invalid("corrupt JPEG: image data before any frame header")
            return frame, pos + 2 + seglen
        pos += 2 + seglen


def _jpeg_header(src: _Source) -> dict[str, Any]:
    return _jpeg_frame(src)[0]


_TIFF_TYPE_SIZES = {1: 1, 3: 2, 4: 4, 6: 1, 8: 2, 9: 4, 13: 4, 16: 8, 17: 8, 18: 8}
_TIFF_TYPE_CODES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_TIFF_KINDS = {0: "gray", 1: "gray", 2: "rgb", 3: "palette", 5: "cmyk", 6: "rgb"}


def _tiff_header(src: _Source) -> dict[str, Any]:
    """Read every IFD (page) of a classic or Big TIFF: sizes, samples, bits, photometric."""
    b = src.read(0, 16)
    bo = "<" if b[:2] == b"II" else ">"
    big = struct.unpack_from(bo + "H", b, 2)[0] == 43
    if big:
        if len(b) < 16:
            raise _Invalid("truncated TIFF header")
        ifd = struct.unpack_from(bo + "Q", b, 8)[0]
        count_fmt, entry_size, slot = "Q", 20, 8
    else:
        if len(b) < 8:
            raise _Invalid("truncated TIFF header")
        ifd = struct.unpack_from(bo + "I", b, 4)[0]
        count_fmt, entry_size, slot = "H", 12, 4
    count_size = struct.calcsize(count_fmt)
    pages: list[dict[str, int]] = []
    seen: set[int] = set()
    while ifd:
        if ifd in seen:
            raise _Invalid("corrupt TIFF: the page directory chain loops")
        if len(pages) >= _MAX_TIFF_PAGES:
            raise _Invalid(f"TIFF has more than {_MAX_TIFF_PAGES} pages")
        seen.add(ifd)
        raw = src.read(ifd, count_size)
        if len(raw) < count_size:
            raise _Invalid(f"corrupt or truncated TIFF: page directory at byte {ifd} is past the end")
        (n,) = struct.unpack(bo + count_fmt, raw)
        if not 0 < n <= _MAX_TIFF_TAGS:
            raise _Invalid(f"corrupt TIFF: page directory at byte {ifd} lists {n} tags")
        body = src.read(ifd + count_size, n * entry_size + slot)
        if len(body) < n * entry_size + slot:
            raise _Invalid(f"corrupt or truncated TIFF: bad page directory at byte {ifd}")
        tags = {}
        for i in range(n):
            e = body[i * entry_size : (i + 1) * entry_size]
            tag, typ = struct.unpack_from(bo + "HH", e, 0)
            cnt = struct.unpack_from(bo + ("Q" if big else "I"), e, 4)[0]
            tags[tag] = (typ, cnt, e[entry_size - slot :])
        page = {k: _tiff_first_value(src, bo, big, tags.get(t)) for k, t in _TIFF_TAGS.items()}
        if not page["width"] or not page["height"]:
            raise _Invalid(f"corrupt TIFF: page {len(pages)} has no image width/height")
        pages.append(page)
        ifd = struct.unpack_from(bo + ("Q" if big else "I"), body, n * entry_size)[0]
    if not pages:
        raise _Invalid("corrupt TIFF: no image directory")
    p = pages[0]
    spp = p["samples"] or 1
    bits = p["bits"] or 1
    photometric = p["photometric"] if p["photometric"] is not None else (2 if spp >= 3 else 1)
    kind = _TIFF_KINDS.get(photometric, f"photometric{photometric}-")
    if kind in ("gray", "rgb") and spp in (2, 4):
        kind += "a"
    return dict(
        width=p["width"],
        height=p["height"],
        frames=len(pages),
        channels=spp,
        bit_depth=bits,
        mode=f"{kind}{bits}",
        total_pixels=sum(q["width"] * q["height"] for q in pages),
    )


_TIFF_TAGS = {"width": 256, "height": 257, "bits": 258, "samples": 277, "photometric": 262}


def _tiff_first_value(src: _Source, bo: str, big: bool, entry: tuple[int, int, bytes] | None) -> int | None:
    """First value of a TIFF tag, stored inline in the entry or at an offset."""
    if entry is None:
        return None
    typ, count, slot = entry
    if typ not in _TIFF_TYPE_SIZES or count == 0:
        raise _Invalid(f"corrupt TIFF: tag of unknown type {typ}")
    size = _TIFF_TYPE_SIZES[typ]
    if size * count <= len(slot):
        data = slot
    else:
        offset = struct.unpack_from(bo + ("Q" if big else "I"), slot, 0)[0]
        data = src.read(offset, size)
        if len(data) < size:
            raise _Invalid("corrupt or truncated TIFF: a tag value lies past the end of the file")
    return int(struct.unpack_from(bo + _TIFF_TYPE_CODES[typ], data, 0)[0])


def _bmp_header(src: _Source) -> dict[str, Any]:
    b = src.read(0, 30)
    (info_size,) = struct.unpack_from("<I", b, 14)
    if info_size == 12:  # OS/2 BITMAPCOREHEADER
        if len(b) < 26:
            raise _Invalid("truncated BMP header")
        width, height, _, bpp = struct.unpack_from("<HHHH", b, 18)
    else:
        if len(b) < 30:
            raise _Invalid("truncated BMP header")
        width, height, _, bpp = struct.unpack_from("<iiHH", b, 18)
        height = abs(height)  # negative = top-down rows
    if width <= 0 or height <= 0 or bpp not in (1, 2, 4, 8, 16, 24, 32):
        raise _Invalid(f"corrupt BMP header ({width}x{height}, {bpp} bits per pixel)")
    if bpp <= 8:
        channels, depth, mode = 1, bpp, f"palette{bpp}"
    else:
        channels, depth, mode = {16: (3, 5, "rgb5"), 24: (3, 8, "rgb8"), 32: (4, 8, "rgba8")}[bpp]
    return dict(width=width, height=height, channels=channels, bit_depth=depth, mode=mode)


def _dicom_header(src: _Source) -> dict[str, Any]:
    ds = _dicom_read(src, pixels=False)
    return _dicom_fields(ds)


_HEADER_PARSERS = {
    "png": _png_header,
    "jpeg": _jpeg_header,
    "tiff": _tiff_header,
    "bmp": _bmp_header,
    "dicom": _dicom_header,
}


# ---------------------------------------------------------------------------------------------
# Loading: header -> limit -> decode -> RGB uint8
# ---------------------------------------------------------------------------------------------


def _load(src: _Source, name: str, max_pixels: int, *, single: bool) -> list[DecodedImage]:
    header = _parse_header(src, name)
    _check_limit(header, max_pixels)
    if single and header.frames > 1:
        raise ImageError(name, f"has {header.frames} frames; use load_images() to get one image per frame")
    try:
        if header.format == "dicom":
            return _decode_dicom(src, header, max_pixels)
        return _decode_raster(src.read(0, src.size), header)
    except _Invalid as exc:
        raise ImageError(name, str(exc)) from None


def _check_limit(header: ImageHeader, max_pixels: int) -> None:
    n = header.pixel_count
    if n <= max_pixels:
        return
    frames = f" x {header.frames} frames" if header.frames > 1 else ""
    raise ImageError(
        header.path,
        f"image is {header.width}x{header.height}{frames} = {n / 1e6:.1f} MP, over the pixel limit "
        f"of {max_pixels / 1e6:g} MP (max_pixels={max_pixels}); not decoded. "
        "Pass a larger max_pixels to load it.",
    )


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
    if header.format == "jpeg":
        _check_jpeg_complete(data)
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
        raise _Invalid(f"OpenCV could not decode the {header.format.upper()} ({_cv2_message(exc)})") from None
    if not pages:
        raise _Invalid(_decode_failure_reason(data, header))
    if len(pages) != header.frames:
        raise _Invalid(f"decoded {len(pages)} of the {header.frames} pages listed in the TIFF header")
    _check_decoded_size(pages[0], header)
    return [
        DecodedImage(
            rgb=_to_rgb8(page, header.bit_depth or 8),
            path=header.path,
            frame=i if header.frames > 1 else None,
            format=header.format,
            source_mode=header.mode or "",
            bit_depth=header.bit_depth or 8,
        )
        for i, page in enumerate(pages)
    ]


def _check_jpeg_complete(data: bytes) -> None:
    """A JPEG must end its entropy-coded data with an end-of-image marker.

    Inside scan data 0xFF is always followed by 0x00 or a restart/scan marker, so the first
    FF D9 after the first scan header is the real end of image. Without it the file was cut
    short (an interrupted copy or upload); libjpeg would fill the missing rows with grey.
    """
    _, scan = _jpeg_frame(_BytesSource(data))
    if data.find(b"\xff\xd9", scan) < 0:
        raise _Invalid(f"truncated JPEG: no end-of-image marker (the file ends after {len(data)} bytes)")


def _decode_failure_reason(data: bytes, header: ImageHeader) -> str:
    if header.format == "png" and data.rfind(b"IEND") < 0:
        return f"truncated PNG: no IEND chunk (the file ends after {len(data)} bytes)"
    if header.format == "jpeg":  # completeness was checked before decoding
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
        raise _Invalid(f"decoded size {w}x{h} differs from the header's {header.width}x{header.height}")


def _cv2_message(exc: cv2.error) -> str:
    text = str(getattr(exc, "err", "") or exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _to_rgb8(arr: np.ndarray, bit_depth: int) -> np.ndarray:
    """OpenCV's BGR/BGRA/gray output of any depth -> C-contiguous RGB uint8."""
    arr = _scale_to_uint8(arr, bit_depth)
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
    raise _Invalid(f"unsupported number of channels after decoding: {channels}")


def _composite_on_black(color: np.ndarray, alpha: np.ndarray) -> np.ndarray:
    """Straight alpha over black: ``round(c * a / 255)``.

    Compositing rather than dropping alpha means transparent pixels become black whatever
    colour the encoder left in them, matching the black surround of fundus photos.
    """
    c = color.astype(np.uint16) * alpha[:, :, None].astype(np.uint16)
    return ((c + 127) // 255).astype(np.uint8)


def _scale_to_uint8(arr: np.ndarray, bit_depth: int) -> np.ndarray:
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
    if arr.dtype == np.uint16:
        peak = (1 << bit_depth) - 1 if 8 < bit_depth <= 16 else 65535
        scaled = (np.minimum(arr, peak).astype(np.uint32) * 255 + peak // 2) // peak
        return scaled.astype(np.uint8)
    values = arr.astype(np.float64)
    finite = values[np.isfinite(values)]
    values = np.nan_to_num(values, nan=0.0, posinf=0.0, neginf=0.0)
    if arr.dtype.kind == "f" and finite.size and finite.min() >= 0.0 and finite.max() <= 1.0:
        return np.rint(values * 255.0).astype(np.uint8)
    return _stretch_to_uint8(values)


def _stretch_to_uint8(values: np.ndarray) -> np.ndarray:
    """min..max -> 0..255; a constant image becomes 0."""
    lo, hi = float(values.min()), float(values.max())
    if hi <= lo:
        return np.zeros(values.shape, dtype=np.uint8)
    return np.clip(np.rint((values - lo) * (255.0 / (hi - lo))), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------

# Transfer syntaxes whose frames are ordinary JPEG / JPEG 2000 codestreams that OpenCV (already
# a dependency) decodes, so the most common compressed ophthalmic DICOMs need no extra plugin.
_OPENCV_DICOM_SYNTAXES = {
    "1.2.840.10008.1.2.4.50": "JPEG Baseline",
    "1.2.840.10008.1.2.4.90": "JPEG 2000 Lossless",
    "1.2.840.10008.1.2.4.91": "JPEG 2000",
}


def _dicom_read(src: _Source, *, pixels: bool) -> Any:
    import pydicom

    has_preamble = src.read(128, 4) == b"DICM"
    try:
        return pydicom.dcmread(src.stream(), stop_before_pixels=not pixels, force=not has_preamble)
    except MemoryError:
        raise
    except Exception as exc:
        raise _Invalid(f"corrupt DICOM ({_exc_text(exc)})") from None


def _dicom_fields(ds: Any) -> dict[str, Any]:
    try:
        if len(ds) == 0:
            raise _Invalid("corrupt DICOM: no readable data elements after the header")
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        if not rows or not cols:
            sop = ds.get("SOPClassUID")
            what = f" (SOP class {getattr(sop, 'name', sop)})" if sop else ""
            raise _Invalid(
                f"DICOM without an image: no Rows/Columns{what}; truncated, or not an image object"
            )
        frames = max(1, int(ds.get("NumberOfFrames") or 1))
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
        pi = str(ds.get("PhotometricInterpretation") or ("MONOCHROME2" if spp == 1 else "RGB")).strip()
    except _Invalid:
        raise
    except Exception as exc:
        raise _Invalid(f"corrupt DICOM image attributes ({_exc_text(exc)})") from None
    return dict(width=cols, height=rows, frames=frames, channels=spp, bit_depth=bits, mode=pi)


def _decode_dicom(src: _Source, header: ImageHeader, max_pixels: int) -> list[DecodedImage]:
    ds = _dicom_read(src, pixels=True)
    full = ImageHeader(path=header.path, format="dicom", **_dicom_fields(ds))
    _check_limit(full, max_pixels)  # the header re-read with the pixels must agree
    if "PixelData" not in ds:
        raise _Invalid("DICOM without pixel data (no PixelData element)")
    meta = {k: str(ds.get(k)).strip() for k in _DICOM_META_KEYS if str(ds.get(k) or "").strip()}
    return [
        DecodedImage(
            rgb=_dicom_frame_to_rgb8(frame, ds, i, full),
            path=full.path,
            frame=i if full.frames > 1 else None,
            format="dicom",
            source_mode=full.mode or "",
            bit_depth=full.bit_depth or 8,
            meta=dict(meta),
        )
        for i, frame in enumerate(_dicom_frames(ds, full))
    ]


def _dicom_transfer_syntax(ds: Any) -> Any:
    """The transfer syntax; for a bare data set (no file meta) the encoding pydicom read it with."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts:
        return UID(str(ts))
    implicit, little = ds.original_encoding
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _dicom_frames(ds: Any, header: ImageHeader) -> Iterator[np.ndarray]:
    """Yield each frame as stored values (monochrome/palette) or RGB (colour), RGB channel order."""
    from pydicom.pixels import get_decoder, pixel_array

    ts = _dicom_transfer_syntax(ds)
    if str(ts) in _OPENCV_DICOM_SYNTAXES and int(ds.get("PixelRepresentation") or 0) == 0:
        yield from _dicom_frames_opencv(ds, header, str(ts))
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise _Invalid(f"unsupported DICOM transfer syntax {ts} ({ts.name})") from None
    if not decoder.is_available:
        needs = "; ".join(decoder.missing_dependencies) or "a pydicom pixel-data plugin"
        raise _Invalid(
            f"DICOM pixel data is compressed as '{ts.name}' ({ts}) and no decoder for it is installed; "
            f"install one of: {needs}"
        )
    for i in range(header.frames):
        try:
            arr = pixel_array(ds, index=i if header.frames > 1 else None)
        except MemoryError:
            raise
        except Exception as exc:
            raise _Invalid(f"corrupt DICOM pixel data in frame {i} ({_exc_text(exc)})") from None
        yield arr


def _dicom_frames_opencv(ds: Any, header: ImageHeader, ts: str) -> Iterator[np.ndarray]:
    from pydicom.encaps import generate_frames

    try:
        frames = generate_frames(
            ds.PixelData,
            number_of_frames=header.frames,
            extended_offsets=(ds.get("ExtendedOffsetTable"), ds.get("ExtendedOffsetTableLengths"))
            if "ExtendedOffsetTable" in ds
            else None,
        )
        for i in range(header.frames):
            data = next(frames, None)
            if data is None:
                raise _Invalid(f"corrupt DICOM: frame {i} of {header.frames} is missing from the pixel data")
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise _Invalid(f"corrupt {_OPENCV_DICOM_SYNTAXES[ts]} data in DICOM frame {i}")
            if arr.shape[:2] != (header.height, header.width):
                raise _Invalid(
                    f"DICOM frame {i} decodes to {arr.shape[1]}x{arr.shape[0]}, "
                    f"but Rows/Columns say {header.width}x{header.height}"
                )
            if arr.ndim == 3 and arr.shape[2] == 3:
                arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
            yield arr
    except (_Invalid, MemoryError):
        raise
    except Exception as exc:  # pydicom.encaps raises ValueError/struct errors on broken items
        raise _Invalid(f"corrupt DICOM encapsulated pixel data ({_exc_text(exc)})") from None


def _dicom_frame_to_rgb8(arr: np.ndarray, ds: Any, frame: int, header: ImageHeader) -> np.ndarray:
    """Display pipeline for one frame; malformed LUT/rescale/window attributes become _Invalid."""
    try:
        return _dicom_to_rgb8(arr, ds, frame, header)
    except (_Invalid, MemoryError):
        raise
    except Exception as exc:
        raise _Invalid(f"corrupt DICOM display attributes in frame {frame} ({_exc_text(exc)})") from None


def _dicom_to_rgb8(arr: np.ndarray, ds: Any, frame: int, header: ImageHeader) -> np.ndarray:
    pi = (header.mode or "").upper()
    bits = header.bit_depth or 8
    if pi in ("MONOCHROME1", "MONOCHROME2") or (arr.ndim == 2 and pi != "PALETTE COLOR"):
        gray = _dicom_gray_to_uint8(arr, ds, frame, bits)
        if pi == "MONOCHROME1":  # MONOCHROME1: the lowest value is displayed white
            gray = 255 - gray
        return cv2.cvtColor(np.ascontiguousarray(gray), cv2.COLOR_GRAY2RGB)
    if pi == "PALETTE COLOR":
        from pydicom.pixels import apply_color_lut

        arr = apply_color_lut(arr, ds)
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
    if arr.ndim != 3 or arr.shape[2] != 3:
        raise _Invalid(f"unexpected DICOM pixel array shape {arr.shape} for {pi}")
    if arr.dtype != np.uint8:  # 16-bit colour: nominal range of the stored bits
        arr = _scale_to_uint8(arr.astype(np.uint16) if arr.dtype.kind == "u" else arr, bits)
    return np.ascontiguousarray(arr)


def _dicom_gray_to_uint8(arr: np.ndarray, ds: Any, frame: int, bits: int) -> np.ndarray:
    """Modality LUT (rescale) then VOI window; min/max stretch when there is no window.

    8-bit unsigned data with no rescale and no window is taken as is (fundus and most
    ophthalmic photography); wider data without a window gets the frame's min..max, the
    usual "auto window" of DICOM viewers.
    """
    slope = _frame_attr(ds, frame, "RescaleSlope", "PixelValueTransformationSequence")
    intercept = _frame_attr(ds, frame, "RescaleIntercept", "PixelValueTransformationSequence")
    slope = 1.0 if slope is None else float(slope)
    intercept = 0.0 if intercept is None else float(intercept)
    if "ModalityLUTSequence" in ds:
        from pydicom.pixels import apply_modality_lut

        values = apply_modality_lut(arr, ds).astype(np.float64)
    else:
        values = arr.astype(np.float64) * slope + intercept
    center = _frame_attr(ds, frame, "WindowCenter", "FrameVOILUTSequence")
    width = _frame_attr(ds, frame, "WindowWidth", "FrameVOILUTSequence")
    function = _frame_attr(ds, frame, "VOILUTFunction", "FrameVOILUTSequence") or "LINEAR"
    if center is not None and width is not None:
        windowed = _window_to_uint8(values, _first(center), _first(width), str(function))
        if windowed is not None:
            return windowed
    plain_8bit = arr.dtype == np.uint8 or (bits <= 8 and arr.dtype.kind == "u")
    if plain_8bit and slope == 1.0 and intercept == 0.0 and "ModalityLUTSequence" not in ds:
        return arr.astype(np.uint8)
    return _stretch_to_uint8(values)


def _window_to_uint8(values: np.ndarray, center: float, width: float, function: str) -> np.ndarray | None:
    """DICOM VOI window (PS3.3 C.11.2.1.2) straight to 0..255; None for an invalid window.

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
        out = ((values - center) / width + 0.5) * 255.0
    else:
        if width < 1:
            return None
        if width == 1:  # a step at c - 0.5
            return np.where(values > center - 0.5, 255, 0).astype(np.uint8)
        out = ((values - (center - 0.5)) / (width - 1.0) + 0.5) * 255.0
    return np.clip(np.rint(out), 0, 255).astype(np.uint8)


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


def _exc_text(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:300]}" if text else type(exc).__name__


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
