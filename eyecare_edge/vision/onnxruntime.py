"""ONNX Runtime (CPU or CUDA) and OpenVINO running the bundle's vision ONNX.

`onnxruntime` and `openvino` are imported when an encoder is opened, not with this module, so
`import eyecare_edge.vision` stays cheap on a machine that has only one of them.
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from eyecare_edge.heap import release_free_heap
from eyecare_edge.vision.encoder import INPUT_NAME, OUTPUT_NAME, VisionError, default_threads, validate_tiles

ORT_CPU_INSTALL = "pip install 'eyecare-edge[cpu]'"
ORT_GPU_INSTALL = "pip uninstall -y onnxruntime && pip install 'eyecare-edge[gpu]'"


class OnnxRuntimeVision:
    """ONNX Runtime session on CPU or CUDA. `session.run` is thread-safe, so encode is too."""

    def __init__(
        self,
        onnx_path: Path,
        *,
        precision: str,
        device: str = "cpu",
        threads: int | None = None,
        device_id: int = 0,
    ) -> None:
        try:
            import onnxruntime as ort
        except ImportError as e:
            raise VisionError(f"onnxruntime is not installed: {ORT_CPU_INSTALL} (or [gpu])") from e
        opts = ort.SessionOptions()
        opts.intra_op_num_threads = threads or default_threads()
        opts.inter_op_num_threads = 1
        opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        opts.log_severity_level = 3
        if device == "cpu":
            # No memory pattern: with it ONNX Runtime plans one block for the whole run's
            # activations; without it a tile's run peaked 26-29 MB lower (steady-state peak RSS of
            # an ask, 2+2 layers of eyecare-3.8b, 25% pool and every token), at the same speed
            # (int8_u8s8, 6 SigLIP layers: 331-338 ms a tile either way, fastest of 12).
            opts.enable_mem_pattern = False
        if device == "cuda":
            if "CUDAExecutionProvider" not in ort.get_available_providers():
                raise VisionError(f"ONNX Runtime has no CUDA provider here: {ORT_GPU_INSTALL}")
            # device_id: the GPU the caller asked for (ONNX Runtime otherwise always takes GPU 0).
            providers = [("CUDAExecutionProvider", {"device_id": int(device_id)}), "CPUExecutionProvider"]
        else:
            providers = ["CPUExecutionProvider"]
        try:
            self.session = ort.InferenceSession(str(onnx_path), opts, providers=providers)
        except Exception as e:  # onnxruntime raises its own exception types
            raise VisionError(f"{onnx_path}: ONNX Runtime cannot load it ({e})") from e
        finally:
            release_free_heap()  # the parsed ONNX's buffers: 0.4-0.6x the file (eyecare_edge.heap)
        if device == "cuda" and "CUDAExecutionProvider" not in self.session.get_providers():
            raise VisionError("ONNX Runtime could not initialise CUDA (driver/CUDA/cuDNN mismatch?)")
        names_in = [i.name for i in self.session.get_inputs()]
        names_out = [o.name for o in self.session.get_outputs()]
        if INPUT_NAME not in names_in or OUTPUT_NAME not in names_out:
            raise VisionError(
                f"{onnx_path}: expected input {INPUT_NAME!r} and output {OUTPUT_NAME!r}, "
                f"found inputs {names_in} and outputs {names_out}"
            )
        out = next(o for o in self.session.get_outputs() if o.name == OUTPUT_NAME)
        self.width = out.shape[-1] if isinstance(out.shape[-1], int) else None
        self.name = f"onnxruntime-{device}"
        self.device = device
        self.device_id = int(device_id) if device == "cuda" else None
        self.precision = precision
        self.threads = opts.intra_op_num_threads
        # RunOptions of a call's last tile: shrink the CPU arena back to its initial chunk.
        self._release = ort.RunOptions()
        self._release.add_run_config_entry("memory.enable_memory_arena_shrinkage", "cpu:0")

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        tiles = validate_tiles(tiles)
        try:
            return self._encode(tiles)
        except Exception as e:  # onnxruntime's own error types (Fail, RuntimeException, OOM)
            raise VisionError(f"{self.name} {self.precision}: ONNX Runtime failed to run ({e})") from e

    def _encode(self, tiles: np.ndarray) -> np.ndarray:
        if self.device == "cpu":
            # One tile per run: a 7-tile batch grows ONNX Runtime's CPU arena by ~760 MB per call
            # for no speed gain (measured with SigLIP-so400m, eyecare_edge.perf). Each tile is
            # written into one output array (no list + concatenate copy), and the last run of a
            # call hands the arena back, so the LLM's prefill that follows does not sit on top of it.
            n = len(tiles)  # >= 1 (validate_tiles)
            release_free_heap()  # what decoding and tiling freed, before the activations (heap.py)
            run = [self._release if i == n - 1 else None for i in range(n)]
            first = self.session.run([OUTPUT_NAME], {INPUT_NAME: tiles[:1]}, run[0])[0]
            out = np.empty((n, *first.shape[1:]), dtype=np.float32)
            out[0] = first[0]
            for i in range(1, n):
                out[i] = self.session.run([OUTPUT_NAME], {INPUT_NAME: tiles[i : i + 1]}, run[i])[0][0]
            return out
        out = self.session.run([OUTPUT_NAME], {INPUT_NAME: tiles})[0]
        return np.asarray(out, dtype=np.float32)


class OpenVinoVision:
    """OpenVINO reading the same ONNX (optional extra `openvino`); BF16/INT8 kernels where the CPU
    has them. Asked for by name only (`backend="openvino"`); `auto` does not try it."""

    def __init__(self, onnx_path: Path, *, precision: str, threads: int | None = None) -> None:
        try:
            import openvino as ov
        except ImportError as e:
            raise VisionError("OpenVINO is not installed: pip install 'eyecare-edge[openvino]'") from e
        core = ov.Core()
        config = {"INFERENCE_NUM_THREADS": threads or default_threads(), "PERFORMANCE_HINT": "LATENCY"}
        try:
            self.model = core.compile_model(str(onnx_path), "CPU", config)
        except Exception as e:
            raise VisionError(f"{onnx_path}: OpenVINO cannot compile it ({e})") from e
        self._lock = threading.Lock()  # one infer request: serialise its use
        self.request = self.model.create_infer_request()
        self.name = "openvino-cpu"
        self.precision = precision
        self.width = None

    def encode(self, tiles: np.ndarray) -> np.ndarray:
        with self._lock:
            result = self.request.infer({INPUT_NAME: validate_tiles(tiles)})
            return np.array(result[self.model.output(OUTPUT_NAME)], dtype=np.float32)
