"""Files built to mislead or exhaust the loader (issue 19), each generated here, small, and bounded
in time (pytest-timeout) and, for the ones that claim huge images, in memory (a subprocess's peak
RSS growth over its own imports)."""

from __future__ import annotations

import io
import json
import os
import struct
import subprocess
import sys
import textwrap
import zlib
from pathlib import Path

import cv2
import numpy as np
import pydicom
import pytest
from pydicom import uid
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.pixels import get_decoder
from test_screen import FakePipeline, _lines, _png

from eyecare_edge.images import ImageError, load_image, load_images, read_header
from eyecare_edge.screening import Question, ResultsFile, file_error_id, run_screen, scan_inputs

pytestmark = pytest.mark.timeout(60)


def _dicom(
    pixels: np.ndarray, photometric: str, *, samples: int = 1, bits: int | None = None, **attrs
) -> bytes:
    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    fm.MediaStorageSOPInstanceUID = uid.generate_uid()
    fm.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID, ds.SOPInstanceUID = fm.MediaStorageSOPClassUID, fm.MediaStorageSOPInstanceUID
    ds.Modality = "OP"
    ds.Rows, ds.Columns = pixels.shape[:2]
    ds.SamplesPerPixel = samples
    ds.PhotometricInterpretation = photometric
    alloc = pixels.dtype.itemsize * 8
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = alloc, bits or alloc, (bits or alloc) - 1
    ds.PixelRepresentation = 0
    if samples == 3:
        ds.PlanarConfiguration = 0
    for k, v in attrs.items():
        setattr(ds, k, v)
    ds.PixelData = pixels.tobytes()
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _peak_rss_growth_mb(path: Path) -> tuple[float, str]:
    """Load `path` in a fresh interpreter; (peak RSS growth over its imports in MB, outcome)."""
    code = textwrap.dedent(
        f"""
        import resource, sys
        from eyecare_edge.images import ImageError, load_images
        import pydicom, pydicom.pixels, cv2, numpy
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        try:
            out = f"decoded {{len(load_images({str(path)!r}))}} frame(s)"
        except ImageError as e:
            out = "refused: " + e.reason
        print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - base) / 1024)
        print(out)
        """
    )
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=50, check=True)
    growth, outcome = r.stdout.strip().split("\n", 1)
    return float(growth), outcome


def _small_jpeg(size: int = 8) -> bytes:
    ok, buf = cv2.imencode(".jpg", np.full((size, size, 3), 128, np.uint8))
    assert ok
    return buf.tobytes()


# 1. ------------------------------------------------------------------------------------------


def test_dicom_with_a_tiff_preamble_is_read_as_dicom(tmp_path: Path) -> None:
    values = np.arange(64 * 64, dtype=np.uint16).reshape(64, 64)
    data = bytearray(_dicom(values, "MONOCHROME1", WindowCenter=2048, WindowWidth=4096))
    tiff = b"II*\x00" + struct.pack("<I", 8) + b"\x00" * 4  # a TIFF header pointing at an empty IFD
    data[: len(tiff)] = tiff
    path = tmp_path / "dual.dcm"
    path.write_bytes(bytes(data))
    img = load_image(path)
    assert img.format == "dicom" and img.meta["Modality"] == "OP" and img.source_mode == "MONOCHROME1"
    assert img.rgb[0, 0, 0] > 250 and img.rgb[-1, -1, 0] < 5  # MONOCHROME1: low values white


# 2. ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore")
def test_rgb_jpeg_dicom_without_colour_transform_is_not_magenta() -> None:
    from pydicom.data import get_testdata_file

    for name in ("SC_jpeg_no_color_transform.dcm", "SC_rgb_jpeg.dcm"):  # no / a short Adobe marker
        path = get_testdata_file(name)
        ours = load_image(path).rgb.astype(int)
        theirs = pydicom.dcmread(path).pixel_array.astype(int)
        assert np.abs(ours - theirs).mean() < 0.5, name


# 3. ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore")
def test_12_bit_jpeg_refusal_names_the_syntax_and_real_decoders(monkeypatch: pytest.MonkeyPatch) -> None:
    from pydicom.data import get_testdata_file

    path = get_testdata_file("JPGExtended.dcm")  # 12-bit JPEG Extended
    decoder = get_decoder(uid.JPEGExtended12Bit)
    monkeypatch.setattr(type(decoder), "available_plugins", property(lambda self: ("pillow",)))
    with pytest.raises(ImageError) as e:
        load_image(path)
    reason = e.value.reason
    assert "JPEG Extended" in reason and str(uid.JPEGExtended12Bit) in reason
    assert "pylibjpeg-libjpeg" in reason and "python-gdcm" in reason and "eyecare-edge[dicom]" in reason


