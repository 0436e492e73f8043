"""`Pipeline`: a bundle loaded for answering questions about eye images, without torch.

    from eyecare_edge.pipeline import Pipeline

    pipe = Pipeline.load("bundles/eyecare-3.8b")            # verifies the files it loads
    answer = pipe.ask("fundus.jpg", "Is there diabetic retinopathy?")
    print(answer.text, answer.timings)

One `ask` runs: decode the image(s) (`images`) -> anyres tiles (`preprocess`) -> tile embeddings
(`vision`: TensorRT / ONNX Runtime) -> visual token sequence (`layout`) -> the chat prompt rendered
with the bundle's template, split at the image placeholder, text pieces tokenized by the GGUF and
each image's visual sequence injected as embedding rows (`llm`, llama.cpp) -> greedy or sampled
generation, streamed through `stream` as it is produced.

Several questions about the same image(s) pay for the image once. The image prefix of the
prompt (everything up to and including the last image's embeddings) stays in llama.cpp's KV
cache after a question; the next question with the same prefix (same image contents, same
preprocessing, same text before the last image) rewinds the cache to the end of that prefix and
evaluates only its own text. The prefix is always evaluated as one `eval_prompt` call and the
question text as the next one, whether cached or fresh, so both paths feed llama.cpp the same
batches: answers are identical to a fresh evaluation (tested), and `Answer.cached_prefix` says
which path ran.

Only the last prefix lives in the KV cache. With `pipe.prefix_cache = PrefixCache(max_bytes)`
(`prefix_cache.py`; one cache may serve several pipelines of the same bundle and options) the KV
state of each fresh image prefix is also saved, and an image asked about again after others
restores its prefix instead of re-running vision and prefill (answers identical, tested).

Thread safety: a `Pipeline` serialises its calls with one lock (decoding files runs outside it),
so one instance may be shared by threads of a server; requests then run one at a time. For
parallel answers load one `Pipeline` per worker (each has its own llama.cpp context). The
`stream` callback runs while the lock is held and must not call back into the same pipeline.

Verification: `Pipeline.load` checks the size and sha256 of every file it loads against the
manifest (only those: not the other precisions in the bundle). Digests are remembered for the
process by (path, size, mtime), so loading again is instant. `verify=False` skips the check, for
integrators that ran `eyecare-edge info BUNDLE --verify` at install time and load on every start.
"""

from __future__ import annotations

import hashlib
import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path

import numpy as np

from eyecare_edge.bundle import BundleError, FileEntry, Manifest, read_manifest, require_valid
from eyecare_edge.images import (
    DEFAULT_MAX_PIXELS,
    DecodedImage,
    ImageError,
    crop_fundus_fov,
    decode_image_bytes,
    load_images,
)
from eyecare_edge.llm import LlamaCppLM, LLMError, LLMOptions
from eyecare_edge.prefix_cache import PrefixCache, PrefixState
from eyecare_edge.preprocess import PreprocessConfig, TilePlan, preprocess_images
from eyecare_edge.prompts import (
    IMAGE_PLACEHOLDER,
    REPORT_PROMPT,
    Message,
    get_template,
    render,
    with_image_placeholders,
)
from eyecare_edge.reduce import TokenBudget, max_kept_tokens, parse_visual_tokens, reduce_image
from eyecare_edge.vision import (
    VisionChoice,
    VisionError,
    load_newline,
    newline_entry,
    open_vision,
)

# `llm="auto"`: the first of these the bundle holds (and export did not fail): Q4_K_M is the
# accuracy/speed point for CPUs and Jetsons (ANCHORS: ~1 benchmark point), then bigger files.
LLM_AUTO_ORDER = ("q4_k_m", "q5_k_m", "q6_k", "q8_0", "q4_0", "f16", "bf16", "f32")
# Positions kept free for the question and the answer when `n_ctx` is derived from the plan.
TEXT_ROOM = 1024
# Phi-3.5's LongRoPE switches factors at 4096 in HF but by allocated context in llama.cpp.
PHI3_MAX_CTX = 4096
# Options that do not change an image prefix's KV state (so pipelines differing only in
# these share prefix-cache entries).
_NOT_IN_PREFIX_KEY = frozenset({"verify", "build_engine", "seed"})

