"""`train --stage vision`: image-level labels from CSV/JSONL, bad rows skipped once and counted,
a tower that learns a visible label, vision_eval.json, and a checkpoint the other stages read."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner

from eyecare_edge.cli import main


def _image(colour: str, side: str, rng: np.random.Generator) -> np.ndarray:
    """A grey noisy field with a coloured disc on one side: colour and side are the labels."""
    img = (rng.normal(110, 12, size=(96, 128, 3))).clip(0, 255).astype(np.uint8)
    bgr = (40, 40, 220) if colour == "red" else (220, 60, 40)
    x = 32 if side == "left" else 96
    cv2.circle(img, (x + int(rng.integers(-6, 7)), 48 + int(rng.integers(-10, 11))), 16, bgr, -1)
    return img


@pytest.fixture(scope="module")
def labelled(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("labelled")
    (root / "img").mkdir()
    rng = np.random.default_rng(0)
    lines = ["path,colour,side,id"]
    for i in range(48):
        colour, side = ("red", "blue")[i % 2], ("left", "right")[(i // 2) % 2]
        cv2.imwrite(str(root / "img" / f"{i}.png"), _image(colour, side, rng))
        lines.append(f"img/{i}.png,{colour},{side},{i}")
    (root / "img" / "broken.jpg").write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    lines.append("img/broken.jpg,red,left,b1")  # undecodable
    lines.append("img/nowhere.png,red,left,b2")  # missing file
    lines.append("img/0.png,,,b3")  # no labels at all
    (root / "labels.csv").write_text("\n".join(lines) + "\n")
    return root


@pytest.fixture(scope="module")
def init_ckpt(tmp_path_factory) -> Path:
    from eyecare_edge.training.checkpoint import init_checkpoint

    return init_checkpoint("tiny", tmp_path_factory.mktemp("vs") / "init", llm_layers=1, vision_layers=2)


def test_read_labels_csv_and_jsonl_skip_bad_rows(labelled, tmp_path):
    from eyecare_edge.training.labels import LabelSkips, class_vocab, drop_unknown, read_labels

    skips = LabelSkips()
    rows, names = read_labels(labelled / "labels.csv", skips=skips)
    assert names == ["colour", "side"]  # path and id are not labels
    assert len(rows) == 49  # 48 good + the undecodable one (decoding is checked when tiles are made)
    assert skips.by_reason() == {"missing image": 1, "no labels": 1}
    # JSONL: null is "unknown for this image", booleans become yes/no
    jl = tmp_path / "labels.jsonl"
    jl.write_text(
        json.dumps({"image": str(labelled / "img/1.png"), "dr": True, "eye": None})
        + "\n"
        + json.dumps({"image": str(labelled / "img/2.png"), "dr": False, "eye": "OS"})
        + "\n"
    )
    rows2, names2 = read_labels(jl)
    assert names2 == ["dr", "eye"] and [r.labels for r in rows2] == [{"dr": "yes"}, {"dr": "no", "eye": "OS"}]
    # a held-out class the training rows never had is an unknown label: skipped and counted
    more = LabelSkips()
    kept = drop_unknown(rows2, class_vocab(rows2[:1], ["dr"]), more)
    assert kept == rows2[:1] and more.by_reason() == {"unknown label": 1}


def test_vision_stage_learns_a_visible_label_and_keeps_the_llm(labelled, init_ckpt, tmp_path):
    out = tmp_path / "vision"
    args = ["train", "--stage", "vision", "--init", str(init_ckpt), "--data", str(labelled / "labels.csv")]
    args += ["--max-steps", "40", "--batch-size", "8", "--lr", "2e-3", "--eval-fraction", "0.25"]
    args += ["--budget", "minimal", "--threads", "1", "--quiet", "--json", "-o", str(out)]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    line = next(ln for ln in reversed(res.output.splitlines()) if '{"out"' in ln)
    result = json.loads(line[line.index('{"out"') :])  # progress bars share the line on stderr
    assert result["stage"] == "vision" and result["skip_reasons"] == {
        "missing image": 1,
        "no labels": 1,
        "unreadable image": 1,
    }
    ev = json.loads((out / "vision_eval.json").read_text())
    assert set(ev["labels"]) == {"colour", "side"}
    for v in ev["labels"].values():
        assert set(v) == {"accuracy", "chance", "n", "token_probe_accuracy"}
        assert v["n"] in (11, 12) and 0 <= v["chance"] <= 1
    assert ev["labels"]["colour"]["accuracy"] >= 0.9  # a random tower cannot do this
    assert "(tiles+global;" in ev["objective"]  # the heads' default pooling, as the heads were built
    # the per-token probes read the visible label from single tokens too, and are kept for align
    assert ev["labels"]["colour"]["token_probe_accuracy"] >= 0.9
    from eyecare_edge.training.label_probes import load_probes

    probes = load_probes(out)
    assert probes is not None and probes.labels == ev["classes"]
    assert probes.weight.shape[0] == sum(len(c) for c in ev["classes"].values()) == probes.bias.shape[0]

    from eyecare_edge.training.checkpoint import load_checkpoint

    before, _ = load_checkpoint(init_ckpt)
    after, _ = load_checkpoint(out)
    assert after.config.preprocess["max_tiles"] == 1  # --budget is stored like the other stages do
    # init marks its random tower; the trained one is no longer random, so no later stage
    # re-initialises it
    assert before.config.vision_tower_random is True and after.config.vision_tower_random is False
    b, a = before.state_dict(), after.state_dict()
    tower = [k for k in a if k.startswith("vision_tower.")]
    assert any(not torch.equal(a[k], b[k]) for k in tower)
    assert all(torch.equal(a[k], b[k]) for k in a if not k.startswith("vision_tower."))


def test_pool_images_puts_the_global_view_beside_the_tile_mean():
    from eyecare_edge.training.label_probes import per_image_mean
    from eyecare_edge.training.vision_stage import pool_images

    per_tile = torch.arange(12, dtype=torch.float32).reshape(6, 2)  # 6 tiles of 3 images: 3, 1, 2
    owner = torch.tensor([0, 0, 0, 1, 2, 2])
    plain = pool_images(per_tile, owner, 3, with_global=False)
    assert torch.equal(plain, per_image_mean(per_tile, owner, 3))
    both = pool_images(per_tile, owner, 3, with_global=True)
    assert both.shape == (3, 4)
    assert torch.equal(both[:, :2], plain)
    assert torch.equal(both[:, 2:], per_tile[[0, 3, 4]])  # each image's first tile: its global view


def test_vision_stage_bad_options(init_ckpt, labelled, tmp_path):
    base = ["train", "--stage", "vision", "--init", str(init_ckpt), "-o", str(tmp_path / "o")]
    res = CliRunner().invoke(main, [*base, "--data", str(labelled / "labels.csv"), "--labels", "grade"])
    assert res.exit_code == 1 and "no label column(s) ['grade']" in res.output
    empty = tmp_path / "only_paths.csv"
    empty.write_text("path\nimg/0.png\n")
    res = CliRunner().invoke(main, [*base, "--data", str(empty)])
    assert res.exit_code == 1 and "no label columns" in res.output
    from eyecare_edge.training.train_options import TrainingError, TrainOptions

    with pytest.raises(TrainingError, match="unknown head pooling 'max'"):
        TrainOptions(init="i", data="d", out="o", stage="vision", head_pooling="max")
    with pytest.raises(TrainingError, match="align/sft have none"):
        TrainOptions(init="i", data="d", out="o", stage="sft", head_pooling="tiles")


def test_label_heads_read_the_pooling_they_were_built_for():
    """The heads' width follows the pooling: a head built for the tile mean cannot be fed the
    global view too, and the other way round, so the flag cannot be silently ignored."""
    from eyecare_edge.training.vision_stage import LabelHeads

    vocab = {"eye": ["OD", "OS"], "dr": ["0", "2", "3"]}
    per_tile, owner = torch.randn(5, 8), torch.tensor([0, 0, 1, 1, 1])
    for pooling in ("tiles", "tiles+global"):
        heads = LabelHeads(8, vocab, pooling=pooling)
        with_global = pooling == "tiles+global"
        assert heads.norm.normalized_shape == ((16,) if with_global else (8,))
        assert [lg.shape for lg in heads(per_tile, owner, 2)] == [(2, 2), (2, 3)]
        # the global view's half is really read: changing an image's first tile moves its logits
        moved = per_tile.clone()
        moved[2] += 5.0
        moved[3:] -= 5.0 / 2  # keep image 1's tile mean where it was
        a, b = heads(per_tile, owner, 2)[0], heads(moved, owner, 2)[0]
        assert torch.allclose(a[0], b[0])
        assert torch.allclose(a[1], b[1]) != with_global


def test_connector_init_points_units_at_the_label_probes(init_ckpt):
    """The first R hidden units become the probes' standardised logits; the rest stay random;
    the output lands on the text embeddings' norm; probes of another width are refused."""
    from eyecare_edge.training.checkpoint import load_checkpoint
    from eyecare_edge.training.connector_init import init_connector_from_data
    from eyecare_edge.training.label_probes import SavedProbes

    model, _ = load_checkpoint(init_ckpt)
    conn = model.connector
    tiles = torch.randn(4, 3, 112, 112, generator=torch.Generator().manual_seed(0))
    width = conn.mm_projector[0].in_features
    g = torch.Generator().manual_seed(1)
    probes = SavedProbes(torch.randn(6, width, generator=g), torch.randn(6, generator=g), {"a": ["x", "y"]})
    with torch.no_grad():
        x = conn.channels(model.vision_tower(tiles)).reshape(-1, width)
    figures = init_connector_from_data(model, tiles, probes)
    assert figures["probe_units"] == 6
    with torch.no_grad():
        pre = conn.mm_projector[0](x)
        logits = x @ probes.weight.T + probes.bias
        out = conn.mm_projector(x)
    z = (logits - logits.mean(0)) / logits.std(0)
    torch.testing.assert_close(pre[:, :6], z, atol=1e-3, rtol=1e-3)
    assert torch.allclose(pre.mean(0), torch.zeros(pre.shape[1]), atol=1e-4)
    emb_norm = model.get_input_embeddings().weight.detach().norm(dim=-1).mean()
    assert float(out.norm(dim=-1).mean()) == pytest.approx(float(emb_norm), rel=1e-3)
    wrong = SavedProbes(torch.randn(2, width + 1), torch.zeros(2), {"a": ["x", "y"]})
    with pytest.raises(ValueError, match="probes from another tower"):
        init_connector_from_data(model, tiles, wrong)


