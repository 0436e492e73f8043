"""Importing LLaVA-convention checkpoints: parity with a reference computed from the source tensors.

Every test builds a small LLaVA-family directory in tmp_path (random SigLIP + random LLM + projector
+ image_newline, stored under LLaVA's names), imports it, reloads the result with
`load_checkpoint`, and compares against a computation done directly on the source weights with
transformers' own SigLIP / causal LM and a hand-written projector, following LLaVA's and Dense
Connector's conventions (not ours).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from eyecare_edge.training.checkpoint import load_checkpoint
from eyecare_edge.training.llava_import import (
    LlavaImportError,
    import_llava,
    parse_pinpoints,
    plan_import,
)
from eyecare_edge.training.llava_keys import LLAVA_KEY_TABLE, key_table_markdown, map_key, normalize_key
from eyecare_edge.training.tokenizer import train_bpe_tokenizer
from safetensors.torch import save_file
from transformers import (
    AutoModelForCausalLM,
    LlamaConfig,
    Phi3Config,
    Qwen2Config,
    SiglipVisionConfig,
    SiglipVisionModel,
)

TEXTS = ["The optic disc and macula are normal.", "Drusen at the fovea; refer to a retina clinic."]
VOCAB_ROWS = 320
WIDTH = 64  # tower width
D_LLM = 64
DEPTH = 5  # SigLIP blocks as released; LLaVA uses hidden state 4 (drops block 4)
TOWER = "model.vision_tower.vision_tower."


@pytest.fixture(scope="module")
def tokenizers():
    return {
        t: train_bpe_tokenizer(TEXTS, vocab_size=300, chat_template=t)
        for t in ("phi3_instruct", "qwen_2", "chatml")
    }


def _text_config(llm: str, tokenizer):
    common = dict(
        vocab_size=VOCAB_ROWS,
        hidden_size=D_LLM,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        max_position_embeddings=512,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
        tie_word_embeddings=False,
    )
    if llm == "phi3":
        return Phi3Config(**common, num_key_value_heads=4, original_max_position_embeddings=512)
    if llm == "qwen2":
        return Qwen2Config(**common, num_key_value_heads=2)
    return LlamaConfig(**{**common, "tie_word_embeddings": True}, num_key_value_heads=2)


@dataclass
class Source:
    dir: Path
    tower: SiglipVisionModel
    llm: torch.nn.Module
    proj: dict[str, torch.Tensor]
    newline: torch.Tensor
    state: dict[str, torch.Tensor]
    tokenizer: object


def _write(d: Path, state: dict[str, torch.Tensor], *, shards: int, fmt: str) -> None:
    keys = sorted(state)
    if fmt == "bin":
        torch.save({k: state[k] for k in keys}, d / "pytorch_model.bin")
        return
    if shards == 1:
        save_file({k: state[k].contiguous() for k in keys}, d / "model.safetensors")
        return
    weight_map = {}
    for i in range(shards):
        name = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        part = keys[i::shards]
        save_file({k: state[k].contiguous() for k in part}, d / name)
        weight_map.update(dict.fromkeys(part, name))
    (d / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def build_llava(
    root: Path,
    tokenizers,
    *,
    llm: str = "phi3",
    connector: str = "plain",
    depth: int = DEPTH,
    truncated: bool = False,
    shards: int = 3,
    fmt: str = "safetensors",
    vision_config: bool = True,
    pinpoints=((112, 224), (224, 112), (224, 224)),
    aspect: str = "anyres_max_4",
    extra_config: dict | None = None,
    seed: int = 0,
    write: bool = True,
) -> Source:
    """A LLaVA-convention directory: tower (with its last block unless `truncated`, post-LayerNorm
    and pooling head), projector, image_newline, LLM, config.json with mm_* fields, tokenizer."""
    torch.manual_seed(seed)
    d = root / "llava"
    d.mkdir(parents=True, exist_ok=True)
    tokenizer = tokenizers[{"phi3": "phi3_instruct", "qwen2": "qwen_2", "llama": "chatml"}[llm]]
    text_cfg = _text_config(llm, tokenizer)
    vcfg = SiglipVisionConfig(
        hidden_size=WIDTH,
        intermediate_size=128,
        num_hidden_layers=depth,
        num_attention_heads=4,
        image_size=112,
        patch_size=14,
    )
    tower = SiglipVisionModel(vcfg).eval()
    lm = AutoModelForCausalLM.from_config(text_cfg).eval()
    groups = 1 if connector == "plain" else 3
    proj = {
        "0.weight": torch.randn(D_LLM, groups * WIDTH) * 0.1,
        "0.bias": torch.randn(D_LLM) * 0.1,
        "2.weight": torch.randn(D_LLM, D_LLM) * 0.1,
        "2.bias": torch.randn(D_LLM) * 0.1,
    }
    newline = torch.randn(D_LLM)
    state = {}
    for k, v in tower.state_dict().items():  # transformers 5 drops SigLIP's `vision_model.` level
        k = k if k.startswith("vision_model.") else "vision_model." + k
        if truncated and k.startswith(f"vision_model.encoder.layers.{depth - 1}."):
            continue
        state[TOWER + k] = v.clone()
    state.update({f"model.mm_projector.{k}": v for k, v in proj.items()})
    state["model.image_newline"] = newline
    state.update({k: v.clone() for k, v in lm.state_dict().items()})
    if text_cfg.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    config = {
        **text_cfg.to_dict(),
        "model_type": {"phi3": "llava_phi3", "qwen2": "llava_qwen", "llama": "llava_llama"}[llm],
        "architectures": [
            {"phi3": "LlavaPhi3ForCausalLM", "qwen2": "LlavaQwenForCausalLM"}.get(llm, "Llava")
        ],
        "mm_vision_tower": "google/tiny-siglip-test",
        "mm_hidden_size": groups * WIDTH,
        "mm_projector_type": "mlp2x_gelu",
        "mm_vision_select_layer": -2,
        "mm_vision_select_feature": "patch",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": aspect,
        # LLaVA lists [width, height]
        "image_grid_pinpoints": [list(p) for p in pinpoints] if not isinstance(pinpoints, str) else pinpoints,
        "mm_use_im_start_end": False,
        "mm_use_im_patch_token": False,
    }
    if connector != "plain":
        config["mm_dense_connector_type"] = connector
    if vision_config:
        config["vision_config"] = {**vcfg.to_dict()}
    config.update(extra_config or {})
    if write:
        (d / "config.json").write_text(json.dumps(config, default=str))
        _write(d, state, shards=shards, fmt=fmt)
        tokenizer.save_pretrained(d)
    return Source(d, tower, lm, proj, newline, state, tokenizer)


def reference_encode(src: Source, pixels: torch.Tensor, connector: str) -> torch.Tensor:
    """LLaVA + Dense Connector on the source weights: transformers SigLIP with all hidden states,
    the selected layer (select -2 of the released tower = h[4]); DCI = [h[4], mean(h[0], h[1]),
    mean(h[2], h[3])] (first and second half of the states before the selected one, like DC's
    range(0, 13) / range(13, 26) for so400m); SCI = [h[sel], h[7], h[15]]; then Linear-GELU-Linear."""
    with torch.no_grad():
        hs = src.tower(pixel_values=pixels, output_hidden_states=True).hidden_states
    sel = len(hs) - 2
    if connector == "plain":
        x = hs[sel]
    elif connector == "dci":
        half = sel // 2
        fine = torch.stack(hs[0:half]).mean(0)
        coarse = torch.stack(hs[half:sel]).mean(0)
        x = torch.cat([hs[sel], fine, coarse], dim=-1)
    else:
        x = torch.cat([hs[sel], hs[7], hs[15]], dim=-1)
    p = src.proj
    return F.linear(F.gelu(F.linear(x, p["0.weight"], p["0.bias"])), p["2.weight"], p["2.bias"])


def _pixels(n: int = 3, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, 112, 112, generator=torch.Generator().manual_seed(seed))


def _ids() -> torch.Tensor:
    return torch.tensor([[3, 17, 42, 99, 250, 7, 1]])


def _check_parity(out: Path, src: Source, connector: str, llm_reference=None) -> None:
    model, tok = load_checkpoint(out)
    pixels = _pixels()
    with torch.no_grad():
        got = model.encode_tiles(pixels)
        torch.testing.assert_close(got, reference_encode(src, pixels, connector), atol=2e-5, rtol=1e-4)
        ref_llm = llm_reference or src.llm
        torch.testing.assert_close(
            model.language_model(_ids()).logits, ref_llm(_ids()).logits, atol=2e-5, rtol=1e-4
        )
    torch.testing.assert_close(model.image_newline.detach(), src.newline)
    assert len(tok) == len(src.tokenizer)


# --- parity -----------------------------------------------------------------------------------
def test_plain_mlp2x_gelu_phi3_sharded(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, llm="phi3", connector="plain", shards=3)
    assert len(list(src.dir.glob("model-*.safetensors"))) == 3
    out = import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    assert (out / "config.json").is_file() and (out / "model.safetensors").is_file()
    _check_parity(out, src, "plain")
    model, tok = load_checkpoint(out)
    cfg = model.config
    assert cfg.model_type == "eyecare_gpt" and cfg.chat_template_name == "phi3_instruct"
    # The plain connector is an LDC with only the selected layer; the tower keeps 4 of 5 blocks.
    assert cfg.ldc_fine_layers == [] and cfg.ldc_coarse_layers == [] and cfg.ldc_last_layer == 4
    assert cfg.vision_config.num_hidden_layers == 4 and cfg.connector_in_features == WIDTH
    pre = cfg.preprocess_config()
    # LLaVA's [width, height] -> our (height, width)
    assert pre.pinpoints == ((224, 112), (112, 224), (224, 224))
    assert pre.tile_size == 112 and pre.anyres_max == 4 and cfg.image_token_index == -200
    assert tok.chat_template is not None


def test_dci_qwen2_with_truncated_tower_and_string_pinpoints(tmp_path, tokenizers):
    # LLaVA-NeXT / Dense Connector store SigLIP without its last block and read hidden_states[-1].
    src = build_llava(
        tmp_path,
        tokenizers,
        llm="qwen2",
        connector="dci",
        truncated=True,
        shards=2,
        pinpoints="(1x1),...,(2x3)",
        aspect="anyres",
    )
    assert not any(k.startswith(TOWER + "vision_model.encoder.layers.4.") for k in src.state)
    out = import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    _check_parity(out, src, "dci")
    model, _ = load_checkpoint(out)
    cfg = model.config
    assert (cfg.ldc_fine_layers, cfg.ldc_coarse_layers, cfg.ldc_last_layer) == ([0, 1], [2, 3], 4)
    assert cfg.chat_template_name == "qwen_2" and cfg.connector_in_features == 3 * WIDTH
    pre = cfg.preprocess_config()
    # "(1x1),...,(2x3)": widths 1..2 tiles, heights 1..3 tiles, width-major; stored as (h, w)
    assert pre.pinpoints == tuple((j * 112, i * 112) for i in (1, 2) for j in (1, 2, 3))
    assert pre.anyres_max == 0


def test_llama_with_tied_embeddings_and_chatml(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, llm="llama", shards=1)
    assert "lm_head.weight" not in src.state
    out = import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    _check_parity(out, src, "plain")
    model, _ = load_checkpoint(out)
    assert model.config.chat_template_name == "chatml"
    lm = model.language_model
    assert torch.equal(lm.lm_head.weight, lm.model.embed_tokens.weight)


def test_sci_maps_to_single_layer_groups(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, llm="qwen2", connector="sci", depth=17, shards=1)
    out = import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    _check_parity(out, src, "sci")
    cfg = load_checkpoint(out)[0].config
    assert (cfg.ldc_fine_layers, cfg.ldc_coarse_layers, cfg.ldc_last_layer) == ([7], [15], 16)


def test_dci_inferred_from_projector_width_and_tower_from_tensors(tmp_path, tokenizers, monkeypatch):
    # No mm_dense_connector_type and no vision_config: the projector's 3x width says DCI; the
    # tower's shape comes from its tensors (heads from the width table, extended for the test).
    import eyecare_edge.training.llava_tower as li

    monkeypatch.setitem(li.SIGLIP_HEADS_BY_WIDTH, WIDTH, 4)
    src = build_llava(
        tmp_path,
        tokenizers,
        connector="dci",
        vision_config=False,
        extra_config={"mm_dense_connector_type": None},
    )
    plan = plan_import(src.dir)
    assert any("assuming Dense Connector DCI" in n for n in plan.notes)
    assert any("inferred from tensor shapes" in n for n in plan.notes)
    out = import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    _check_parity(out, src, "dci")


def test_known_tower_table_gives_so400m_shapes():
    from eyecare_edge.training.llava_tower import KNOWN_SIGLIP_TOWERS

    so400m = KNOWN_SIGLIP_TOWERS["siglip-so400m-patch14-384"]
    assert (so400m["hidden_size"], so400m["num_hidden_layers"], so400m["num_attention_heads"]) == (
        1152,
        27,
        16,
    )
    assert (so400m["image_size"], so400m["patch_size"], so400m["intermediate_size"]) == (384, 14, 4304)


# --- reporting --------------------------------------------------------------------------------
def test_missing_and_extra_tensors_are_reported_by_name(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, shards=1)
    state = dict(src.state)
    state.pop("model.image_newline")
    state.pop("model.layers.1.mlp.down_proj.weight")
    state["model.vision_resampler.query"] = torch.zeros(4, 4)
    state["model.mm_projector.4.weight"] = torch.zeros(4, 4)
    _write(src.dir, state, shards=1, fmt="safetensors")
    with pytest.raises(LlavaImportError) as e:
        import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    msg = str(e.value)
    for name in (
        "model.vision_resampler.query",
        "model.mm_projector.4.weight",
        "image_newline",
        "language_model.model.layers.1.mlp.down_proj.weight",
    ):
        assert name in msg
    assert "--allow-missing" in msg
    assert not (tmp_path / "ckpt").exists()
    lines: list[str] = []
    with pytest.raises(LlavaImportError, match="model.vision_resampler.query"):
        import_llava(src.dir, tmp_path / "ckpt", dry_run=True, echo=lines.append)
    assert "unmapped (2):" in "\n".join(lines) and not (tmp_path / "ckpt").exists()

    out = import_llava(src.dir, tmp_path / "ckpt", allow_missing=True, echo=lambda s: None)
    model, _ = load_checkpoint(out)
    newline = model.image_newline.detach()
    assert torch.isfinite(newline).all() and newline.abs().sum() > 0  # initialised, not left empty
    torch.testing.assert_close(
        model.language_model.model.layers[0].mlp.down_proj.weight,
        src.state["model.layers.0.mlp.down_proj.weight"],
    )


def test_dropped_tensors_are_listed_with_reasons(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, shards=1)
    plan = plan_import(src.dir)
    dropped = {m.source: m.reason for m in plan.dropped}
    assert "post_layernorm" in " ".join(dropped) and any(".head." in k for k in dropped)
    assert all(k in dropped for k in src.state if k.startswith(TOWER + "vision_model.encoder.layers.4."))
    assert "past hidden state 4" in dropped[TOWER + "vision_model.encoder.layers.4.mlp.fc1.weight"]
    assert not plan.unmapped and not plan.missing
    # every source tensor is accounted for exactly once
    assert {m.source for m in plan.mappings} == set(src.state)


def test_shape_mismatch_is_reported(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, shards=1)
    state = dict(src.state)
    state["model.mm_projector.2.bias"] = torch.zeros(D_LLM + 1)
    _write(src.dir, state, shards=1, fmt="safetensors")
    with pytest.raises(LlavaImportError, match=r"model\.mm_projector\.2\.bias \[65\]"):
        import_llava(src.dir, tmp_path / "ckpt", allow_missing=True, echo=lambda s: None)


def test_missing_shard_named(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, shards=2)
    (src.dir / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(LlavaImportError, match="model-00002-of-00002.safetensors"):
        plan_import(src.dir)


def test_dry_run_prints_mapping_and_config_and_writes_nothing(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, connector="dci")
    lines: list[str] = []
    assert import_llava(src.dir, tmp_path / "ckpt", dry_run=True, echo=lines.append) is None
    assert not (tmp_path / "ckpt").exists()
    text = "\n".join(lines)
    assert "model.layers.N.self_attn.qkv_proj.weight" in text
    assert "language_model.model.layers.N.self_attn.qkv_proj.weight  [2]" in text
    assert "connector.mm_projector.0.weight" in text and "(dropped:" in text
    config = json.loads(lines[lines.index("resulting config:") + 1])
    assert config["model_type"] == "eyecare_gpt" and config["ldc_last_layer"] == 4


def test_cli_dry_run(tmp_path, tokenizers):
    from click.testing import CliRunner

    from eyecare_edge.cli import main

    src = build_llava(tmp_path, tokenizers, shards=1)
    result = CliRunner().invoke(
        main, ["init", "--from-llava", str(src.dir), "-o", str(tmp_path / "ckpt"), "--dry-run"]
    )
    assert result.exit_code == 0, result.output
    assert "resulting config:" in result.output and not (tmp_path / "ckpt").exists()


# --- pickle ----------------------------------------------------------------------------------
def test_pickle_refused_without_flag_and_read_with_it(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, fmt="bin")
    with pytest.raises(LlavaImportError) as e:
        import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    assert "pytorch_model.bin" in str(e.value) and "--allow-pickle" in str(e.value)
    assert not (tmp_path / "ckpt").exists()
    out = import_llava(src.dir, tmp_path / "ckpt", allow_pickle=True, echo=lambda s: None)
    _check_parity(out, src, "plain")


def test_pickle_with_code_is_refused_even_with_flag(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, shards=1)
    torch.save({"model.extra": torch.zeros(2), "opts": {"lr": 1.0, "fn": print}}, src.dir / "extra.bin")
    with pytest.raises(LlavaImportError, match="extra.bin"):
        plan_import(src.dir, allow_pickle=True)


# --- adapters --------------------------------------------------------------------------------
def _lora(model, *, seed: int, targets: list[str], r: int = 4, alpha: int = 8, **kw):
    """A PEFT LoRA on `model` with random (non-zero) B matrices, so the merge is not vacuous."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    peft_model = get_peft_model(model, LoraConfig(r=r, lora_alpha=alpha, target_modules=targets, **kw))
    with torch.no_grad():
        for n, p in peft_model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.2)
    return peft_model.eval()


