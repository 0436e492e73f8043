"""Where image bytes come from, what format they are, and how much decoding them may cost.

* Opening: only a regular file is opened. ``os.stat`` is checked *before* ``open``, because
  opening a FIFO for reading blocks until a writer appears (a FIFO named ``.jpg`` used to hang a
  whole screening run) and a device file may never end. The open itself is non-blocking and
  re-checked with ``fstat``, so a file swapped for a FIFO in between cannot block either.
* Sniffing: the format comes from the first bytes. DICOM's ``DICM`` at byte 128 is checked
  *first*: the 128-byte preamble is free for applications and may legally hold a TIFF header
  (dual-format files), so a file with both is a DICOM (read as TIFF it lost MONOCHROME1
  inversion, the window and the DICOM attributes).
* Limits, checked on the header before any pixel is decoded: a pixel count (``max_pixels``) and
  a decoded-bytes budget (``max_decoded_bytes``), the latter from bit depth x channels x pixels
  plus the working copies the conversion to RGB uint8 makes (see :func:`estimated_decode_bytes`).
"""

from __future__ import annotations

import io
import os
import stat
import struct
from typing import BinaryIO, Protocol

from eyecare_edge.image_types import ImageError, ImageHeader, InvalidImage

DEFAULT_MAX_PIXELS = 100_000_000
"""Default limit on width * height * frames; 100 MP is ~4x a 45-degree 24 MP fundus photo."""

DEFAULT_MAX_DECODED_BYTES = 1 << 30
"""Default budget (1 GiB) for the memory one file's decoding may take, estimated from its header.

Sized for a 4 GB Jetson, whose memory the CPU shares with the GPU and the model: a quarter of
the board for one image. Estimates (:func:`estimated_decode_bytes`): a 24 MP RGB fundus JPEG
~0.23 GB and a 100 MP RGB JPEG ~0.92 GB are decoded; a 100 MP 16-bit RGBA PNG (~2.5 GB estimated;
3.96 GB peak measured before this budget existed) is refused from its header.
"""


class Source(Protocol):
    size: int

    def read(self, offset: int, n: int) -> bytes: ...

    def stream(self) -> BinaryIO: ...


