"""Tests for eyecare_edge.images: real fundus/OCT files, odd and hostile files, DICOM variants.

Pillow is used here only to *make* awkward inputs (CMYK JPEG, palette PNG, EXIF orientation)
and as an independent decoder to compare against; the module itself must not need it.
"""

from __future__ import annotations

import csv
import hashlib
import io
import pickle
import struct
import subprocess
import sys
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from PIL import Image
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.encaps import encapsulate
from pydicom.sequence import Sequence

from eyecare_edge import images
from eyecare_edge.images import (
    DEFAULT_MAX_PIXELS,
    SUPPORTED_SUFFIXES,
    DecodedImage,
    ImageError,
    ImageHeader,
    crop_fundus_fov,
    decode_image_bytes,
    fundus_fov_bbox,
    load_image,
    load_images,
    read_header,
)

# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------


def _color_ramp(h: int = 40, w: int = 60) -> np.ndarray:
    """An RGB image with three different, smooth channels (catches channel-order mistakes)."""
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = np.linspace(10, 250, w, dtype=np.uint8)[None, :]
    rgb[..., 1] = 120
    rgb[..., 2] = np.linspace(240, 20, h, dtype=np.uint8)[:, None]
    return rgb


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def _encode(ext: str, img: np.ndarray, params: list[int] | None = None) -> bytes:
    ok, buf = cv2.imencode(ext, img, params or [])
    assert ok
    return buf.tobytes()


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def _expect_error(path: Path | str, *fragments: str, **kw) -> ImageError:
    with pytest.raises(ImageError) as info:
        load_images(path, **kw)
    err = info.value
    text = str(err)
    assert str(path) in text and err.path == str(path)
    assert text == f"{err.path}: {err.reason}"
    for frag in fragments:
        assert frag.lower() in err.reason.lower(), (frag, err.reason)
    return err


def _dicom(
    pixels: np.ndarray,
    photometric: str,
    *,
    bits_stored: int | None = None,
    frames: int = 1,
    transfer_syntax: str = uid.ExplicitVRLittleEndian,
    encapsulated: list[bytes] | None = None,
    **attrs,
) -> bytes:
    """A minimal Secondary Capture DICOM built in memory.

    ``pixels`` is (frames?, rows, cols[, samples]) in the stored layout (interleaved samples).
    """
    samples = 1 if photometric.startswith("MONO") or photometric == "PALETTE COLOR" else 3
    shape = pixels.shape[1:] if frames > 1 else pixels.shape
    rows, cols = shape[:2]
    bits_alloc = pixels.dtype.itemsize * 8
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    fm.MediaStorageSOPInstanceUID = uid.generate_uid()
    fm.TransferSyntaxUID = transfer_syntax
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = fm.MediaStorageSOPClassUID
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.PatientName = "Test^Phantom"
    ds.Modality = "OP"
    ds.Rows, ds.Columns = rows, cols
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    ds.BitsAllocated = bits_alloc
    ds.BitsStored = bits_stored or bits_alloc
    ds.HighBit = ds.BitsStored - 1
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    for key, value in attrs.items():
        setattr(ds, key, value)
    if encapsulated is not None:
        ds.PixelData = encapsulate(encapsulated)
        ds["PixelData"].VR = "OB"
    else:
        ds.PixelData = pixels.tobytes()
        ds["PixelData"].VR = "OW" if bits_alloc > 8 else "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _dicom_window_reference(x: np.ndarray, center: float, width: float) -> np.ndarray:
    """DICOM PS3.3 C.11.2.1.2.1 LINEAR window written out piecewise, scaled to 0..255."""
    lo = center - 0.5 - (width - 1) / 2
    hi = center - 0.5 + (width - 1) / 2
    mid = ((x - (center - 0.5)) / (width - 1) + 0.5) * 255
    y = np.where(x <= lo, 0.0, np.where(x > hi, 255.0, mid))
    return np.rint(y).astype(np.uint8)


# ---------------------------------------------------------------------------------------------
# real images from ../shared/data
# ---------------------------------------------------------------------------------------------

DATASETS = ("hrf", "kermany-oct", "skimage-retina")


def _checksummed_files(folder: Path) -> list[tuple[Path, str]]:
    rows = []
    for line in (folder / "SHA256SUMS").read_text().splitlines():
        if line.strip():
            digest, rel = line.split(maxsplit=1)
            rows.append((folder / rel.lstrip("*"), digest))
    return rows


def _image_files(folder: Path) -> list[Path]:
    return [p for p, _ in _checksummed_files(folder) if p.suffix.lower() in SUPPORTED_SUFFIXES]


@pytest.mark.parametrize("dataset", DATASETS)
def test_shared_data_checksums_match(shared_data: Path, dataset: str) -> None:
    files = _checksummed_files(shared_data / dataset)
    assert files
    for path, digest in files:
        assert hashlib.sha256(path.read_bytes()).hexdigest() == digest, path


def test_hrf_fundus_photos_decode(shared_data: Path) -> None:
    folder = shared_data / "hrf"
    files = _image_files(folder)
    assert len(files) >= 6
    with open(folder / "labels.csv") as f:
        sizes = {row["filename"]: (int(row["width"]), int(row["height"])) for row in csv.DictReader(f)}
    for path in files:
        header = read_header(path)
        assert (header.format, header.width, header.height, header.frames) == ("jpeg", 3504, 2336, 1)
        assert (header.channels, header.bit_depth, header.mode) == (3, 8, "rgb8")
        img = load_image(path)
        assert img.rgb.shape == (2336, 3504, 3) and img.rgb.dtype == np.uint8
        assert img.rgb.flags.c_contiguous
        assert (img.width, img.height) == sizes[path.relative_to(folder).as_posix()]
        assert (img.frame, img.format, img.source_mode, img.bit_depth, img.meta) == (
            None,
            "jpeg",
            "rgb8",
            8,
            {},
        )
        # a fundus photo is red-dominated: proves R and B were not swapped
        centre = img.rgb[800:1500, 1200:2300].reshape(-1, 3).mean(axis=0)
        assert centre[0] > centre[1] and centre[0] > centre[2]


