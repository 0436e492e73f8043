"""The images a question is about: what the pipeline accepts (`ImageSource`), one decoded frame
with the digest that keys the KV prefix cache (`ImageInput`), and `decode_source` between them."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from eyecare_edge.bundle import sha256_file
from eyecare_edge.images import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageError,
    decode_image_bytes,
    load_images,
)

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | DecodedImage


@dataclass(frozen=True, eq=False)
class ImageInput:
    """One decoded image as the pipeline uses it.

    sha256: of the encoded file (or bytes, or raw pixels for arrays); key: what identifies the
    pixels for the KV prefix cache (sha256 plus the frame of a multi-frame file).
    """

    rgb: np.ndarray
    sha256: str
    name: str
    frame: int | None = None

    @property
    def key(self) -> str:
        return self.sha256 if self.frame is None else f"{self.sha256}:{self.frame}"


def _file_sha256(path: str | os.PathLike[str]) -> str:
    try:
        return sha256_file(path)
    except OSError as e:
        raise ImageError(os.fspath(path), f"cannot read the file ({e.strerror or e})") from None


def _pixels_sha256(rgb: np.ndarray) -> str:
    h = hashlib.sha256(f"{rgb.shape}".encode())
    h.update(np.ascontiguousarray(rgb).data)
    return h.hexdigest()


def _as_rgb(array: np.ndarray, name: str) -> np.ndarray:
    """An (H, W, 3) or (H, W) uint8 array as C-contiguous RGB; anything else is an ImageError."""
    if array.dtype != np.uint8 or array.ndim not in (2, 3) or (array.ndim == 3 and array.shape[2] != 3):
        raise ImageError(
            name, f"expected an RGB (H, W, 3) or gray (H, W) uint8 array, got {array.dtype} {array.shape}"
        )
    if array.ndim == 2:
        array = np.repeat(array[:, :, None], 3, axis=2)
    if min(array.shape[:2]) < 1:
        raise ImageError(name, f"empty image {array.shape}")
    return np.ascontiguousarray(array)


def decode_source(
    source: ImageSource | ImageInput, *, max_pixels: int = DEFAULT_MAX_PIXELS
) -> list[ImageInput]:
    """Decode one image source to its frames (a multi-frame DICOM gives several).

    Paths are read with `images.load_images` (format from the file's bytes, pixel limit checked
    on the header); bytes with `decode_image_bytes`; arrays must be RGB or gray uint8.
    """
    if isinstance(source, ImageInput):
        return [source]
    if isinstance(source, DecodedImage):
        return [ImageInput(source.rgb, _pixels_sha256(source.rgb), source.path, source.frame)]
    if isinstance(source, np.ndarray):
        rgb = _as_rgb(source, "<array>")
        return [ImageInput(rgb, _pixels_sha256(rgb), "<array>")]
    if isinstance(source, (bytes, bytearray, memoryview)):
        digest = hashlib.sha256(source).hexdigest()
        frames = decode_image_bytes(source, "<bytes>", max_pixels=max_pixels)
        return [ImageInput(f.rgb, digest, f.path, f.frame) for f in frames]
    if isinstance(source, (str, os.PathLike)):
        digest = _file_sha256(source)
        frames = load_images(source, max_pixels=max_pixels)
        return [ImageInput(f.rgb, digest, f.path, f.frame) for f in frames]
    raise TypeError(f"cannot read an image from a {type(source).__name__}")


def decode_inputs(
    images: ImageSource | ImageInput | Sequence[ImageSource | ImageInput],
    *,
    max_pixels: int = DEFAULT_MAX_PIXELS,
) -> list[ImageInput]:
    """The images of one question, one frame each: a multi-frame source is an ImageError here
    (`Pipeline.decode` returns its frames, `screen` asks about each)."""
    if isinstance(
        images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, DecodedImage, ImageInput)
    ):
        images = [images]
    out: list[ImageInput] = []
    for src in images:
        frames = decode_source(src, max_pixels=max_pixels)
        if len(frames) > 1:
            raise ImageError(
                frames[0].name,
                f"has {len(frames)} frames; ask about one frame at a time "
                "(Pipeline.decode(path) returns them) or use `eyecare-edge screen`",
            )
        out.extend(frames)
    return out