def test_lora_adapter_is_merged(tmp_path, tokenizers):
    import copy

    src = build_llava(tmp_path, tokenizers, llm="phi3", shards=2)
    peft_model = _lora(
        copy.deepcopy(src.llm), seed=3, targets=["qkv_proj", "o_proj", "gate_up_proj"], use_rslora=True
    )
    peft_model.save_pretrained(src.dir / "adapter")
    assert (src.dir / "adapter" / "adapter_model.safetensors").is_file()
    out = import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    _check_parity(out, src, "plain", llm_reference=peft_model)
    with torch.no_grad():  # the adapter changed the outputs, so parity above is not vacuous
        assert not torch.allclose(peft_model(_ids()).logits, src.llm(_ids()).logits, atol=1e-3)


def test_llava_lora_release_with_local_base_and_tower(tmp_path, tokenizers):
    """LLaVA's LoRA release layout: config.json + non_lora_trainables.bin + adapter, with the base
    LLM and the SigLIP tower in local directories named by the adapter config and mm_vision_tower."""
    import copy

    src = build_llava(tmp_path, tokenizers, llm="qwen2", write=False)
    base, tower_dir, d = tmp_path / "qwen-base", tmp_path / "tiny-siglip", src.dir
    src.llm.save_pretrained(base)
    src.tokenizer.save_pretrained(base)
    src.tower.save_pretrained(tower_dir)
    peft_model = _lora(
        copy.deepcopy(src.llm), seed=5, targets=["q_proj", "v_proj", "down_proj"], r=2, alpha=4
    )
    peft_model.save_pretrained(d)
    cfg = json.loads(json.dumps(src.llm.config.to_dict(), default=str))
    cfg.update(
        model_type="llava_qwen",
        mm_vision_tower=str(tower_dir),
        mm_projector_type="mlp2x_gelu",
        mm_hidden_size=WIDTH,
        mm_vision_select_layer=-2,
        mm_patch_merge_type="spatial_unpad",
        image_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=[[112, 112], [224, 224]],
    )
    (d / "config.json").write_text(json.dumps(cfg))
    adapter_cfg = json.loads((d / "adapter_config.json").read_text())
    adapter_cfg["base_model_name_or_path"] = str(base)
    (d / "adapter_config.json").write_text(json.dumps(adapter_cfg))
    trainables = {f"base_model.model.model.mm_projector.{k}": v for k, v in src.proj.items()}
    trainables["base_model.model.model.image_newline"] = src.newline
    torch.save(trainables, d / "non_lora_trainables.bin")

    with pytest.raises(LlavaImportError, match="non_lora_trainables.bin"):
        plan_import(d)
    plan = plan_import(d, allow_pickle=True)
    assert {o for o, _ in plan.store.files()} == {"checkpoint", "base", "vision"}
    assert not plan.missing and not plan.unmapped
    out = import_llava(d, tmp_path / "ckpt", allow_pickle=True, echo=lambda s: None)
    _check_parity(out, src, "plain", llm_reference=peft_model)
    assert load_checkpoint(out)[0].config.preprocess_config().anyres_max == 9


