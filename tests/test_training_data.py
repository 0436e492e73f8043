"""Training data: label masking per chat template, image-token expansion, reading both file shapes,
the collator, and skipping (never crashing on) bad samples."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from eyecare_edge.training.collate import EyecareCollator, pop_meta
from eyecare_edge.training.data import (
    Conversation,
    EyecareDataset,
    TileCache,
    filter_tasks,
    read_conversations,
)
from eyecare_edge.training.encoding import (
    IGNORE_INDEX,
    EncodingError,
    encode_conversation,
    encode_prompt,
)
from eyecare_edge.training.tokenizer import train_bpe_tokenizer

from eyecare_edge.preprocess import plan_image
from eyecare_edge.prompts import TEMPLATES, Message, get_template, render

IMG = -200
TEXTS = [
    "Is there a haemorrhage? A. Yes B. No Answer with the option's letter from the given choices directly.",
    "The optic disc is on the left side. Examination Type: colour fundus photograph.",
    "What colour is the square? Red square Blue square",
]


@pytest.fixture(scope="module")
def tokenizers():
    return {name: train_bpe_tokenizer(TEXTS, vocab_size=400, chat_template=name) for name in TEMPLATES}


def _tok(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize("name", ["chatml", "qwen_2", "phi3_instruct"])
def test_template_frame_costs_one_token_per_role_word(name):
    """The merges learn the template's own words: every turn of a conversation pays its role name
    (6 tokens for "assistant" before) and every sample the default system prompt."""
    tok = train_bpe_tokenizer(TEXTS, vocab_size=4096, chat_template=name)
    t = TEMPLATES[name]
    for prefix in (t.system_prefix, t.user_prefix, t.assistant_prefix):
        pieces = tok.convert_ids_to_tokens(_tok(tok, prefix))
        assert len(pieces) <= 3, pieces  # special (or role token), the role word, the newline
    words = t.default_system.split()
    assert len(_tok(tok, t.default_system)) <= len(words) + 1  # a token a word, the full stop


# --- label masking, token by token ---------------------------------------------------------------


@pytest.mark.parametrize("name", ["chatml", "qwen_2", "phi3_instruct"])
def test_label_masking_is_exact_per_template(tokenizers, name):
    tok = tokenizers[name]
    t = get_template(name)
    q1 = "<image>\nIs there a haemorrhage?\nA. Yes\nB. No"
    q2 = "Where is the optic disc?"
    a1, a2 = "A", "On the left side."
    messages = [Message("user", q1), Message("assistant", a1), Message("user", q2), Message("assistant", a2)]
    enc = encode_conversation(messages, t, tok, [7], image_token_index=IMG, system="Be brief.")

    # The expected sequence, piece by piece: context is tokenized up to the image and up to each
    # reply (exactly what generation sees), each reply with its end-of-turn token on its own.
    head = t.system_prefix + "Be brief." + t.system_suffix + t.turn_separator + t.user_prefix
    ctx1 = "\nIs there a haemorrhage?\nA. Yes\nB. No" + t.user_suffix + t.turn_separator + t.assistant_prefix
    ctx2 = t.turn_separator + t.user_prefix + q2 + t.user_suffix + t.turn_separator + t.assistant_prefix
    pieces = [
        (_tok(tok, head), False),
        ([IMG] * 7, False),
        (_tok(tok, ctx1), False),
        (_tok(tok, a1 + t.assistant_suffix), True),
        (_tok(tok, ctx2), False),
        (_tok(tok, a2 + t.assistant_suffix), True),
        (_tok(tok, t.turn_separator), False),
    ]
    want_ids = [i for ids, _ in pieces for i in ids]
    want_labels = [i if sup else IGNORE_INDEX for ids, sup in pieces for i in ids]
    assert enc.input_ids == want_ids
    assert enc.labels == want_labels

    # The supervised tokens are exactly the replies, each ending with the end-of-turn token.
    eot = tok.convert_tokens_to_ids(t.assistant_suffix)
    runs, cur = [], []
    for i, lab in zip(enc.input_ids, enc.labels, strict=True):
        if lab != IGNORE_INDEX:
            assert lab == i
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    assert [tok.decode(r) for r in runs] == [a1 + t.assistant_suffix, a2 + t.assistant_suffix]
    assert all(r[-1] == eot for r in runs)
    # The separator after a reply, the system turn, the user turns and the image carry no loss.
    assert enc.labels[-1] == IGNORE_INDEX
    assert enc.input_ids.count(IMG) == 7
    assert all(lab == IGNORE_INDEX for i, lab in zip(enc.input_ids, enc.labels, strict=True) if i == IMG)
    # The text of all non-image tokens is the rendered conversation without the placeholder.
    text = tok.decode([i for i in enc.input_ids if i != IMG])
    assert text == render(t, messages, system="Be brief.", add_generation_prompt=False).replace("<image>", "")


def test_prompt_matches_the_runtime_split(tokenizers):
    tok = tokenizers["chatml"]
    t = get_template("chatml")
    messages = [Message("user", "<image>\nWhich eye?")]
    ids = encode_prompt(messages, t, tok, [5], image_token_index=IMG)
    text = render(t, messages)
    before, after = text.split("<image>")
    assert ids == _tok(tok, before) + [IMG] * 5 + _tok(tok, after)
    assert text.endswith(t.assistant_prefix)


def test_placeholder_count_must_match_images(tokenizers):
    tok, t = tokenizers["chatml"], get_template("chatml")
    msgs = [Message("user", "<image>\n<image>\nCompare."), Message("assistant", "Same.")]
    with pytest.raises(EncodingError, match="2 <image>"):
        encode_conversation(msgs, t, tok, [3], image_token_index=IMG)
    with pytest.raises(EncodingError, match="no assistant"):
        encode_conversation([Message("user", "Hi")], t, tok, [], image_token_index=IMG)


# --- reading files --------------------------------------------------------------------------------


def _png(path: Path, color, size=(60, 80)) -> str:
    img = np.zeros((size[0], size[1], 3), np.uint8)
    img[:] = color
    path.parent.mkdir(parents=True, exist_ok=True)
    cv2.imwrite(str(path), img)
    return path.name


def test_read_llava_json_multi_turn_multi_image(tmp_path):
    _png(tmp_path / "img" / "a.png", (255, 0, 0))
    _png(tmp_path / "img" / "b.png", (0, 0, 255))
    records = [
        {
            "id": "s1",
            "image": "img/a.png",
            "modality": "Fundus Photography",
            "conversations": [
                {"from": "human", "value": "<image>\nWhich eye?\nA. Left\nB. Right\nAnswer with the letter."},
                {"from": "gpt", "value": "B"},
                {"from": "human", "value": "Describe it."},
                {"from": "gpt", "value": "A red field."},
            ],
        },
        {
            "id": "s2",
            "image": ["img/a.png", "img/b.png"],
            "conversations": [
                {"from": "human", "value": "Compare the two images."},
                {"from": "gpt", "value": "One is red, one is blue."},
            ],
        },
        {"id": "s3", "image": "img/a.png", "conversations": [{"from": "gpt", "value": "no question"}]},
        {
            "id": "s4",
            "image": ["img/a.png"],
            "conversations": [
                {"from": "human", "value": "<image><image> two?"},
                {"from": "gpt", "value": "x"},
            ],
        },
    ]
    f = tmp_path / "train.json"
    f.write_text(json.dumps(records))
    convs = read_conversations(f)
    assert [c.id for c in convs] == ["s1", "s2", "s3", "s4"]
    s1, s2, s3, s4 = convs
    assert s1.images == (str(tmp_path / "img" / "a.png"),)
    assert s1.modality == "fundus"
    assert s1.tasks == ("closed", "open")
    assert [m.role for m in s1.messages] == ["user", "assistant", "user", "assistant"]
    # Images without placeholders go before the first question, one line each (LLaVA's convention).
    assert s2.messages[0].content == "<image>\n<image>\nCompare the two images."
    assert len(s2.images) == 2
    assert s3.problem and "alternate" in s3.problem
    assert s4.problem and "2 <image> placeholder(s) for 1 image(s)" in s4.problem
    # JSONL with an images root gives the same paths.
    g = tmp_path / "sub" / "train.jsonl"
    g.parent.mkdir()
    g.write_text("\n".join(json.dumps(r) for r in records[:2]) + "\n")
    again = read_conversations(g, images_root=tmp_path)
    assert again[0].images == s1.images and again[1].images == s2.images
    assert [c.id for c in filter_tasks(convs, ["open"])] == ["s2", "s3", "s4"]


def test_read_bench_jsonl_asks_like_the_bench(tmp_path):
    _png(tmp_path / "a.png", (10, 200, 10))
    rec = {
        "id": "q1",
        "images": ["a.png"],
        "modality": "oct",
        "task": "closed",
        "question": "Is there fluid?",
        "options": {"A": "Yes", "B": "No"},
        "answer": "No",
    }
    f = tmp_path / "bench.jsonl"
    f.write_text(json.dumps(rec) + "\n")
    (c,) = read_conversations(f)
    assert c.messages[0].content == (
        "<image>\nIs there fluid?\nA. Yes\nB. No\nAnswer with the option's letter from the given choices directly."
    )
    assert c.messages[1] == Message("assistant", "B")
    assert c.tasks == ("closed",) and c.modality == "oct"


def test_unreadable_data_file_names_the_file(tmp_path):
    from eyecare_edge.training.data import DataFormatError

    f = tmp_path / "bad.json"
    f.write_text("[{]")
    with pytest.raises(DataFormatError, match="bad.json"):
        read_conversations(f)
    g = tmp_path / "other.jsonl"
    g.write_text(json.dumps({"foo": 1}) + "\n")
    with pytest.raises(DataFormatError, match="other.jsonl"):
        read_conversations(g)


# --- dataset, collator, skipping ------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_ckpt(tmp_path_factory):
    from eyecare_edge.training.checkpoint import init_checkpoint

    out = tmp_path_factory.mktemp("ckpt") / "tiny"
    init_checkpoint("tiny", out, tokenizer_texts=TEXTS, llm_layers=1, vision_layers=1)
    return out


@pytest.fixture(scope="module")
def tiny_model(tiny_ckpt):
    from eyecare_edge.training.checkpoint import load_checkpoint

    return load_checkpoint(tiny_ckpt)


def _conv(cid, images, question="<image>\nWhat colour?", answer="Red square"):
    return Conversation(
        cid,
        tuple(str(p) for p in images),
        (Message("user", question), Message("assistant", answer)),
        tasks=("open",),
    )


def test_dataset_expands_images_to_planned_tokens(tmp_path, tiny_model):
    model, tok = tiny_model
    a = tmp_path / "a.png"
    b = tmp_path / "b.png"
    _png(a, (255, 0, 0), size=(90, 200))
    _png(b, (0, 0, 255), size=(150, 150))
    convs = [
        _conv("one", [a]),
        _conv("two", [a, b], question="<image>\n<image>\nCompare.", answer="Different."),
        _conv("again", [a], question="<image>\nAgain?", answer="Yes"),
    ]
    ds = EyecareDataset(convs, tok, model.config, max_length=2048)
    assert len(ds) == 3 and len(ds.skips) == 0
    cfg = model.config.preprocess_config()
    one = ds[0]
    plan = plan_image((90, 200), cfg)
    assert int((one["input_ids"] == IMG).sum()) == plan.visual_tokens
    assert one["pixel_values"].shape == (plan.n_tiles, 3, cfg.tile_size, cfg.tile_size)
    assert one["image_sizes"].tolist() == [[90, 200]] and one["image_n_tiles"].tolist() == [plan.n_tiles]
    two = ds[1]
    single = [plan_image(s, cfg, single=True).visual_tokens for s in ((90, 200), (150, 150))]
    assert int((two["input_ids"] == IMG).sum()) == sum(single)
    assert two["image_n_tiles"].tolist() == [1, 1]
    # The first image's tiles are cached and reused by the third sample.
    hits = ds.cache.hits
    ds[2]
    assert ds.cache.hits == hits + 1

    batch = EyecareCollator(pad_token_id=tok.pad_token_id)([ds[0], ds[1], ds[2]])
    meta = pop_meta(batch)
    assert meta["sample_ids"] == ["one", "two", "again"] and meta["skipped"] == []
    n = batch["input_ids"].shape[1]
    assert n == max(len(ds[i]["input_ids"]) for i in range(3))
    lengths = batch["attention_mask"].sum(1).tolist()
    for row, k in enumerate(lengths):
        assert (batch["input_ids"][row, k:] == tok.pad_token_id).all()
        assert (batch["labels"][row, k:] == IGNORE_INDEX).all()
    assert batch["pixel_values"].shape[0] == plan.n_tiles + 2 + plan.n_tiles
    assert batch["image_sizes"].tolist() == [[90, 200], [90, 200], [150, 150], [90, 200]]
    # The model finds exactly one visual token per placeholder position and computes a loss.
    with torch.no_grad():
        out = model(**batch)
    assert torch.isfinite(out.loss)


def test_bad_samples_are_skipped_once_and_counted(tmp_path, tiny_model, caplog):
    model, tok = tiny_model
    good = tmp_path / "good.png"
    _png(good, (0, 255, 0))
    garbage = tmp_path / "garbage.png"
    garbage.write_bytes(b"this is not an image at all")
    # A PNG whose header is fine but whose compressed data is damaged: only decoding finds out
    # (a JPEG cut short is already refused from its header: no end-of-image marker).
    noise = np.random.default_rng(0).integers(0, 256, (128, 128, 3), dtype=np.uint8)
    _, buf = cv2.imencode(".png", noise)
    data = bytearray(buf.tobytes())
    idat = data.find(b"IDAT") + 4
    data[idat + 2 : idat + 2002] = bytes(2000)  # zeroed deflate data (its chunk CRC no longer matches)
    truncated = tmp_path / "truncated.png"
    truncated.write_bytes(bytes(data))
    convs = [
        _conv("good", [good]),
        _conv("missing", [tmp_path / "nope.png"]),
        _conv("garbage", [garbage]),
        _conv("truncated", [truncated]),
        _conv("long", [good], answer="Red square " * 300),
        Conversation("malformed", (), (), problem="conversation turn 0 needs 'from' and 'value'"),
        _conv("good2", [good], answer="Green"),
    ]
    with caplog.at_level(logging.WARNING, logger="eyecare_edge.training"):
        ds = EyecareDataset(convs, tok, model.config, max_length=400)
        assert [c.id for c in ds.items] == ["good", "truncated", "good2"]
        assert set(ds.skips.reasons) == {"missing", "garbage", "long", "malformed"}
        assert ds.skips.reasons["missing"].startswith("missing image")
        assert ds.skips.reasons["garbage"].startswith("unreadable image")
        assert ds.skips.reasons["long"].startswith("too long")
        # The truncated JPEG fails when decoded: the next good sample comes instead, the skip is listed.
        item = ds[1]
        assert item["sample_id"] == "good2"
        assert [s[0] for s in item["skipped"]] == ["truncated"]
        again = ds[1]
        assert again["sample_id"] == "good2" and again["skipped"] == []
    assert len(ds.skips) == 5
    assert ds.skips.by_reason() == {"missing image": 1, "unreadable image": 2, "too long": 1, "bad record": 1}
    warned = [r.getMessage() for r in caplog.records if "skipping sample" in r.getMessage()]
    assert len(warned) == 5 and len({w.split(":")[0] for w in warned}) == 5


def test_tile_cache_is_bounded():
    from eyecare_edge.preprocess import PreprocessConfig, preprocess_image

    cfg = PreprocessConfig(tile_size=28, patch_size=14, pinpoints=((28, 28),))
    item = preprocess_image(np.zeros((20, 20, 3), np.uint8), cfg)
    cache = TileCache(max_bytes=item.tiles.nbytes * 2)
    for k in range(5):
        cache.put((f"p{k}", False), item)
    assert len(cache) == 2 and cache.nbytes <= cache.max_bytes
    assert cache.get(("p0", False)) is None and cache.get(("p4", False)) is item
