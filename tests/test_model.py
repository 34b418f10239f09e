import json

import pytest
import torch

from conftest import nano_config, random_batch
from m3ae import M3AE, ConfigError, M3AEConfig


def test_forward_shapes_every_mode(nano_model):
    image, text, padding = random_batch()
    c = nano_model.config
    out = nano_model(image, text, padding, full_outputs=True)
    assert out.image_output.shape == (4, c.num_patches, c.patch_dim)
    assert out.text_output.shape == (4, text.shape[1], c.vocab_size)
    assert out.image_mask.shape == (4, c.num_patches) and out.text_mask.shape == text.shape
    assert out.loss.ndim == 0 and torch.isfinite(out.loss)
    img_only = nano_model(image, full_outputs=True)
    assert img_only.text_loss is None and img_only.image_output.shape == (4, 16, 192)
    txt_only = nano_model(None, text, padding, full_outputs=True)
    assert txt_only.image_loss is None and txt_only.text_output.shape == (4, text.shape[1], 40)
    assert torch.allclose(txt_only.loss, 0.5 * txt_only.text_loss)


def test_encode_shapes_and_no_masking(nano_model):
    image, text, padding = random_batch()
    nano_model.eval()
    assert nano_model.encode(image, text, padding).shape == (4, 1 + 16 + text.shape[1], 64)
    assert nano_model.encode(image).shape == (4, 17, 64)
    assert nano_model.encode(None, text, padding).shape == (4, 1 + text.shape[1], 64)
    assert torch.equal(nano_model.encode(image), nano_model.encode(image))  # deterministic


def test_padding_content_does_not_change_real_outputs(nano_model):
    image, text, padding = random_batch()
    nano_model.eval()
    a = nano_model.encode(image, text, padding)
    b = nano_model.encode(image, text.masked_fill(padding, 7), padding)
    real = torch.cat([torch.ones(4, 17, dtype=torch.bool), ~padding], 1)
    assert torch.allclose(a[real], b[real], atol=1e-6)


def test_image_only_model_is_the_mae_baseline():
    model = M3AE(nano_config(vocab_size=0, use_type_embedding=False))
    assert not any("text" in n or "type" in n for n, _ in model.named_parameters())
    image, text, padding = random_batch()
    assert model(image).text_loss is None
    with pytest.raises(ValueError, match="image-only"):
        model(image, text, padding)


def test_initialisation_matches_reference_scheme():
    torch.manual_seed(0)
    model = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=2000, text_length=16))
    assert abs(model.text_embedding.weight.std().item() - 1.0) < 0.05
    assert abs(model.cls_token.std().item() - 0.02) < 0.01
    w = model.encoder.blocks[0].mlp.fc1.weight
    bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5  # xavier-uniform
    assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound
    assert model.encoder.blocks[0].mlp.fc1.bias.abs().max() == 0


def test_drop_path_only_in_training():
    model = M3AE(nano_config(drop_path=0.5))
    image, text, padding = random_batch()
    model.eval()
    assert torch.equal(model.encode(image), model.encode(image))
    model.train()
    torch.manual_seed(0)
    a = model.encode(image)
    torch.manual_seed(1)
    assert not torch.allclose(a, model.encode(image))


def test_explicit_masks_are_replayed(nano_model):
    image, text, padding = random_batch()
    masks = nano_model.make_masks(4, True, padding, None, torch.Generator().manual_seed(3))
    a = nano_model(image, text, padding, masks=masks)
    b = nano_model(image, text, padding, masks=masks)
    assert torch.equal(a.loss, b.loss)
    assert a.encoder_output.shape[1] == 1 + masks.image_keep + masks.text_keep


def test_output_head_depth():
    model = M3AE(nano_config(output_head_depth=2))
    image, text, padding = random_batch()
    assert torch.isfinite(model(image, text, padding).loss)


def test_save_and_load_round_trip(tmp_path, nano_model):
    nano_model.save_pretrained(tmp_path / "ckpt")
    assert json.loads((tmp_path / "ckpt" / "config.json").read_text())["emb_dim"] == 64
    loaded = M3AE.from_pretrained(tmp_path / "ckpt")
    assert loaded.config == nano_model.config
    for (k, v), (k2, v2) in zip(nano_model.state_dict().items(), loaded.state_dict().items()):
        assert k == k2 and torch.equal(v, v2)
    image, _, _ = random_batch()
    nano_model.eval()
    loaded.eval()
    assert torch.equal(nano_model.encode(image), loaded.encode(image))
    assert not list((tmp_path / "ckpt").glob("*.tmp"))  # atomic writes leave no temp files


