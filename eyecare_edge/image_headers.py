"""Header parsers for the raster formats (PNG, JPEG, TIFF, BMP): no pixel is decoded here.

Each parser returns the :class:`~eyecare_edge.image_types.ImageHeader` fields and checks that the
data actually present can hold the image the header claims, so a tiny file claiming a huge
image is refused instead of being decoded into a flat grey picture (libjpeg fills missing rows
with grey and only warns):

* JPEG (Huffman-coded, the common case): every 8x8 block of the first component costs at least
  one bit (its DC code), so the entropy-coded data must hold at least blocks / 8 bytes (lossless:
  one bit per pixel). Arithmetic-coded JPEG has no such floor (a flat image codes to almost
  nothing); its memory is bounded by the decoded-bytes budget only.
* PNG: deflate expands at most 1032:1, so the IDAT chunks must hold at least raw / 1032 bytes.

They also say how many bytes the decoder needs (``encoded_bytes``: up to a JPEG's end-of-image
marker or a PNG's IEND chunk), so a file padded with a gigabyte of zeros is not read whole.
"""

from __future__ import annotations

import struct
import zlib
from typing import Any

from eyecare_edge.image_source import Source
from eyecare_edge.image_types import InvalidImage

MAX_TIFF_PAGES = 10_000
_MAX_TIFF_TAGS = 4_096  # real files have tens; a huge count is a corrupt (or hostile) directory
_METADATA_SLACK = 64 << 20  # EXIF/ICC/XMP and other non-pixel data a real file may carry
_DEFLATE_MAX_RATIO = 1032  # zlib's maximum compression ratio (258-byte matches in ~2 bits)
_SCAN_CHUNK = 1 << 20


# PNG colour type -> (mode prefix, stored samples, allowed bit depths)
_PNG_KINDS = {
    0: ("gray", 1, (1, 2, 4, 8, 16)),
    2: ("rgb", 3, (8, 16)),
    3: ("palette", 1, (1, 2, 4, 8)),
    4: ("graya", 2, (8, 16)),
    6: ("rgba", 4, (8, 16)),
}


