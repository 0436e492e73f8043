"""Training stages end to end on a tiny model: the loss falls, stages freeze the right parts, resume
continues from the saved step, LoRA is merged exactly, 2-process DDP (gloo) works, bad samples are
skipped and counted, and the CLI/YAML/DeepSpeed options reach the Trainer."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import cv2
import numpy as np
import pytest
import torch
from click.testing import CliRunner
from eyecare_edge.training.checkpoint import init_checkpoint, load_checkpoint
from eyecare_edge.training.train import run_training, training_arguments_kwargs
from eyecare_edge.training.train_options import TrainingError, TrainOptions, resolve_options
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[1]
TEXTS = [
    "What colour is the square? A. Red B. Blue Answer with the option's letter from the given choices directly.",
    "The square is red. The square is blue.",
]
COLOURS = {"Red": (255, 0, 0), "Blue": (0, 0, 255)}


def _question(options: dict[str, str]) -> str:
    lines = ["<image>", "What colour is the square?"]
    lines += [f"{k}. {v}" for k, v in sorted(options.items())]
    lines.append("Answer with the option's letter from the given choices directly.")
    return "\n".join(lines)


@pytest.fixture(scope="module")
def squares(tmp_path_factory) -> Path:
    """8 small images, red or blue, with closed questions whose option order varies."""
    root = tmp_path_factory.mktemp("squares")
    (root / "images").mkdir()
    rng = np.random.default_rng(0)
    records = []
    for i in range(8):
        colour = "Red" if i % 2 == 0 else "Blue"
        h, w = int(rng.integers(40, 90)), int(rng.integers(40, 90))
        img = np.zeros((h, w, 3), np.uint8)
        img[:] = COLOURS[colour]
        cv2.imwrite(str(root / "images" / f"sq{i}.png"), img[:, :, ::-1])
        options = {"A": "Red", "B": "Blue"} if i % 4 < 2 else {"A": "Blue", "B": "Red"}
        letter = next(k for k, v in options.items() if v == colour)
        records.append(
            {
                "id": f"sq{i}",
                "image": f"images/sq{i}.png",
                "modality": "fundus",
                "conversations": [
                    {"from": "human", "value": _question(options)},
                    {"from": "gpt", "value": letter},
                    {"from": "human", "value": "Describe the image."},
                    {"from": "gpt", "value": f"The square is {colour.lower()}."},
                ],
            }
        )
    (root / "train.json").write_text(json.dumps(records))
    bench = [
        {
            "id": f"b{i}",
            "images": [f"images/sq{i}.png"],
            "modality": "fundus",
            "task": "closed",
            "question": "What colour is the square?",
            "options": {"A": "Red", "B": "Blue"},
            "answer": "Red" if i % 2 == 0 else "Blue",
        }
        for i in range(4)
    ]
    (root / "bench.jsonl").write_text("".join(json.dumps(b) + "\n" for b in bench))
    return root


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("init") / "tiny"
    init_checkpoint("tiny", out, tokenizer_texts=TEXTS, llm_layers=1, vision_layers=1)
    return out


def _opts(ckpt: Path, squares: Path, out: Path, **kw) -> TrainOptions:
    base = {
        "init": str(ckpt),
        "data": str(squares / "train.json"),
        "out": str(out),
        "stage": "sft",
        "max_steps": 4,
        "batch_size": 2,
        "lr": 2e-3,
        "train_vision": True,
        "logging_steps": 1,
        "save_steps": 1000,
        "warmup": 0.0,
    }
    base.update(kw)
    return TrainOptions(**base)


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "model.safetensors"))


@pytest.fixture(scope="module")
def trained(ckpt, squares, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "sft"
    result = run_training(_opts(ckpt, squares, out, max_steps=30, lr=3e-3), progress=False)
    return out, result


def test_tiny_run_lowers_the_loss(trained, ckpt):
    out, result = trained
    losses = [loss for _, loss in result.loss_history]
    assert result.global_step == 30 and len(losses) >= 30
    first, last = float(np.mean(losses[:3])), float(np.mean(losses[-5:]))
    assert last < 0.5 * first, losses
    assert result.final_loss == losses[-1]
    assert result.samples_seen == 60 and result.skipped == 0
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 30
    assert [h["loss"] for h in state["log_history"] if "loss" in h][-1] == pytest.approx(losses[-1])
    # The final checkpoint is a plain, loadable HF directory with trained weights.
    _, tok = load_checkpoint(out)
    before, after = _state(ckpt), _state(out)
    assert set(before) == set(after)
    assert not torch.equal(
        before["connector.mm_projector.0.weight"], after["connector.mm_projector.0.weight"]
    )
    assert tok("A", add_special_tokens=False)["input_ids"]
    assert json.loads((out / "train_result.json").read_text())["global_step"] == 30
    # init's random tower, trained here (--train-vision), is no longer flagged random
    assert json.loads((ckpt / "config.json").read_text())["vision_tower_random"] is True
    assert json.loads((out / "config.json").read_text()).get("vision_tower_random", False) is False


def test_evaluate_closed_qa_reports_accuracy(trained, squares):
    from eyecare_edge.training.evaluate import evaluate_closed_qa, generate_answer, prompt_inputs

    out, _ = trained
    model, tok = load_checkpoint(out)
    res = evaluate_closed_qa(model, tok, squares / "bench.jsonl", limit=3)
    assert res["n"] == 3 and len(res["items"]) == 3
    assert res["accuracy"] == pytest.approx(sum(it["correct"] for it in res["items"]) / 3)
    assert set(res["per_modality"]) == {"fundus"}
    # Greedy and deterministic; the prompt is the runtime's (one image slot run, generation header).
    rgb = cv2.imread(str(squares / "images" / "sq0.png"))[:, :, ::-1].copy()
    q = "What colour is the square?"
    a1 = generate_answer(model, tok, [rgb], q, max_new_tokens=6)
    assert a1 == generate_answer(model, tok, [rgb], q, max_new_tokens=6)
    ids = prompt_inputs(model, tok, [rgb], q).input_ids[0].tolist()
    assert tok.decode([i for i in ids if i >= 0]).endswith("<|im_start|>assistant\n")
    assert "<|im_end|>" not in a1


def test_align_trains_only_the_connector(ckpt, squares, tmp_path):
    out = tmp_path / "align"
    result = run_training(
        _opts(ckpt, squares, out, stage="align", train_vision=False, max_steps=2, budget="minimal")
    )
    assert result.global_step == 2 and "connector, image_newline" in result.trainable
    # The token budget trained with is recorded in the checkpoint, so export and runtime tile alike.
    cfg = json.loads((out / "config.json").read_text())
    pre = cfg["preprocess"]
    assert (pre["max_tiles"], pre["anyres_max"]) == (1, 1)
    assert cfg["vision_tower_random"] is True  # the tower was frozen: still init's random one
    before, after = _state(ckpt), _state(out)
    for k in before:
        same = torch.equal(before[k], after[k])
        if k.startswith(("connector.", "image_newline")):
            assert not same, k
        elif k.startswith(("vision_tower.", "language_model.")):
            assert same, k


def test_each_part_trains_at_its_own_learning_rate(ckpt, squares, tmp_path):
    """sft with the tower unfrozen: a part given rate 0 ends bit-identical, the others move."""
    before = _state(ckpt)

    def moved(out: Path, **kw) -> dict[str, bool]:
        run_training(_opts(ckpt, squares, out, max_steps=2, **kw), progress=False)
        after = _state(out)
        parts = {"vision_tower.": "vision", "connector.": "connector", "language_model.": "llm"}
        return {
            part: any(not torch.equal(before[k], after[k]) for k in before if k.startswith(prefix))
            for prefix, part in parts.items()
        }

    assert moved(tmp_path / "frozen-tower", vision_lr=0.0) == {
        "vision": False,
        "connector": True,
        "llm": True,
    }
    assert moved(tmp_path / "frozen-conn", connector_lr=0.0, vision_lr=1e-3) == {
        "vision": True,
        "connector": False,
        "llm": True,
    }


def test_resume_continues_from_the_saved_step(ckpt, squares, tmp_path):
    out = tmp_path / "resume"
    first = run_training(_opts(ckpt, squares, out, max_steps=4, save_steps=2), progress=False)
    assert first.global_step == 4 and first.resumed_from is None
    assert (out / "checkpoint-4" / "trainer_state.json").is_file()
    second = run_training(_opts(ckpt, squares, out, max_steps=6, save_steps=2), progress=False)
    assert second.resumed_from == 4
    assert second.global_step == 6
    # Only the remaining 2 steps ran (2 samples each), and the loss history spans both runs.
    assert second.samples_seen == 4
    steps = [s for s, _ in second.loss_history]
    assert steps[-1] == 6 and {1, 2, 3, 4, 5, 6} <= set(steps)
    assert json.loads((out / "trainer_state.json").read_text())["global_step"] == 6
    # --no-resume starts again from the init checkpoint.
    third = run_training(
        _opts(ckpt, squares, out, max_steps=2, save_steps=1000, resume=False), progress=False
    )
    assert third.resumed_from is None and third.global_step == 2


def test_lora_merged_checkpoint_equals_the_adapter_model(ckpt, squares, tmp_path):
    from eyecare_edge.training.collate import EyecareCollator, pop_meta
    from eyecare_edge.training.data import EyecareDataset, read_conversations
    from eyecare_edge.training.stages import LoraSettings, configure_stage

    out = tmp_path / "lora"
    result = run_training(
        _opts(ckpt, squares, out, max_steps=3, save_steps=3, lora_r=4, lr=2e-2, train_vision=False)
    )
    assert "LoRA r=4" in result.trainable
    adapted = _state(out / "checkpoint-3")
    assert any(".lora_B." in k for k in adapted)
    assert any(v.abs().max() > 0 for k, v in adapted.items() if ".lora_B." in k)
    merged = _state(out)
    assert not any("lora" in k or "base_layer" in k for k in merged)
    assert set(merged) == set(_state(ckpt))

    # The model with adapters (as trained, from the resumable checkpoint) vs the merged one.
    peft_model, tok = load_checkpoint(ckpt)
    configure_stage(peft_model, "sft", lora=LoraSettings(r=4))
    missing, unexpected = peft_model.load_state_dict(adapted, strict=False)
    assert not unexpected and all("lm_head" in k for k in missing)  # tied to the embeddings
    peft_model.tie_weights()
    peft_model.eval()
    plain, _ = load_checkpoint(out)
    ds = EyecareDataset(read_conversations(squares / "train.json"), tok, plain.config)
    batch = EyecareCollator(tok.pad_token_id)([ds[0], ds[1]])
    pop_meta(batch)
    batch.pop("labels")
    with torch.no_grad():
        a = peft_model(**batch).logits
        b = plain(**batch).logits
    assert torch.allclose(a, b, atol=1e-4), (a - b).abs().max()
    base, _ = load_checkpoint(ckpt)
    with torch.no_grad():
        c = base.eval()(**batch).logits
    assert (a - c).abs().max() > 1e-3  # the adapters did change the model


def test_corrupt_and_missing_images_are_skipped_and_counted(ckpt, squares, tmp_path):
    from eyecare_edge.commands.train import train

    data = json.loads((squares / "train.json").read_text())
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 40)
    extra = [
        dict(data[0], id="gone", image=str(tmp_path / "gone.png")),
        dict(data[1], id="bad", image=str(broken)),
    ]
    f = tmp_path / "train.json"
    for r in data[:4]:
        r["image"] = str(squares / r["image"])
    f.write_text(json.dumps(data[:4] + extra))
    cfg = tmp_path / "train.yaml"
    cfg.write_text(f"init: {ckpt}\nstage: sft\nmax-steps: 2\nbatch_size: 2\nlogging_steps: 1\nlr: 1.0e-3\n")
    out = tmp_path / "out"
    res = CliRunner().invoke(
        train, ["--config", str(cfg), "--data", str(f), "-o", str(out), "--quiet", "--max-steps", "3"]
    )
    assert res.exit_code == 0, res.output
    line = res.output.strip().splitlines()[-1]
    assert "2 skipped" in line and "missing image: 1" in line and "unreadable image: 1" in line
    assert "3 steps" in line and "final loss" in line and "samples seen" in line
    assert json.loads((out / "train_result.json").read_text())["skipped"] == 2
    load_checkpoint(out)


def test_options_yaml_cli_and_deepspeed_passthrough(tmp_path, ckpt, squares):
    cfg = tmp_path / "c.yaml"
    cfg.write_text(
        f"init: {ckpt}\ndata: {squares / 'train.json'}\nout: {tmp_path / 'o'}\nstage: align\n"
        "lr: 0.5\nbatch-size: 3\ndeepspeed: configs/deepspeed_zero2.json\n"
    )
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        opts = resolve_options(cfg, lr=0.25, batch_size=None)
        assert (opts.stage, opts.lr, opts.batch_size) == ("align", 0.25, 3)  # the CLI wins, None doesn't
        kw = training_arguments_kwargs(opts, progress=False)
        assert kw["deepspeed"] == "configs/deepspeed_zero2.json"
        assert kw["learning_rate"] == 0.25 and kw["per_device_train_batch_size"] == 3
        assert kw["lr_scheduler_type"] == "cosine" and kw["remove_unused_columns"] is False
        assert kw["label_names"] == ["labels"]
    finally:
        os.chdir(cwd)
    for stage, path in ((2, "deepspeed_zero2.json"), (3, "deepspeed_zero3.json")):
        ds = json.loads((ROOT / "configs" / path).read_text())
        assert ds["zero_optimization"]["stage"] == stage
        assert ds["train_micro_batch_size_per_gpu"] == "auto"
    assert TrainOptions(init="i", data="d", out="o", stage="sft", lora_r=8).learning_rate == 2e-4
    assert TrainOptions(init="i", data="d", out="o", stage="sft").learning_rate == 2e-5
    assert TrainOptions(init="i", data="d", out="o", stage="align").learning_rate == 1e-3
    with pytest.raises(TrainingError, match="unknown option"):
        (tmp_path / "bad.yaml").write_text("learning_rate: 1\n")
        resolve_options(tmp_path / "bad.yaml", init="i", data="d", out="o")
    with pytest.raises(TrainingError, match="lora"):
        TrainOptions(init="i", data="d", out="o", stage="align", lora_r=4)
    with pytest.raises(TrainingError, match="--train-vision"):  # a frozen tower has no rate
        TrainOptions(init="i", data="d", out="o", stage="sft", vision_lr=1e-4)
    with pytest.raises(TrainingError, match="--train-vision"):
        TrainOptions(init="i", data="d", out="o", stage="vision", train_vision=True, vision_lr=1e-4)
    with pytest.raises(TrainingError, match="DeepSpeed config not found"):
        TrainOptions(init="i", data="d", out="o", deepspeed=str(tmp_path / "none.json"))
    example = resolve_options(ROOT / "configs" / "train_tiny.yaml", init="i", data="d", out="o")
    assert example.stage in ("align", "sft")


@pytest.mark.slow
def test_two_process_ddp_with_gloo(ckpt, squares, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1", CUDA_VISIBLE_DEVICES="")
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "eyecare_edge.cli", "train", "--init", str(ckpt), "--data", str(squares / "train.json"),
        "--stage", "sft", "--train-vision", "--max-steps", "2", "--batch-size", "2", "--lr", "1e-3",
        "--logging-steps", "1", "--quiet", "--json", "-o", str(out),
    ]  # fmt: skip
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["world_size"] == 2 and result["global_step"] == 2
    assert result["samples_seen"] == 8  # 2 steps x 2 per process x 2 processes
    assert "backend gloo" in proc.stderr or "gloo" in proc.stderr
    load_checkpoint(out)
    assert not torch.equal(
        _state(ckpt)["connector.mm_projector.0.weight"], _state(out)["connector.mm_projector.0.weight"]
    )


def test_auto_precision_is_bf16_only_where_the_hardware_has_it(monkeypatch):
    """`auto`: bf16 on a GPU with it, and on a CPU with native BF16 dot products (AVX-512 BF16 or
    AMX); fp32 on other CPUs, where autocast would emulate bf16 and run slower. Explicit choices
    are taken as given."""
    from eyecare_edge.training.precision import cpu_has_native_bf16, mixed_precision

    for avx512_bf16, amx, expected in ((False, False, False), (True, False, True), (False, True, True)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        assert cpu_has_native_bf16() is expected
        assert mixed_precision("auto", on_gpu=False) == (expected, False)
        assert mixed_precision("auto", on_gpu=False, cpu_bf16=False) == (False, False)
        for on_gpu in (False, True):
            assert mixed_precision("fp32", on_gpu=on_gpu) == (False, False)
            assert mixed_precision("bf16", on_gpu=on_gpu) == (True, False)
    monkeypatch.delattr(torch.cpu, "_is_avx512_bf16_supported")
    monkeypatch.delattr(torch.cpu, "_is_amx_tile_supported")
    assert mixed_precision("auto", on_gpu=False) == (False, False)  # a torch without the probes: fp32
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: True)
    assert mixed_precision("auto", on_gpu=True) == (True, False)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda: False)
    assert mixed_precision("auto", on_gpu=True) == (False, False)


def test_auto_bf16_on_a_cpu_reaches_training_arguments_only_with_use_cpu(monkeypatch, tmp_path):
    """On a CUDA-less machine with native BF16, `auto` gives the Trainer bf16 with use_cpu; with
    DeepSpeed (no use_cpu, which TrainingArguments would refuse bf16 without) it stays fp32."""
    import eyecare_edge.training.precision as precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(precision, "cpu_has_native_bf16", lambda: True)
    opts = TrainOptions(init="i", data="d", out=str(tmp_path / "o"))
    kw = training_arguments_kwargs(opts)
    assert kw["bf16"] is True and kw["use_cpu"] is True and kw["fp16"] is False
    ds = tmp_path / "ds.json"
    ds.write_text("{}")
    kw = training_arguments_kwargs(
        TrainOptions(init="i", data="d", out=str(tmp_path / "o"), deepspeed=str(ds))
    )
    assert kw["bf16"] is False and kw["use_cpu"] is False
    assert (
        training_arguments_kwargs(TrainOptions(init="i", data="d", out="o", precision="fp32"))["bf16"]
        is False
    )


def test_length_mixed_batching_reaches_the_trainer(ckpt, squares, tmp_path, monkeypatch):
    """--batching length-mixed: the Trainer draws its batches from LengthMixedSampler."""
    import eyecare_edge.training.train as train_module
    from eyecare_edge.training.batching import LengthMixedSampler

    orders: list[list[int]] = []

    class Recording(LengthMixedSampler):
        def __iter__(self):
            order = list(super().__iter__())
            orders.append(order)
            return iter(order)

    monkeypatch.setattr(train_module, "LengthMixedSampler", Recording)
    result = run_training(
        _opts(ckpt, squares, tmp_path / "mixed", max_steps=4, batching="length-mixed"), progress=False
    )
    assert result.global_step == 4 and result.samples_seen == 8
    assert orders and sorted(orders[0]) == list(range(8))
