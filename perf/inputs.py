"""What a perf run measures on: the GPU it may use, the image (an HRF photograph or a phantom of
its size), the token budgets to time, and the weight bytes of the bundle's GGUFs."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from eyecare_edge import costs

PHANTOM_SIZE = (3504, 2336)  # (width, height) of the HRF fundus photographs


def gpu_status() -> tuple[bool, str]:
    """(present, why not): an NVIDIA GPU that ONNX Runtime CUDA or TensorRT could use."""
    if not any(Path(p).exists() for p in ("/dev/nvidia0", "/dev/nvidiactl", "/dev/nvgpu")):
        return False, "no NVIDIA GPU device on this machine"
    try:
        import onnxruntime as ort

        if "CUDAExecutionProvider" in ort.get_available_providers():
            return True, ""
    except ImportError:
        pass
    try:
        import tensorrt  # noqa: F401

        return True, ""
    except ImportError:
        return False, "a GPU device exists but neither onnxruntime-gpu nor tensorrt is installed"


def shared_hrf_dirs() -> list[Path]:
    """Where the real HRF fundus photographs live next to a checkout (../shared/data/hrf)."""
    checkout = Path(__file__).resolve().parents[1]  # perf/ is a top-level folder of the checkout
    return [Path.cwd().parent / "shared" / "data" / "hrf", checkout.parent / "shared" / "data" / "hrf"]


def default_image(workdir: Path, run_child: Callable[[str, dict], object], seed: int = 0) -> tuple[Path, str]:
    """(path, source): an HRF photograph if present, else a cached phantom of the same size."""
    for d in shared_hrf_dirs():
        images = sorted(
            p for p in (d / "images").glob("*") if p.suffix.lower() in (".jpg", ".jpeg", ".png", ".tif")
        )
        if images:
            return images[0], "hrf"
    out = Path(workdir) / f"phantom_{PHANTOM_SIZE[0]}x{PHANTOM_SIZE[1]}_s{seed}.png"
    if not out.exists():
        run_child("eyecare_edge.perf.inputs:phantom_child", {"out": str(out), "seed": seed})
    return out, "phantom"


def phantom_child(out: str, seed: int) -> str:
    """Write a phantom fundus photograph of the HRF size (child process: training room)."""
    import cv2
    from eyecare_edge.phantom import make_phantom_fundus

    rgb = make_phantom_fundus(PHANTOM_SIZE, seed)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    if not cv2.imwrite(out, cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR)):
        raise OSError(f"{out}: could not write the phantom image")
    return out


def one_tile_image(image: Path, workdir: Path, size: int) -> Path:
    """A size x size centre crop of `image` (resized when smaller), for the one-tile GPU figure."""
    import cv2

    from eyecare_edge.images import load_image

    out = Path(workdir) / f"one_tile_{size}.png"
    rgb = load_image(image).rgb
    h, w = rgb.shape[:2]
    side = min(h, w)
    crop = rgb[(h - side) // 2 : (h - side) // 2 + side, (w - side) // 2 : (w - side) // 2 + side]
    crop = cv2.resize(crop, (size, size), interpolation=cv2.INTER_AREA)
    cv2.imwrite(str(out), cv2.cvtColor(crop, cv2.COLOR_RGB2BGR))
    return out


def budget_list(tiles: tuple[int, ...], fast: bool) -> list[dict]:
    """Budgets to time: N patch tiles at most (the bundle's compression), plus the named `fast`."""
    from eyecare_edge.preprocess import BUDGETS

    rows = [{"name": f"N={n}", "max_tiles": n, "anyres_max": None} for n in tiles]
    if fast:
        b = BUDGETS["fast"]
        rows.append({"name": "fast", "max_tiles": b.get("max_tiles"), "anyres_max": b.get("anyres_max")})
    return rows


def same_budget(budget: dict, preprocess) -> bool:
    """Whether a budget leaves the bundle's preprocessing as it is (then the default run is it)."""
    if budget.get("anyres_max") not in (None, preprocess.anyres_max):
        return False
    mt = budget.get("max_tiles")
    return mt is None or set(preprocess.replace(max_tiles=mt).allowed_pinpoints()) == set(
        preprocess.allowed_pinpoints()
    )


def gguf_bytes(bundle: Path, manifest, llm_shape: costs.LLMShape) -> dict[str, dict]:
    """Per-layer and fixed weight bytes of every GGUF in the bundle (tensor tables; without the
    `gguf` package, each file's size is split in proportion to the parameter counts)."""
    out = {}
    for entry in manifest.files:
        if entry.role != "llm" or entry.format != "gguf":
            continue
        path = Path(bundle) / entry.path
        try:
            wb = costs.gguf_weight_bytes(path, llm_shape.layers, llm_shape.hidden)
        except ImportError:
            share = entry.size / llm_shape.params
            head = llm_shape.embed_params if llm_shape.tied_embeddings else llm_shape.head_params
            wb = costs.WeightBytes(
                per_layer=llm_shape.layer_params * share,
                fixed_per_token=head * share,
                resident_fixed=(llm_shape.params - llm_shape.layers * llm_shape.layer_params) * share,
            )
        out[entry.precision] = asdict(wb)
    return out