# 4 and 8. ------------------------------------------------------------------------------------


def test_tiny_jpeg_claiming_10000x10000_is_refused(tmp_path: Path) -> None:
    data = bytearray(_small_jpeg())
    sof = data.find(b"\xff\xc0")
    struct.pack_into(">HH", data, sof + 5, 10000, 10000)
    path = tmp_path / "forged.jpg"
    path.write_bytes(bytes(data))
    assert len(data) < 1000
    growth, outcome = _peak_rss_growth_mb(path)
    assert outcome.startswith("refused: truncated or forged JPEG") and "10000x10000" in outcome
    assert growth < 50, growth


def test_small_jpeg_followed_by_a_gigabyte_is_not_read_whole(tmp_path: Path) -> None:
    path = tmp_path / "padded.jpg"
    with open(path, "wb") as f:
        f.write(_small_jpeg())
        f.truncate(1 << 30)  # sparse: a gigabyte of zeros that costs no disk
    growth, outcome = _peak_rss_growth_mb(path)
    assert outcome == "decoded 1 frame(s)" and growth < 50, (growth, outcome)


def test_16_bit_rgba_png_over_the_decoded_bytes_budget_is_refused_from_the_header(tmp_path: Path) -> None:
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    w = h = 7000  # 49 MP: under the pixel limit, but 8 bytes per pixel decoded
    raw = h * (1 + w * 8)
    ihdr = struct.pack(">IIBBBBB", w, h, 16, 6, 0, 0, 0)
    data = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", b"\x00" * (raw // 1032 + 1))
        + chunk(b"IEND", b"")
    )
    path = tmp_path / "rgba16.png"
    path.write_bytes(data)
    growth, outcome = _peak_rss_growth_mb(path)
    assert "decoded-bytes budget" in outcome and "max_decoded_bytes" in outcome and growth < 50


# 5. ------------------------------------------------------------------------------------------


def test_fifo_and_directory_named_like_images_are_refused_without_blocking(tmp_path: Path) -> None:
    fifo = tmp_path / "scan.jpg"
    os.mkfifo(fifo)
    (tmp_path / "IM000001").symlink_to(fifo)  # suffix-less: the folder scan sniffs such files
    folder = tmp_path / "photo.jpg"
    folder.mkdir()
    for path, what in ((fifo, "FIFO"), (folder, "directory")):
        with pytest.raises(ImageError, match=what):
            load_images(path)
        with pytest.raises(ImageError, match=what):
            read_header(path)
    good = _png(tmp_path / "z.png")
    scan = scan_inputs([tmp_path])
    assert fifo in scan.files and good in scan.files
    out = tmp_path / "out.jsonl"
    with ResultsFile(out, digest=FakePipeline.digest, resume=False) as results:
        s = run_screen(FakePipeline(), [fifo, good], [Question("Q", "Q")], results, task="open")
    lines = _lines(out)
    assert (s.n_ok, s.n_errors) == (1, 1) and "FIFO" in lines[0]["error"] and lines[1]["error"] is None


# 6. ------------------------------------------------------------------------------------------