def test_kermany_oct_scans_decode(shared_data: Path) -> None:
    files = _image_files(shared_data / "kermany-oct")
    assert len(files) >= 16
    for path in files:
        header = read_header(path)
        assert (header.height, header.channels, header.mode) == (496, 1, "gray8")
        assert header.width in (512, 768)
        (img,) = load_images(path)
        assert img.rgb.shape == (496, header.width, 3) and img.rgb.dtype == np.uint8
        assert img.source_mode == "gray8"
        # grayscale replicated into all three channels
        assert np.array_equal(img.rgb[..., 0], img.rgb[..., 1])
        assert np.array_equal(img.rgb[..., 0], img.rgb[..., 2])


def test_skimage_retina_images_decode_like_pillow(shared_data: Path) -> None:
    folder = shared_data / "skimage-retina"
    retina = load_image(folder / "retina.jpg")
    assert retina.rgb.shape == (1411, 1411, 3) and retina.source_mode == "rgb8"
    reference = np.asarray(Image.open(folder / "retina.jpg").convert("RGB"))
    # two libjpeg builds may differ by a level or so in their IDCT, never more on average
    assert np.abs(retina.rgb.astype(int) - reference).mean() < 1.0
    crop = load_image(folder / "microaneurysms.png")
    assert crop.rgb.shape == (102, 102, 3) and crop.source_mode == "gray8"
    assert np.array_equal(
        crop.rgb[..., 1], np.asarray(Image.open(folder / "microaneurysms.png").convert("L"))
    )


def test_decode_bytes_matches_file(shared_data: Path, tmp_path: Path) -> None:
    sources = [
        shared_data / "skimage-retina" / "retina.jpg",
        shared_data / "skimage-retina" / "microaneurysms.png",
        _write(tmp_path / "gray.dcm", _dicom(np.arange(48, dtype=np.uint8).reshape(6, 8), "MONOCHROME2")),
        _write(tmp_path / "img.tiff", _encode(".tiff", _color_ramp())),
    ]
    for path in sources:
        from_file = load_images(path)
        from_bytes = decode_image_bytes(path.read_bytes(), name="camera-1")
        assert len(from_file) == len(from_bytes) == 1
        assert np.array_equal(from_file[0].rgb, from_bytes[0].rgb)
        assert from_bytes[0].path == "camera-1"
        assert from_bytes[0].source_mode == from_file[0].source_mode
    assert decode_image_bytes(bytearray(sources[1].read_bytes()))[0].path == "<memory>"
    assert decode_image_bytes(memoryview(sources[1].read_bytes()))[0].rgb.shape == (102, 102, 3)


# ---------------------------------------------------------------------------------------------
# fundus field-of-view crop
# ---------------------------------------------------------------------------------------------


def _assert_plausible_fov_crop(rgb: np.ndarray) -> None:
    h, w = rgb.shape[:2]
    box = fundus_fov_bbox(rgb)
    assert box is not None
    x0, y0, x1, y1 = box
    assert 0 <= x0 < x1 <= w and 0 <= y0 < y1 <= h
    assert (x1 - x0) * (y1 - y0) < w * h
    assert x0 < w // 2 < x1 and y0 < h // 2 < y1  # contains the centre
    assert (x1 - x0) > 0.6 * w and (y1 - y0) > 0.6 * h  # the field is most of the photo
    crop = crop_fundus_fov(rgb)
    assert crop.shape == (y1 - y0, x1 - x0, 3) and crop.flags.c_contiguous
    assert np.array_equal(crop, rgb[y0:y1, x0:x1])
    brightness = np.maximum(np.maximum(rgb[..., 0], rgb[..., 1]), rgb[..., 2])
    total = int(brightness.sum(dtype=np.int64))
    kept = int(brightness[y0:y1, x0:x1].sum(dtype=np.int64))
    removed_pixels = w * h - (x1 - x0) * (y1 - y0)
    assert (total - kept) / removed_pixels < 10  # what was cut off is the black surround
    # and the box is tight: each of its edges has field pixels within 2% of the image size
    margin = max(2, round(0.02 * max(h, w)))
    inside = brightness[y0:y1, x0:x1] > 40
    assert inside[:, :margin].any() and inside[:, -margin:].any()
    assert inside[:margin, :].any() and inside[-margin:, :].any()


def test_fov_crop_on_real_hrf_photos(shared_data: Path) -> None:
    for path in _image_files(shared_data / "hrf")[:3]:
        rgb = load_image(path).rgb
        _assert_plausible_fov_crop(rgb)
        x0, y0, x1, y1 = fundus_fov_bbox(rgb)
        # HRF's circular field touches the top and bottom edge: only the sides are cut
        assert (y0, y1) == (0, 2336) and x0 > 50 and x1 < 3504 - 50


def test_fov_crop_on_real_skimage_retina(shared_data: Path) -> None:
    _assert_plausible_fov_crop(load_image(shared_data / "skimage-retina" / "retina.jpg").rgb)
    # a crop with no surround comes back unchanged (the very same array)
    patch = load_image(shared_data / "skimage-retina" / "microaneurysms.png").rgb
    assert fundus_fov_bbox(patch) is None
    assert crop_fundus_fov(patch) is patch