def png_header(src: Source) -> dict[str, Any]:
    b = src.read(0, 33)
    if len(b) < 33:
        raise InvalidImage(f"truncated PNG: the file ends inside the header ({src.size} bytes)")
    length, ctype = struct.unpack_from(">I4s", b, 8)
    if ctype != b"IHDR" or length != 13:
        raise InvalidImage("corrupt PNG header: the first chunk is not a valid IHDR")
    if zlib.crc32(b[12:29]) != struct.unpack_from(">I", b, 29)[0]:
        raise InvalidImage("corrupt PNG header: IHDR checksum mismatch")
    width, height, depth, color = struct.unpack_from(">IIBB", b, 16)
    if color not in _PNG_KINDS or depth not in _PNG_KINDS[color][2]:
        raise InvalidImage(f"corrupt PNG header: invalid colour type {color} / bit depth {depth}")
    if not (0 < width < 2**31 and 0 < height < 2**31):
        raise InvalidImage(f"corrupt PNG header: invalid size {width}x{height}")
    kind, channels, _ = _PNG_KINDS[color]
    raw = height * (1 + (width * channels * depth + 7) // 8)  # filter byte + packed row
    end, idat = _png_extent(src)
    if end > raw + raw // 64 + _METADATA_SLACK:  # deflate never expands by more than ~0.03%
        raise InvalidImage(
            f"PNG is {end} bytes up to its IEND chunk, far more than a {width}x{height} image can need; not read"
        )
    if idat * _DEFLATE_MAX_RATIO < raw:
        raise InvalidImage(
            f"truncated or forged PNG: {width}x{height} needs {raw} bytes of pixel data, which deflate cannot "
            f"pack into the {idat} bytes of image data present (at least {raw // _DEFLATE_MAX_RATIO} needed)"
        )
    return dict(
        width=width,
        height=height,
        channels=channels,
        bit_depth=depth,
        mode=f"{kind}{depth}",
        encoded_bytes=end,
    )


def _png_extent(src: Source) -> tuple[int, int]:
    """(end of the IEND chunk, bytes of IDAT data), walking chunk headers only.

    A file without IEND is given to the decoder whole (it reports the truncation itself).
    """
    pos, idat = 8, 0
    while pos + 8 <= src.size:
        length, ctype = struct.unpack(">I4s", src.read(pos, 8))
        if ctype == b"IDAT":
            idat += min(length, max(0, src.size - pos - 12))
        pos += 12 + length
        if ctype == b"IEND":
            return min(pos, src.size), idat
    return src.size, idat


_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # C4 DHT, C8 JPG, CC DAC
_JPEG_STANDALONE = frozenset({0x01, *range(0xD0, 0xD8)})


def jpeg_frame(src: Source) -> tuple[dict[str, Any], int]:
    """Walk the marker segments up to the first scan; return the frame header and scan offset.

    The frame dict also carries ``sof`` (the frame marker, e.g. 0xC0 baseline, 0xC3 lossless).
    """
    pos, frame = 2, None
    while True:
        m = src.read(pos, 4)
        if len(m) < 2:
            raise InvalidImage(f"truncated JPEG: the file ends inside the header ({src.size} bytes)")
        if m[0] != 0xFF:
            raise InvalidImage(f"corrupt JPEG header: expected a marker at byte {pos}")
        marker = m[1]
        if marker == 0xFF:  # fill byte before a marker
            pos += 1
            continue
        if marker in _JPEG_STANDALONE:
            pos += 2
            continue
        if marker in (0xD8, 0xD9):
            raise InvalidImage("corrupt JPEG: unexpected start/end-of-image marker before the image data")
        if len(m) < 4:
            raise InvalidImage(f"truncated JPEG: the file ends inside the header ({src.size} bytes)")
        (seglen,) = struct.unpack_from(">H", m, 2)
        if seglen < 2:
            raise InvalidImage(f"corrupt JPEG header: bad segment length at byte {pos}")
        if marker in _JPEG_SOF:
            b = src.read(pos + 4, 6)
            if len(b) < 6:
                raise InvalidImage(f"truncated JPEG: the file ends inside the header ({src.size} bytes)")
            precision, height, width, ncomp = struct.unpack(">BHHB", b)
            if height == 0:
                raise InvalidImage("JPEG whose height is given by a later DNL marker is not supported")
            if width == 0 or ncomp not in (1, 3, 4):
                raise InvalidImage(f"corrupt JPEG frame header ({width}x{height}, {ncomp} components)")
            kind = {1: "gray", 3: "rgb", 4: "cmyk"}[ncomp]
            frame = dict(
                width=width,
                height=height,
                channels=ncomp,
                bit_depth=precision,
                mode=f"{kind}{precision}",
                sof=marker,
            )
        if marker == 0xDA:
            if frame is None:
                raise InvalidImage("corrupt JPEG: image data before any frame header")
            return frame, pos + 2 + seglen
        pos += 2 + seglen


_JPEG_ARITHMETIC = frozenset({0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF})
_JPEG_LOSSLESS = frozenset({0xC3, 0xC7, 0xCB, 0xCF})


def jpeg_end(src: Source, scan: int, limit: int) -> int:
    """Offset just past the end-of-image marker, searching from the first scan.

    Inside entropy-coded data 0xFF is always followed by 0x00 or a restart/scan marker, so the
    first FF D9 after the first scan header is the real end of image. Reads at most ``limit``
    bytes; raises InvalidImage when the marker is missing (a cut file: libjpeg would fill the
    missing rows with grey) or lies beyond ``limit`` (far more data than the frame can need).
    """
    pos, stop = scan, min(src.size, limit)
    while pos < stop:
        block = src.read(pos, min(_SCAN_CHUNK, stop - pos) + 1)
        i = block.find(b"\xff\xd9")
        if i >= 0:
            return pos + i + 2
        pos += len(block) - 1
        if len(block) <= 1:
            break
    if src.size > limit:
        raise InvalidImage(
            f"JPEG has no end-of-image marker within its first {limit} bytes, far more than its frame can "
            f"need (the file is {src.size} bytes); not read further"
        )
    raise InvalidImage(f"truncated JPEG: no end-of-image marker (the file ends after {src.size} bytes)")


def jpeg_header(src: Source) -> dict[str, Any]:
    frame, scan = jpeg_frame(src)
    sof = frame.pop("sof")
    width, height, ncomp = frame["width"], frame["height"], frame["channels"]
    sample_bytes = 1 if frame["bit_depth"] <= 8 else 2
    limit = scan + 2 * width * height * ncomp * sample_bytes + _METADATA_SLACK
    end = jpeg_end(src, scan, limit)
    if sof not in _JPEG_ARITHMETIC:
        units = width * height if sof in _JPEG_LOSSLESS else -(-width // 8) * -(-height // 8)
        floor = units // 8  # >= 1 bit per block (DCT: its DC code) or per pixel (lossless)
        if end - scan < floor:
            raise InvalidImage(
                f"truncated or forged JPEG: a {width}x{height} frame needs at least {floor} bytes of image data "
                f"(one bit per {'pixel' if sof in _JPEG_LOSSLESS else '8x8 block'}), the file holds {end - scan}"
            )
    return dict(frame, encoded_bytes=end)


_TIFF_TYPE_SIZES = {1: 1, 3: 2, 4: 4, 6: 1, 8: 2, 9: 4, 13: 4, 16: 8, 17: 8, 18: 8}
_TIFF_TYPE_CODES = {1: "B", 3: "H", 4: "I", 6: "b", 8: "h", 9: "i", 13: "I", 16: "Q", 17: "q", 18: "Q"}
_TIFF_KINDS = {0: "gray", 1: "gray", 2: "rgb", 3: "palette", 5: "cmyk", 6: "rgb"}


def tiff_header(src: Source) -> dict[str, Any]:
    """Read every IFD (page) of a classic or Big TIFF: sizes, samples, bits, photometric."""
    b = src.read(0, 16)
    bo = "<" if b[:2] == b"II" else ">"
    big = struct.unpack_from(bo + "H", b, 2)[0] == 43
    if big:
        if len(b) < 16:
            raise InvalidImage("truncated TIFF header")
        ifd = struct.unpack_from(bo + "Q", b, 8)[0]
        count_fmt, entry_size, slot = "Q", 20, 8
    else:
        if len(b) < 8:
            raise InvalidImage("truncated TIFF header")
        ifd = struct.unpack_from(bo + "I", b, 4)[0]
        count_fmt, entry_size, slot = "H", 12, 4
    count_size = struct.calcsize(count_fmt)
    pages: list[dict[str, int]] = []
    seen: set[int] = set()
    while ifd:
        if ifd in seen:
            raise InvalidImage("corrupt TIFF: the page directory chain loops")
        if len(pages) >= MAX_TIFF_PAGES:
            raise InvalidImage(f"TIFF has more than {MAX_TIFF_PAGES} pages")
        seen.add(ifd)
        raw = src.read(ifd, count_size)
        if len(raw) < count_size:
            raise InvalidImage(f"corrupt or truncated TIFF: page directory at byte {ifd} is past the end")
        (n,) = struct.unpack(bo + count_fmt, raw)
        if not 0 < n <= _MAX_TIFF_TAGS:
            raise InvalidImage(f"corrupt TIFF: page directory at byte {ifd} lists {n} tags")
        body = src.read(ifd + count_size, n * entry_size + slot)
        if len(body) < n * entry_size + slot:
            raise InvalidImage(f"corrupt or truncated TIFF: bad page directory at byte {ifd}")
        tags = {}
        for i in range(n):
            e = body[i * entry_size : (i + 1) * entry_size]
            tag, typ = struct.unpack_from(bo + "HH", e, 0)
            cnt = struct.unpack_from(bo + ("Q" if big else "I"), e, 4)[0]
            tags[tag] = (typ, cnt, e[entry_size - slot :])
        page = {k: _tiff_first_value(src, bo, big, tags.get(t)) for k, t in _TIFF_TAGS.items()}
        if not page["width"] or not page["height"]:
            raise InvalidImage(f"corrupt TIFF: page {len(pages)} has no image width/height")
        pages.append(page)
        ifd = struct.unpack_from(bo + ("Q" if big else "I"), body, n * entry_size)[0]
    if not pages:
        raise InvalidImage("corrupt TIFF: no image directory")
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


def _tiff_first_value(src: Source, bo: str, big: bool, entry: tuple[int, int, bytes] | None) -> int | None:
    """First value of a TIFF tag, stored inline in the entry or at an offset."""
    if entry is None:
        return None
    typ, count, slot = entry
    if typ not in _TIFF_TYPE_SIZES or count == 0:
        raise InvalidImage(f"corrupt TIFF: tag of unknown type {typ}")
    size = _TIFF_TYPE_SIZES[typ]
    if size * count <= len(slot):
        data = slot
    else:
        offset = struct.unpack_from(bo + ("Q" if big else "I"), slot, 0)[0]
        data = src.read(offset, size)
        if len(data) < size:
            raise InvalidImage("corrupt or truncated TIFF: a tag value lies past the end of the file")
    return int(struct.unpack_from(bo + _TIFF_TYPE_CODES[typ], data, 0)[0])


def bmp_header(src: Source) -> dict[str, Any]:
    b = src.read(0, 30)
    (info_size,) = struct.unpack_from("<I", b, 14)
    if info_size == 12:  # OS/2 BITMAPCOREHEADER
        if len(b) < 26:
            raise InvalidImage("truncated BMP header")
        width, height, _, bpp = struct.unpack_from("<HHHH", b, 18)
    else:
        if len(b) < 30:
            raise InvalidImage("truncated BMP header")
        width, height, _, bpp = struct.unpack_from("<iiHH", b, 18)
        height = abs(height)  # negative = top-down rows
    if width <= 0 or height <= 0 or bpp not in (1, 2, 4, 8, 16, 24, 32):
        raise InvalidImage(f"corrupt BMP header ({width}x{height}, {bpp} bits per pixel)")
    if bpp <= 8:
        channels, depth, mode = 1, bpp, f"palette{bpp}"
    else:
        channels, depth, mode = {16: (3, 5, "rgb5"), 24: (3, 8, "rgb8"), 32: (4, 8, "rgba8")}[bpp]
    return dict(width=width, height=height, channels=channels, bit_depth=depth, mode=mode)


def check_not_oversized(src: Source, fields: dict[str, Any], fmt: str) -> None:
    """TIFF and BMP are read whole: refuse a file more than twice the size of its raw pixels.

    Uncompressed pixels are 1x their raw size and every TIFF/BMP compression is smaller, so a
    larger file is padding (or an attack) that would only cost memory.
    """
    bits = fields.get("bit_depth") or 8
    pixels = fields.get("total_pixels") or fields["width"] * fields["height"] * fields.get("frames", 1)
    raw = pixels * (fields.get("channels") or 1) * -(-bits // 8)
    if src.size > 2 * raw + _METADATA_SLACK:
        raise InvalidImage(
            f"{fmt.upper()} file is {src.size} bytes, far more than its {pixels} pixels can need ({raw} bytes raw); not read"
        )


HEADER_PARSERS = {"png": png_header, "jpeg": jpeg_header, "tiff": tiff_header, "bmp": bmp_header}
