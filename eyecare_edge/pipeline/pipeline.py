"""`Pipeline`: a bundle loaded for answering questions about eye images, without torch (the
package docstring shows its use and what one `ask` runs).

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

import json
import os
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, fields
from pathlib import Path

import numpy as np

from eyecare_edge.bundle import BundleError, FileEntry, Manifest, read_manifest, require_valid
from eyecare_edge.images import crop_fundus_fov
from eyecare_edge.llm import LlamaCppLM, LLMOptions
from eyecare_edge.llm.device import offloads, resolve_gpu_layers
from eyecare_edge.pipeline.image_prefix import ImagePrefix, prefix_cache_key, restore_prefix, save_prefix
from eyecare_edge.pipeline.inputs import ImageInput, ImageSource, decode_inputs, decode_source
from eyecare_edge.pipeline.options import Answer, PipelineOptions
from eyecare_edge.pipeline.plan import choose_kv_cache, choose_llm, choose_ubatch, default_n_ctx, token_budget
from eyecare_edge.prefix_cache import PrefixCache
from eyecare_edge.preprocess import PreprocessConfig, TilePlan, preprocess_images
from eyecare_edge.prompts import (
    IMAGE_PLACEHOLDER,
    REPORT_PROMPT,
    Message,
    get_template,
    render,
    with_image_placeholders,
)
from eyecare_edge.reduce import TokenBudget, reduce_image
from eyecare_edge.vision import (
    VisionChoice,
    VisionError,
    load_newline,
    newline_entry,
    open_vision,
)


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
        self._prefix: ImagePrefix | None = None
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
        on_gpu = offloads(resolve_gpu_layers(opts.n_gpu_layers))
        kv_type, flash_attn = choose_kv_cache(
            opts.kv_type, opts.flash_attn, on_gpu=on_gpu, llm_precision=llm_entry.precision
        )
        lm = LlamaCppLM(
            root / llm_entry.path,
            LLMOptions(
                n_ctx=n_ctx,
                n_batch=opts.n_batch,
                n_ubatch=choose_ubatch(opts.n_ubatch, opts.n_batch, on_gpu),
                n_threads=opts.n_threads,
                n_gpu_layers=opts.n_gpu_layers,
                kv_type=kv_type,
                # auto's choice falls back to F16 on a model whose head size a Q8_0 K cannot take
                kv_fallback="f16" if opts.kv_type == "auto" else None,
                flash_attn=flash_attn,
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
            f"({self.llm_entry.path}) on {self.lm.describe_device()}, n_ctx {self.lm.n_ctx}, "
            f"KV {self.lm.options.kv_type}{' + flash attention' if self.lm.options.flash_attn else ''}"
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

    def _tiles(self, images: Sequence[ImageInput]) -> tuple[list[np.ndarray], list[TilePlan]]:
        rgbs = [crop_fundus_fov(im.rgb) if self.options.fundus_crop else im.rgb for im in images]
        pre = preprocess_images(rgbs, self.preprocess)
        return [p.tiles for p in pre], [p.plan for p in pre]

    def _visual(self, tiles: list[np.ndarray], plans: list[TilePlan]) -> list[np.ndarray]:
        """Tile embeddings of all images in one encoder call, laid out per image."""
        embeds = self.vision.encoder.encode(tiles[0] if len(tiles) == 1 else np.concatenate(tiles, axis=0))
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
        inputs = decode_inputs(images, max_pixels=self.options.max_pixels)
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
        inputs = decode_inputs(images, max_pixels=self.options.max_pixels)
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
        has_images = bool(inputs)
        with self._lock, self.lm.exclusive():
            cached = self._prefix is not None and self._prefix.key == key
            if not cached and has_images and self.prefix_cache is not None:
                cached = self._restore_prefix(key, timings)
            if cached:
                self.lm.rewind(self._prefix.mark)
            else:
                self._prefix = None
                self.lm.reset()
                t = time.perf_counter()
                tiles, plans = self._tiles(inputs)
                # the decoded pixels, then the tiles, are not needed past here: freed before the
                # vision run and the prefill, whose scratch memory is this process's peak
                del inputs
                t_pre = time.perf_counter()
                sequences = self._visual(tiles, plans) if has_images else []
                del tiles
                t_vis = time.perf_counter()
                timings["preprocess_ms"] = 1000.0 * (t_pre - t)
                timings["vision_ms"] = 1000.0 * (t_vis - t_pre)
                timings["layout_ms"] = self._layout_ms if has_images else 0.0
                parts: list[str | np.ndarray] = []
                for text, seq in zip(pieces[:-1], sequences, strict=True):
                    parts += [text, seq]
                try:
                    self.lm.eval_prompt(parts)
                except BaseException:
                    self.lm.reset()
                    raise
                prefix_prefill_ms = 1000.0 * (time.perf_counter() - t_vis)
                self._prefix = ImagePrefix(key, self.lm.mark(), sum(s.shape[0] for s in sequences))
                if has_images and self.prefix_cache is not None:
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
        return prefix_cache_key(self.digest, self.llm_entry.path, self.options, key)

    def _restore_prefix(self, key: tuple, timings: dict[str, float]) -> bool:
        """Load a cached KV state for `key` into the context; False when there is none."""
        self._prefix = None
        self._prefix = restore_prefix(self.lm, self.prefix_cache, self._cache_key(key), key, timings)
        return self._prefix is not None

    def _save_prefix(self, timings: dict[str, float]) -> None:
        save_prefix(self.lm, self.prefix_cache, self._cache_key(self._prefix.key), self._prefix, timings)

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
