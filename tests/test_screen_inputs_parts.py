"""The Ray engine's Ray-free halves: manifests and source ids (`distributed.inputs`), and the
results directory of parts (`distributed.parts`): atomic parts, resume, dedupe, retry of errors."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest

from eyecare_edge.distributed.inputs import (
    dicom_instance_uid,
    expand_paths,
    read_manifest_rows,
    resolve_sources,
    source_id,
)
from eyecare_edge.distributed.parts import PartsDir, list_parts, read_parts
from eyecare_edge.screening import ScreenError

DIGEST = "d" * 64


def _png(path: Path, value: int = 100) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), np.full((16, 16, 3), value, np.uint8))
    return path


def _dicom(path: Path, uid: str) -> Path:
    from pydicom.dataset import Dataset, FileMetaDataset
    from pydicom.uid import ExplicitVRLittleEndian, SecondaryCaptureImageStorage

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = uid
    ds.Rows, ds.Columns, ds.SamplesPerPixel = 4, 4, 1
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 8, 8, 7, 0
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.PixelData = bytes(16)
    ds.save_as(path, enforce_file_format=True)
    return path


def test_manifests_csv_jsonl_parquet_and_file_lists(tmp_path):
    a, b = _png(tmp_path / "imgs" / "a.png"), _png(tmp_path / "imgs" / "b.png", 50)
    (tmp_path / "m.csv").write_text("id,path,site\nA1,imgs/a.png,x\n,imgs/b.png,y\n")
    (tmp_path / "m.jsonl").write_text(json.dumps({"path": str(a), "id": 7}) + "\n\n")
    (tmp_path / "m.txt").write_text("# archive\nimgs/b.png\n")
    (tmp_path / "m.tsv").write_text("path\nimgs/a.png\n")
    assert read_manifest_rows(tmp_path / "m.csv") == [(a, "A1"), (b, None)]
    assert read_manifest_rows(tmp_path / "m.jsonl") == [(a, "7")]
    assert read_manifest_rows(tmp_path / "m.txt") == [(b, None)]
    assert read_manifest_rows(tmp_path / "m.tsv") == [(a, None)]

    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    pq.write_table(pa.table({"path": ["imgs/b.png"], "id": ["B"]}), tmp_path / "m.parquet")
    assert read_manifest_rows(tmp_path / "m.parquet") == [(b, "B")]

    for name, text, msg in [
        ("no_path.csv", "file,id\na.png,1\n", "needs a header with a 'path'"),
        ("bad.jsonl", '{"path": "a.png"}\n{oops\n', r"bad.jsonl:2: invalid JSON"),
        ("empty.txt", "# nothing\n", "lists no files"),
    ]:
        (tmp_path / name).write_text(text)
        with pytest.raises(ScreenError, match=msg):
            read_manifest_rows(tmp_path / name)


def test_source_ids_manifest_id_then_dicom_uid_then_path(tmp_path):
    img = _png(tmp_path / "a.png")
    dcm = _dicom(tmp_path / "IM0001", "1.2.826.0.1.3680043.8.498.1")
    assert dicom_instance_uid(dcm) == "1.2.826.0.1.3680043.8.498.1"
    assert source_id(img) == str(img)
    assert source_id(dcm) == "dicom:1.2.826.0.1.3680043.8.498.1"  # suffix-less, by the DICM magic
    assert source_id(dcm, "study-9") == "study-9"
    moved = tmp_path / "elsewhere" / "copy.dcm"
    moved.parent.mkdir()
    moved.write_bytes(dcm.read_bytes())
    assert source_id(moved) == source_id(dcm)  # an archive moved keeps its ids

    (tmp_path / "m.csv").write_text(f"path,id\n{img},X\n")
    got = resolve_sources([str(tmp_path / "m.csv"), str(tmp_path / "a.png"), str(dcm)])
    assert [(Path(s.path).name, s.source_id) for s in got] == [
        ("a.png", "X"),  # a path already listed is taken once, with its first id
        ("IM0001", "dicom:1.2.826.0.1.3680043.8.498.1"),
    ]
    with pytest.raises(ScreenError, match="same id"):
        resolve_sources([str(dcm), str(moved)])
    # the local engine reads manifests too (paths only); missing manifest rows are not checked here
    (tmp_path / "list.txt").write_text("a.png\nmissing.png\n")
    assert [p.name for p in expand_paths([str(tmp_path / "list.txt"), str(img)])] == ["a.png", "missing.png"]


def _row(i: int, source: str, items: int = 1, error: str | None = None) -> dict:
    return {
        "id": f"id{i}",
        "path": f"/x/{source}.png",
        "answer": None if error else f"answer {i}",
        "error": error,
        "timings": {"total_ms": 1.5},
        "options": {"A": "yes"} if i % 2 else None,
        "bundle_digest": DIGEST,
        "source_id": source,
        "source_items": items,
    }


@pytest.mark.parametrize("fmt", ["jsonl", "parquet"])
def test_parts_resume_dedupe_and_retry_errors(tmp_path, fmt):
    if fmt == "parquet":
        pytest.importorskip("pyarrow")
    out = tmp_path / "out"
    parts = PartsDir(out, digest=DIGEST, resume=False, fmt=fmt)
    parts.write([_row(0, "s0", 2), _row(1, "s0", 2), _row(2, "s1")])
    parts.write([_row(3, "s2", error="cannot decode"), _row(2, "s1")])  # id2 again: not written
    assert parts.write([_row(2, "s1")]) is None
    (out / ".part-cut-by-a-kill.jsonl.tmp").write_text('{"id": "torn')
    assert len(list_parts(out)) == 2
    rows = list(read_parts(out))
    assert [r["id"] for r in rows] == ["id0", "id1", "id2", "id3"]
    assert rows[0]["timings"] == {"total_ms": 1.5} and rows[1]["options"] == {"A": "yes"}

    with pytest.raises(ScreenError, match="pass --resume"):
        PartsDir(out, digest=DIGEST, resume=False, fmt=fmt)
    with pytest.raises(ScreenError, match="not this bundle"):
        PartsDir(out, digest="e" * 64, resume=True, fmt=fmt)

    again = PartsDir(out, digest=DIGEST, resume=True, fmt=fmt)
    assert not list(out.glob("*.tmp"))  # the torn temporary is gone
    st = again.state
    assert st.n_rows == 4 and st.n_errors == 1 and st.dropped_duplicates == 0
    assert all(st.source_done(s) for s in ("s0", "s1", "s2")) and not st.source_done("s3")

    # a duplicate that got in anyway (say, a part copied by hand) is removed on resume
    dup = out / f"part-zzz-000001.{fmt}"
    dup.write_bytes(list_parts(out)[0].read_bytes())
    retry = PartsDir(out, digest=DIGEST, resume=True, retry_errors=True, fmt=fmt)
    assert retry.state.dropped_duplicates == 3 and retry.state.dropped_errors == 1
    assert not dup.exists()  # it held nothing new: deleted
    assert not retry.state.source_done("s2") and retry.state.n_rows == 3
    assert [r["id"] for r in read_parts(out)] == ["id0", "id1", "id2"]
    retry.write([_row(4, "s2")])
    assert retry.state.source_done("s2") and len(list(read_parts(out))) == 4


def test_parts_dir_refuses_a_file(tmp_path):
    f = tmp_path / "results.jsonl"
    f.write_text("{}\n")
    with pytest.raises(ScreenError, match="not a directory"):
        PartsDir(f, digest=DIGEST, resume=True)
