"""DICOM decoding: pydicom for the data set, OpenCV or pydicom's plugins for the pixels.

* The header is read with ``stop_before_pixels``; then the Pixel Data element's own header is
  read at the file position pydicom stopped at, and the bytes actually present are compared with
  what Rows x Columns x Samples x BitsAllocated x NumberOfFrames need, *before* anything is
  decoded: a 614-byte file claiming ten million frames is one refusal, not ten million errors,
  and a file cut short is refused rather than decoded from whatever is left. Only the bytes the
  header needs are read for decoding (trailing junk is not).
* Which decoder: JPEG Baseline, 8-bit JPEG Extended, 8-bit JPEG Lossless and unsigned JPEG 2000
  frames are ordinary codestreams that OpenCV (already a dependency) decodes, so the common
  ophthalmic DICOMs need no plugin. Everything else goes to pydicom's own decoders: native data,
  RLE and Deflate need nothing; 12-bit JPEG, 16-bit lossless JPEG and JPEG-LS need
  pylibjpeg-libjpeg (or python-gdcm), signed JPEG 2000 and HTJ2K pylibjpeg-openjpeg (or
  python-gdcm). ``pip install 'eyecare-edge[dicom]'`` installs the pylibjpeg ones. Pillow is
  not offered for 12-bit JPEG: it reads only 8-bit samples. A refusal names the transfer syntax
  and the decoders that really read it.
* Colour: a JPEG frame whose Photometric Interpretation is RGB holds RGB components (the DICOM
  standard's meaning, and pydicom's reading). libjpeg would convert them from YCbCr when the
  frame has no Adobe marker (magenta pictures), so such frames are decoded with the colour
  transform switched off (an Adobe APP14 "transform 0" marker is put in the header we hand over).
* Display (:mod:`eyecare_edge.dicom_display`): Modality LUT, then the VOI window, else a min/max
  stretch for data wider than 8 bits; data of under 8 bits (1-bit segmentations) is scaled by its
  nominal range; MONOCHROME1 is inverted; YBR_* are converted to RGB; PALETTE COLOR is looked up.
"""

from __future__ import annotations

import io
import struct
from collections.abc import Iterator
from typing import Any

import cv2
import numpy as np

from eyecare_edge.dicom_display import exc_text, frame_to_rgb8
from eyecare_edge.image_source import BytesSource, Source
from eyecare_edge.image_types import DecodedImage, ImageHeader, InvalidImage

META_KEYS = (
    "Modality",
    "ImageLaterality",
    "Laterality",
    "PhotometricInterpretation",
    "Manufacturer",
    "ManufacturerModelName",
    "BodyPartExamined",
    "StudyDate",
)

_JPEG_BASELINE = "1.2.840.10008.1.2.4.50"
_JPEG_EXTENDED = "1.2.840.10008.1.2.4.51"
_JPEG_LOSSLESS = ("1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70")
_J2K = ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91")
_DEFLATED = "1.2.840.10008.1.2.1.99"
_NATIVE = ("1.2.840.10008.1.2", "1.2.840.10008.1.2.1", "1.2.840.10008.1.2.2", _DEFLATED)
_PIXEL_TAGS = {(0x7FE0, 0x0010), (0x7FE0, 0x0008), (0x7FE0, 0x0009)}
_LONG_VRS = frozenset(b"OB OD OF OL OV OW SQ UC UN UR UT SV UV".split())
_INSTALL = "pip install 'eyecare-edge[dicom]'"

