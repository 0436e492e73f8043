"""Training data: Eyecare-100K-style LLaVA conversations and bench JSONL -> model-ready samples.

Two file shapes are read (JSON list or JSONL, detected from the first record):

- LLaVA / Eyecare-100K: `id`, `image` (a path or a list of paths), `conversations` of
  human/gpt turns with `<image>` placeholders, optional `modality`;
- the project's bench JSONL (`eyecare_edge.qa.loaders.load_bench`): each question becomes a
  one-turn conversation asked exactly as the bench asks it (`BenchRecord.prompt_text()`).

A sample's text is tokenized by `training.encoding` with each `<image>` expanded to the number of
visual tokens that the one shared preprocessing (`eyecare_edge.preprocess`) plans for that image.
A run over tens of thousands of clinical images always meets some broken ones, so bad samples
(missing or undecodable image, more tokens than `max_length`, malformed conversation) are skipped
with one warning each and counted in a `SkipLog`, never allowed to stop the run.
"""

from __future__ import annotations

import logging
import os
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from eyecare_edge.training.encoding import Encoded, EncodingError, encode_conversation
from torch.utils.data import Dataset

from eyecare_edge.errors import EyecareError
from eyecare_edge.images import ImageError, load_image, read_header
from eyecare_edge.preprocess import (
    PreprocessConfig,
    PreprocessedImage,
    plan_image,
    preprocess_image,
)
from eyecare_edge.prompts import (
    IMAGE_PLACEHOLDER,
    Message,
    get_template,
    with_image_placeholders,
)
from eyecare_edge.qa.loaders import (
    BenchFormatError,
    load_bench,
    normalize_modality,
    read_json_records,
    split_closed_question,
)
from eyecare_edge.qa.records import has_all_report_sections

log = logging.getLogger("eyecare_edge.training")

_USER_ROLES = {"human", "user"}
_ASSISTANT_ROLES = {"gpt", "assistant", "model"}


class DataFormatError(EyecareError, ValueError):
    """A data file that cannot be read at all; the message names the file (and line)."""


@dataclass(frozen=True)
class Conversation:
    """One training sample before tokenization.

    `images` are absolute paths in order of their `<image>` placeholders. `tasks` holds one task
    per assistant turn (closed | open | report), inferred like the bench loader does when the
    file does not say. `problem` is set for a record that cannot become a sample (it is skipped
    and counted, not raised, so one bad record never stops a run).
    """

    id: str
    images: tuple[str, ...]
    messages: tuple[Message, ...]
    modality: str = "unknown"
    tasks: tuple[str, ...] = ()
    source: str = ""
    problem: str | None = None


# --- reading files -------------------------------------------------------------------------------


def _read_records(path: Path) -> list[tuple[str, Any]]:
    """(location, record) pairs of a JSON list or JSONL file (the bench's reader, our error type)."""
    try:
        return read_json_records(path)
    except BenchFormatError as e:
        raise DataFormatError(str(e)) from None


def _resolve(paths: Sequence[str], base: Path) -> tuple[str, ...]:
    out = []
    for p in paths:
        q = Path(p).expanduser()
        out.append(os.path.normpath(q if q.is_absolute() else (base / q).absolute()))
    return tuple(out)


def infer_task(question: str, answer: str) -> str:
    """closed (lettered options in the question), report (all three sections) or open."""
    if split_closed_question(question) is not None:
        return "closed"
    return "report" if has_all_report_sections(answer) else "open"


