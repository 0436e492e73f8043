"""The random-weight checkpoint and bundle a perf run measures, built once and cached.

Speed does not depend on what the weights say, only on their shapes and types, so a preset's
exact widths with random weights measure what the trained model would cost. Depth can be cut
(`llm_layers`, `vision_layers`) to fit a run into minutes; `costs` extrapolates to full depth.

Cache layout (one folder per spec, default ~/.cache/eyecare-edge/perf):

    <workdir>/<preset>-L<k>-V<k>-s<seed>-<formats digest>/
        checkpoint/   (HF directory, FP32 safetensors)
        bundle/       (manifest + vision ONNX + GGUFs)
        build.json    (the spec; written last, so a half-built folder is rebuilt)

The export skips validation: these are random weights and the perf run measures time, not
accuracy (the export tests validate real exports). Building runs in child processes, so the
command's own process never imports torch.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from eyecare_edge import __version__
from eyecare_edge.formats import export_formats, format_names

# From the formats table: what export writes by default, the GPU-only vision formats, and the LLM
# types perf measures (bf16 too: the CPU's BF16 speed is a question perf answers).
DEFAULT_VISION = format_names("vision", default=True)
GPU_VISION = tuple(
    f.name for f in export_formats() if f.role == "vision" and f.prefer == "gpu" and "ort-cpu" not in f.backends
)
DEFAULT_LLM = format_names("llm", measured=True)
STAMP = "build.json"


@dataclass(frozen=True)
class BuildSpec:
    """What to build: a preset at a depth, with these vision/LLM formats."""

    preset: str
    llm_layers: int | None
    vision_layers: int | None
    seed: int = 0
    vision: tuple[str, ...] = DEFAULT_VISION
    llm: tuple[str, ...] = DEFAULT_LLM
    calibration_images: int = 4

    def key(self) -> str:
        formats = ",".join(self.vision) + "|" + ",".join(self.llm) + f"|c{self.calibration_images}"
        digest = hashlib.sha256(formats.encode()).hexdigest()[:8]
        depth = f"L{self.llm_layers or 'full'}-V{self.vision_layers or 'full'}"
        return f"{self.preset}-{depth}-s{self.seed}-{digest}"

    def to_dict(self) -> dict:
        d = asdict(self)
        d["producer"] = __version__
        return d


@dataclass
class Built:
    checkpoint: Path
    bundle: Path
    built_now: bool
    seconds: float

    def to_dict(self) -> dict:
        return {
            "checkpoint": str(self.checkpoint),
            "bundle": str(self.bundle),
            "built_now": self.built_now,
            "build_seconds": round(self.seconds, 1),
            "checkpoint_bytes": dir_bytes(self.checkpoint),
            "bundle_bytes": dir_bytes(self.bundle),
        }


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).rglob("*") if f.is_file())


def cached(spec: BuildSpec, workdir: Path) -> Built | None:
    """The cached build of `spec`, if complete."""
    root = Path(workdir) / spec.key()
    stamp = root / STAMP
    if not stamp.is_file():
        return None
    try:
        saved = json.loads(stamp.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if saved != json.loads(json.dumps(spec.to_dict())):
        return None
    ckpt, bundle = root / "checkpoint", root / "bundle"
    if not (ckpt / "config.json").is_file() or not (bundle / "manifest.json").is_file():
        return None
    return Built(ckpt, bundle, False, 0.0)


def ensure_built(
    spec: BuildSpec,
    workdir: Path,
    run_child: Callable[[str, dict], object],
    progress: Callable[[str], None] = lambda m: None,
) -> Built:
    """The checkpoint and bundle of `spec` under `workdir`, built by child processes if absent.
    run_child(target, kwargs) runs `module:function` in a child (see `rss.run_in_child`)."""
    hit = cached(spec, workdir)
    if hit is not None:
        progress(f"using cached build {hit.bundle.parent}")
        return hit
    root = Path(workdir) / spec.key()
    ckpt, bundle = root / "checkpoint", root / "bundle"
    t0 = time.perf_counter()
    root.mkdir(parents=True, exist_ok=True)
    (root / STAMP).unlink(missing_ok=True)
    for d in (ckpt, bundle):
        shutil.rmtree(d, ignore_errors=True)
    progress(
        f"building a random-weight {spec.preset} checkpoint "
        f"(llm_layers={spec.llm_layers}, vision_layers={spec.vision_layers}) in {ckpt}"
    )
    run_child(
        "eyecare_edge.perf.build:init_child",
        {
            "preset": spec.preset,
            "out": str(ckpt),
            "llm_layers": spec.llm_layers,
            "vision_layers": spec.vision_layers,
            "seed": spec.seed,
        },
    )
    progress(f"exporting its bundle (vision {','.join(spec.vision)}; llm {','.join(spec.llm)}) to {bundle}")
    run_child(
        "eyecare_edge.perf.build:export_child",
        {
            "ckpt": str(ckpt),
            "out": str(bundle),
            "vision": list(spec.vision),
            "llm": list(spec.llm),
            "calibration_images": spec.calibration_images,
        },
    )
    (root / STAMP).write_text(json.dumps(spec.to_dict(), indent=1))
    return Built(ckpt, bundle, True, time.perf_counter() - t0)


# ------------------------------------------------------------------------- child entry points


def init_child(preset: str, out: str, llm_layers: int | None, vision_layers: int | None, seed: int) -> str:
    from eyecare_edge.training.checkpoint import init_checkpoint

    return str(init_checkpoint(preset, out, llm_layers=llm_layers, vision_layers=vision_layers, seed=seed))


def export_child(ckpt: str, out: str, vision: list[str], llm: list[str], calibration_images: int) -> dict:
    from eyecare_edge.export.exporter import ExportOptions, export_bundle

    options = ExportOptions(
        vision=tuple(vision), llm=tuple(llm), validate=False, calibration_images=calibration_images
    )
    result = export_bundle(ckpt, out, options)
    return {row.file: row.size for row in result.rows}