def test_tower_left_out_of_the_checkpoint_comes_from_a_vision_dir(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers)
    for f in src.dir.glob("model*.safetensors*"):
        f.unlink()
    _write(
        src.dir, {k: v for k, v in src.state.items() if not k.startswith(TOWER)}, shards=1, fmt="safetensors"
    )
    with pytest.raises(LlavaImportError, match="holds no vision tower"):
        import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    src.tower.save_pretrained(tmp_path / "siglip")
    out = import_llava(src.dir, tmp_path / "ckpt", vision_dir=tmp_path / "siglip", echo=lambda s: None)
    _check_parity(out, src, "plain")


def test_h_lora_adapter_is_refused_with_reason(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, shards=1)
    hl = src.dir / "hlora"
    hl.mkdir()
    (hl / "adapter_config.json").write_text(
        json.dumps(
            {"peft_type": "LORA", "r": 64, "lora_alpha": 128, "lora_nums": 4, "target_modules": ["qkv_proj"]}
        )
    )
    module = "base_model.model.model.layers.0.self_attn.qkv_proj"
    save_file(
        {
            f"{module}.lora_A.weight": torch.zeros(64, D_LLM),
            f"{module}.lora_B.weight": torch.zeros(3 * D_LLM, 64),
            f"{module}.lora_route.weight": torch.zeros(4, D_LLM),
        },
        hl / "adapter_model.safetensors",
    )
    with pytest.raises(LlavaImportError) as e:
        import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    msg = str(e.value)
    assert "lora_nums" in msg and "per-token" in msg and "llama.cpp" in msg and "cannot be folded" in msg

    # The same routed tensors without the config field, inside the checkpoint itself (HealthGPT
    # stores them in its state dict): refused by their names.
    (hl / "adapter_config.json").unlink()
    (hl / "adapter_model.safetensors").rename(src.dir / "zz_extra.safetensors")
    with pytest.raises(LlavaImportError, match="lora_route"):
        plan_import(src.dir)