def test_missing_checkpoint_folder_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="not found"):
        M3AE.from_pretrained(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="config.json"):
        M3AE.from_pretrained(tmp_path / "empty")


def test_checkpoint_from_another_shape_is_a_clear_error(tmp_path, nano_model):
    nano_model.save_pretrained(tmp_path / "ckpt")
    config = json.loads((tmp_path / "ckpt" / "config.json").read_text())
    config["depth"] = 3
    (tmp_path / "ckpt" / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="another shape"):
        M3AE.from_pretrained(tmp_path / "ckpt")
    other = M3AE(nano_config(emb_dim=32, num_heads=4))
    with pytest.raises(ConfigError, match="shape mismatch"):
        other.load_weights(nano_model.state_dict())


@pytest.mark.parametrize("overrides, message", [
    (dict(image_size=30), "not divisible by patch_size"),
    (dict(image_mask_ratio=1.0), "image_mask_ratio must be in"),
    (dict(text_mask_ratio=-0.1), "text_mask_ratio must be in"),
    (dict(emb_dim=66), "not divisible by its number of heads"),
    (dict(masking="sometimes"), "masking must be one of"),
])
def test_bad_configuration_errors(overrides, message):
    with pytest.raises(ConfigError, match=message):
        nano_config(**overrides)


def test_unknown_preset():
    with pytest.raises(ConfigError, match="unknown model preset"):
        M3AEConfig.from_preset("gigantic")


def test_bad_inputs_are_rejected(nano_model):
    image, text, padding = random_batch()
    with pytest.raises(ValueError, match="multiples of the patch size"):  # other sizes are fine (test_image_size)
        nano_model(torch.randn(2, 3, 60, 64))
    with pytest.raises(ValueError, match="need an image"):
        nano_model()
    with pytest.raises(ValueError, match="L <= 16"):
        nano_model(image, torch.zeros(4, 20, dtype=torch.long))


def test_explicit_attention_matches_sdpa(nano_model):
    image, text, padding = random_batch()
    explicit = M3AE(nano_config(attention="explicit"))
    explicit.load_state_dict(nano_model.state_dict())
    masks = nano_model.make_masks(4, True, padding, None, torch.Generator().manual_seed(0))
    a = nano_model(image, text, padding, masks=masks, full_outputs=True)
    b = explicit(image, text, padding, masks=masks, full_outputs=True)
    torch.testing.assert_close(a.image_output, b.image_output, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(a.loss, b.loss, atol=2e-5, rtol=1e-4)


def test_activation_checkpointing_gives_the_same_loss_and_gradients(nano_model):
    image, text, padding = random_batch()
    checkpointed = M3AE(nano_config(grad_checkpointing=True))
    checkpointed.load_state_dict(nano_model.state_dict())
    masks = nano_model.make_masks(4, True, padding, None, torch.Generator().manual_seed(0))
    grads = []
    for model in (nano_model, checkpointed):
        model.train()
        model.zero_grad()
        out = model(image, text, padding, masks=masks)
        out.loss.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        torch.testing.assert_close(grads[0][name], grads[1][name], atol=1e-6, rtol=1e-5)


def test_the_model_names_its_no_weight_decay_parameters():
    from torch import nn

    from m3ae.optim import param_groups

    model = M3AE(nano_config())
    params = set(dict(model.named_parameters()))
    linear_weights = {f"{name}.weight" for name, m in model.named_modules() if isinstance(m, nn.Linear)}
    assert params - model.no_weight_decay("mae") == linear_weights  # only Linear matrices decay
    ref = model.no_weight_decay("reference")
    assert {"cls_token", "text_embedding.weight", "text_mask_token"} <= ref
    assert "encoder.blocks.0.norm1.weight" not in ref  # the authors decay LayerNorm scales
    decay, no_decay = param_groups(model, 0.05, "reference")
    assert {id(p) for p in no_decay["params"]} == {id(p) for n, p in model.named_parameters() if n in ref}
    with pytest.raises(ValueError, match="weight-decay mode"):
        model.no_weight_decay("adamw")
