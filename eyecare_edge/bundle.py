"""The bundle format: a directory of model files plus `manifest.json` that says what each one is.

Export writes it, the runtime reads it and refuses it when a file's size or digest differs from
the manifest (naming the file), and `eyecare-edge info` prints it. Only ONNX (with external
data), GGUF, TensorRT engines (with their timing cache), safetensors, JSON and `.npy` files may be
in a bundle: nothing that unpickles.
"""

from __future__ import annotations

import datetime as _dt
import hashlib
import json
import os
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

from eyecare_edge import __version__
from eyecare_edge.errors import EyecareError
from eyecare_edge.preprocess import PreprocessConfig

FORMAT_VERSION = 1
MANIFEST = "manifest.json"

# suffix -> format name; the only files a bundle may hold.
ALLOWED_SUFFIXES: dict[str, str] = {
    ".onnx": "onnx",
    ".onnx.data": "onnx_data",
    ".gguf": "gguf",
    ".engine": "engine",
    ".trtcache": "trt_timing_cache",
    ".safetensors": "safetensors",
    ".json": "json",
    ".npy": "npy",
}
ROLES = ("vision", "llm", "extra")


class BundleError(EyecareError):
    """A bundle that cannot be used; the message names the bundle and the file at fault."""


def file_format(name: str) -> str:
    for suffix in sorted(ALLOWED_SUFFIXES, key=len, reverse=True):
        if name.endswith(suffix):
            return ALLOWED_SUFFIXES[suffix]
    raise BundleError(f"{name}: not an allowed bundle file (allowed: {', '.join(ALLOWED_SUFFIXES)})")


def _hash_into(update: Callable[[bytes], None], path: str | os.PathLike[str], chunk: int = 1 << 22) -> None:
    """Feed a file to a hash's `update` in 4 MiB blocks, so a 2 GB GGUF never sits in memory whole."""
    with open(path, "rb") as f:
        while block := f.read(chunk):
            update(block)


def sha256_file(path: str | os.PathLike[str], *, chunk: int = 1 << 22) -> str:
    """Hex sha256 of one file's bytes: what the manifest records and every digest check compares."""
    h = hashlib.sha256()
    _hash_into(h.update, path, chunk)
    return h.hexdigest()


def sha256_files(paths: Iterable[str | os.PathLike[str]]) -> str:
    """Hex sha256 over several files in the given order, each as its name then its bytes.

    The identity of an ONNX graph with its external-data file(s): TensorRT engine records
    (`onnx_sha256`) and the calibration cache key are this digest, so its layout must not change.
    """
    h = hashlib.sha256()
    for path in paths:
        h.update(Path(path).name.encode())
        _hash_into(h.update, path)
    return h.hexdigest()


class DigestMemo:
    """Digests of files, remembered per process by what the file system says about each file.

    Hashing a 2 GB GGUF takes seconds; a server that reloads a pipeline, a screen run that opens
    several, or a TensorRT engine lookup after the pipeline's own check should pay for it once per
    file version. The key is (resolved path, device, inode, size, mtime_ns, ctime_ns): a file
    rewritten in place gets a new mtime (or size), one replaced by rename a new inode, and one
    whose mtime was set back (`touch -d`, `cp -p`) a new ctime, which user code cannot set — so a
    file changed on disk is hashed again, and an unchanged one is not. (A rewrite of the same size
    within one tick of the file system's clock after the first hash is the one change it cannot
    see.) Thread-safe; nothing but digests is kept.
    """

    def __init__(self) -> None:
        self._known: dict[tuple, str] = {}
        self._lock = threading.Lock()

    def digest(
        self, paths: Sequence[str | os.PathLike[str]], compute: Callable[[], str], kind: str = "sha256"
    ) -> str:
        """`compute()` unless the same `kind` of digest of these exact file versions is known."""
        key = (kind, *(_stat_key(Path(p)) for p in paths))
        with self._lock:
            hit = self._known.get(key)
        if hit is not None:
            return hit
        value = compute()
        with self._lock:
            self._known[key] = value
        return value

    def sha256(self, path: str | os.PathLike[str]) -> str:
        return self.digest([path], lambda: sha256_file(path))