def test_h_lora_pickle_refused_by_name_before_unpickling(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, shards=1)
    (src.dir / "com_hlora_weights.bin").write_bytes(b"not even a pickle")
    with pytest.raises(LlavaImportError, match="mixture-of-LoRA-experts"):
        plan_import(src.dir)


# --- LLM and tower variants ---------------------------------------------------------------------
def test_qwen25_vl_llm_with_siglip_drops_qwen_visual(tmp_path, tokenizers, monkeypatch):
    src = build_llava(tmp_path, tokenizers, llm="qwen2", shards=1, write=False)
    state = dict(src.state)
    state["visual.blocks.0.attn.qkv.weight"] = torch.zeros(3 * 32, 32)
    state["visual.merger.mlp.0.weight"] = torch.zeros(32, 32)
    cfg = {
        **src.llm.config.to_dict(),
        "model_type": "qwen2_5_vl",
        "architectures": ["Qwen2_5_VLForConditionalGeneration"],
        "rope_scaling": {"type": "mrope", "mrope_section": [2, 3, 3]},
        "rope_theta": 10000.0,
        "vision_config": {"depth": 2, "hidden_size": 32, "model_type": "qwen2_5_vl"},
        "mm_vision_tower": "google/siglip-tiny-test",
        "mm_projector_type": "mlp2x_gelu",
        "mm_patch_merge_type": "spatial_unpad",
        "image_aspect_ratio": "anyres_max_4",
        "image_grid_pinpoints": [[112, 112]],
    }
    cfg.pop("rope_parameters", None)
    d = src.dir
    d.mkdir(parents=True, exist_ok=True)
    (d / "config.json").write_text(json.dumps(cfg, default=str))
    _write(d, state, shards=1, fmt="safetensors")
    src.tokenizer.save_pretrained(d)
    # no SigLIP config anywhere (vision_config is Qwen's): the tower's shape comes from its tensors
    import eyecare_edge.training.llava_tower as li

    monkeypatch.setitem(li.SIGLIP_HEADS_BY_WIDTH, WIDTH, 4)
    plan = plan_import(d)
    assert any("mrope" in n for n in plan.notes)
    assert plan.config.text_config.model_type == "qwen2"
    dropped = {m.source for m in plan.dropped}
    assert dropped >= {"visual.blocks.0.attn.qkv.weight", "visual.merger.mlp.0.weight"}
    out = import_llava(d, tmp_path / "ckpt", echo=lambda s: None)
    _check_parity(out, src, "plain")

    # without a SigLIP tower the checkpoint is Qwen2.5-VL itself: refused
    no_tower = {k: v for k, v in state.items() if not k.startswith(TOWER)}
    for f in d.glob("*.safetensors"):
        f.unlink()
    _write(d, no_tower, shards=1, fmt="safetensors")
    with pytest.raises(LlavaImportError, match="Qwen2.5-VL's own vision encoder"):
        plan_import(d)