class BytesSource:
    """Image bytes already in memory (``decode_image_bytes``)."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self.size = len(self._view)

    def read(self, offset: int, n: int) -> bytes:
        return bytes(self._view[offset : offset + n])

    def stream(self) -> BinaryIO:
        return io.BytesIO(self._view)


class FileSource:
    """An open regular file; header parsers read small pieces at offsets, never the whole file."""

    def __init__(self, f: BinaryIO) -> None:
        self._f = f
        self.size = os.fstat(f.fileno()).st_size

    def read(self, offset: int, n: int) -> bytes:
        self._f.seek(offset)
        return self._f.read(n)

    def stream(self) -> BinaryIO:
        self._f.seek(0)
        return self._f

    def __enter__(self) -> FileSource:
        return self

    def __exit__(self, *exc: object) -> None:
        self._f.close()


_FILE_KINDS = (
    (stat.S_ISDIR, "is a directory, not an image file"),
    (stat.S_ISFIFO, "is a FIFO (named pipe), not a regular file; not opened"),
    (stat.S_ISCHR, "is a character device, not a regular file; not opened"),
    (stat.S_ISBLK, "is a block device, not a regular file; not opened"),
    (stat.S_ISSOCK, "is a socket, not a regular file; not opened"),
)


def not_regular_reason(mode: int) -> str | None:
    """Why a file of this ``st_mode`` is not read as an image; None for a regular file."""
    if stat.S_ISREG(mode):
        return None
    for test, reason in _FILE_KINDS:
        if test(mode):
            return reason
    return "is not a regular file; not opened"


def check_regular_file(name: str) -> os.stat_result:
    """``os.stat`` the path (following links) and refuse anything but a regular file."""
    try:
        st = os.stat(name)
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read the file ({exc.strerror or exc})") from None
    reason = not_regular_reason(st.st_mode)
    if reason is not None:
        raise ImageError(name, reason)
    return st


def open_file(name: str) -> FileSource:
    """Open a regular file for reading; anything else is an ImageError, and nothing blocks."""
    check_regular_file(name)
    try:
        fd = os.open(name, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise ImageError(name, "file not found") from None
    except IsADirectoryError:
        raise ImageError(name, "is a directory, not an image file") from None
    except PermissionError:
        raise ImageError(name, "permission denied") from None
    except OSError as exc:
        raise ImageError(name, f"cannot read the file ({exc.strerror or exc})") from None
    try:
        reason = not_regular_reason(os.fstat(fd).st_mode)  # swapped since the stat?
        if reason is not None:
            raise ImageError(name, reason)
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return FileSource(os.fdopen(fd, "rb"))
    except BaseException:
        os.close(fd)
        raise


# ---------------------------------------------------------------------------------------------
# Format detection by signature
# ---------------------------------------------------------------------------------------------

SUPPORTED_NAMES = "JPEG, PNG, TIFF, BMP, DICOM"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
BMP_INFO_SIZES = frozenset({12, 40, 52, 56, 64, 108, 124})
_DICOM_VRS = frozenset(
    b"AE AS AT CS DA DS DT FD FL IS LO LT OB OD OF OL OV OW PN SH SL SQ SS ST SV TM UC UI UL UN UR US UT UV".split()
)
# Formats we recognise but do not load, so the message can say what the file is.
_OTHER_SIGNATURES: tuple[tuple[int, bytes, str], ...] = (
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"\x00\x00\x00\x0cjP  \r\n\x87\n", "JPEG 2000 (JP2)"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000 codestream"),
    (0, b"\xff\x0a", "JPEG XL"),
    (0, b"\x00\x00\x00\x0cJXL \r\n\x87\n", "JPEG XL"),
    (0, b"%PDF", "PDF"),
    (0, b"PK\x03\x04", "ZIP archive"),
    (0, b"\x1f\x8b", "gzip archive"),
    (4, b"ftypheic", "HEIC"),
    (4, b"ftypheix", "HEIC"),
    (4, b"ftypmif1", "HEIF"),
    (4, b"ftypavif", "AVIF"),
    (0, b"\x76\x2f\x31\x01", "OpenEXR"),
)


def sniff(head: bytes) -> str:
    """Format name from the first 132 bytes, or raise InvalidImage saying what the file looks like."""
    if head[128:132] == b"DICM":  # before TIFF: the DICOM preamble may hold a TIFF header
        return "dicom"
    if head.startswith(b"\xff\xd8\xff"):
        return "jpeg"
    if head.startswith(PNG_SIGNATURE):
        return "png"
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        return "tiff"
    if head[:2] == b"BM" and len(head) >= 18 and struct.unpack_from("<I", head, 14)[0] in BMP_INFO_SIZES:
        return "bmp"
    if _looks_like_bare_dicom(head):
        return "dicom"
    for offset, magic, what in _OTHER_SIGNATURES:
        if head[offset : offset + len(magic)] == magic:
            raise InvalidImage(f"unsupported format {what} (supported: {SUPPORTED_NAMES})")
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        raise InvalidImage(f"unsupported format WebP (supported: {SUPPORTED_NAMES})")
    sample = head[:64].rstrip(b"\x00")
    if sample and all(32 <= c < 127 or c in (9, 10, 13) for c in sample):
        text = sample.decode("ascii", "replace")[:40]
        raise InvalidImage(f"not a supported image: no known image signature; the file is text ({text!r}...)")
    raise InvalidImage(f"not a supported image: no known image signature (first bytes {head[:8].hex(' ')})")


def _looks_like_bare_dicom(head: bytes) -> bool:
    """A DICOM data set written without the 128-byte preamble (older modalities do this).

    It starts with a group 0002 or 0008 element tag (little or big endian) followed by an
    explicit VR or a plausible implicit length; specific enough not to catch text or binaries.
    """
    if len(head) < 8:
        return False
    for order in ("<", ">"):
        group, element = struct.unpack_from(order + "HH", head, 0)
        if group not in (0x0002, 0x0008) or element > 0x0100:
            continue
        if head[4:6] in _DICOM_VRS:
            return True
        (length,) = struct.unpack_from(order + "I", head, 4)
        if length < 1024:
            return True
    return False


# ---------------------------------------------------------------------------------------------
# Limits
# ---------------------------------------------------------------------------------------------


def check_limit_args(max_pixels: int, max_decoded_bytes: int) -> None:
    for name, value in (("max_pixels", max_pixels), ("max_decoded_bytes", max_decoded_bytes)):
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise ValueError(f"{name} must be a positive int, got {value!r}")


def estimated_decode_bytes(header: ImageHeader) -> int:
    """Upper estimate of the memory decoding this file takes, from its header alone.

    encoded bytes held (twice for DICOM: our read and pydicom's Pixel Data) + decoder output
    (pixels x channels x bytes per sample, all frames) + RGB uint8 results (pixels x 3, all
    frames: ``load_images`` returns them together) + per-frame working memory: one spare copy of
    the decoder output (16 -> 8-bit lookup, BGR -> RGB), 6 bytes per pixel for alpha compositing
    (uint16 RGB) and 9 for the DICOM greyscale display pipeline (float64 + uint8).
    Measured peak RSS growth (``tests/dicom_corpus.py``'s ``peak_rss_growth_mb``) vs this
    estimate, MiB: 24 MP RGB JPEG 165 vs 226; 25 MP 16-bit RGBA PNG 697 vs 787; 16 MP 16-bit grey
    PNG 130 vs 137; 16 MP 12-bit CT DICOM 232 vs 305 (windowed or min/max-stretched).
    """
    channels = max(1, header.channels or 1)
    bits = header.bit_depth or 8
    sample = 1 if bits <= 8 else 2 if bits <= 16 else 4
    frame = header.width * header.height
    work = channels * sample + (6 if channels in (2, 4) else 0)
    encoded = header.encoded_bytes or 0
    if header.format == "dicom":
        encoded *= 2
        work += 9 if channels == 1 else 0
    return encoded + header.pixel_count * (channels * sample + 3) + frame * work


def check_limits(header: ImageHeader, max_pixels: int, max_decoded_bytes: int) -> None:
    """Refuse, from the header, an image over the pixel limit or the decoded-bytes budget."""
    n = header.pixel_count
    frames = f" x {header.frames} frames" if header.frames > 1 else ""
    if n > max_pixels:
        raise ImageError(
            header.path,
            f"image is {header.width}x{header.height}{frames} = {n / 1e6:.1f} MP, over the pixel limit "
            f"of {max_pixels / 1e6:g} MP (max_pixels={max_pixels}); not decoded. "
            "Pass a larger max_pixels to load it.",
        )
    need = estimated_decode_bytes(header)
    if need > max_decoded_bytes:
        raise ImageError(
            header.path,
            f"decoding needs about {need / 2**20:.0f} MiB ({header.width}x{header.height}{frames}, "
            f"{header.channels or 1} x {header.bit_depth or 8}-bit samples), over the decoded-bytes budget "
            f"of {max_decoded_bytes / 2**20:.0f} MiB (max_decoded_bytes={max_decoded_bytes}); not decoded. "
            "Pass a larger max_decoded_bytes to load it.",
        )