# Which decoders really read each compressed transfer syntax (said in refusals).
_REAL_DECODERS = {
    _JPEG_BASELINE: "OpenCV (built in), pylibjpeg-libjpeg or python-gdcm",
    _JPEG_EXTENDED: "pylibjpeg-libjpeg or python-gdcm for 12-bit samples (Pillow and OpenCV read only 8-bit JPEG)",
    _JPEG_LOSSLESS[0]: "pylibjpeg-libjpeg or python-gdcm (OpenCV reads only 8-bit lossless JPEG)",
    _JPEG_LOSSLESS[1]: "pylibjpeg-libjpeg or python-gdcm (OpenCV reads only 8-bit lossless JPEG)",
    "1.2.840.10008.1.2.4.80": "pylibjpeg-libjpeg, pyjpegls or python-gdcm",
    "1.2.840.10008.1.2.4.81": "pylibjpeg-libjpeg, pyjpegls or python-gdcm",
    _J2K[0]: "pylibjpeg-openjpeg or python-gdcm (OpenCV reads only unsigned JPEG 2000)",
    _J2K[1]: "pylibjpeg-openjpeg or python-gdcm (OpenCV reads only unsigned JPEG 2000)",
    "1.2.840.10008.1.2.4.201": "pylibjpeg-openjpeg >= 2.0",
    "1.2.840.10008.1.2.4.202": "pylibjpeg-openjpeg >= 2.0",
    "1.2.840.10008.1.2.4.203": "pylibjpeg-openjpeg >= 2.0",
    "1.2.840.10008.1.2.5": "pydicom (built in)",
}
_NO_DECODER = (
    "no decoder this toolkit uses reads it; convert the file to an uncompressed transfer syntax first "
    "(gdcmconv --raw, or DCMTK's dcmdjpeg / dcmdjpls / dcmdrle)"
)


def real_decoders(ts: str) -> str:
    """The decoders that really read a transfer syntax, as words for a refusal."""
    return _REAL_DECODERS.get(str(ts), _NO_DECODER)


# ---------------------------------------------------------------------------------------------
# Header: data set without pixels, then the Pixel Data element checked against the claim
# ---------------------------------------------------------------------------------------------


def dicom_header(src: Source) -> dict[str, Any]:
    ds, pixel_pos = read_dataset(src)
    fields = dicom_fields(ds)
    fields["encoded_bytes"] = _pixel_extent(src, ds, pixel_pos, fields)
    return fields


def read_dataset(src: Source) -> tuple[Any, int | None]:
    """The data set without pixels, and where its Pixel Data element starts (None: unknown)."""
    import pydicom

    has_preamble = src.read(128, 4) == b"DICM"
    stream = src.stream()
    try:
        ds = pydicom.dcmread(stream, stop_before_pixels=True, force=not has_preamble)
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImage(f"corrupt DICOM ({exc_text(exc)})") from None
    if str(_transfer_syntax(ds)) == _DEFLATED:  # positions are in the inflated stream
        return ds, None
    return ds, stream.tell()


def dicom_fields(ds: Any) -> dict[str, Any]:
    try:
        if len(ds) == 0:
            raise InvalidImage("corrupt DICOM: no readable data elements after the header")
        rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
        if not rows or not cols:
            sop = ds.get("SOPClassUID")
            what = f" (SOP class {getattr(sop, 'name', sop)})" if sop else ""
            raise InvalidImage(
                f"DICOM without an image: no Rows/Columns{what}; truncated, or not an image object"
            )
        frames = max(1, int(ds.get("NumberOfFrames") or 1))
        spp = int(ds.get("SamplesPerPixel") or 1)
        bits = int(ds.get("BitsStored") or ds.get("BitsAllocated") or 8)
        pi = str(ds.get("PhotometricInterpretation") or ("MONOCHROME2" if spp == 1 else "RGB")).strip()
    except InvalidImage:
        raise
    except Exception as exc:
        raise InvalidImage(f"corrupt DICOM image attributes ({exc_text(exc)})") from None
    if spp not in (1, 3):
        raise InvalidImage(f"DICOM with {spp} samples per pixel is not supported (1 or 3)")
    return dict(width=cols, height=rows, frames=frames, channels=spp, bit_depth=bits, mode=pi)