def test_image_token_in_tokenizer_is_harmless(tmp_path, tokenizers):
    tok = train_bpe_tokenizer(TEXTS, vocab_size=300, chat_template="phi3_instruct")
    tok.add_tokens(["<image>"], special_tokens=True)
    tokenizers = {**tokenizers, "phi3_instruct": tok}
    src = build_llava(tmp_path, tokenizers, shards=1)
    out = import_llava(src.dir, tmp_path / "ckpt", echo=lambda s: None)
    model, loaded = load_checkpoint(out)
    assert loaded.convert_tokens_to_ids("<image>") < model.config.text_config.vocab_size
    _check_parity(out, src, "plain")
    # Our placeholder is the id -200 in input_ids, never a vocabulary entry.
    assert model.config.image_token_index == -200


def test_unsupported_layouts_are_refused_with_reasons(tmp_path, tokenizers):
    cases = {
        "mm_patch_merge_type": ("flat", "spatial_unpad"),
        "image_aspect_ratio": ("pad", "anyres"),
        "mm_projector_type": ("linear", "mlp2x_gelu"),
        "mm_dense_connector_type": ("sti", "token axis"),
    }
    src = build_llava(tmp_path, tokenizers, shards=1, connector="dci")
    base = json.loads((src.dir / "config.json").read_text())
    for field_name, (value, words) in cases.items():
        (src.dir / "config.json").write_text(json.dumps({**base, field_name: value}))
        with pytest.raises(LlavaImportError, match=words):
            plan_import(src.dir)


