"""Test-only: a briefly trained tiny EyecareGPT, its phantom data and its exported bundle, built once
per pytest session and shared by the runtime tests (test_pipeline, test_screen, test_robustness,
test_vision).

Why trained: a random tiny model repeats one word, and near-tied logits make greedy parity a
coin toss; and parity of a model that answers at chance says nothing (issue 13). So the fixture
follows the demo's recipe, shrunk: `vision` (tower + per-label heads on the phantom's image labels,
PCA patch init) teaches the tower to see (modality is read at 100% after it), then `sft` on closed
QA (answered "B. Left eye (OS)": the letter, then its option), reports and open answers gives long,
image-dependent text and letters that depend on the image. test_pipeline checks the closed
letters: reference accuracy above chance on the question types the tower learned, FP32 + F32 the same option on >= 98%,
INT8 + Q4_K_M within 2 points. Why small: the phantom images are downscaled to 160 px and the
model has 2 LLM / 2 vision layers with the `minimal` token budget, so training takes well under
a minute on two busy cores.

Everything lands in `<pytest basetemp>/runtime-assets`; a `done` marker makes the second caller
(another test module of the same session) reuse it.
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

import cv2

PHANTOM_IMAGES = 40
PHANTOM_SEED = 7
IMAGE_SIDE = 160
VISION_STEPS = 60
TRAIN_STEPS = 160
TRAIN_TASKS = ["closed", "report", "open"]
VISION = ("fp32", "int8", "int8_u8s8")
LLM = ("f32", "q4_k_m")
# Settings every test pipeline uses: one thread each (two busy cores: llama.cpp's spinning
# worker threads slow down by 10-100x when they share cores with other processes).
FAST = {"n_threads": 1, "vision_threads": 1}


@dataclass(frozen=True)
class RuntimeAssets:
    root: Path

    @property
    def phantom(self) -> Path:
        return self.root / "phantom"

    @property
    def bench(self) -> Path:
        return self.phantom / "bench.jsonl"

    @property
    def images(self) -> list[Path]:
        return sorted((self.phantom / "images").iterdir())

    @property
    def checkpoint(self) -> Path:
        return self.root / "sft"

    @property
    def bundle(self) -> Path:
        return self.root / "bundle"

    def bench_records(self) -> list[dict]:
        return [json.loads(line) for line in self.bench.read_text().splitlines() if line.strip()]


def _downscale_images(folder: Path, side: int) -> None:
    """Re-encode every phantom image at most `side` px on its long side (same format)."""
    for f in sorted(folder.iterdir()):
        img = cv2.imread(str(f), cv2.IMREAD_COLOR)
        scale = side / max(img.shape[:2])
        if scale < 1:
            size = (max(1, round(img.shape[1] * scale)), max(1, round(img.shape[0] * scale)))
            img = cv2.resize(img, size, interpolation=cv2.INTER_AREA)
        ok, buf = cv2.imencode(f.suffix, img)
        assert ok, f
        f.write_bytes(buf.tobytes())


def build_runtime_assets(base: Path) -> RuntimeAssets:
    """Phantom data -> tiny checkpoint -> SFT -> bundle (FP32/INT8 ONNX, F32/Q4_K_M GGUF)."""
    assets = RuntimeAssets(base)
    if (base / "done").exists():
        return assets
    if base.exists():
        shutil.rmtree(base)
    base.mkdir(parents=True)

    import torch
    from eyecare_edge.export.exporter import ExportOptions, export_bundle
    from eyecare_edge.phantom import make_phantom_dataset
    from eyecare_edge.training.checkpoint import init_checkpoint
    from eyecare_edge.training.train import run_training
    from eyecare_edge.training.train_options import TrainOptions

    make_phantom_dataset(assets.phantom, PHANTOM_IMAGES, PHANTOM_SEED, bench_fraction=0.25, multi_turn=True)
    _downscale_images(assets.phantom / "images", IMAGE_SIDE)
    init = base / "init"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        init_checkpoint("tiny", init, llm_layers=2, vision_layers=2)
        run_training(
            TrainOptions(
                init=str(init),
                data=str(assets.phantom / "train_labels.jsonl"),
                out=str(base / "vision"),
                stage="vision",
                max_steps=VISION_STEPS,
                batch_size=16,
                lr=2e-3,
                patch_init=True,
                head_pooling="tiles",  # as the demo's recipe, which this shrinks (two tiles an image)
                logging_steps=VISION_STEPS,
                budget="minimal",
            ),
            progress=False,
        )
        run_training(
            TrainOptions(
                init=str(base / "vision"),
                data=str(assets.phantom / "train.json"),
                out=str(assets.checkpoint),
                stage="sft",
                max_steps=TRAIN_STEPS,
                batch_size=4,
                lr=3e-3,
                connector_init=True,
                logging_steps=TRAIN_STEPS,
                save_steps=10_000,
                warmup=0.1,
                budget="minimal",
                tasks=TRAIN_TASKS,
            ),
            progress=False,
        )
        export_bundle(
            assets.checkpoint,
            assets.bundle,
            ExportOptions(vision=VISION, llm=LLM, validate=False, threads=1),
        )
    finally:
        torch.set_num_threads(threads)
    (base / "done").write_text("ok\n")
    return assets


def runtime_assets(tmp_path_factory) -> RuntimeAssets:
    """The session's assets (built on first use). EYECARE_TEST_RUNTIME_ASSETS=<dir> keeps them
    across sessions (delete the directory after changing training, export or this file)."""
    keep = os.environ.get("EYECARE_TEST_RUNTIME_ASSETS")
    base = Path(keep) if keep else tmp_path_factory.getbasetemp() / "runtime-assets"
    return build_runtime_assets(base)


def copy_bundle(src: Path, dst: Path) -> Path:
    """A private copy of a bundle (for tests that corrupt or edit one)."""
    shutil.copytree(src, dst)
    return dst