def conversation_from_llava(loc: str, obj: Any, base: Path, index: int) -> Conversation:
    """One LLaVA / Eyecare-100K record; problems are recorded on the result, not raised."""
    if not isinstance(obj, dict):
        return Conversation(f"item-{index}", (), (), source=loc, problem="a record must be a JSON object")
    cid = str(obj.get("id", f"item-{index}"))

    def bad(reason: str) -> Conversation:
        return Conversation(cid, (), (), source=loc, problem=reason)

    raw = obj.get("image", obj.get("images"))
    raw = [] if raw is None else [raw] if isinstance(raw, str) else raw
    if not isinstance(raw, list) or not all(isinstance(p, str) and p for p in raw):
        return bad(f"image must be a path or a list of paths, got {obj.get('image')!r}")
    turns = obj.get("conversations")
    if not isinstance(turns, list) or not turns:
        return bad("conversations must be a non-empty list of turns")
    messages: list[Message] = []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            return bad(f"conversation turn {i} needs 'from' and 'value'")
        role, value = str(turn["from"]).lower(), str(turn["value"])
        if role == "system":
            if i != 0:
                return bad(f"conversation turn {i}: a system turn must come first")
            messages.append(Message("system", value))
            continue
        want_user = not messages or messages[-1].role in ("system", "assistant")
        if role in _USER_ROLES and want_user:
            messages.append(Message("user", value))
        elif role in _ASSISTANT_ROLES and not want_user:
            if IMAGE_PLACEHOLDER in value:
                return bad(f"conversation turn {i}: an assistant turn holds an <image> placeholder")
            messages.append(Message("assistant", value))
        elif role in _USER_ROLES | _ASSISTANT_ROLES:
            return bad(f"conversation turn {i}: human and gpt turns must alternate, starting with human")
        else:
            return bad(f"conversation turn {i}: unknown role {turn['from']!r}")
    if messages[-1].role != "assistant":
        return bad("the last human turn has no gpt answer")
    n_placeholders = sum(m.content.count(IMAGE_PLACEHOLDER) for m in messages)
    if n_placeholders == 0 and raw:
        # LLaVA's convention: images without a placeholder go before the first question.
        first = next(i for i, m in enumerate(messages) if m.role == "user")
        messages[first] = Message("user", with_image_placeholders(messages[first].content, len(raw)))
    elif n_placeholders != len(raw):
        return bad(f"{n_placeholders} <image> placeholder(s) for {len(raw)} image(s)")
    users = [m for m in messages if m.role == "user"]
    answers = [m for m in messages if m.role == "assistant"]
    tasks = tuple(infer_task(u.content, a.content) for u, a in zip(users, answers, strict=True))
    modality = normalize_modality(obj["modality"]) if obj.get("modality") else "unknown"
    return Conversation(cid, _resolve(raw, base), tuple(messages), modality, tasks, loc)


def read_conversations(
    path: str | os.PathLike[str], *, images_root: str | os.PathLike[str] | None = None
) -> list[Conversation]:
    """All samples of a LLaVA JSON/JSONL or bench JSONL file.

    Image paths are resolved against `images_root`, else against the file's folder. A file that
    cannot be parsed raises `DataFormatError`; a malformed record becomes a Conversation with
    `problem` set (skipped and counted by the dataset).
    """
    path = Path(path)
    base = Path(images_root).expanduser().absolute() if images_root is not None else path.parent.absolute()
    records = _read_records(path)
    if not records:
        raise DataFormatError(f"{path}: the data file holds no records")
    first = records[0][1]
    if isinstance(first, dict) and "conversations" in first:
        return [conversation_from_llava(loc, obj, base, i) for i, (loc, obj) in enumerate(records)]
    if isinstance(first, dict) and ("question" in first or "task" in first):
        bench = load_bench(path, fmt="jsonl", images_root=base)
        return [
            Conversation(
                r.id,
                tuple(r.images),
                (
                    Message("user", with_image_placeholders(r.prompt_text(), len(r.images))),
                    Message("assistant", r.answer),
                ),
                r.modality,
                (r.task,),
                str(path),
            )
            for r in bench
        ]
    keys = sorted(first) if isinstance(first, dict) else type(first).__name__
    raise DataFormatError(
        f"{records[0][0]}: neither a LLaVA conversation (no 'conversations') nor a bench record "
        f"(no 'question'); keys: {keys}"
    )