def test_balanced_class_weights_make_each_class_weigh_the_same():
    from eyecare_edge.training.vision_stage import balanced_class_weights

    # label 0: 4 "no", 1 "yes", one row without the label; label 1: 3 classes, one never seen
    targets = torch.tensor([[0, 0], [0, 1], [0, 1], [0, 0], [1, 0], [-100, 0]])
    w0, w1 = balanced_class_weights(targets, [2, 3])
    assert torch.allclose(w0, torch.tensor([5 / 8, 5 / 2]))
    # every class's total weight is n / K: the rare class counts as much as the common one
    assert torch.allclose(w0 * torch.tensor([4.0, 1.0]), torch.tensor([2.5, 2.5]))
    assert torch.allclose(w1[:2] * torch.tensor([4.0, 2.0]), torch.tensor([2.0, 2.0]))
    assert torch.isfinite(w1).all()  # an unseen class gets a finite weight (it never occurs)


def _vision_args(init: Path, data: Path, out: Path) -> list[str]:
    return ["train", "--stage", "vision", "--init", str(init), "--data", str(data), "-o", str(out)]


def _vision_run(init: Path, data: Path, out: Path, *extra: str) -> dict[str, torch.Tensor]:
    args = [*_vision_args(init, data, out), "--batch-size", "4", "--budget", "minimal"]
    args += ["--threads", "1", "--quiet", *extra]
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    from eyecare_edge.training.checkpoint import load_checkpoint

    return {k: v for k, v in load_checkpoint(out)[0].state_dict().items() if k.startswith("vision_tower.")}


