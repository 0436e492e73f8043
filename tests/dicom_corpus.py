"""Check the image loader against pydicom's own test files (only those shipped with the package).

Every file must either decode to what pydicom gives, or be refused honestly:

* grey: pydicom's stored values (``pixel_array``) and Modality LUT (``apply_modality_lut``), then
  the display rule ``eyecare_edge.dicom_decode`` documents, written out here independently: the
  PS3.3 C.11.2.1.2 LINEAR window to 0..255, else min..max of the frame for data wider than
  8 bits, nominal range for data under 8 bits, MONOCHROME1 inverted. Lossless: within 1 level.
* colour: pydicom's RGB (``as_rgb``, palette via ``apply_color_lut``), nominal range for wider
  samples. Lossless within 1 level; lossy (JPEG, JPEG-LS near-lossless, JPEG 2000 lossy) within
  JPEG tolerance (mean |diff| <= 2.5, 99.9th percentile <= 16), since decoders' IDCTs differ.
* refused: honest when the reason names the transfer syntax and a decoder that really reads it,
  or when pydicom cannot produce the pixels either (not an image, truncated, corrupt).

Run it as a script for the table in the note:
``python tests/dicom_corpus.py [-v] [--rss]`` prints files tried / decoded / honestly refused /
wrong (``-v``: every file; ``--rss``: the peak RSS growth of the worst file, each loaded in a
forked child).
"""

from __future__ import annotations

import contextlib
import os
import sys
import warnings
from dataclasses import dataclass

import numpy as np

LOSSY = {
    "1.2.840.10008.1.2.4.50",
    "1.2.840.10008.1.2.4.51",
    "1.2.840.10008.1.2.4.81",
    "1.2.840.10008.1.2.4.91",
    "1.2.840.10008.1.2.4.203",
}
DECODER_WORDS = ("pylibjpeg-libjpeg", "pylibjpeg-openjpeg", "python-gdcm", "pyjpegls", "OpenCV", "pydicom")


@dataclass
class Outcome:
    path: str
    kind: str  # "decoded", "refused", "wrong"; "unverified": decoded, pydicom lacks a decoder to compare
    detail: str


def corpus_files() -> list[str]:
    """pydicom's shipped test files (never downloaded), files and folders alike, sorted."""
    from pydicom.data import get_testdata_files

    return sorted(set(get_testdata_files()))


def _reference(path: str) -> tuple[object, list[np.ndarray] | None, str]:
    """(dataset or None, pydicom's RGB uint8 frames or None, why None)."""
    import pydicom
    from pydicom.pixels import apply_color_lut, pixel_array

    try:
        ds = pydicom.dcmread(path, force=True)
    except Exception as exc:
        return None, None, f"pydicom cannot read it ({type(exc).__name__})"
    if "PixelData" not in ds or not ds.get("Rows"):
        return ds, None, "not an image"
    try:
        n = int(ds.get("NumberOfFrames") or 1)
        pi = str(ds.PhotometricInterpretation).upper()
        frames = []
        for i in range(n):
            arr = pixel_array(ds, index=i if n > 1 else None)
            if pi.startswith("MONOCHROME"):
                frames.append(_grey_reference(arr, ds, pi))
            else:
                bits = int(ds.BitsStored)
                if pi == "PALETTE COLOR":
                    arr = apply_color_lut(arr, ds)
                    bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
                frames.append(_nominal(arr, bits) if arr.ndim == 3 else None)
        return ds, frames, ""
    except Exception as exc:
        return ds, None, f"pydicom cannot decode it ({type(exc).__name__}: {str(exc)[:80]})"


def _nominal(arr: np.ndarray, bits: int) -> np.ndarray:
    if arr.dtype == np.uint8 and bits >= 8:
        return arr
    peak = float((1 << bits) - 1)
    return np.clip(np.rint(arr.astype(np.float64) * 255.0 / peak), 0, 255).astype(np.uint8)


def _grey_reference(arr: np.ndarray, ds: object, pi: str) -> np.ndarray:
    from pydicom.pixels import apply_modality_lut

    values = np.asarray(apply_modality_lut(arr, ds), dtype=np.float64)
    center, width = ds.get("WindowCenter"), ds.get("WindowWidth")  # type: ignore[attr-defined]
    first = lambda v: float(v[0] if hasattr(v, "__len__") and not isinstance(v, str) else v)  # noqa: E731
    plain = "RescaleSlope" not in ds and "ModalityLUTSequence" not in ds  # type: ignore[operator]
    bits = int(ds.BitsStored)  # type: ignore[attr-defined]
    if center is not None and width is not None and first(width) >= 1:
        c, w = first(center), first(width)
        out = np.clip(np.rint(((values - (c - 0.5)) / (w - 1) + 0.5) * 255.0), 0, 255) if w > 1 else None
        grey = (np.where(values > c - 0.5, 255, 0) if out is None else out).astype(np.uint8)
    elif plain and bits < 8:
        grey = _nominal(arr, bits)
    elif plain and arr.dtype == np.uint8:
        grey = arr
    else:
        lo, hi = values.min(), values.max()
        grey = (
            np.zeros(values.shape, np.uint8)
            if hi <= lo
            else np.rint((values - lo) * 255.0 / (hi - lo)).astype(np.uint8)
        )
    if pi == "MONOCHROME1":
        grey = 255 - grey
    return np.repeat(grey[..., None], 3, axis=2)


