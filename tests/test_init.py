"""`eyecare-edge init`: presets and local pretrained parts -> loadable checkpoints."""

from __future__ import annotations

import json

import torch
from click.testing import CliRunner
from eyecare_edge.training.checkpoint import load_checkpoint
from eyecare_edge.training.tokenizer import train_bpe_tokenizer
from transformers import LlamaConfig, LlamaForCausalLM, SiglipVisionConfig, SiglipVisionModel

from eyecare_edge.cli import main
from eyecare_edge.prompts import Message, get_template, render


def test_init_tiny(tmp_path):
    out = tmp_path / "tiny"
    r = CliRunner().invoke(main, ["init", "--preset", "tiny", "-o", str(out)])
    assert r.exit_code == 0, r.output
    assert "wrote tiny checkpoint" in r.output
    model, tok = load_checkpoint(out)
    cfg = model.config
    assert cfg.preset == "tiny" and cfg.chat_template_name == "chatml"
    assert cfg.text_config.vocab_size >= len(tok) and cfg.text_config.vocab_size % 64 == 0
    assert cfg.text_config.hidden_size % 256 == 0
    assert tok.eos_token == "<|im_end|>" and tok.convert_tokens_to_ids("<|im_start|>") < len(tok)
    # the HF chat template renders what eyecare_edge.prompts renders
    msgs = [Message("user", "Which eye?")]
    ours = render(get_template("chatml"), msgs, system="")
    theirs = tok.apply_chat_template(
        [{"role": "user", "content": "Which eye?"}], tokenize=False, add_generation_prompt=True
    )
    assert ours == theirs
    # the tokenizer learned the domain's words
    assert len(tok.tokenize(" haemorrhages")) <= 2
    assert json.loads((out / "config.json").read_text())["model_type"] == "eyecare_gpt"


def test_init_from_local_vision_and_llm_dirs(tmp_path):
    vision_dir, llm_dir = tmp_path / "siglip", tmp_path / "llm"
    torch.manual_seed(0)
    sv = SiglipVisionModel(
        SiglipVisionConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=3,
            num_attention_heads=2,
            image_size=112,
            patch_size=14,
        )
    )
    sv.save_pretrained(vision_dir)
    tok = train_bpe_tokenizer(["a small corpus of words"], vocab_size=300, chat_template="qwen_2")
    llm = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=320,
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
        )
    )
    llm.save_pretrained(llm_dir)
    tok.save_pretrained(llm_dir)
    out = tmp_path / "ckpt"
    r = CliRunner().invoke(
        main,
        [
            "init",
            "--preset",
            "eyecare-7b",
            "--vision",
            str(vision_dir),
            "--llm",
            str(llm_dir),
            "-o",
            str(out),
        ],
    )
    assert r.exit_code == 0, r.output
    model, _ = load_checkpoint(out)
    # LLaVA convention: the tower's last block is dropped
    assert model.config.vision_config.num_hidden_layers == 2
    assert torch.equal(
        model.vision_tower.encoder.layers[1].mlp.fc1.weight, sv.encoder.layers[1].mlp.fc1.weight
    )
    assert torch.equal(
        model.vision_tower.embeddings.patch_embedding.weight, sv.embeddings.patch_embedding.weight
    )
    assert torch.equal(
        model.language_model.model.layers[1].mlp.up_proj.weight, llm.model.layers[1].mlp.up_proj.weight
    )
    assert model.config.preprocess_config().tile_size == 112 and model.config.chat_template_name == "qwen_2"
    assert model.config.connector_in_features == 3 * 64


def test_init_usage_errors(tmp_path):
    r = CliRunner().invoke(main, ["init", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2 and "--preset" in r.output
    r = CliRunner().invoke(main, ["init", "--preset", "huge", "-o", str(tmp_path / "x")])
    assert r.exit_code == 2
    bad = tmp_path / "notsiglip"
    bad.mkdir()
    r = CliRunner().invoke(
        main, ["init", "--preset", "eyecare-3.8b", "--vision", str(bad), "-o", str(tmp_path / "y")]
    )
    assert r.exit_code == 1 and "notsiglip" in r.output