def test_only_a_random_tower_gets_sincos_positions_and_pca_only_when_asked(labelled, init_ckpt, tmp_path):
    """At learning rate 0 the tower changes only by its init: `init`'s random tower gets the
    sin-cos position table and nothing else; --patch-init adds the PCA patch filters; a trained
    tower (the flag cleared) is left bit-identical, and --patch-init there touches only its
    patch filters."""
    from eyecare_edge.training.checkpoint import load_checkpoint
    from eyecare_edge.training.vision_stage import init_position_embedding_sincos

    data = labelled / "labels.csv"
    lr0 = ("--max-steps", "1", "--lr", "0")
    pos = "vision_tower.embeddings.position_embedding.weight"
    patch = "vision_tower.embeddings.patch_embedding.weight"
    model, _ = load_checkpoint(init_ckpt)
    before = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("vision_tower.")}
    init_position_embedding_sincos(model)
    sincos = model.vision_tower.embeddings.position_embedding.weight.detach()

    first = _vision_run(init_ckpt, data, tmp_path / "a", *lr0)
    assert torch.equal(first[pos], sincos) and not torch.equal(first[pos], before[pos])
    assert all(torch.equal(first[k], before[k]) for k in before if k != pos)
    pca = _vision_run(init_ckpt, data, tmp_path / "p", *lr0, "--patch-init")
    assert torch.equal(pca[pos], sincos) and not torch.equal(pca[patch], before[patch])

    trained = _vision_run(init_ckpt, data, tmp_path / "t", "--max-steps", "2", "--lr", "1e-3")
    again = _vision_run(tmp_path / "t", data, tmp_path / "b", *lr0)
    assert all(torch.equal(again[k], trained[k]) for k in trained)  # trained: nothing re-initialised
    forced = _vision_run(tmp_path / "t", data, tmp_path / "c", *lr0, "--patch-init")
    assert not torch.equal(forced[patch], trained[patch]) and torch.equal(forced[pos], trained[pos])