def _synthetic_fundus(h: int = 600, w: int = 900, radius: int = 260) -> tuple[np.ndarray, tuple[int, ...]]:
    rng = np.random.default_rng(0)
    img = np.zeros((h, w, 3), np.uint8)
    cy, cx = h // 2 + 10, w // 2 - 30
    cv2.circle(img, (cx, cy), radius, (190, 90, 40), thickness=-1)  # RGB order: reddish field
    cv2.line(img, (cx - 200, cy), (cx + 200, cy - 40), (90, 30, 20), 6)  # a dark "vessel"
    noisy = np.clip(img.astype(int) + rng.integers(0, 12, img.shape), 0, 255).astype(np.uint8)
    jpeg = _encode(".jpg", cv2.cvtColor(noisy, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 40])
    rgb = decode_image_bytes(jpeg)[0].rgb
    return rgb, (cx - radius, cy - radius, cx + radius + 1, cy + radius + 1)


def test_fov_bbox_on_noisy_synthetic_fundus() -> None:
    rgb, (ex0, ey0, ex1, ey1) = _synthetic_fundus()
    x0, y0, x1, y1 = fundus_fov_bbox(rgb)
    for got, expected in zip((x0, y0, x1, y1), (ex0, ey0, ex1, ey1), strict=True):
        assert abs(got - expected) <= 4
    # margin widens the crop and is clamped at the image border
    crop = crop_fundus_fov(rgb, margin=10)
    assert crop.shape == (y1 - y0 + 20, x1 - x0 + 20, 3)
    assert crop_fundus_fov(rgb, margin=10_000).shape == rgb.shape
    # an explicit threshold is honoured: above the field's brightness nothing is found
    assert fundus_fov_bbox(rgb, threshold=250) is None
    assert fundus_fov_bbox(rgb, threshold=30) is not None
    with pytest.raises(ValueError):
        crop_fundus_fov(rgb, margin=-1)


def test_fov_crop_returns_input_when_no_surround() -> None:
    black = np.zeros((50, 80, 3), np.uint8)
    bright = np.full((50, 80, 3), 180, np.uint8)
    tiny = np.full((1, 1, 3), 7, np.uint8)
    for img in (black, bright, tiny):
        assert fundus_fov_bbox(img) is None
        assert crop_fundus_fov(img) is img
    with pytest.raises(ValueError):
        fundus_fov_bbox(np.zeros((0, 5, 3), np.uint8))
    with pytest.raises(ValueError):
        fundus_fov_bbox(np.zeros((5, 5, 3), np.float32))


# ---------------------------------------------------------------------------------------------
# odd and hostile files
# ---------------------------------------------------------------------------------------------


def test_error_type_carries_path_and_reason_and_pickles() -> None:
    err = ImageError("scans/a.jpg", "empty file (0 bytes)")
    assert (err.path, err.reason, str(err)) == (
        "scans/a.jpg",
        "empty file (0 bytes)",
        "scans/a.jpg: empty file (0 bytes)",
    )
    again = pickle.loads(pickle.dumps(err))
    assert (again.path, again.reason, str(again)) == (err.path, err.reason, str(err))


def test_missing_empty_and_directory(tmp_path: Path) -> None:
    _expect_error(tmp_path / "nope.jpg", "file not found")
    _expect_error(_write(tmp_path / "empty.jpg", b""), "empty file (0 bytes)")
    _expect_error(tmp_path, "directory")
    with pytest.raises(ImageError, match="empty file"):
        decode_image_bytes(b"", name="cam")
    with pytest.raises(ImageError, match="file not found"):
        read_header(tmp_path / "nope.png")


def test_text_and_unknown_files_are_rejected_by_signature(tmp_path: Path) -> None:
    _expect_error(
        _write(tmp_path / "note.jpg", b"this is not a picture\n"), "no known image signature", "text"
    )
    _expect_error(
        _write(tmp_path / "page.png", b"<!DOCTYPE html><html>404</html>"), "no known image signature"
    )
    _expect_error(
        _write(tmp_path / "noise.jpg", bytes(range(256)) * 4), "no known image signature", "first bytes"
    )
    _expect_error(_write(tmp_path / "anim.jpg", b"GIF89a" + b"\x00" * 40), "unsupported format gif")
    webp = b"RIFF\x24\x00\x00\x00WEBPVP8 " + b"\x00" * 30
    _expect_error(_write(tmp_path / "x.png", webp), "webp")
    _expect_error(_write(tmp_path / "tiny.bmp", b"BM"), "no known image signature")


