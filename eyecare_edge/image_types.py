"""The data types of image loading: the error, the header, the decoded frame.

They live apart from :mod:`eyecare_edge.images` (the public entry, which re-exports them) so the
format modules (:mod:`eyecare_edge.image_source`, :mod:`eyecare_edge.image_headers`,
:mod:`eyecare_edge.dicom_decode`) can share them without importing each other in a circle.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from eyecare_edge.errors import EyecareError


def display_name(path: str | os.PathLike[str] | bytes) -> str:
    """A file name as printable, valid UTF-8 text, whatever bytes it was made of.

    POSIX file names are bytes; Python hands names that are not UTF-8 over as str with lone
    surrogates (``surrogateescape``), which cannot be printed, written to a UTF-8 file or
    encoded. Such bytes are shown as ``\\xe9`` escapes; a valid name is returned unchanged.
    """
    raw = path if isinstance(path, bytes) else os.fsencode(path)
    return raw.decode("utf-8", "backslashreplace")


class ImageError(EyecareError):
    """An image could not be read; ``str(e)`` is ``"<path>: <reason>"``.

    ``path`` is the name as given (it may hold surrogate escapes for a non-UTF-8 name, so it can
    be opened again); the message shows it through :func:`display_name`, so printing or logging
    the error never raises.
    """

    def __init__(self, path: str, reason: str) -> None:
        super().__init__(f"{display_name(path)}: {reason}")
        self.path = path
        self.reason = reason

    def __reduce__(self) -> tuple[Any, ...]:
        # Keep (path, reason) through pickling, so errors survive multiprocessing workers.
        return (type(self), (self.path, self.reason))


class InvalidImage(EyecareError):
    """Internal: a reason why the bytes are not a readable image (the caller adds the path)."""


@dataclass(frozen=True)
class ImageHeader:
    """What the file's header says, read without decoding any pixel.

    ``width``/``height`` are of the first frame as stored (before EXIF orientation).
    ``channels`` are samples per stored pixel (a palette image has 1). ``mode`` is a short
    description of the stored pixels ("gray16", "rgba8", "cmyk8", "palette8", or the DICOM
    PhotometricInterpretation). ``total_pixels`` is the sum over all frames, which the pixel
    limit is checked against (pages of a multi-page TIFF may differ in size).
    ``encoded_bytes`` is how many bytes of the file the decoder will be given (the file may be
    longer: trailing bytes after a JPEG's end-of-image are never read).
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
    encoded_bytes: int | None = None

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