def test_clip_tower_is_refused(tmp_path, tokenizers):
    src = build_llava(tmp_path, tokenizers, shards=1)
    state = dict(src.state)
    state[TOWER + "vision_model.embeddings.class_embedding"] = torch.zeros(WIDTH)
    _write(src.dir, state, shards=1, fmt="safetensors")
    with pytest.raises(LlavaImportError, match="CLIP"):
        plan_import(src.dir)


# --- pure pieces ----------------------------------------------------------------------------------
def test_parse_pinpoints_forms():
    assert parse_pinpoints([[384, 768], [768, 384]], 384) == ((768, 384), (384, 768))
    assert parse_pinpoints("[[336, 672], [672, 336]]", 336) == ((672, 336), (336, 672))
    # LLaVA-OneVision: "(1x1),...,(6x6)" = (width, height) multiples, width-major
    grid = parse_pinpoints("(1x1),...,(2x2)", 384)
    assert grid == ((384, 384), (768, 384), (384, 768), (768, 768))
    with pytest.raises(ValueError):
        parse_pinpoints("nonsense", 384)


def test_key_table_covers_llava_names():
    cases = {
        TOWER
        + "vision_model.embeddings.patch_embedding.weight": "vision_tower.embeddings.patch_embedding.weight",
        TOWER + "vision_model.encoder.layers.25.mlp.fc2.bias": "vision_tower.encoder.layers.25.mlp.fc2.bias",
        "model.mm_projector.0.weight": "connector.mm_projector.0.weight",
        "model.mm_projector.2.bias": "connector.mm_projector.2.bias",
        "model.image_newline": "image_newline",
        "model.layers.3.self_attn.qkv_proj.weight": "language_model.model.layers.3.self_attn.qkv_proj.weight",
        "model.embed_tokens.weight": "language_model.model.embed_tokens.weight",
        "lm_head.weight": "language_model.lm_head.weight",
        "model.language_model.norm.weight": "language_model.model.norm.weight",
    }
    for src, want in cases.items():
        assert map_key(src)[0] == want
    assert map_key(TOWER + "vision_model.post_layernorm.weight") == (None, LLAVA_KEY_TABLE[2])
    assert (
        normalize_key("base_model.model.model.mm_projector.0.weight", "checkpoint")
        == "model.mm_projector.0.weight"
    )
    assert normalize_key("vision_model.head.probe", "vision") == TOWER + "vision_model.head.probe"
    assert "| `lm_head\\.weight` |" in key_table_markdown()