def test_truncated_and_corrupt_jpeg(shared_data: Path, tmp_path: Path) -> None:
    data = (shared_data / "skimage-retina" / "retina.jpg").read_bytes()
    _expect_error(_write(tmp_path / "half.jpg", data[: len(data) // 2]), "truncated jpeg", "end-of-image")
    _expect_error(_write(tmp_path / "cut_eoi.jpg", data[:-2]), "truncated jpeg")
    _expect_error(_write(tmp_path / "header_only.jpg", data[:300]), "truncated jpeg")
    _expect_error(_write(tmp_path / "soi.jpg", b"\xff\xd8\xff"), "truncated jpeg")
    # complete file, but the quantisation tables are missing: the decoder itself rejects it
    err = _expect_error(_write(tmp_path / "no_dqt.jpg", _drop_jpeg_segments(data, 0xDB)), "corrupt", "jpeg")
    assert "decoder rejected" in err.reason


def _drop_jpeg_segments(data: bytes, marker: int) -> bytes:
    """Remove every header segment with the given marker (before the first scan)."""
    out, pos = bytearray(data[:2]), 2
    while data[pos + 1] != 0xDA:
        (length,) = struct.unpack_from(">H", data, pos + 2)
        if data[pos + 1] != marker:
            out += data[pos : pos + 2 + length]
        pos += 2 + length
    return bytes(out + data[pos:])


def test_truncated_png(tmp_path: Path) -> None:
    png = _encode(".png", _color_ramp())
    _expect_error(_write(tmp_path / "cut.png", png[: len(png) // 2]), "truncated png")
    _expect_error(_write(tmp_path / "hdr.png", png[:20]), "truncated png")
    bad_crc = bytearray(png)
    bad_crc[20] ^= 0xFF
    _expect_error(_write(tmp_path / "crc.png", bytes(bad_crc)), "corrupt png header")


def test_png_bomb_rejected_before_decoding(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A 30000x30000 PNG of a few hundred bytes: refused from the header alone; with image data
    deflate could really expand that far, refused by the pixel limit."""
    tiny = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0))
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + _png_chunk(b"IEND", b"")
    )
    assert len(tiny) < 200
    _expect_error(_write(tmp_path / "tiny.png", tiny), "forged png", "30000x30000", "deflate")
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    idat = b"\x00" * 2_620_000  # >= raw / 1032: what deflate's best ratio needs
    data = (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", idat)
        + _png_chunk(b"IEND", b"")
    )
    path = _write(tmp_path / "bomb.png", data)

    def _must_not_decode(*args, **kwargs):
        raise AssertionError("OpenCV was asked to decode an image over the pixel limit")

    monkeypatch.setattr(images.cv2, "imdecode", _must_not_decode)
    monkeypatch.setattr(images.cv2, "imdecodemulti", _must_not_decode)
    header = read_header(path)
    assert (header.format, header.width, header.height, header.pixel_count) == (
        "png",
        30000,
        30000,
        900_000_000,
    )
    err = _expect_error(path, "pixel limit", "30000x30000", "max_pixels")
    assert "900.0 MP" in err.reason and "100 MP" in err.reason
    with pytest.raises(ImageError, match="pixel limit"):
        decode_image_bytes(data, name="bomb")
    with pytest.raises(ImageError, match="pixel limit"):
        load_image(path)


def test_custom_pixel_limit(shared_data: Path) -> None:
    path = shared_data / "kermany-oct" / "images" / "NORMAL" / "NORMAL-4872585-1.jpeg"
    w, h = read_header(path).width, read_header(path).height
    _expect_error(path, "pixel limit", f"{w}x{h}", f"max_pixels={w * h - 1}", max_pixels=w * h - 1)
    assert load_image(path, max_pixels=w * h).rgb.shape == (h, w, 3)
    assert DEFAULT_MAX_PIXELS == 100_000_000
    for bad in (0, -5, 1.5, True):
        with pytest.raises(ValueError):
            load_images(path, max_pixels=bad)


def test_16bit_gray_png_uses_nominal_range(tmp_path: Path) -> None:
    ramp = np.linspace(0, 65535, 64 * 32).round().astype(np.uint16).reshape(32, 64)
    ramp[0, :4] = [0, 257, 257 * 128, 65535]
    path = _write(tmp_path / "oct16.png", _encode(".png", ramp))
    header = read_header(path)
    assert (header.channels, header.bit_depth, header.mode) == (1, 16, "gray16")
    img = load_image(path)
    assert (img.source_mode, img.bit_depth) == ("gray16", 16)
    expected = np.rint(ramp / 257.0).astype(np.uint8)
    assert np.array_equal(img.rgb[..., 0], expected)
    assert list(img.rgb[0, :4, 0]) == [0, 1, 128, 255]
    assert img.rgb[..., 1].min() == 0 and img.rgb[..., 1].max() == 255


def test_16bit_rgb_png_keeps_channel_order(tmp_path: Path) -> None:
    rgb16 = _color_ramp().astype(np.uint16) * 257
    img = load_image(_write(tmp_path / "rgb16.png", _encode(".png", cv2.cvtColor(rgb16, cv2.COLOR_RGB2BGR))))
    assert img.source_mode == "rgb16"
    assert np.array_equal(img.rgb, _color_ramp())


def test_rgba_png_is_composited_on_black(tmp_path: Path) -> None:
    rgba = np.zeros((4, 3, 4), np.uint8)
    rgba[..., :3] = (200, 100, 50)
    rgba[0, :, 3] = 255
    rgba[1, :, 3] = 0
    rgba[2, :, 3] = 128
    rgba[3, :, 3] = 64
    path = _write(tmp_path / "rgba.png", _encode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA)))
    assert read_header(path).mode == "rgba8"
    img = load_image(path)
    assert img.source_mode == "rgba8"
    assert img.rgb[0, 0].tolist() == [200, 100, 50]
    assert img.rgb[1, 0].tolist() == [0, 0, 0]
    assert img.rgb[2, 0].tolist() == [round(200 * 128 / 255), round(100 * 128 / 255), round(50 * 128 / 255)]
    assert img.rgb[3, 0].tolist() == [round(200 * 64 / 255), round(100 * 64 / 255), round(50 * 64 / 255)]


def test_gray_and_palette_and_gray_alpha_png(tmp_path: Path) -> None:
    gray = np.arange(200, dtype=np.uint8).reshape(10, 20)
    img = load_image(_write(tmp_path / "g.png", _encode(".png", gray)))
    assert img.source_mode == "gray8"
    assert all(np.array_equal(img.rgb[..., c], gray) for c in range(3))

    pal = Image.fromarray(_color_ramp()).quantize(colors=16)
    buf = io.BytesIO()
    pal.save(buf, "PNG")
    img = load_image(_write(tmp_path / "p.png", buf.getvalue()))
    header = read_header(tmp_path / "p.png")
    assert (
        header.channels == 1 and header.mode == f"palette{header.bit_depth}"
    )  # Pillow packs 16 colours in 4 bits
    assert img.source_mode == header.mode
    assert np.array_equal(img.rgb, np.asarray(pal.convert("RGB")))

    la = np.stack([np.full((5, 5), 200, np.uint8), np.full((5, 5), 51, np.uint8)], axis=-1)
    buf = io.BytesIO()
    Image.fromarray(la, "LA").save(buf, "PNG")
    img = load_image(_write(tmp_path / "la.png", buf.getvalue()))
    assert img.source_mode == "graya8"
    assert img.rgb[0, 0].tolist() == [40, 40, 40]  # 200 * 51 / 255


def test_cmyk_jpeg_becomes_correct_rgb(tmp_path: Path) -> None:
    rgb = _color_ramp()
    cmyk = Image.fromarray(rgb).convert("CMYK")
    buf = io.BytesIO()
    cmyk.save(buf, "JPEG", quality=95)
    path = _write(tmp_path / "cmyk.jpg", buf.getvalue())
    header = read_header(path)
    assert (header.channels, header.mode) == (4, "cmyk8")
    img = load_image(path)
    assert img.source_mode == "cmyk8" and img.rgb.shape == rgb.shape
    pillow = np.asarray(Image.open(path).convert("RGB")).astype(int)
    assert np.abs(img.rgb.astype(int) - pillow).max() <= 2
    assert np.abs(img.rgb.astype(int) - rgb).mean() < 3


def test_jpeg_exif_orientation_is_applied(tmp_path: Path) -> None:
    im = Image.fromarray(_color_ramp(20, 40))
    exif = im.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise to display
    buf = io.BytesIO()
    im.save(buf, "JPEG", exif=exif, quality=95)
    path = _write(tmp_path / "phone.jpg", buf.getvalue())
    assert (read_header(path).width, read_header(path).height) == (40, 20)
    assert load_image(path).rgb.shape == (40, 20, 3)


def test_bmp_24_and_32_bit(tmp_path: Path) -> None:
    rgb = _color_ramp()
    bmp = _write(tmp_path / "a.bmp", _encode(".bmp", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
    assert read_header(bmp).mode == "rgb8"
    img = load_image(bmp)
    assert img.format == "bmp" and np.array_equal(img.rgb, rgb)
    # a 32-bit BMP whose 4th byte is zero: must not turn black
    bgra = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGRA)
    bgra[..., 3] = 0
    bmp32 = _write(tmp_path / "b.bmp", _encode(".bmp", bgra))
    assert read_header(bmp32).channels == 4
    assert np.array_equal(load_image(bmp32).rgb, rgb)
    _expect_error(_write(tmp_path / "cut.bmp", bmp.read_bytes()[:200]), "bmp")


def test_tiff_8_16_bit_and_multipage(tmp_path: Path) -> None:
    rgb = _color_ramp()
    tif = _write(tmp_path / "a.tif", _encode(".tiff", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)))
    header = read_header(tif)
    assert (header.format, header.width, header.height, header.channels, header.mode) == (
        "tiff",
        60,
        40,
        3,
        "rgb8",
    )
    assert np.array_equal(load_image(tif).rgb, rgb)

    g16 = (np.arange(40 * 60, dtype=np.uint32).reshape(40, 60) * 27).astype(np.uint16)
    tif16 = _write(tmp_path / "b.tiff", _encode(".tiff", g16))
    assert read_header(tif16).mode == "gray16"
    assert np.array_equal(load_image(tif16).rgb[..., 0], np.rint(g16 / 257.0).astype(np.uint8))

    ok, buf = cv2.imencodemulti(
        ".tiff", [cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), g16[:20, :30].astype(np.uint8)]
    )
    assert ok
    multi = _write(tmp_path / "volume.tiff", buf.tobytes())
    header = read_header(multi)
    assert header.frames == 2 and header.pixel_count == 60 * 40 + 30 * 20
    pages = load_images(multi)
    assert [p.frame for p in pages] == [0, 1]
    assert pages[0].rgb.shape == (40, 60, 3) and pages[1].rgb.shape == (20, 30, 3)
    with pytest.raises(ImageError, match="2 frames; use load_images"):
        load_image(multi)
    _expect_error(_write(tmp_path / "cut.tiff", tif.read_bytes()[:500]), "tiff")


def test_big_tiff(tmp_path: Path) -> None:
    rgb = _color_ramp()
    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, "TIFF", big_tiff=True)
    path = _write(tmp_path / "big.tif", buf.getvalue())
    assert path.read_bytes()[:4] == b"II+\x00"
    assert (read_header(path).width, read_header(path).height) == (60, 40)
    assert np.array_equal(load_image(path).rgb, rgb)


def test_cmyk_tiff(tmp_path: Path) -> None:
    rgb = _color_ramp()
    buf = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(buf, "TIFF")
    path = _write(tmp_path / "cmyk.tif", buf.getvalue())
    assert read_header(path).mode == "cmyk8"
    assert np.abs(load_image(path).rgb.astype(int) - rgb).max() <= 1


# ---------------------------------------------------------------------------------------------
# DICOM
# ---------------------------------------------------------------------------------------------


def test_dicom_monochrome1_16bit_window_numerically(tmp_path: Path) -> None:
    ramp = np.arange(4096, dtype=np.uint16).reshape(32, 128)  # 12-bit ramp in 16-bit words
    path = _write(
        tmp_path / "mono1.dcm",
        _dicom(ramp, "MONOCHROME1", bits_stored=12, WindowCenter=2048, WindowWidth=1024, Laterality="R"),
    )
    header = read_header(path)
    assert (header.format, header.width, header.height, header.bit_depth, header.mode) == (
        "dicom",
        128,
        32,
        12,
        "MONOCHROME1",
    )
    img = load_image(path)
    assert (img.source_mode, img.bit_depth, img.frame) == ("MONOCHROME1", 12, None)
    expected = 255 - _dicom_window_reference(ramp.astype(float), 2048, 1024)
    assert np.array_equal(img.rgb[..., 0], expected)
    flat = img.rgb[..., 0].ravel()
    assert flat[0] == 255 and flat[-1] == 0  # inverted: low values white
    assert flat[1535] == 255 and flat[2560] == 0  # outside the window saturates
    assert np.all(np.diff(flat.astype(int)) <= 0)  # monotone
    assert abs(int(flat[2048]) - 127) <= 1
    assert img.meta == {"Modality": "OP", "Laterality": "R", "PhotometricInterpretation": "MONOCHROME1"}


def test_dicom_rescale_applies_before_window(tmp_path: Path) -> None:
    stored = np.arange(0, 2000, 2, dtype=np.uint16).reshape(20, 50)
    path = _write(
        tmp_path / "rescaled.dcm",
        _dicom(
            stored, "MONOCHROME2", RescaleSlope=2, RescaleIntercept=-1000, WindowCenter=0, WindowWidth=2000
        ),
    )
    values = stored.astype(float) * 2 - 1000
    assert np.array_equal(load_image(path).rgb[..., 1], _dicom_window_reference(values, 0, 2000))


def test_dicom_16bit_without_window_is_min_max_stretched(tmp_path: Path) -> None:
    stored = np.linspace(1000, 3000, 200).astype(np.uint16).reshape(10, 20)
    img = load_image(_write(tmp_path / "oct.dcm", _dicom(stored, "MONOCHROME2")))
    expected = np.rint((stored.astype(float) - 1000) * 255 / 2000).astype(np.uint8)
    assert np.array_equal(img.rgb[..., 2], expected)


def test_dicom_monochrome2_8bit_is_identity(tmp_path: Path) -> None:
    gray = np.arange(256, dtype=np.uint8).reshape(16, 16)
    img = load_image(_write(tmp_path / "m2.dcm", _dicom(gray, "MONOCHROME2")))
    assert img.source_mode == "MONOCHROME2" and img.bit_depth == 8
    assert all(np.array_equal(img.rgb[..., c], gray) for c in range(3))


def test_dicom_rgb_and_ybr_full(tmp_path: Path) -> None:
    rgb = _color_ramp(12, 16)
    img = load_image(_write(tmp_path / "rgb.dcm", _dicom(rgb, "RGB", ImageLaterality="L")))
    assert np.array_equal(img.rgb, rgb) and img.meta["ImageLaterality"] == "L"

    ybr = pydicom.pixels.convert_color_space(rgb, "RGB", "YBR_FULL")
    img = load_image(_write(tmp_path / "ybr.dcm", _dicom(ybr, "YBR_FULL")))
    assert img.source_mode == "YBR_FULL"
    assert np.abs(img.rgb.astype(int) - rgb).max() <= 2


def test_dicom_ybr_full_422(tmp_path: Path) -> None:
    rgb = np.repeat(_color_ramp(6, 4), 2, axis=1)  # pairs of equal pixels: 4:2:2 loses nothing
    ybr = pydicom.pixels.convert_color_space(rgb, "RGB", "YBR_FULL").astype(np.uint8)
    packed = np.empty((6, 4, 4), np.uint8)  # Y0 Y1 Cb Cr per pixel pair
    packed[..., 0], packed[..., 1] = ybr[:, 0::2, 0], ybr[:, 1::2, 0]
    packed[..., 2], packed[..., 3] = ybr[:, 0::2, 1], ybr[:, 0::2, 2]
    data = _dicom(rgb, "YBR_FULL_422")
    ds = pydicom.dcmread(io.BytesIO(data))
    ds.PixelData = packed.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    img = load_image(_write(tmp_path / "ybr422.dcm", buf.getvalue()))
    assert img.source_mode == "YBR_FULL_422"
    assert np.abs(img.rgb.astype(int) - rgb).max() <= 2


def test_dicom_palette_color(tmp_path: Path) -> None:
    index = np.arange(64, dtype=np.uint8).reshape(8, 8) % 4
    lut = {"Red": [65535, 0, 0, 32896], "Green": [0, 65535, 0, 32896], "Blue": [0, 0, 65535, 32896]}
    attrs = {}
    for colour, values in lut.items():
        attrs[f"{colour}PaletteColorLookupTableDescriptor"] = [4, 0, 16]
        attrs[f"{colour}PaletteColorLookupTableData"] = np.array(values, np.uint16).tobytes()
    img = load_image(_write(tmp_path / "pal.dcm", _dicom(index, "PALETTE COLOR", **attrs)))
    assert img.rgb[0, 0].tolist() == [255, 0, 0]
    assert img.rgb[0, 1].tolist() == [0, 255, 0]
    assert img.rgb[0, 2].tolist() == [0, 0, 255]
    assert img.rgb[0, 3].tolist() == [128, 128, 128]


def test_dicom_multiframe_gives_one_image_per_frame(tmp_path: Path) -> None:
    frames = np.stack([np.full((5, 7), v, np.uint8) for v in (10, 120, 240)])
    path = _write(tmp_path / "cine.dcm", _dicom(frames, "MONOCHROME2", frames=3, Modality="OPT"))
    assert read_header(path).frames == 3 and read_header(path).pixel_count == 3 * 35
    decoded = load_images(path)
    assert [d.frame for d in decoded] == [0, 1, 2]
    assert [int(d.rgb[0, 0, 0]) for d in decoded] == [10, 120, 240]
    assert all(d.rgb.shape == (5, 7, 3) and d.meta["Modality"] == "OPT" for d in decoded)
    with pytest.raises(ImageError, match="3 frames; use load_images") as info:
        load_image(path)
    assert info.value.path == str(path)
    _expect_error(path, "pixel limit", "3 frames", max_pixels=100)


def test_dicom_enhanced_per_frame_windows(tmp_path: Path) -> None:
    stored = np.stack([np.arange(100, dtype=np.uint16).reshape(10, 10)] * 2)
    data = _dicom(stored, "MONOCHROME2", frames=2)
    ds = pydicom.dcmread(io.BytesIO(data))
    per_frame = []
    for center, width in ((30, 21), (70, 41)):
        voi = Dataset()
        voi.WindowCenter, voi.WindowWidth = center, width
        group = Dataset()
        group.FrameVOILUTSequence = Sequence([voi])
        per_frame.append(group)
    ds.PerFrameFunctionalGroupsSequence = Sequence(per_frame)
    buf = io.BytesIO()
    ds.save_as(buf)
    first, second = load_images(_write(tmp_path / "enh.dcm", buf.getvalue()))
    values = stored[0].astype(float)
    assert np.array_equal(first.rgb[..., 0], _dicom_window_reference(values, 30, 21))
    assert np.array_equal(second.rgb[..., 0], _dicom_window_reference(values, 70, 41))


def test_dicom_jpeg_baseline_and_jpeg2000_decode_without_plugins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # OpenCV decodes these itself: make sure pydicom's (Pillow) plugin is not what did it.
    def _no_pydicom(*args, **kwargs):
        raise AssertionError("pydicom pixel decoder used")

    monkeypatch.setattr(pydicom.pixels, "pixel_array", _no_pydicom)
    rgb = _color_ramp(32, 48)
    jpeg = _encode(".jpg", cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR), [cv2.IMWRITE_JPEG_QUALITY, 98])
    path = _write(
        tmp_path / "jpeg.dcm",
        _dicom(rgb, "YBR_FULL_422", transfer_syntax=uid.JPEGBaseline8Bit, encapsulated=[jpeg]),
    )
    img = load_image(path)
    assert img.source_mode == "YBR_FULL_422"
    assert np.abs(img.rgb.astype(int) - rgb).mean() < 2

    oct16 = np.linspace(0, 4095, 48 * 64).round().astype(np.uint16).reshape(48, 64)
    jp2 = _encode(".jp2", oct16)
    codestream = jp2[jp2.find(b"jp2c") + 4 :]
    frames = [codestream, codestream]
    stack = np.stack([oct16, oct16])
    path = _write(
        tmp_path / "j2k.dcm",
        _dicom(
            stack,
            "MONOCHROME2",
            bits_stored=12,
            frames=2,
            transfer_syntax=uid.JPEG2000Lossless,
            encapsulated=frames,
        ),
    )
    decoded = load_images(path)
    assert len(decoded) == 2
    expected = np.rint(oct16.astype(float) * 255 / 4095).astype(np.uint8)  # min 0, max 4095
    assert np.array_equal(decoded[1].rgb[..., 0], expected)


def test_dicom_without_preamble(tmp_path: Path) -> None:
    gray = np.arange(30, dtype=np.uint8).reshape(5, 6)
    ds = pydicom.dcmread(io.BytesIO(_dicom(gray, "MONOCHROME2")))
    del ds.file_meta
    ds.preamble = None
    buf = io.BytesIO()
    pydicom.dcmwrite(buf, ds, implicit_vr=True, little_endian=True)
    data = buf.getvalue()
    assert data[128:132] != b"DICM" and data[:2] == b"\x08\x00"
    img = load_image(_write(tmp_path / "IM000001", data))
    assert img.format == "dicom" and np.array_equal(img.rgb[..., 0], gray)


@pytest.mark.filterwarnings("ignore:End of file reached before delimiter")
def test_corrupt_and_unsupported_dicom(tmp_path: Path) -> None:
    good = _dicom(np.arange(4096, dtype=np.uint16).reshape(64, 64), "MONOCHROME2")
    _expect_error(_write(tmp_path / "truncated.dcm", good[:-1000]), "dicom", "pixel data")
    _expect_error(_write(tmp_path / "garbage.dcm", b"\x00" * 128 + b"DICM" + b"\xff" * 64), "corrupt dicom")
    _expect_error(_write(tmp_path / "meta_only.dcm", good[:200]), "dicom")
    # a bad preamble (no DICM, no data-set start) is not recognised as DICOM at all
    _expect_error(
        _write(tmp_path / "nopreamble.dcm", b"\x00" * 128 + b"XXXX" + good[132:]), "no known image signature"
    )

    ds = pydicom.dcmread(io.BytesIO(good))
    for keyword in ("Rows", "Columns", "PixelData"):
        delattr(ds, keyword)
    buf = io.BytesIO()
    ds.save_as(buf)
    _expect_error(_write(tmp_path / "report.dcm", buf.getvalue()), "without an image")

    jpeg_ls = _dicom(
        np.zeros((4, 4), np.uint8),
        "MONOCHROME2",
        transfer_syntax=uid.JPEGLSLossless,
        encapsulated=[b"\xff\xd8\xff\xf7" + b"\x00" * 16],
    )
    _expect_error(
        _write(tmp_path / "jls.dcm", jpeg_ls), "JPEG-LS Lossless", "1.2.840.10008.1.2.4.80", "pylibjpeg-libjpeg"
    )

    broken_jpeg = _dicom(
        np.zeros((4, 4, 3), np.uint8),
        "YBR_FULL_422",
        transfer_syntax=uid.JPEGBaseline8Bit,
        encapsulated=[b"\xff\xd8\xff\xdb" + b"\x00" * 16],
    )
    _expect_error(_write(tmp_path / "badjpeg.dcm", broken_jpeg), "corrupt", "jpeg baseline", "frame 0")


# ---------------------------------------------------------------------------------------------
# API surface
# ---------------------------------------------------------------------------------------------


def test_headers_for_every_format(tmp_path: Path) -> None:
    rgb = _color_ramp()
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    cases = {
        "a.jpg": (_encode(".jpg", bgr), ("jpeg", 3, 8, "rgb8")),
        "a.png": (_encode(".png", bgr), ("png", 3, 8, "rgb8")),
        "a.tif": (_encode(".tiff", bgr), ("tiff", 3, 8, "rgb8")),
        "a.bmp": (_encode(".bmp", bgr), ("bmp", 3, 8, "rgb8")),
        "a.dcm": (_dicom(rgb, "RGB"), ("dicom", 3, 8, "RGB")),
    }
    for name, (data, (fmt, channels, bits, mode)) in cases.items():
        header = read_header(_write(tmp_path / name, data))
        assert isinstance(header, ImageHeader)
        assert (header.format, header.width, header.height, header.frames) == (fmt, 60, 40, 1)
        assert (header.channels, header.bit_depth, header.mode) == (channels, bits, mode)
        # the suffix is irrelevant: the same bytes under a wrong name load the same
        renamed = _write(tmp_path / f"wrong{name}.txt", data)
        assert load_image(renamed).format == fmt
    assert {".jpg", ".jpeg", ".png", ".tif", ".tiff", ".bmp", ".dcm", ".dicom"} <= SUPPORTED_SUFFIXES
    assert all(s == s.lower() and s.startswith(".") for s in SUPPORTED_SUFFIXES)


def test_decoded_image_validates_its_array() -> None:
    ok = DecodedImage(np.zeros((2, 3, 3), np.uint8), "x", None, "png", "rgb8", 8)
    assert (ok.width, ok.height, ok.meta) == (3, 2, {})
    with pytest.raises(ValueError):
        DecodedImage(np.zeros((2, 3), np.uint8), "x", None, "png", "gray8", 8)


def test_module_needs_no_torch_or_pillow() -> None:
    code = (
        "import sys, eyecare_edge.images; "
        "bad = {'torch', 'transformers', 'PIL'} & set(sys.modules); "
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_invalid_window_falls_back_and_sigmoid_is_applied(tmp_path: Path) -> None:
    stored = np.linspace(100, 900, 80).astype(np.uint16).reshape(8, 10)
    zero_width = load_image(
        _write(tmp_path / "w0.dcm", _dicom(stored, "MONOCHROME2", WindowCenter=500, WindowWidth=0))
    )
    stretched = np.rint((stored.astype(float) - 100) * 255 / 800).astype(np.uint8)
    assert np.array_equal(zero_width.rgb[..., 0], stretched)
    sigmoid = load_image(
        _write(
            tmp_path / "sig.dcm",
            _dicom(stored, "MONOCHROME2", WindowCenter=500, WindowWidth=400, VOILUTFunction="SIGMOID"),
        )
    )
    expected = np.rint(255 / (1 + np.exp(-4 * (stored.astype(float) - 500) / 400))).astype(np.uint8)
    assert np.array_equal(sigmoid.rgb[..., 0], expected)


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_mutated_files_raise_only_image_error(tmp_path: Path) -> None:
    """Truncations and byte flips of every format: an image or an ImageError, nothing else."""
    rgb = _color_ramp(24, 32)
    bgr = cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)
    ok, multi = cv2.imencodemulti(".tiff", [bgr, bgr[:10]])
    assert ok
    samples = {
        "jpg": _encode(".jpg", bgr),
        "png": _encode(".png", bgr),
        "tif": _encode(".tiff", bgr),
        "multi.tif": multi.tobytes(),
        "bmp": _encode(".bmp", bgr),
        "dcm": _dicom(
            np.arange(24 * 32, dtype=np.uint16).reshape(24, 32),
            "MONOCHROME2",
            WindowCenter=300,
            WindowWidth=200,
        ),
        "jpeg.dcm": _dicom(
            rgb, "YBR_FULL_422", transfer_syntax=uid.JPEGBaseline8Bit, encapsulated=[_encode(".jpg", bgr)]
        ),
    }
    rng = np.random.default_rng(1234)
    outcomes = {"image": 0, "error": 0}
    for kind, data in samples.items():
        for trial in range(25):
            mutated = bytearray(data)
            if trial % 2:
                mutated = mutated[: int(rng.integers(1, len(data)))]
            else:
                for pos in rng.integers(0, min(len(data), 400), size=int(rng.integers(1, 6))):
                    mutated[pos] = int(rng.integers(0, 256))
            try:
                decoded = decode_image_bytes(bytes(mutated), name=f"{kind}-{trial}", max_pixels=10_000_000)
            except ImageError as err:
                assert err.path == f"{kind}-{trial}" and err.reason
                outcomes["error"] += 1
            else:
                assert all(d.rgb.dtype == np.uint8 and d.rgb.shape[2] == 3 for d in decoded)
                outcomes["image"] += 1
    assert outcomes["error"] > 50 and outcomes["image"] > 10
