"""Awkward and broken inputs in a batch: every bad file becomes its own error line with a specific
reason, unusual-but-valid files (16-bit, RGBA, grayscale, CMYK, DICOM, multi-frame DICOM) are
answered, and the batch always runs to the end. Pillow and pydicom are used only to *make* inputs.
"""

from __future__ import annotations

import io
import json
import struct
import zlib
from pathlib import Path

import cv2
import numpy as np
import pytest
from click.testing import CliRunner
from runtime_fixtures import FAST, runtime_assets

from eyecare_edge import images as images_module
from eyecare_edge.cli import main
from eyecare_edge.images import ImageError
from eyecare_edge.pipeline import Pipeline


def _ramp(h: int = 48, w: int = 64) -> np.ndarray:
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[..., 0] = np.linspace(10, 250, w, dtype=np.uint8)[None, :]
    rgb[..., 1] = 120
    rgb[..., 2] = np.linspace(240, 20, h, dtype=np.uint8)[:, None]
    return rgb


def _encode(ext: str, img: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(ext, img)
    assert ok
    return buf.tobytes()


def _png_chunk(ctype: bytes, payload: bytes) -> bytes:
    return struct.pack(">I", len(payload)) + ctype + payload + struct.pack(">I", zlib.crc32(ctype + payload))


def _png_bomb() -> bytes:
    """A valid PNG header for 30000 x 30000 RGB (900 MP) in well under 200 bytes (refused from the
    header: deflate cannot expand the 17 bytes of image data present that far)."""
    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", ihdr)
        + _png_chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + _png_chunk(b"IEND", b"")
    )


def _dicom(pixels: np.ndarray, frames: int = 1) -> bytes:
    from pydicom import uid
    from pydicom.dataset import Dataset, FileMetaDataset

    fm = FileMetaDataset()
    fm.MediaStorageSOPClassUID = uid.SecondaryCaptureImageStorage
    fm.MediaStorageSOPInstanceUID = uid.generate_uid()
    fm.TransferSyntaxUID = uid.ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = fm
    ds.SOPClassUID = fm.MediaStorageSOPClassUID
    ds.SOPInstanceUID = fm.MediaStorageSOPInstanceUID
    ds.Modality = "OP"
    ds.Rows, ds.Columns = pixels.shape[-2:]
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.BitsAllocated = ds.BitsStored = 8
    ds.HighBit = 7
    ds.PixelRepresentation = 0
    if frames > 1:
        ds.NumberOfFrames = frames
    ds.PixelData = pixels.tobytes()
    ds["PixelData"].VR = "OB"
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


# file name -> (bytes, None for an answer or a fragment the error must contain)
def _cases() -> dict[str, tuple[bytes, str | None]]:
    from PIL import Image

    rgb = _ramp()
    jpeg = _encode(".jpg", rgb[:, :, ::-1])
    gray16 = (np.linspace(0, 65535, 48 * 64).reshape(48, 64)).astype(np.uint16)
    rgba = np.dstack([rgb[:, :, ::-1], np.full(rgb.shape[:2], 180, np.uint8)])
    cmyk = io.BytesIO()
    Image.fromarray(rgb).convert("CMYK").save(cmyk, "JPEG", quality=90)
    gray8 = np.tile(np.linspace(0, 255, 64, dtype=np.uint8), (48, 1))
    return {
        "empty.jpg": (b"", "empty file"),
        "truncated.jpg": (jpeg[: len(jpeg) // 2], "truncated jpeg"),
        "notes.jpg": (b"Patient notes: please review the scan on Monday.\n", "text"),
        "gray16.png": (_encode(".png", gray16), None),
        "rgba.png": (_encode(".png", rgba), None),
        "gray.png": (_encode(".png", gray8), None),
        "cmyk.jpg": (cmyk.getvalue(), None),
        "bomb.png": (_png_bomb(), "forged png"),
        "corrupt.dcm": (b"\x00" * 128 + b"DICM" + b"\xff" * 64, "corrupt dicom"),
        "good.dcm": (_dicom(gray8), None),
        "frames.dcm": (_dicom(np.stack([gray8, 255 - gray8, gray8 // 2]), frames=3), None),
    }


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    return runtime_assets(tmp_path_factory)


@pytest.fixture()
def awkward(tmp_path) -> tuple[Path, dict[str, tuple[bytes, str | None]]]:
    folder = tmp_path / "inbox"
    folder.mkdir()
    cases = _cases()
    for name, (data, _) in cases.items():
        (folder / name).write_bytes(data)
    return folder, cases


def test_screen_records_each_bad_file_and_answers_the_rest(assets, awkward, tmp_path, monkeypatch):
    folder, cases = awkward
    decoded_sizes: list[int] = []
    real_imdecode = images_module.cv2.imdecode

    def spy(buf, flags):
        decoded_sizes.append(len(buf))
        return real_imdecode(buf, flags)

    monkeypatch.setattr(images_module.cv2, "imdecode", spy)
    out = tmp_path / "results.jsonl"
    args = ["screen", str(assets.bundle), str(folder), "-o", str(out), "--task", "open"]
    args += [
        "-q",
        "What is shown?",
        "--max-tokens",
        "4",
        "--threads",
        "1",
        "--vision-threads",
        "1",
        "--no-progress",
    ]
    r = CliRunner().invoke(main, args)
    assert r.exit_code == 3, r.output  # finished, with per-item errors

    lines = [json.loads(x) for x in out.read_text().splitlines()]
    by_name: dict[str, list[dict]] = {}
    for line in lines:
        by_name.setdefault(Path(line["path"]).name, []).append(line)
    assert set(by_name) == set(cases)
    for name, (_, fragment) in cases.items():
        got = by_name[name]
        if fragment is None:
            assert all(x["error"] is None and isinstance(x["answer"], str) for x in got), (name, got)
        else:
            assert len(got) == 1 and got[0]["answer"] is None, (name, got)
            assert fragment in got[0]["error"].lower(), (name, got[0]["error"])
    assert [x["frame"] for x in by_name["frames.dcm"]] == [0, 1, 2]
    assert len(lines) == len(cases) + 2 == len({x["id"] for x in lines})
    assert len(_png_bomb()) not in decoded_sizes  # refused from its header, never decoded
    assert "5 error(s)" in r.stderr


def test_pipeline_ask_raises_one_image_error_per_bad_file(assets, awkward):
    folder, cases = awkward
    with Pipeline.load(assets.bundle, llm="q4_k_m", **FAST) as pipe:
        for name, (_, fragment) in cases.items():
            if fragment is None or name == "frames.dcm":
                continue
            with pytest.raises(ImageError) as info:
                pipe.ask(folder / name, "What is shown?", max_tokens=2)
            assert info.value.path == str(folder / name) and fragment in info.value.reason.lower()
        for name in ("gray16.png", "rgba.png", "gray.png", "cmyk.jpg", "good.dcm"):
            assert pipe.ask(folder / name, "What is shown?", max_tokens=2).n_image_tokens > 0
        # a lower pixel limit is honoured from the header as well
        with (
            Pipeline.load(assets.bundle, llm="q4_k_m", max_pixels=1000, **FAST) as small,
            pytest.raises(ImageError, match="pixel limit"),
        ):
            small.ask(folder / "gray.png", "What is shown?")
