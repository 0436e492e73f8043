"""EyecareGPT in torch: config round trip, forward/backward/generate, splicing, full-size shapes."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from eyecare_edge.training.config import IMAGE_TOKEN_INDEX, EyecareGPTConfig
from eyecare_edge.training.modeling import EyecareGPTForConditionalGeneration
from eyecare_edge.training.presets import build_config, tiny_llama_config

from eyecare_edge.layout import layout_image
from eyecare_edge.preprocess import preprocess_image, preprocess_images


@pytest.fixture(scope="module")
def tiny_model():
    torch.manual_seed(0)
    cfg = build_config(
        "tiny", text_config=tiny_llama_config(512, bos_token_id=None, eos_token_id=2, pad_token_id=1)
    )
    return EyecareGPTForConditionalGeneration(cfg).eval()


def _image(h, w, seed=0):
    return np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)


def _inputs(model, images, prefix=(5, 6), suffix=(7, 8)):
    pre = preprocess_images(images, model.config.preprocess_config())
    ids = list(prefix)
    for p in pre:
        ids += [IMAGE_TOKEN_INDEX] * p.plan.visual_tokens + [9]
    ids += list(suffix)
    return dict(
        input_ids=torch.tensor([ids]),
        pixel_values=torch.from_numpy(np.concatenate([p.tiles for p in pre])),
        image_sizes=torch.tensor([list(p.plan.image_size) for p in pre]),
        image_n_tiles=torch.tensor([p.plan.n_tiles for p in pre]),
    ), pre


def test_config_round_trip(tmp_path, tiny_model):
    cfg = tiny_model.config
    cfg.save_pretrained(tmp_path)
    again = EyecareGPTConfig.from_pretrained(tmp_path)
    assert again.to_dict() == cfg.to_dict()
    assert again.ldc_fine_layers == [0, 1] and again.ldc_coarse_layers == [2, 3] and again.ldc_last_layer == 4
    assert again.preprocess_config() == cfg.preprocess_config()
    assert again.text_config.hidden_size % 256 == 0 and again.text_config.intermediate_size % 256 == 0


def test_ldc_default_groups_match_the_spec_for_so400m():
    cfg = build_config("eyecare-3.8b")
    assert cfg.vision_config.num_hidden_layers == 26
    assert cfg.ldc_fine_layers == list(range(0, 13)) and cfg.ldc_coarse_layers == list(range(13, 26))
    assert cfg.ldc_last_layer == 26 and cfg.connector_in_features == 3 * 1152


def test_save_load_round_trip(tmp_path, tiny_model):
    tiny_model.save_pretrained(tmp_path)
    assert (tmp_path / "model.safetensors").is_file()
    loaded = EyecareGPTForConditionalGeneration.from_pretrained(tmp_path).eval()
    a, b = tiny_model.state_dict(), loaded.state_dict()
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    inputs, _ = _inputs(tiny_model, [_image(300, 500)])
    with torch.no_grad():
        assert torch.equal(tiny_model(**inputs).logits, loaded(**inputs).logits)


def test_visual_tokens_spliced_at_placeholders(tiny_model):
    inputs, pre = _inputs(tiny_model, [_image(300, 500)])
    with torch.no_grad():
        emb = tiny_model.embed_inputs(**inputs)
        tiles = tiny_model.encode_tiles(inputs["pixel_values"]).numpy()
    expected = layout_image(tiles, pre[0].plan, tiny_model.image_newline.detach().numpy())
    mask = (inputs["input_ids"][0] == IMAGE_TOKEN_INDEX).numpy()
    np.testing.assert_allclose(emb[0, mask].numpy(), expected, atol=1e-5)
    text_rows = tiny_model.get_input_embeddings()(torch.tensor([5, 6]))
    assert torch.equal(emb[0, :2], text_rows)


def test_encode_tiles_shape(tiny_model):
    x = torch.from_numpy(preprocess_image(_image(224, 336), tiny_model.config.preprocess_config()).tiles)
    out = tiny_model.encode_tiles(x)
    assert out.shape == (7, 64, tiny_model.config.text_config.hidden_size)


def test_forward_backward_and_generate(tiny_model):
    model = EyecareGPTForConditionalGeneration(tiny_model.config)
    model.load_state_dict(tiny_model.state_dict())
    model.train()
    inputs, _ = _inputs(model, [_image(300, 500), _image(200, 200, 1)])  # two images: single-tile mode
    labels = inputs["input_ids"].masked_fill(inputs["input_ids"] == IMAGE_TOKEN_INDEX, -100)
    out = model(**inputs, labels=labels)
    assert torch.isfinite(out.loss)
    out.loss.backward()
    assert model.connector.mm_projector[0].weight.grad.abs().sum() > 0
    assert model.vision_tower.encoder.layers[0].mlp.fc1.weight.grad.abs().sum() > 0
    assert model.image_newline.grad.abs().sum() > 0
    model.eval()
    inputs, _ = _inputs(model, [_image(300, 500)])
    new = model.generate(**inputs, max_new_tokens=6, do_sample=False)
    assert new.shape == (1, 6)
    # greedy generation = argmax of a full forward pass over prompt + generated tokens
    with torch.no_grad():
        ids = torch.cat([inputs["input_ids"], new], dim=1)
        logits = model(**{**inputs, "input_ids": ids}).logits
    n = inputs["input_ids"].shape[1]
    assert torch.equal(logits[0, n - 1 : n + 5].argmax(-1), new[0])


def test_mismatched_placeholders_are_reported(tiny_model):
    inputs, _ = _inputs(tiny_model, [_image(300, 500)])
    short = {**inputs, "input_ids": inputs["input_ids"][:, :-5]}
    short["input_ids"] = torch.cat([inputs["input_ids"][:, :2], inputs["input_ids"][:, 3:]], dim=1)
    with pytest.raises(ValueError, match="visual tokens for"):
        tiny_model.embed_inputs(**short)
    with pytest.raises(ValueError, match="no pixel_values"):
        tiny_model.embed_inputs(inputs["input_ids"])


@pytest.mark.parametrize(("preset", "billions"), [("eyecare-3.8b", 4.24), ("eyecare-7b", 8.04)])
def test_full_presets_build_on_meta_device(preset, billions):
    cfg = build_config(preset)
    with torch.device("meta"):
        model = EyecareGPTForConditionalGeneration(cfg)
    n = sum(p.numel() for p in model.parameters())
    assert abs(n / 1e9 - billions) < 0.02
    assert cfg.vision_config.image_size == 384 and cfg.preprocess_config().anyres_max == 4
    assert max(h for h, _ in cfg.preprocess_config().pinpoints) == 1152
    assert model.language_model.config.model_type == {"eyecare-3.8b": "phi3", "eyecare-7b": "qwen2"}[preset]