def test_non_utf8_file_names_screen_and_resume(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9.png"
    bad_name = Path(os.fsdecode(raw))
    cv2.imwrite(str(_png(tmp_path / "tmp.png")), np.zeros((8, 8, 3), np.uint8))
    os.rename(tmp_path / "tmp.png", raw)
    text = tmp_path / "r\xe9sum\xe9.jpg"
    text.write_text("not an image")
    os.rename(text, os.fsencode(tmp_path) + b"/notes\xff.jpg")
    files = scan_inputs([tmp_path]).files
    assert len(files) == 2
    out = tmp_path / "out.jsonl"
    questions = [Question("Q1", "Q1"), Question("Q2", "Q2")]
    with ResultsFile(out, digest=FakePipeline.digest, resume=False) as results:
        s = run_screen(FakePipeline(), files, questions, results, task="open")
    assert (s.n_ok, s.n_errors) == (2, 1)
    text_lines = out.read_bytes().decode("utf-8").splitlines()  # valid UTF-8 JSON lines
    lines = [json.loads(x) for x in text_lines]
    assert {x["path"].rsplit("/", 1)[1] for x in lines} == {"caf\\xe9.png", "notes\\xff.jpg"}
    assert len({x["id"] for x in lines}) == 3 and any(str(bad_name) == str(f) for f in files)
    with ResultsFile(out, digest=FakePipeline.digest, resume=True) as results:
        s = run_screen(FakePipeline(), files, questions, results, task="open")
    assert s.n_items == 0 and s.n_skipped == 3 and len(_lines(out)) == 3


# 7. ------------------------------------------------------------------------------------------


def test_dicom_claiming_ten_million_frames_is_one_refusal(tmp_path: Path) -> None:
    ds = pydicom.dcmread(io.BytesIO(_dicom(np.zeros((4, 4), np.uint8), "MONOCHROME2")))
    ds.NumberOfFrames = 10_000_000
    buf = io.BytesIO()
    ds.save_as(buf)
    path = tmp_path / "frames.dcm"
    path.write_bytes(buf.getvalue())
    assert path.stat().st_size < 1000
    with pytest.raises(ImageError, match="truncated or forged DICOM: 10000000 frames"):
        read_header(path)
    growth, outcome = _peak_rss_growth_mb(path)
    assert outcome.startswith("refused") and growth < 50
    out = tmp_path / "out.jsonl"
    with ResultsFile(out, digest=FakePipeline.digest, resume=False) as results:
        run_screen(FakePipeline(), [path], [Question("A", "A"), Question("B", "B")], results, task="open")
    (line,) = _lines(out)
    assert line["id"] == file_error_id(path, line["image_sha256"]) and "10000000 frames" in line["error"]


# 9. ------------------------------------------------------------------------------------------


def test_one_bit_dicom_is_scaled_to_0_and_255(tmp_path: Path) -> None:
    mask = (np.arange(64).reshape(8, 8) % 3 == 0).astype(np.uint8)
    ds = pydicom.dcmread(io.BytesIO(_dicom(np.zeros((8, 8), np.uint8), "MONOCHROME2")))
    ds.BitsAllocated, ds.BitsStored, ds.HighBit = 1, 1, 0
    ds.PixelData = np.packbits(mask.ravel(), bitorder="little").tobytes()
    buf = io.BytesIO()
    ds.save_as(buf)
    path = tmp_path / "seg.dcm"
    path.write_bytes(buf.getvalue())
    assert np.array_equal(load_image(path).rgb[..., 0], mask * 255)


def test_three_sample_monochrome2_is_a_clear_error(tmp_path: Path) -> None:
    data = _dicom(np.zeros((6, 5, 3), np.uint8), "MONOCHROME2", samples=3)
    path = tmp_path / "mono3.dcm"
    path.write_bytes(data)
    with pytest.raises(ImageError, match="MONOCHROME2 with 3 samples per pixel"):
        load_image(path)


def test_screen_lists_and_counts_skipped_folder_files(tmp_path: Path) -> None:
    _png(tmp_path / "a.png")
    for name in ("b.heic", "c.webp", "d.gif", "e.avif", "f.jp2", "notes.txt"):
        (tmp_path / name).write_bytes(b"\x00" * 16)
    scan = scan_inputs([tmp_path])
    assert [p.name for p in scan.files] == ["a.png"]
    reasons = {Path(s.path).name: s.reason for s in scan.skipped}
    assert len(reasons) == 6 and "HEIC" in reasons["b.heic"] and "WebP" in reasons["c.webp"]
    out = tmp_path / "out.jsonl"
    with ResultsFile(out, digest=FakePipeline.digest, resume=False) as results:
        s = run_screen(
            FakePipeline(), scan.files, [Question("Q", "Q")], results, task="open", skipped_files=scan.skipped
        )
    assert s.n_skipped_files == 6 and s.to_dict()["skipped_files"] == 6


def test_padding_after_the_image_is_not_read_and_oversized_files_are_refused(tmp_path: Path) -> None:
    png = tmp_path / "padded.png"
    with open(png, "wb") as f:
        f.write(cv2.imencode(".png", np.full((8, 8, 3), 7, np.uint8))[1].tobytes())
        f.truncate(1 << 30)  # sparse gigabyte after IEND
    growth, outcome = _peak_rss_growth_mb(png)
    assert outcome == "decoded 1 frame(s)" and growth < 50, (growth, outcome)
    bmp = tmp_path / "padded.bmp"
    with open(bmp, "wb") as f:
        f.write(cv2.imencode(".bmp", np.full((8, 8, 3), 7, np.uint8))[1].tobytes())
        f.truncate(1 << 30)
    with pytest.raises(ImageError, match="far more than its 64 pixels can need"):
        read_header(bmp)