ImageSource = str | os.PathLike | bytes | bytearray | memoryview | np.ndarray | DecodedImage


@dataclass
class PipelineOptions:
    """How `Pipeline.load` runs a bundle. Every field is also a keyword of `Pipeline.load`.

    vision: vision backend: auto | tensorrt | ort-cuda | ort-cpu | openvino.
    vision_precision: auto | fp32 | fp16 | int8 | int8_u8s8 (auto: fp16 on GPUs, the fastest
        validated INT8 variant on CPUs, else fp32).
    llm: GGUF precision in the bundle (q4_k_m, q8_0, f16, f32, ...) or auto (see LLM_AUTO_ORDER).
    n_ctx: context positions; None = the largest image plan + 1024, capped at the model's trained
        context (and at 4096 for Phi-3.5, see ANCHORS.md).
    n_threads / vision_threads: CPU threads of llama.cpp and of the vision backend (None: the
        physical cores). n_gpu_layers: LLM layers offloaded to a GPU build of llama.cpp (None: all
        when the build can offload, else 0; -1 all; 0 CPU only).
    kv_type, flash_attn, n_batch, repack: llama.cpp settings (see `LLMOptions`; flash_attn None =
        auto: llama.cpp's choice on a GPU, off on the CPU).
    fundus_crop: crop colour fundus photos to their circular field of view before tiling.
    max_tiles: token budget: at most this many patch tiles per image (None: the bundle's).
    visual_tokens: visual tokens the LLM reads per image: a count (800), a fraction of the
        image's full sequence (0.25, or "25%"), "all"; None: the bundle's budget (`export
        --budget`), else all. token_reduction: how they are chosen, pool | diverse (None: the
        bundle's, else pool). See `eyecare_edge.reduce`. n_ctx follows the budget.
    max_pixels: decoding limit (width x height x frames, checked on the header).
    verify: check the sha256 of each loaded file against the manifest.
    device: GPU ordinal for TensorRT / ONNX Runtime CUDA. build_engine: allow a first-use
        TensorRT engine build into the bundle. seed: sampling seed when temperature > 0.
    """

    vision: str = "auto"
    vision_precision: str = "auto"
    llm: str = "auto"
    n_ctx: int | None = None
    n_threads: int | None = None
    vision_threads: int | None = None
    n_gpu_layers: int | None = None
    kv_type: str = "f16"
    flash_attn: bool | None = None
    n_batch: int = 512
    repack: bool = False
    fundus_crop: bool = False
    max_tiles: int | None = None
    visual_tokens: int | float | str | None = None
    token_reduction: str | None = None
    max_pixels: int = DEFAULT_MAX_PIXELS
    verify: bool = True
    device: int = 0
    build_engine: bool = True
    seed: int = 0


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


@dataclass
class Answer:
    """One answer. timings are milliseconds: decode_ms (reading and decoding the images),
    preprocess_ms (FOV crop, tiling), vision_ms (tile embeddings + layout; 0 when the image
    prefix was reused; layout_ms of it: laying out and reducing the visual tokens),
    prefill_ms (image prefix, when not reused, plus the question text), generate_ms (sampling
    the answer after prefill), first_token_ms (call start to the first token), total_ms.
    cached_prefix: whether the image prefix came from the KV cache.
    """

    text: str
    n_image_tokens: int
    n_prompt_tokens: int
    n_generated: int
    stop_reason: str
    cached_prefix: bool
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def tokens_per_s(self) -> float:
        """Decode speed after the first token."""
        ms = self.timings.get("generate_ms", 0.0)
        return 1000.0 * (self.n_generated - 1) / ms if self.n_generated > 1 and ms > 0 else 0.0

    def to_dict(self) -> dict:
        d = asdict(self)
        d["timings"] = {k: round(v, 2) for k, v in self.timings.items()}
        return d


