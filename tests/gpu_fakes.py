"""Test-only fakes for hardware this machine lacks: a CUDA driver with pretend GPUs and a
`tensorrt` module whose builder fails in chosen ways. Only the hardware is faked: the code under
test (`vision`, its `tensorrt` and `engines`, `doctor`) runs for real on top of them."""

from __future__ import annotations

import types

from eyecare_edge.vision import tensorrt as trt_rt

# --- fakes for the hardware --------------------------------------------------------------------


class FakeDriver:
    """The CUDA driver calls `eyecare_edge.vision.tensorrt` makes, on a pretend machine with `n` GPUs;
    records the context made current (per device) so tests can see which GPU work ran on."""

    log: list[tuple] = []
    n = 2

    def __init__(self) -> None:
        self.lib = None

    def call(self, name, *args):
        FakeDriver.log.append((name, *[getattr(a, "value", a) for a in args]))

    def device(self, ordinal=0):
        if not 0 <= ordinal < self.n:
            raise trt_rt.CudaError(f"cuDeviceGet failed: invalid device ordinal {ordinal}")
        return types.SimpleNamespace(value=ordinal)

    def count(self):
        return self.n

    def name(self, ordinal=0):
        return f"Fake GPU {ordinal}"

    def compute_capability(self, ordinal=0):
        return "8.9"

    def driver_version(self):
        return "12.4"


def current_device() -> int | None:
    """The device whose primary context was retained last and not released yet."""
    held: list[int] = []
    for entry in FakeDriver.log:
        if entry[0] == "cuDevicePrimaryCtxRetain":
            held.append(entry[2])
        elif entry[0] == "cuDevicePrimaryCtxRelease_v2" and held:
            held.pop()
    return held[-1] if held else None


def fake_tensorrt(version="10.3.0", *, builder="ok", build="ok", seen=None):
    """A `tensorrt` module whose builder fails the way `builder`/`build` say:
    builder: ok | typeerror | null; build: ok | memory | none."""
    seen = seen if seen is not None else {}
    trt = types.ModuleType("tensorrt")
    trt.__version__ = version

    class Logger:
        WARNING, VERBOSE = 1, 0

        def __init__(self, level):
            pass

    class _Cache:
        def serialize(self):
            return b"cache"

    class _Config:
        def set_memory_pool_limit(self, *a):
            pass

        def create_timing_cache(self, blob):
            return _Cache()

        def set_timing_cache(self, cache, ignore_mismatch):
            return True

        def get_timing_cache(self):
            return _Cache()

        def add_optimization_profile(self, p):
            pass

    class _Input:
        name, shape = "pixel_values", (-1, 3, 112, 112)

    class _Network:
        num_inputs = 1

        def get_input(self, i):
            return _Input()

    class Builder:
        def __new__(cls, logger):
            seen["builder_device"] = current_device()
            if builder == "typeerror":
                raise TypeError("pybind11::init(): factory function returned nullptr")
            if builder == "null":
                return None
            return super().__new__(cls)

        def __init__(self, logger):
            pass

        def create_network(self, flags):
            return _Network()

        def create_builder_config(self):
            return _Config()

        def create_optimization_profile(self):
            return types.SimpleNamespace(set_shape=lambda *a: None)

        def build_serialized_network(self, network, config):
            if build == "memory":
                raise MemoryError("std::bad_alloc: CUDA out of memory")
            return None if build == "none" else b"fake engine"

    class OnnxParser:
        def __init__(self, network, logger):
            pass

        def parse_from_file(self, path):
            return True

    trt.Logger, trt.Builder, trt.OnnxParser = Logger, Builder, OnnxParser
    trt.NetworkDefinitionCreationFlag = types.SimpleNamespace(STRONGLY_TYPED=1)
    trt.MemoryPoolType = types.SimpleNamespace(WORKSPACE=0)
    return trt