def test_init_position_embedding_sincos_codes_row_and_column():
    """Half the channels code the row, half the column; every position gets its own code."""
    from types import SimpleNamespace

    from eyecare_edge.training.vision_stage import init_position_embedding_sincos

    table = torch.nn.Embedding(64, 32)
    model = SimpleNamespace(
        vision_tower=SimpleNamespace(embeddings=SimpleNamespace(position_embedding=table))
    )
    init_position_embedding_sincos(model)
    w = table.weight.detach().reshape(8, 8, 32)
    assert torch.equal(w[3, 0, :16], w[3, 7, :16]) and torch.equal(w[0, 5, 16:], w[6, 5, 16:])
    assert torch.cdist(w.reshape(64, 32), w.reshape(64, 32)).add(torch.eye(64)).min() > 0.1
    assert float(w.abs().max()) <= 1.0
    with pytest.raises(ValueError, match="square grid"):
        init_position_embedding_sincos(
            SimpleNamespace(
                vision_tower=SimpleNamespace(
                    embeddings=SimpleNamespace(position_embedding=torch.nn.Embedding(60, 32))
                )
            )
        )


def test_token_loss_trains_the_tower(labelled, init_ckpt, tmp_path):
    """The per-token label loss reaches the tower: the same seeded step with weight 0 and weight 1
    gives different towers, and with the same weight the same one."""
    data = labelled / "labels.csv"
    steps = ("--max-steps", "2", "--lr", "1e-3")
    w0 = _vision_run(init_ckpt, data, tmp_path / "w0", *steps, "--token-loss-weight", "0")
    w1 = _vision_run(init_ckpt, data, tmp_path / "w1", *steps, "--token-loss-weight", "1")
    w1b = _vision_run(init_ckpt, data, tmp_path / "w1b", *steps, "--token-loss-weight", "1")
    assert all(torch.equal(w1[k], w1b[k]) for k in w1)
    assert any(not torch.equal(w0[k], w1[k]) for k in w0 if "encoder.layers" in k)
    res = CliRunner().invoke(
        main, [*_vision_args(init_ckpt, data, tmp_path / "x"), "--token-loss-weight", "-1"]
    )
    assert res.exit_code == 2 and "token-loss-weight" in res.output


def test_vision_stage_in_bf16_and_fp16_refused(labelled, init_ckpt, tmp_path):
    """--precision bf16 trains the tower under CPU autocast (recorded in vision_eval.json) with
    fp32 weights saved; fp16, which the CPU cannot autocast to, is refused with the reason."""
    data = labelled / "labels.csv"
    before = _vision_run(init_ckpt, data, tmp_path / "w0", "--max-steps", "1", "--lr", "0")
    bf = _vision_run(
        init_ckpt, data, tmp_path / "bf", "--max-steps", "2", "--lr", "1e-3", "--precision", "bf16"
    )
    assert all(v.dtype == torch.float32 for v in bf.values())
    assert any(not torch.equal(bf[k], before[k]) for k in bf if "encoder.layers" in k)
    assert "bf16 autocast" in json.loads((tmp_path / "bf" / "vision_eval.json").read_text())["objective"]
    fp32 = tmp_path / "f32"
    _vision_run(init_ckpt, data, fp32, "--max-steps", "1", "--precision", "fp32")
    assert json.loads((fp32 / "vision_eval.json").read_text())["objective"].endswith("fp32")
    res = CliRunner().invoke(main, [*_vision_args(init_ckpt, data, tmp_path / "x"), "--precision", "fp16"])
    assert res.exit_code == 1 and "autocasts to bf16 only" in res.output