def _pydicom_lacks_a_decoder(ds: object) -> bool:
    """True when none of the plugins that read the syntax is installed for pydicom (pylibjpeg and
    co. are the optional ``dicom`` extra)."""
    from pydicom.pixels import get_decoder

    ts = ds.file_meta.get("TransferSyntaxUID")  # type: ignore[attr-defined]
    try:
        decoder = get_decoder(ts)
    except Exception:
        return True
    return not {"pylibjpeg", "gdcm", "pyjpegls"} & set(decoder.available_plugins)


def check(path: str) -> Outcome:
    from eyecare_edge.images import ImageError, load_images

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ds, ref, why = _reference(path)
        try:
            ours = load_images(path)
        except ImageError as exc:
            reason = exc.reason
            ts = (
                ds.file_meta.get("TransferSyntaxUID") if ds is not None and hasattr(ds, "file_meta") else None
            )
            names_ts = ts is not None and (str(ts) in reason or getattr(ts, "name", "?") in reason)
            if names_ts and any(w in reason for w in DECODER_WORDS):
                return Outcome(path, "refused", reason)
            if ref is None:
                return Outcome(path, "refused", f"{reason} [pydicom: {why}]")
            return Outcome(path, "wrong", f"refused though pydicom decodes it: {reason}")
    if ref is None and why.startswith("pydicom cannot decode") and _pydicom_lacks_a_decoder(ds):
        return Outcome(
            path, "unverified", f"decoded; pydicom has no decoder installed to compare with ({why})"
        )
    if ref is None:
        return Outcome(path, "wrong", f"decoded though pydicom says: {why}")
    if len(ours) != len(ref):
        return Outcome(path, "wrong", f"{len(ours)} frames, pydicom {len(ref)}")
    ts = str(ds.file_meta.get("TransferSyntaxUID", ""))  # type: ignore[union-attr]
    lossy = ts in LOSSY or ("LossyImageCompression" in ds and str(ds.LossyImageCompression) == "01")  # type: ignore[union-attr,operator]
    worst = 0.0
    for i, (im, r) in enumerate(zip(ours, ref, strict=True)):
        if r is None or im.rgb.shape != r.shape:
            return Outcome(
                path, "wrong", f"frame {i}: shape {im.rgb.shape} vs pydicom {None if r is None else r.shape}"
            )
        diff = np.abs(im.rgb.astype(np.int16) - r.astype(np.int16))
        if lossy:
            bad = diff.mean() > 2.5 or np.percentile(diff, 99.9) > 16
        else:
            bad = diff.max() > 1
        if bad:
            return Outcome(
                path, "wrong", f"frame {i}: mean |diff| {diff.mean():.2f}, max {diff.max()} vs pydicom"
            )
        worst = max(worst, float(diff.max()))
    return Outcome(
        path, "decoded", f"{len(ours)} frame(s), max |diff| {worst:g}{' (lossy)' if lossy else ''}"
    )


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise KeyError(field)


def peak_rss_growth_mb(path: str) -> float:
    """Peak RSS growth (MB) of loading one file, in a forked child of this (warmed-up) process.

    The child resets its peak-RSS mark to its current RSS (Linux: ``5 > /proc/self/clear_refs``),
    loads the file and reports VmHWM - VmRSS-at-start.
    """
    from eyecare_edge.images import ImageError, load_images

    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: load, report its own peak, leave without cleanup
        os.close(read)
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        base = _status_kb("VmRSS")
        with contextlib.suppress(ImageError, OSError):
            load_images(path)
        os.write(write, str(_status_kb("VmHWM") - base).encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as f:
        growth = int(f.read() or 0)
    os.waitpid(pid, 0)
    return max(0, growth) / 1024


def main() -> int:
    outcomes = [check(p) for p in corpus_files()]
    if "--rss" in sys.argv:  # after check(): every import and decoder is warm in the parent
        worst = max((peak_rss_growth_mb(p), p) for p in corpus_files())
        print(f"peak RSS growth of the worst file: {worst[0]:.1f} MB ({os.path.basename(worst[1])})")
    counts = {k: sum(o.kind == k for o in outcomes) for k in ("decoded", "refused", "wrong", "unverified")}
    for o in outcomes:
        if o.kind != "decoded" or "-v" in sys.argv:
            print(
                f"{o.kind:8s} {os.path.relpath(o.path, os.path.dirname(corpus_files()[0]))}: {o.detail[:160]}"
            )
    print(
        f"files tried {len(outcomes)} | decoded {counts['decoded']} | honestly refused {counts['refused']} "
        f"| wrong {counts['wrong']} | decoded but unverified (pydicom lacks a decoder) {counts['unverified']}"
    )
    return 1 if counts["wrong"] else 0


if __name__ == "__main__":
    sys.exit(main())
