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


def sha256_file(path: str | Path, *, chunk: int = 1 << 22) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


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


def verify_bundle(
    bundle: str | Path, manifest: Manifest | None = None, *, only: list[str] | None = None
) -> list[Problem]:
    """Check sizes and digests (of `only` these paths, or all); list what is missing or differs."""
    root = Path(bundle)
    manifest = manifest or read_manifest(root)
    problems: list[Problem] = []
    for f in manifest.files:
        if only is not None and f.path not in only:
            continue
        full = root / f.path
        if not full.is_file():
            problems.append(Problem(f.path, "missing"))
            continue
        size = full.stat().st_size
        if size != f.size:
            problems.append(Problem(f.path, f"size {size} differs from the manifest's {f.size}"))
            continue
        if sha256_file(full) != f.sha256:
            problems.append(Problem(f.path, "sha256 differs from the manifest (file changed or corrupt)"))
    for child in sorted(root.iterdir()) if root.is_dir() else []:
        if child.is_file() and child.name not in (MANIFEST,):
            try:
                file_format(child.name)
            except BundleError as e:
                problems.append(Problem(child.name, str(e).split(": ", 1)[1]))
    return problems


def require_valid(bundle: str | Path, manifest: Manifest, *, only: list[str] | None = None) -> None:
    """Raise BundleError naming every file that does not match the manifest."""
    problems = verify_bundle(bundle, manifest, only=only)
    if problems:
        listing = "; ".join(str(p) for p in problems)
        raise BundleError(f"{bundle}: bundle does not match its manifest: {listing}")