def filter_tasks(conversations: Iterable[Conversation], tasks: Iterable[str]) -> list[Conversation]:
    """Samples whose every turn is one of `tasks` (e.g. {"closed"}); bad records pass through."""
    keep = set(tasks)
    return [c for c in conversations if c.problem is not None or set(c.tasks) <= keep]


# --- skipping bad samples ------------------------------------------------------------------------


@dataclass
class SkipLog:
    """Samples left out of a run and why: one warning per sample id, however often it is met."""

    reasons: dict[str, str] = field(default_factory=dict)
    quiet: bool = False

    def add(self, sample_id: str, reason: str) -> bool:
        """Record a skipped sample; True (and one warning) the first time this id is seen."""
        if sample_id in self.reasons:
            return False
        self.reasons[sample_id] = reason
        # DataLoader workers hold copies of this log; only the main process speaks.
        if not self.quiet and torch.utils.data.get_worker_info() is None:
            log.warning("skipping sample %s: %s", sample_id, reason)
        return True

    def __len__(self) -> int:
        return len(self.reasons)

    def by_reason(self) -> dict[str, int]:
        """Counts per kind of reason (the text before the first colon)."""
        out: dict[str, int] = {}
        for r in self.reasons.values():
            key = r.split(":", 1)[0]
            out[key] = out.get(key, 0) + 1
        return out


# --- preprocessed tiles, cached ------------------------------------------------------------------


class TileCache:
    """LRU cache of preprocessed images keyed by (path, single-tile mode), bounded in bytes.

    An Eyecare-100K image is asked about in several samples (closed, open, report), and decoding
    plus Pillow-exact bicubic resizing costs more than the tiny model's step; caching pays once per
    image. The bound keeps memory flat on large datasets (least recently used goes first).
    """

    def __init__(self, max_bytes: int) -> None:
        self.max_bytes = max(0, int(max_bytes))
        self._items: OrderedDict[tuple[str, bool], PreprocessedImage] = OrderedDict()
        self.nbytes = 0
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, bool]) -> PreprocessedImage | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: tuple[str, bool], item: PreprocessedImage) -> None:
        size = item.tiles.nbytes
        if size > self.max_bytes or key in self._items:
            return
        self._items[key] = item
        self.nbytes += size
        while self.nbytes > self.max_bytes:
            _, old = self._items.popitem(last=False)
            self.nbytes -= old.tiles.nbytes

    def __len__(self) -> int:
        return len(self._items)


# --- the dataset ---------------------------------------------------------------------------------


class SampleError(EyecareError):
    """Internal: why one sample cannot be used (becomes a skip, never escapes the dataset)."""