def _stat_key(path: Path) -> tuple:
    try:
        st = path.stat()
    except FileNotFoundError:
        return (str(path), None)
    return (os.path.realpath(path), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


# One per process: the digest of a file version never changes, so sharing it is safe.
DIGESTS = DigestMemo()


@dataclass
class FileEntry:
    """One file of the bundle. `precision` is the numeric type (fp32, fp16, int8, f32, f16, q4_k_m...)."""

    path: str
    role: str
    format: str
    precision: str
    size: int
    sha256: str
    # TensorRT engines are tied to the GPU and TensorRT version they were built with.
    trt_version: str | None = None
    compute_capability: str | None = None
    extra: dict = field(default_factory=dict)


@dataclass
class PromptSpec:
    template: str
    system: str | None
    image_placeholder: str = "<image>"
    stop_strings: list[str] = field(default_factory=list)
    report_prompt: str = ""
    # Special tokens that swallow the whitespace after / before them in the checkpoint's
    # tokenizer (see prompts.strip_special_whitespace).
    rstrip_specials: list[str] = field(default_factory=list)
    lstrip_specials: list[str] = field(default_factory=list)


@dataclass
class Manifest:
    model: dict
    preprocess: dict
    prompt: PromptSpec
    files: list[FileEntry] = field(default_factory=list)
    validation: dict = field(default_factory=dict)
    source: dict = field(default_factory=dict)
    # Token budget baked by `export --budget` ({"name", "visual_tokens", "method"}; see
    # `eyecare_edge.reduce`); empty = every visual token.
    budget: dict = field(default_factory=dict)
    format_version: int = FORMAT_VERSION
    producer: str = f"eyecare-edge {__version__}"
    created: str = field(
        default_factory=lambda: _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds")
    )

    def preprocess_config(self) -> PreprocessConfig:
        return PreprocessConfig.from_dict(self.preprocess)

    def find(self, role: str, *, format: str | None = None, precision: str | None = None) -> FileEntry | None:
        for f in self.files:
            if (
                f.role == role
                and (format is None or f.format == format)
                and (precision is None or f.precision == precision)
            ):
                return f
        return None

    def precisions(self, role: str, format: str) -> list[str]:
        return [f.precision for f in self.files if f.role == role and f.format == format]

    def digest(self) -> str:
        """Identity of what the bundle computes: files (by content), preprocessing and prompt.

        Engines and caches built on a device are excluded, so the digest is the same on every
        machine the bundle is deployed to.
        """
        core = {
            "files": sorted(
                (f.path, f.sha256) for f in self.files if f.format not in ("engine", "trt_timing_cache")
            ),
            "preprocess": self.preprocess,
            "prompt": asdict(self.prompt),
        }
        if self.budget:  # only when baked, so digests of bundles without one are unchanged
            core["budget"] = self.budget
        return hashlib.sha256(json.dumps(core, sort_keys=True).encode()).hexdigest()

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> Manifest:
        d = dict(d)
        version = d.get("format_version")
        if version != FORMAT_VERSION:
            raise BundleError(
                f"manifest format_version {version!r} is not supported (this runtime reads {FORMAT_VERSION})"
            )
        d["prompt"] = PromptSpec(**d["prompt"])
        d["files"] = [FileEntry(**f) for f in d.get("files", [])]
        return cls(**d)


def read_manifest(bundle: str | Path) -> Manifest:
    path = Path(bundle) / MANIFEST
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise BundleError(f"{bundle}: not a bundle (no {MANIFEST})") from None
    except (OSError, json.JSONDecodeError) as e:
        raise BundleError(f"{path}: unreadable manifest ({e})") from e
    try:
        return Manifest.from_dict(data)
    except (TypeError, KeyError) as e:
        raise BundleError(f"{path}: malformed manifest ({e})") from e


def write_manifest(bundle: str | Path, manifest: Manifest) -> Path:
    """Write atomically (temp file + rename) so a crash never leaves half a manifest."""
    path = Path(bundle) / MANIFEST
    tmp = path.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(manifest.to_dict(), indent=2) + "\n")
    os.replace(tmp, path)
    return path


def add_file(
    bundle: str | Path,
    manifest: Manifest,
    rel_path: str,
    *,
    role: str,
    precision: str,
    **extra_fields,
) -> FileEntry:
    """Record (or re-record) a file already written into the bundle directory."""
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    full = Path(bundle) / rel_path
    if not full.is_file():
        raise BundleError(f"{full}: file to add does not exist")
    trt = {k: extra_fields.pop(k) for k in ("trt_version", "compute_capability") if k in extra_fields}
    entry = FileEntry(
        path=rel_path,
        role=role,
        format=file_format(rel_path),
        precision=precision,
        size=full.stat().st_size,
        sha256=sha256_file(full),
        extra=dict(extra_fields.pop("extra", {}), **extra_fields),
        **trt,
    )
    manifest.files = [f for f in manifest.files if f.path != rel_path] + [entry]
    return entry


@dataclass(frozen=True)
class Problem:
    path: str
    reason: str

    def __str__(self) -> str:
        return f"{self.path}: {self.reason}"


def verify_files(
    bundle: str | os.PathLike[str], entries: Iterable[FileEntry], *, memo: DigestMemo = DIGESTS
) -> list[Problem]:
    """The one integrity check: each entry's file present, of the recorded size and sha256.

    Digests come from `memo` (the process's `DIGESTS` unless a test passes its own), so a file
    checked by the pipeline, then by the TensorRT engine lookup, then by a reload is hashed once
    per version on disk. Returns what is missing or differs, in `entries` order.
    """
    root = Path(bundle)
    problems: list[Problem] = []
    for entry in entries:
        full = root / entry.path
        if not full.is_file():
            problems.append(Problem(entry.path, "missing"))
            continue
        size = full.stat().st_size
        if size != entry.size:
            problems.append(Problem(entry.path, f"size {size} differs from the manifest's {entry.size}"))
        elif memo.sha256(full) != entry.sha256:
            problems.append(Problem(entry.path, "sha256 differs from the manifest (file changed or corrupt)"))
    return problems


def verify_bundle(
    bundle: str | Path, manifest: Manifest | None = None, *, only: list[str] | None = None
) -> list[Problem]:
    """Audit a whole bundle (`info --verify`): `verify_files` on its entries (`only` these paths,
    or all), plus every file in the directory that a bundle may not hold."""
    root = Path(bundle)
    manifest = manifest or read_manifest(root)
    entries = [f for f in manifest.files if only is None or f.path in only]
    problems = verify_files(root, entries)
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.is_file() and child.name not in (MANIFEST,):
            try:
                file_format(child.name)
            except BundleError as e:
                problems.append(Problem(child.name, str(e).split(": ", 1)[1]))
    return problems


def require_valid(bundle: str | os.PathLike[str], entries: Sequence[FileEntry]) -> None:
    """Raise BundleError naming every file of `entries` that does not match the manifest.

    The `check` the runtime hands to `eyecare_edge.vision.open_vision` and the LLM loader: only
    the files about to be read are checked, before they are read, so a corrupt file is reported
    by name rather than as a parser's error.
    """
    problems = verify_files(bundle, entries)
    if problems:
        listing = "; ".join(str(p) for p in problems)
        raise BundleError(f"{bundle}: bundle does not match its manifest: {listing}")
