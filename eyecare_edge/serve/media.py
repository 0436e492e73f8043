"""Images of a request: `data:` URIs, or local files under one allowed directory.

Why local paths at all: a fundus camera's software usually already wrote the photo to disk on the
same workstation; sending a path avoids base64-encoding 10-20 MB. Why only under
`--allowed-media-dir`: a server that opens any path it is sent turns every API key holder (or,
without a key, every local process) into a reader of the whole disk. The path is resolved
(symlinks followed) and must still lie inside the resolved allowed directory; `..` components
are refused outright, so neither a `../` nor a symlink can lead out.

Remote `http(s)://` URLs are refused: the server makes no outbound connections.

Decoding reuses `pipeline.decode_source` (format from the bytes, pixel limit checked on the
header, so a 30000x30000 header bomb is refused before any pixel is allocated).
"""

from __future__ import annotations

import base64
import binascii
import os
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

from eyecare_edge.images import DEFAULT_MAX_PIXELS, ImageError
from eyecare_edge.pipeline import ImageInput, decode_source
from eyecare_edge.serve.errors import ApiError


@dataclass(frozen=True)
class MediaPolicy:
    """allowed_dir: the one directory local paths may point into (None: no local paths).
    max_pixels: decoding limit per image (width x height x frames, checked on the header)."""

    allowed_dir: Path | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS

    def __post_init__(self) -> None:
        if self.allowed_dir is not None:
            object.__setattr__(self, "allowed_dir", Path(os.path.realpath(self.allowed_dir)))


def _bad(message: str) -> ApiError:
    return ApiError(400, message, param="messages[0].content")


def data_uri_bytes(url: str) -> bytes:
    """The bytes of a base64 `data:` URI (any media type: the format is sniffed from the bytes)."""
    head, sep, payload = url.partition(",")
    if not sep:
        raise _bad("a data: URI needs a ',' before its payload")
    params = head[len("data:") :].split(";")
    if "base64" not in params[1:]:
        raise _bad("image data: URIs must be base64 (data:image/jpeg;base64,...)")
    try:
        data = base64.b64decode("".join(payload.split()), validate=True)  # line-wrapped base64 is fine
    except (binascii.Error, ValueError) as e:
        raise _bad(f"the data: URI's base64 payload does not decode ({e})") from None
    if not data:
        raise _bad("the data: URI is empty")
    return data


def resolve_local(url: str, policy: MediaPolicy) -> Path:
    """The real path of a local image reference (`file://` URL or a path; relative paths are
    taken inside the allowed directory), refused unless it stays inside `policy.allowed_dir`."""
    if policy.allowed_dir is None:
        raise ApiError(
            403,
            "local image paths are disabled on this server (start it with --allowed-media-dir DIR); "
            "send the image as a data: URI",
            "permission_error",
            param="messages[0].content",
        )
    raw = urllib.parse.unquote(urllib.parse.urlparse(url).path) if url.startswith("file://") else url
    if "\x00" in raw:
        raise _bad("the image path contains a NUL byte")
    path = Path(raw)
    if ".." in path.parts:
        raise ApiError(403, f"image path {raw!r} contains '..'; not allowed", "permission_error")
    full = path if path.is_absolute() else policy.allowed_dir / path
    real = Path(os.path.realpath(full))
    if not real.is_relative_to(policy.allowed_dir):
        raise ApiError(403, f"image path {raw!r} is outside the allowed media directory", "permission_error")
    if not real.is_file():
        raise _bad(f"image path {raw!r} is not a file under the allowed media directory")
    return real


def load_image_url(url: str, policy: MediaPolicy) -> ImageInput:
    """One decoded single-frame image from an `image_url`; ApiError (400/403) otherwise."""
    if url.startswith("data:"):
        data, name = data_uri_bytes(url), "data: URI"
    elif url.startswith(("http://", "https://")):
        raise _bad(
            "remote image URLs are not fetched; send a data: URI (or a local path, see --allowed-media-dir)"
        )
    else:
        real = resolve_local(url, policy)
        try:
            data = real.read_bytes()
        except OSError as e:
            raise _bad(f"cannot read image {url!r} ({e.strerror or e})") from None
        name = real.name
    try:
        frames = decode_source(data, max_pixels=policy.max_pixels)
    except ImageError as e:
        reason = str(e).replace("<bytes>", name)
        raise _bad(f"the image is not usable: {reason}") from None
    if len(frames) != 1:
        raise _bad(f"the image ({name}) has {len(frames)} frames; send one frame per image")
    return frames[0]


def load_images(urls: list[str], policy: MediaPolicy) -> list[ImageInput]:
    return [load_image_url(u, policy) for u in urls]


__all__ = ["MediaPolicy", "data_uri_bytes", "load_image_url", "load_images", "resolve_local"]