class EyecareDataset(Dataset):
    """Map-style dataset of tokenized samples with their image tiles.

    On construction every record is checked cheaply (image files exist and have a readable
    header, the token count fits `max_length`, the conversation is well formed); failures are
    skipped and counted in `skips`. Problems that only decoding reveals (a truncated JPEG) are
    found in `__getitem__`, which then records the skip, returns the next good sample instead and
    lists the skipped ids under `"skipped"`, so a batch is never short and the run never stops.
    """

    def __init__(
        self,
        conversations: Sequence[Conversation],
        tokenizer,
        model_config,
        *,
        max_length: int = 2048,
        cache_mb: float = 1024,
        skips: SkipLog | None = None,
        quiet: bool = False,
    ) -> None:
        self.tokenizer = tokenizer
        self.template = get_template(model_config.chat_template_name)
        self.system = model_config.system_prompt
        self.image_token_index = int(model_config.image_token_index)
        self.preprocess: PreprocessConfig = model_config.preprocess_config()
        self.max_length = int(max_length)
        self.cache = TileCache(int(cache_mb * 2**20))
        self.skips = skips if skips is not None else SkipLog(quiet=quiet)
        self.n_records = len(conversations)
        self.items: list[Conversation] = []
        self.lengths: list[int] = []
        headers: dict[str, tuple[int, int] | str] = {}
        for conv in conversations:
            try:
                self.lengths.append(len(self._check(conv, headers)))
                self.items.append(conv)
            except SampleError as e:
                self.skips.add(conv.id, str(e))
        self._bad: set[int] = set()

    # -- checks and encoding -------------------------------------------------------------------
    def _encode(self, conv: Conversation, visual_tokens: Sequence[int]) -> Encoded:
        try:
            enc = encode_conversation(
                conv.messages,
                self.template,
                self.tokenizer,
                visual_tokens,
                image_token_index=self.image_token_index,
                system=self.system,
            )
        except EncodingError as e:
            raise SampleError(f"bad conversation: {e}") from None
        if len(enc) > self.max_length:
            raise SampleError(f"too long: {len(enc)} tokens > max_length {self.max_length}")
        return enc

    def _check(self, conv: Conversation, headers: dict[str, tuple[int, int] | str]) -> Encoded:
        if conv.problem is not None:
            where = f" ({conv.source})" if conv.source else ""
            raise SampleError(f"bad record: {conv.problem}{where}")
        sizes = []
        for p in conv.images:
            if p not in headers:
                try:
                    h = read_header(p)
                    headers[p] = (h.height, h.width)
                except ImageError as e:
                    headers[p] = _image_reason(e)
            if isinstance(headers[p], str):
                raise SampleError(headers[p])
            sizes.append(headers[p])
        single = len(sizes) > 1
        tokens = [plan_image(s, self.preprocess, single=single).visual_tokens for s in sizes]
        return self._encode(conv, tokens)

    def _images(self, conv: Conversation) -> list[PreprocessedImage]:
        single = len(conv.images) > 1
        out = []
        for p in conv.images:
            key = (p, single)
            item = self.cache.get(key)
            if item is None:
                try:
                    rgb = load_image(p).rgb
                except ImageError as e:
                    raise SampleError(_image_reason(e)) from None
                item = preprocess_image(rgb, self.preprocess, single=single)
                self.cache.put(key, item)
            out.append(item)
        return out

    def build(self, index: int) -> dict[str, Any]:
        """Sample `index` as tensors; raises SampleError when it cannot be used."""
        conv = self.items[index]
        images = self._images(conv)
        enc = self._encode(conv, [im.plan.visual_tokens for im in images])
        if images:
            pixel_values = torch.from_numpy(np.concatenate([im.tiles for im in images], axis=0))
        else:
            s = self.preprocess.tile_size
            pixel_values = torch.zeros((0, 3, s, s), dtype=torch.float32)
        return {
            "input_ids": torch.tensor(enc.input_ids, dtype=torch.long),
            "labels": torch.tensor(enc.labels, dtype=torch.long),
            "pixel_values": pixel_values,
            "image_sizes": torch.tensor([im.plan.image_size for im in images], dtype=torch.long).reshape(
                -1, 2
            ),
            "image_n_tiles": torch.tensor([im.plan.n_tiles for im in images], dtype=torch.long),
            "sample_id": conv.id,
        }

    # -- Dataset protocol ----------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, Any]:
        n = len(self.items)
        skipped: list[tuple[str, str]] = []
        for step in range(n):
            i = (index + step) % n
            if i in self._bad:
                continue
            try:
                sample = self.build(i)
            except SampleError as e:
                self._bad.add(i)
                skipped.append((self.items[i].id, str(e)))
                self.skips.add(self.items[i].id, str(e))
                continue
            sample["skipped"] = skipped
            return sample
        raise RuntimeError(f"no usable sample left: all {n} samples failed to load (see the warnings)")


def _image_reason(e: ImageError) -> str:
    if e.reason == "file not found":
        return f"missing image: {e.path}"
    return f"unreadable image: {e}"