def _native_bytes(ds: Any, fields: dict[str, Any]) -> int:
    """Bytes of uncompressed pixel data the header claims (all frames; 1-bit data is packed)."""
    try:
        allocated = int(ds.get("BitsAllocated") or 0)
    except (TypeError, ValueError):
        allocated = 0
    if allocated not in (1, 8, 16, 32, 64):
        raise InvalidImage(
            f"corrupt DICOM: BitsAllocated is {ds.get('BitsAllocated')!r} (1, 8, 16, 32 or 64)"
        )
    samples = fields["channels"]
    if str(fields.get("mode", "")).upper() == "YBR_FULL_422" and samples == 3:
        samples = 2  # Y Y Cb Cr per pixel pair
    bits = fields["width"] * fields["height"] * samples * fields["frames"] * allocated
    return -(-bits // 8)


def _pixel_extent(src: Source, ds: Any, pos: int | None, fields: dict[str, Any]) -> int:
    """How many bytes of the file decoding needs; refuses pixel data shorter than the claim."""
    if pos is None:
        return src.size
    implicit, little = ds.original_encoding
    bo = "<" if little is not False else ">"
    head = src.read(pos, 12)
    if len(head) < 8 or struct.unpack_from(bo + "HH", head, 0) not in _PIXEL_TAGS:
        return src.size  # no pixel data: decoding says so
    if implicit:
        length, start = struct.unpack_from(bo + "I", head, 4)[0], pos + 8
    elif head[4:6] in _LONG_VRS:
        if len(head) < 12:
            raise InvalidImage("truncated DICOM: the file ends inside the Pixel Data element header")
        length, start = struct.unpack_from(bo + "I", head, 8)[0], pos + 12
    else:
        length, start = struct.unpack_from(bo + "H", head, 6)[0], pos + 8
    present = max(0, src.size - start)
    frames = fields["frames"]
    ts = _transfer_syntax(ds)
    if length == 0xFFFFFFFF:  # encapsulated: an offset-table item plus >= one item per frame
        if present < 8 * (frames + 1):
            raise InvalidImage(
                f"truncated or forged DICOM: {frames} frames claimed, but the {present} bytes of "
                f"encapsulated pixel data cannot hold {frames} frame items ({8 * (frames + 1)} bytes at least)"
            )
        raw_frame = -(-fields["width"] * fields["height"] * fields["channels"] * 16 // 8)
        if present > frames * (2 * raw_frame + (64 << 10)) + (64 << 20):
            raise InvalidImage(
                f"DICOM holds {present} bytes of compressed pixel data, far more than {frames} frame(s) of "
                f"{fields['width']}x{fields['height']} can need; not read"
            )
        return src.size
    if str(ts) not in _NATIVE:
        return src.size  # pydicom reports an undefined-length mismatch itself
    need = _native_bytes(ds, fields)
    if min(length, present) > 2 * need + (1 << 20):
        raise InvalidImage(
            f"DICOM Pixel Data holds {min(length, present)} bytes, far more than the {need} its "
            f"{frames} frame(s) of {fields['width']}x{fields['height']} need; not read"
        )
    if min(length, present) < need:
        what = f"{frames} frames of " if frames > 1 else ""
        raise InvalidImage(
            f"truncated or forged DICOM: {what}{fields['width']}x{fields['height']} x {fields['channels']} samples "
            f"need {need} bytes of pixel data, the file holds {min(length, present)}"
        )
    return start + min(length, present)


# ---------------------------------------------------------------------------------------------
# Decoding
# ---------------------------------------------------------------------------------------------


def decode_dicom(src: Source, header: ImageHeader) -> list[DecodedImage]:
    """Every frame of a DICOM whose header (``dicom_header``) passed the limits, as RGB uint8."""
    import pydicom

    end = header.encoded_bytes or src.size
    data = src.read(0, end)
    try:
        ds = pydicom.dcmread(io.BytesIO(data), force=data[128:132] != b"DICM")
    except MemoryError:
        raise
    except Exception as exc:
        raise InvalidImage(f"corrupt DICOM ({exc_text(exc)})") from None
    del data
    full = ImageHeader(path=header.path, format="dicom", **dicom_fields(ds))
    if (full.width, full.height, full.frames, full.channels) != (
        header.width,
        header.height,
        header.frames,
        header.channels,
    ):
        raise InvalidImage("corrupt DICOM: the image attributes read with the pixels differ from the header")
    if "PixelData" not in ds:
        raise InvalidImage("DICOM without pixel data (no PixelData element)")
    pi = (full.mode or "").upper()
    if pi.startswith("MONOCHROME") and full.channels != 1:
        raise InvalidImage(f"corrupt DICOM: {pi} with {full.channels} samples per pixel (must be 1)")
    colour = pi in ("RGB", "PALETTE COLOR") or pi.startswith("YBR")
    if colour and (full.channels != 3) != (pi == "PALETTE COLOR"):
        raise InvalidImage(f"corrupt DICOM: {pi} with {full.channels} samples per pixel")
    meta = {k: str(ds.get(k)).strip() for k in META_KEYS if str(ds.get(k) or "").strip()}
    return [
        DecodedImage(
            rgb=frame_to_rgb8(frame, ds, i, full),
            path=full.path,
            frame=i if full.frames > 1 else None,
            format="dicom",
            source_mode=full.mode or "",
            bit_depth=full.bit_depth or 8,
            meta=dict(meta),
        )
        for i, frame in enumerate(_frames(ds, full))
    ]


def _transfer_syntax(ds: Any) -> Any:
    """The transfer syntax; for a bare data set (no file meta) the encoding pydicom read it with."""
    from pydicom.uid import UID, ExplicitVRBigEndian, ExplicitVRLittleEndian, ImplicitVRLittleEndian

    ts = ds.file_meta.get("TransferSyntaxUID") if hasattr(ds, "file_meta") else None
    if ts:
        return UID(str(ts))
    implicit, little = ds.original_encoding
    ts = ImplicitVRLittleEndian if implicit else (ExplicitVRLittleEndian if little else ExplicitVRBigEndian)
    ds.file_meta.TransferSyntaxUID = ts
    return ts


def _opencv_reads(ds: Any, ts: str) -> bool:
    """Frames OpenCV decodes correctly: 8-bit JPEG (baseline/extended/lossless), unsigned JPEG 2000."""
    unsigned = int(ds.get("PixelRepresentation") or 0) == 0
    eight = int(ds.get("BitsAllocated") or 8) == 8 and int(ds.get("BitsStored") or 8) == 8
    if ts == _JPEG_BASELINE:
        return True
    if ts == _JPEG_EXTENDED or ts in _JPEG_LOSSLESS:
        return eight and unsigned
    return ts in _J2K and unsigned


def _frames(ds: Any, header: ImageHeader) -> Iterator[np.ndarray]:
    """Yield each frame as stored values (monochrome/palette) or RGB (colour), RGB channel order."""
    from pydicom.pixels import get_decoder

    ts = _transfer_syntax(ds)
    if _opencv_reads(ds, str(ts)):
        yield from _frames_opencv(ds, header, ts)
        return
    try:
        decoder = get_decoder(ts)
    except NotImplementedError:
        raise InvalidImage(
            f"DICOM transfer syntax '{ts.name}' ({ts}) is not supported: {real_decoders(ts)}"
        ) from None
    if not ts.is_compressed:  # native pixel data: pydicom reads it itself
        yield from _frames_pydicom(ds, header, ts, [""])
        return
    plugins = list(decoder.available_plugins) if decoder.is_available else []
    if str(ts) == _JPEG_EXTENDED and (header.bit_depth or 8) > 8:
        plugins = [p for p in plugins if p != "pillow"]  # Pillow reads only 8-bit JPEG
    if not plugins:
        raise InvalidImage(
            f"DICOM pixel data is compressed as '{ts.name}' ({ts}) and no installed decoder reads it; "
            f"it needs {real_decoders(ts)}: {_INSTALL}"
        )
    yield from _frames_pydicom(ds, header, ts, plugins)


def _frames_pydicom(ds: Any, header: ImageHeader, ts: Any, plugins: list[str]) -> Iterator[np.ndarray]:
    from pydicom.pixels import pixel_array

    for i in range(header.frames):
        index = i if header.frames > 1 else None
        arr = None
        errors = []
        for plugin in plugins:
            try:
                arr = pixel_array(ds, index=index, decoding_plugin=plugin)
                if arr.ndim != (3 if header.channels == 3 else 2):
                    raise ValueError(f"decoded to an array of shape {arr.shape}")
                break
            except MemoryError:
                raise
            except Exception as exc:
                errors.append(f"{plugin or 'pydicom'}: {exc_text(exc)}")
        if arr is None:
            others = "" if str(ts) in _NATIVE else f"; decoders that read it: {real_decoders(ts)}"
            raise InvalidImage(
                f"corrupt DICOM pixel data in frame {i}: '{ts.name}' ({ts}) failed in "
                f"{'; '.join(errors)[:400]}{others}"
            )
        yield arr


def _frames_opencv(ds: Any, header: ImageHeader, ts: Any) -> Iterator[np.ndarray]:
    from pydicom.encaps import generate_frames

    rgb_components = (header.mode or "").upper() == "RGB" and str(ts) not in _J2K
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
                raise InvalidImage(
                    f"corrupt DICOM: frame {i} of {header.frames} is missing from the pixel data"
                )
            if rgb_components and (header.channels or 1) == 3:
                data = without_colour_transform(data)
            arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
            if arr is None:
                raise InvalidImage(f"corrupt '{ts.name}' ({ts}) data in DICOM frame {i}")
            if arr.shape[:2] != (header.height, header.width):
                raise InvalidImage(
                    f"DICOM frame {i} decodes to {arr.shape[1]}x{arr.shape[0]}, "
                    f"but Rows/Columns say {header.width}x{header.height}"
                )
            if (arr.ndim == 3 and arr.shape[2] == 3) != ((header.channels or 1) == 3):
                raise InvalidImage(
                    f"DICOM frame {i} decodes to {arr.shape[2] if arr.ndim == 3 else 1} samples per pixel, "
                    f"but SamplesPerPixel says {header.channels}"
                )
            if arr.ndim == 3:
                arr = cv2.cvtColor(arr, cv2.COLOR_BGR2RGB)
            yield arr
    except (InvalidImage, MemoryError):
        raise
    except Exception as exc:  # pydicom.encaps raises ValueError/struct errors on broken items
        raise InvalidImage(f"corrupt DICOM encapsulated pixel data ({exc_text(exc)})") from None


def without_colour_transform(jpeg: bytes) -> bytes:
    """The same JPEG, marked so libjpeg hands its three components over untransformed.

    libjpeg treats a 3-component frame as YCbCr unless an Adobe APP14 marker says "transform 0"
    (or the component ids spell R, G, B), and always when a JFIF APP0 marker is present. A DICOM
    JPEG with Photometric Interpretation RGB holds RGB, so: a frame with an Adobe marker is left
    as its marker says (pydicom does the same); otherwise JFIF APP0 segments and short Adobe
    segments (under 12 bytes, which libjpeg ignores: pydicom's SC_rgb_jpeg.dcm has one) are
    dropped and an Adobe "transform 0" segment is put right after SOI.
    """
    if not jpeg.startswith(b"\xff\xd8"):
        return jpeg
    try:
        from eyecare_edge.image_headers import jpeg_frame

        _, scan = jpeg_frame(BytesSource(jpeg))
    except InvalidImage:
        return jpeg  # the decoder reports the damage
    out, pos, header_end = [b"\xff\xd8"], 2, scan
    while pos < header_end:
        if jpeg[pos] != 0xFF or pos + 4 > len(jpeg):
            return jpeg
        marker = jpeg[pos + 1]
        if marker == 0xFF:
            pos += 1
            continue
        if marker == 0x01 or 0xD0 <= marker <= 0xD7:
            out.append(jpeg[pos : pos + 2])
            pos += 2
            continue
        seglen = struct.unpack_from(">H", jpeg, pos + 2)[0]
        segment = jpeg[pos : pos + 2 + seglen]
        adobe = marker == 0xEE and segment[4:9] == b"Adobe"
        if adobe and seglen >= 14:  # libjpeg reads a transform only from a full 12-byte APP14
            return jpeg  # the frame says how it was coded
        if not adobe and not (marker == 0xE0 and segment[4:9] == b"JFIF\x00"):
            out.append(segment)  # a JFIF or short (ignored) Adobe segment is replaced
        pos += 2 + seglen
        if marker == 0xDA:
            break
    adobe = b"\xff\xee\x00\x0eAdobe\x00\x64\x00\x00\x00\x00\x00"  # version 100, flags 0, transform 0
    return out[0] + adobe + b"".join(out[1:]) + jpeg[pos:]
