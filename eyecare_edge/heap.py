"""Give memory the C heap has freed back to the operating system (glibc's `malloc_trim`).

Why: glibc keeps freed heap memory mapped for reuse, and it still counts in the process's RSS.
Two places in a run leave a lot of it behind that nothing reuses soon after:
- ONNX Runtime parses the whole vision ONNX into heap buffers while it builds a session and frees
  them once the weights are copied out. Measured on the 2-core EPYC, int8_u8s8 vision at eyecare-3.8b
  width (RSS before and after the session build, two runs): a session held 98 MB for a 55 MB file
  (2 SigLIP layers) and 175-180 MB for 116 MB (6 layers), 1.25-1.3x the file bytes per added
  layer; trimmed after the build, 66 and 129 MB, 1.03x per added layer (the freed buffers were
  0.4-0.6x the file).
- Decoding a photo and laying out its tiles frees tens of MB just before the vision encoder's
  activations and the prefill's scratch are allocated (large blocks, which glibc maps afresh
  rather than carving from that freed memory), so the request's peak sat on top of it: trimming
  right before the vision run lowered the steady-state peak RSS of a 25%-budget ask from 861 to
  780 MB (2 LLM + 2 vision layers), TTFT unchanged (2.12 vs 2.17 s); the trim took under 4 ms.
A process-wide `MALLOC_TRIM_THRESHOLD_=0` reached the same peak but made every tile's activations
fault in afresh: vision took 1.47 s instead of 1.18 s. So the trim is called at these two points only.

A no-op where the C library has no `malloc_trim` (musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import functools
import sys


@functools.cache
def _malloc_trim():
    """glibc's malloc_trim, or None where the C library has none (not Linux, or musl)."""
    if not sys.platform.startswith("linux"):
        return None
    try:
        trim = ctypes.CDLL(None).malloc_trim  # the process's own symbols: libc is loaded
    except (OSError, AttributeError, TypeError):
        return None
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    return trim


def release_free_heap() -> bool:
    """Return the C heap's free pages to the OS; True when something was released."""
    trim = _malloc_trim()
    return bool(trim(0)) if trim is not None else False