@dataclass
class _Prefix:
    """The image prefix currently in the KV cache."""

    key: tuple
    mark: int
    n_image_tokens: int


def choose_llm(manifest: Manifest, wanted: str) -> FileEntry:
    """The GGUF entry for `wanted` (a precision, or auto)."""
    have = manifest.precisions("llm", "gguf")
    if wanted != "auto":
        entry = manifest.find("llm", format="gguf", precision=wanted)
        if entry is None:
            raise BundleError(f"bundle has no {wanted} GGUF (it has: {', '.join(have) or 'none'})")
        return entry
    ok = [p for p in have if manifest.validation.get(f"llm_{p}", {}).get("passed", True)]
    for p in (*LLM_AUTO_ORDER, *ok):
        if p in ok:
            return manifest.find("llm", format="gguf", precision=p)  # type: ignore[return-value]
    raise BundleError(f"bundle has no usable GGUF (it has: {', '.join(have) or 'none'})")


def max_visual_tokens(config: PreprocessConfig) -> int:
    """An upper bound on one image's visual tokens under `config`: the global view, plus the
    largest allowed canvas's map, capped where anyres_max compression starts (a map is left
    alone up to a side ratio of 1.1, i.e. 1.21 x N tiles' worth of cells), plus row newlines."""
    n = config.tokens_per_side
    most = 0
    for h, w in config.allowed_pinpoints():
        rows, cols = (h // config.tile_size) * n, (w // config.tile_size) * n
        cells = rows * cols
        if config.anyres_max > 0:
            cells = min(cells, int(1.21 * config.anyres_max * n * n) + 1)
        most = max(most, cells + rows)
    return n * n + most


def default_n_ctx(manifest: Manifest, config: PreprocessConfig, budget: TokenBudget | None = None) -> int:
    """Enough positions for the largest image plan (after the token budget) plus TEXT_ROOM
    (multiple of 256), capped at the model's trained context (Phi-3.5: at most 4096). The KV
    cache is n_ctx positions (Phi-3.5 has no GQA: 384 KiB per position in F16), so a budget
    lowers peak memory too."""
    most = max_kept_tokens(max_visual_tokens(config), config, budget)
    want = -(-(most + TEXT_ROOM) // 256) * 256
    cap = int(manifest.model.get("context_length") or manifest.model.get("max_position_embeddings") or 4096)
    if manifest.model.get("llm_arch") == "phi3":
        cap = min(cap, PHI3_MAX_CTX)
    return max(256, min(want, cap))


def token_budget(manifest: Manifest, visual_tokens: object = None, method: str | None = None) -> TokenBudget:
    """The bundle's baked budget (`manifest.budget`) with run-time overrides applied."""
    baked = TokenBudget.from_dict(getattr(manifest, "budget", None) or {})
    k = baked.visual_tokens if visual_tokens is None else parse_visual_tokens(visual_tokens)  # type: ignore[arg-type]
    return TokenBudget(k, method or baked.method)


def _sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: str | os.PathLike[str]) -> str:
    h = hashlib.sha256()
    try:
        with open(path, "rb") as f:
            while block := f.read(1 << 22):
                h.update(block)
    except OSError as e:
        raise ImageError(os.fspath(path), f"cannot read the file ({e.strerror or e})") from None
    return h.hexdigest()


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
        digest = _sha256_bytes(source)
        frames = decode_image_bytes(source, "<bytes>", max_pixels=max_pixels)
        return [ImageInput(f.rgb, digest, f.path, f.frame) for f in frames]
    if isinstance(source, (str, os.PathLike)):
        digest = _sha256_file(source)
        frames = load_images(source, max_pixels=max_pixels)
        return [ImageInput(f.rgb, digest, f.path, f.frame) for f in frames]
    raise TypeError(f"cannot read an image from a {type(source).__name__}")


class Pipeline:
    """A loaded bundle; see the module docstring. Create with `Pipeline.load`."""

    def __init__(
        self,
        bundle: Path,
        manifest: Manifest,
        options: PipelineOptions,
        preprocess: PreprocessConfig,
        vision: VisionChoice,
        lm: LlamaCppLM,
        newline: np.ndarray,
        llm_entry: FileEntry,
        budget: TokenBudget | None = None,
    ) -> None:
        self.bundle = bundle
        self.manifest = manifest
        self.options = options
        self.preprocess = preprocess
        self.vision = vision
        self.lm = lm
        self.newline = newline
        self.llm_entry = llm_entry
        self.budget = budget if budget is not None else TokenBudget()
        self.template = get_template(manifest.prompt.template)
        self.digest = manifest.digest()
        self._preprocess_key = json.dumps(
            {**preprocess.to_dict(), "token_budget": self.budget.to_dict()}, sort_keys=True
        )
        self._prefix: _Prefix | None = None
        self._layout_ms = 0.0
        self._lock = threading.RLock()
        # Cross-request image prefixes (see prefix_cache.py); None: only the last one, in the KV.
        self.prefix_cache: PrefixCache | None = None

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(
        cls,
        bundle: str | os.PathLike[str],
        options: PipelineOptions | None = None,
        *,
        progress: Callable[[str], None] | None = None,
        **overrides: object,
    ) -> Pipeline:
        """Load `bundle` (a directory with manifest.json). Keyword overrides are `PipelineOptions`
        fields, e.g. `Pipeline.load(b, vision="ort-cpu", llm="q8_0", n_threads=4)`.

        Raises BundleError (bad manifest, a file that does not match it, missing precision,
        widths that disagree), VisionError (no vision backend loads) or LLMError (llama.cpp
        cannot load the GGUF or create the context).
        """
        known = {f.name for f in fields(PipelineOptions)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise TypeError(f"unknown Pipeline option(s) {unknown}; known: {', '.join(sorted(known))}")
        opts = PipelineOptions(**{**asdict(options or PipelineOptions()), **overrides})
        root = Path(bundle)
        manifest = read_manifest(root)
        preprocess = manifest.preprocess_config()
        if opts.max_tiles is not None:
            try:
                preprocess = preprocess.replace(max_tiles=opts.max_tiles)
            except ValueError as e:
                raise BundleError(f"{root}: max_tiles={opts.max_tiles} does not fit this bundle ({e})") from e
        try:
            budget = token_budget(manifest, opts.visual_tokens, opts.token_reduction)
        except ValueError as e:
            raise BundleError(f"{root}: {e}") from e
        check = (lambda entries: require_valid(root, entries)) if opts.verify else None

        llm_entry = choose_llm(manifest, opts.llm)
        nl_entry = newline_entry(manifest)
        if check is not None:
            check([nl_entry, llm_entry])
        newline = load_newline(root, manifest)
        vision = open_vision(
            root,
            manifest,
            precision=opts.vision_precision,
            backend=opts.vision,
            threads=opts.vision_threads,
            device=opts.device,
            build_engine=opts.build_engine,
            check=check,
            progress=progress,
        )
        n_ctx = opts.n_ctx or default_n_ctx(manifest, preprocess, budget)
        lm = LlamaCppLM(
            root / llm_entry.path,
            LLMOptions(
                n_ctx=n_ctx,
                n_batch=opts.n_batch,
                n_ubatch=opts.n_batch,
                n_threads=opts.n_threads,
                n_gpu_layers=opts.n_gpu_layers,
                kv_type=opts.kv_type,
                flash_attn=opts.flash_attn,
                repack=opts.repack,
                seed=opts.seed,
            ),
        )
        try:
            _check_widths(root, manifest, vision, newline, lm)
        except BundleError:
            lm.close()
            raise
        return cls(root, manifest, opts, preprocess, vision, lm, newline, llm_entry, budget)

    def close(self) -> None:
        """Free the llama.cpp context and model (and a TensorRT engine)."""
        with self._lock:
            self._prefix = None
            self.lm.close()
            closer = getattr(self.vision.encoder, "close", None)
            if closer is not None:
                closer()

    def __enter__(self) -> Pipeline:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def describe(self) -> str:
        """One line on what runs where: vision backend, precision and device (with why faster ones
        were skipped), GGUF precision, the LLM's device and offloaded layers, context size."""
        return (
            f"{self.vision.describe()}; llm: llama.cpp {self.llm_entry.precision} "
            f"({self.llm_entry.path}) on {self.lm.describe_device()}, n_ctx {self.lm.n_ctx}"
            + (
                ""
                if self.budget.is_full
                else f"; visual tokens {self.budget.visual_tokens} ({self.budget.method})"
            )
        )

    # ------------------------------------------------------------------ images

    def decode(self, source: ImageSource | ImageInput) -> list[ImageInput]:
        """The frames of one image source, decoded with this pipeline's pixel limit."""
        return decode_source(source, max_pixels=self.options.max_pixels)

    def _inputs(
        self, images: ImageSource | ImageInput | Sequence[ImageSource | ImageInput]
    ) -> list[ImageInput]:
        if isinstance(
            images, (str, os.PathLike, bytes, bytearray, memoryview, np.ndarray, DecodedImage, ImageInput)
        ):
            images = [images]
        out: list[ImageInput] = []
        for src in images:
            frames = self.decode(src)
            if len(frames) > 1:
                raise ImageError(
                    frames[0].name,
                    f"has {len(frames)} frames; ask about one frame at a time "
                    "(Pipeline.decode(path) returns them) or use `eyecare-edge screen`",
                )
            out.extend(frames)
        return out

    def _tiles(self, images: Sequence[ImageInput]) -> tuple[list[np.ndarray], list[TilePlan]]:
        rgbs = [crop_fundus_fov(im.rgb) if self.options.fundus_crop else im.rgb for im in images]
        pre = preprocess_images(rgbs, self.preprocess)
        return [p.tiles for p in pre], [p.plan for p in pre]

    def _visual(self, tiles: list[np.ndarray], plans: list[TilePlan]) -> list[np.ndarray]:
        """Tile embeddings of all images in one encoder call, laid out per image."""
        embeds = self.vision.encoder.encode(np.concatenate(tiles, axis=0))
        if embeds.ndim != 3 or embeds.shape[0] != sum(p.n_tiles for p in plans):
            raise VisionError(
                f"vision output has shape {embeds.shape} for {sum(p.n_tiles for p in plans)} tiles"
            )
        if embeds.shape[2] != self.lm.n_embd:
            raise BundleError(
                f"{self.bundle}: vision embeddings are {embeds.shape[2]} wide but the LLM's n_embd is "
                f"{self.lm.n_embd} (vision and LLM files from different models?)"
            )
        out, start = [], 0
        t = time.perf_counter()
        for plan in plans:
            out.append(reduce_image(embeds[start : start + plan.n_tiles], plan, self.newline, self.budget))
            start += plan.n_tiles
        self._layout_ms = 1000.0 * (time.perf_counter() - t)
        return out

    def encode_images(
        self, images: ImageSource | ImageInput | Sequence[ImageSource | ImageInput]
    ) -> list[np.ndarray]:
        """The visual token sequence [visual_tokens, n_embd] of each image, as `ask` injects them."""
        inputs = self._inputs(images)
        with self._lock:
            return self._visual(*self._tiles(inputs))

    # ------------------------------------------------------------------ asking

    def prompt_pieces(self, question: str, n_images: int) -> list[str]:
        """The rendered prompt split at the image placeholder: n_images + 1 text pieces."""
        text = render(
            self.template,
            [Message("user", with_image_placeholders(question, n_images))],
            system=self.manifest.prompt.system,
        )
        placeholder = self.manifest.prompt.image_placeholder or IMAGE_PLACEHOLDER
        if placeholder != IMAGE_PLACEHOLDER:
            text = text.replace(IMAGE_PLACEHOLDER, placeholder)
        pieces = text.split(placeholder)
        if len(pieces) != n_images + 1:
            raise ValueError(
                f"the question places {len(pieces) - 1} {placeholder} placeholder(s) for {n_images} image(s)"
            )
        return pieces

    def ask(
        self,
        images: ImageSource | ImageInput | Sequence[ImageSource | ImageInput],
        question: str,
        *,
        max_tokens: int = 256,
        temperature: float = 0.0,
        top_p: float = 1.0,
        top_k: int = 0,
        seed: int | None = None,
        stream: Callable[[str], None] | None = None,
        grammar: str | None = None,
        stop: Sequence[str] = (),
    ) -> Answer:
        """Answer `question` about `images` (a path, bytes, RGB array, or a list of them; [] for a
        text-only question). Greedy by default. `stream` receives text pieces as they are
        generated (they concatenate to the unstripped answer). `grammar`: a GBNF grammar the
        answer must follow (`eyecare_edge.grammar.json_schema_grammar` makes one from a JSON
        schema). `stop`: stop strings on top of the bundle's.

        Raises ImageError (an image that cannot be read), ValueError (bad placeholders),
        LLMError (the prompt does not fit n_ctx) or VisionError.
        """
        t0 = time.perf_counter()
        inputs = self._inputs(images)
        t_decoded = time.perf_counter()
        pieces = self.prompt_pieces(question, len(inputs))
        key = (
            tuple(im.key for im in inputs),
            self._preprocess_key,
            self.options.fundus_crop,
            tuple(pieces[:-1]),
        )
        timings = {"decode_ms": 1000.0 * (t_decoded - t0), "preprocess_ms": 0.0, "vision_ms": 0.0}
        prefix_prefill_ms = 0.0
        with self._lock, self.lm.exclusive():
            cached = self._prefix is not None and self._prefix.key == key
            if not cached and inputs and self.prefix_cache is not None:
                cached = self._restore_prefix(key, timings)
            if cached:
                self.lm.rewind(self._prefix.mark)
            else:
                self._prefix = None
                self.lm.reset()
                t = time.perf_counter()
                tiles, plans = self._tiles(inputs)
                t_pre = time.perf_counter()
                sequences = self._visual(tiles, plans) if inputs else []
                t_vis = time.perf_counter()
                timings["preprocess_ms"] = 1000.0 * (t_pre - t)
                timings["vision_ms"] = 1000.0 * (t_vis - t_pre)
                timings["layout_ms"] = self._layout_ms if inputs else 0.0
                parts: list[str | np.ndarray] = []
                for text, seq in zip(pieces[:-1], sequences, strict=True):
                    parts += [text, seq]
                try:
                    self.lm.eval_prompt(parts)
                except BaseException:
                    self.lm.reset()
                    raise
                prefix_prefill_ms = 1000.0 * (time.perf_counter() - t_vis)
                self._prefix = _Prefix(key, self.lm.mark(), sum(s.shape[0] for s in sequences))
                if inputs and self.prefix_cache is not None:
                    self._save_prefix(timings)
            n_image_tokens = self._prefix.n_image_tokens
            gen = self.lm.generate(
                max_tokens,
                prompt=[pieces[-1]],
                temperature=temperature,
                top_p=top_p,
                top_k=top_k,
                seed=seed,
                stop_strings=[*self.manifest.prompt.stop_strings, *stop],
                on_text=stream,
                grammar=grammar,
            )
        t_end = time.perf_counter()
        g = gen.timings
        timings["prefill_ms"] = prefix_prefill_ms + g["prefill_ms"]
        timings["generate_ms"] = g["total_ms"] - g["prefill_ms"]
        timings["first_token_ms"] = 1000.0 * (t_end - t0) - (g["total_ms"] - g["first_token_ms"])
        timings["total_ms"] = 1000.0 * (t_end - t0)
        return Answer(
            text=gen.text.strip(),
            n_image_tokens=n_image_tokens,
            n_prompt_tokens=gen.n_prompt,
            n_generated=len(gen.tokens),
            stop_reason=gen.stop_reason,
            cached_prefix=cached,
            timings=timings,
        )

    def report(
        self,
        images: ImageSource | ImageInput | Sequence[ImageSource | ImageInput],
        *,
        max_tokens: int = 512,
        **kwargs: object,
    ) -> Answer:
        """An examination report (the bundle's report prompt) for `images`; kwargs as `ask`."""
        prompt = self.manifest.prompt.report_prompt or REPORT_PROMPT
        return self.ask(images, prompt, max_tokens=max_tokens, **kwargs)  # type: ignore[arg-type]

    def next_token_logits(
        self, images: ImageSource | ImageInput | Sequence[ImageSource | ImageInput], question: str
    ) -> tuple[np.ndarray, Answer]:
        """The logits of the answer's first token (what `ask` would sample from), with the
        one-token `Answer` that produced them (its timings, prefix reuse).

        For constrained answers (`eyecare_edge.clinical.constrained` scores option letters on
        them). A one-token greedy `ask` evaluates the prompt and samples without feeding the token
        back, so the context's last logits are still the prompt's; both locks are held across the
        two calls so no other thread evaluates in between.
        """
        with self._lock, self.lm.exclusive():
            answer = self.ask(images, question, max_tokens=1)
            return self.lm.last_logits(), answer

    def _cache_key(self, key: tuple) -> tuple:
        # What shapes the KV bytes: the bundle, the GGUF, the options (token budget, context size,
        # KV type, threads...; not checks or the seed) and the prompt key (image digests, preprocessing, text).
        opts = {k: v for k, v in asdict(self.options).items() if k not in _NOT_IN_PREFIX_KEY}
        return (self.digest, self.llm_entry.path, json.dumps(opts, sort_keys=True, default=str), key)

    def _restore_prefix(self, key: tuple, timings: dict[str, float]) -> bool:
        """Load a cached KV state for `key` into the context; False when there is none."""
        state = self.prefix_cache.get(self._cache_key(key))
        if state is None:
            return False
        t = time.perf_counter()
        self._prefix = None
        try:
            self.lm.load_state(state.blob, state.n_past)
        except LLMError:
            self.lm.reset()
            return False
        self._prefix = _Prefix(key, state.n_past, state.n_image_tokens)
        timings["restore_ms"] = 1000.0 * (time.perf_counter() - t)
        return True

    def _save_prefix(self, timings: dict[str, float]) -> None:
        t = time.perf_counter()
        prefix = self._prefix
        state = PrefixState(self.lm.save_state(), prefix.mark, prefix.n_image_tokens)
        self.prefix_cache.put(self._cache_key(prefix.key), state)
        timings["save_ms"] = 1000.0 * (time.perf_counter() - t)

    def forget_images(self) -> None:
        """Drop the cached image prefix (the next question evaluates its images afresh)."""
        with self._lock:
            self._prefix = None


def _check_widths(
    root: Path, manifest: Manifest, vision: VisionChoice, newline: np.ndarray, lm: LlamaCppLM
) -> None:
    """The visual sequence must be as wide as the LLM's input embeddings: say so at load time."""
    d = lm.n_embd
    problems = []
    if newline.size != d:
        problems.append(f"image_newline has {newline.size} values")
    if vision.encoder.width is not None and vision.encoder.width != d:
        problems.append(f"the vision graph outputs {vision.encoder.width}-wide embeddings")
    declared = manifest.model.get("n_embd")
    if declared is not None and int(declared) != d:
        problems.append(f"the manifest declares n_embd {declared}")
    if problems:
        raise BundleError(
            f"{root}: the LLM ({lm.path.name}) has n_embd {d}, but {'; '.join(problems)} "
            "(files from different models?)"
        )


__all__ = [
    "Answer",
    "ImageInput",
    "LLMError",
    "Pipeline",
    "PipelineOptions",
    "VisionError",
    "choose_llm",
    "decode_source",
    "default_n_ctx",
    "max_visual_tokens",
    "token_budget",
]
