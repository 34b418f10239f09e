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


# -- the named stages forward runs (public: encode() and the visualisations build on them) -------
def _parts(image, text, padding, parts):
    return (image if "image" in parts else None,
            text if "text" in parts else None, padding if "text" in parts else None)


@pytest.mark.parametrize("parts", [("image", "text"), ("image",), ("text",)])
@pytest.mark.parametrize("full", [False, True])
def test_forward_is_its_stages(nano_model, parts, full):
    """prepare -> forward_encoder -> forward_decoder -> image_loss / text_loss, run by hand, give
    forward's outputs bit for bit: the stages are what forward runs, not a second copy."""
    image, text, padding = _parts(*random_batch(), parts)
    masks = nano_model.make_masks(4, image is not None, padding, None, torch.Generator().manual_seed(1))
    out = nano_model(image, text, padding, masks=masks, full_outputs=full)
    inputs = nano_model.prepare(image, text, padding)
    latent, _ = nano_model.forward_encoder(inputs, masks)
    assert torch.equal(latent, out.encoder_output)
    image_dec, text_dec, _ = nano_model.forward_decoder(latent, inputs, masks, every_slot=full)
    assert (image_dec is None) == (image is None) and (text_dec is None) == (text is None)
    c = nano_model.config
    loss = torch.zeros(())
    if image is not None:
        image_loss, prediction = nano_model.image_loss(image_dec, inputs, masks, every_slot=full)
        assert torch.equal(image_loss, out.image_loss)
        assert (prediction is None) == (not full)
        if full:
            assert torch.equal(prediction, out.image_output)
        loss = loss + c.image_loss_weight * image_loss
    if text is not None:
        text_loss, accuracy, logits = nano_model.text_loss(text_dec, inputs, masks, every_slot=full)
        assert torch.equal(text_loss, out.text_loss) and torch.equal(accuracy, out.text_accuracy)
        if full:
            assert torch.equal(logits, out.text_output)
        loss = loss + c.text_loss_weight * text_loss
    assert torch.equal(loss, out.loss)


def test_encode_is_the_encoder_stage_with_nothing_hidden(nano_model):
    """encode() = forward_encoder without masks = forward_encoder with masks that keep every token
    in place: masking only selects the visible tokens, the embedding and the encoder are shared."""
    from m3ae import Masks

    nano_model.eval()
    image, text, padding = random_batch()
    n, length = nano_model.config.num_patches, text.shape[1]
    keep_all = Masks(image_ids=torch.arange(n).expand(4, -1), image_keep=n,
                     text_ids=torch.arange(length).expand(4, -1), text_keep=length)
    inputs = nano_model.prepare(image, text, padding)
    encoded = nano_model.encode(image, text, padding)
    assert torch.equal(nano_model.forward_encoder(inputs)[0], encoded)
    torch.testing.assert_close(nano_model.forward_encoder(inputs, keep_all)[0], encoded, rtol=0, atol=1e-6)
    tokens, key_padding = nano_model.embed(inputs, keep_all)
    assert tokens.shape == (4, 1 + n + length, 64)
    assert torch.equal(key_padding, torch.cat([torch.zeros(4, 1 + n, dtype=torch.bool), padding], 1))
    # With masks, each modality keeps its first image_keep / text_keep ids, in that order.
    masks = nano_model.make_masks(4, True, padding, None, torch.Generator().manual_seed(2))
    tokens, key_padding = nano_model.embed(inputs, masks)
    assert tokens.shape[1] == 1 + masks.image_keep + masks.text_keep
    assert torch.equal(key_padding[:, 1 + masks.image_keep:], padding.gather(1, masks.text_ids[:, : masks.text_keep]))
    assert torch.equal(tokens[:, 1: 1 + masks.image_keep],
                       nano_model.embed_image(inputs.patches)[torch.arange(4)[:, None],
                                                              masks.image_ids[:, : masks.image_keep]])


def test_decoder_stage_returns_the_hidden_slots_in_mask_order(nano_model):
    """By default forward_decoder returns only the hidden slots (its last block computes nothing
    else); they are the every-slot outputs at the hidden positions, in mask order."""
    from m3ae.layers import gather_rows

    nano_model.eval()
    image, text, padding = random_batch()
    masks = nano_model.make_masks(4, True, padding, None, torch.Generator().manual_seed(3))
    inputs = nano_model.prepare(image, text, padding)
    latent, _ = nano_model.forward_encoder(inputs, masks)
    every_image, every_text, _ = nano_model.forward_decoder(latent, inputs, masks, every_slot=True)
    assert every_image.shape == (4, 16, 32) and every_text.shape == (4, text.shape[1], 32)
    expected_image = gather_rows(every_image, masks.image_ids[:, masks.image_keep:])
    expected_text = gather_rows(every_text, masks.text_ids[:, masks.text_keep:])
    image_dec, text_dec, weights = nano_model.forward_decoder(latent, inputs, masks)
    assert weights == []
    torch.testing.assert_close(image_dec, expected_image, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(text_dec, expected_text, rtol=1e-5, atol=1e-6)
    # Asking for the attention weights runs every row (the explicit path), then keeps the hidden slots.
    every_image, every_text, every_weights = nano_model.forward_decoder(latent, inputs, masks, every_slot=True,
                                                                        return_attention=True)
    image_dec, text_dec, weights = nano_model.forward_decoder(latent, inputs, masks, return_attention=True)
    assert len(weights) == nano_model.config.dec_depth
    assert all(torch.equal(a, b) for a, b in zip(weights, every_weights))
    assert torch.equal(image_dec, gather_rows(every_image, masks.image_ids[:, masks.image_keep:]))
    assert torch.equal(text_dec, gather_rows(every_text, masks.text_ids[:, masks.text_keep:]))


def test_strip_decoder_keeps_exactly_what_encode_uses(nano_model):
    image, text, padding = random_batch()
    nano_model.eval()
    before = nano_model.encode(image, text, padding)
    nano_model.encode(image, text, padding).sum().backward()
    used = {n for n, p in nano_model.named_parameters() if p.grad is not None}
    assert nano_model.strip_decoder() is nano_model
    assert set(dict(nano_model.named_parameters())) == used
    assert torch.equal(nano_model.encode(image, text, padding), before)


def test_masks_without_a_part_the_input_has_are_a_clear_error(nano_model):
    image, text, padding = random_batch()
    masks = nano_model.make_masks(4, True, None, None, torch.Generator().manual_seed(0))  # image part only
    with pytest.raises(ValueError, match="no text part"):
        nano_model(image, text, padding, masks=masks)
    text_only = nano_model.make_masks(4, False, padding, None, torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="no image part"):
        nano_model(image, text, padding, masks=text_only)


def test_training_forward_is_one_graph_under_torch_compile():
    """torch.compile sees the whole training forward, the fused text head included (an operator of
    its own), with no graph break: traced by dynamo only (backend "eager": no code generation)."""
    from m3ae.train.bench import BenchOptions, synthetic_batches

    cfg = M3AEConfig(image_size=16, patch_size=4, emb_dim=32, depth=2, num_heads=4, dec_emb_dim=16, dec_depth=1,
                     dec_num_heads=2, vocab_size=100, text_length=12)
    torch.manual_seed(0)
    model = M3AE(cfg)
    (batch,) = synthetic_batches(cfg, BenchOptions(cfg, batch=4, pool=1))
    inputs = batch.parts[0].model_inputs()
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="eager", fullgraph=True)  # a graph break would raise
    out = compiled(**inputs)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    ref = model(**inputs)
    ref.loss.backward()
    assert torch.equal(out.loss, ref.loss)
    for name, p in model.named_parameters():
        torch.testing.assert_close(grads[name], p.grad, rtol=0, atol=0, msg=name)


def _small(**overrides) -> M3AE:
    torch.manual_seed(0)
    return M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=100, text_length=8,
                                       **overrides))


@pytest.mark.parametrize("overrides, text_len", [({"text_mask_ratio": 0.0}, 8), ({"text_mask_ratio": 0.15}, 3),
                                                  ({"image_mask_ratio": 0.0}, 8)])
def test_nothing_hidden_in_a_modality_is_a_zero_loss_there(overrides, text_len):
    # Was: a reshape error (no text slot hidden) and a NaN image loss (no patch hidden).
    model = _small(**overrides)
    image, text = torch.randn(2, 3, 32, 32), torch.randint(0, 100, (2, text_len))
    out = model(image, text)
    assert torch.isfinite(out.loss)
    full = model(image, text, masks=out.masks, full_outputs=True)
    for name in ("image_loss", "text_loss"):
        torch.testing.assert_close(getattr(out, name), getattr(full, name))
    zero = "image_loss" if overrides.get("image_mask_ratio") == 0.0 else "text_loss"
    assert getattr(out, zero).item() == 0.0
    out.loss.backward()  # a graph, even where a modality contributes nothing


def test_a_stripped_model_encodes_checkpoints_and_refuses_the_rest(tmp_path):
    model = _small().strip_decoder().set_grad_checkpointing(True)
    image = torch.randn(2, 3, 32, 32, requires_grad=True)
    model.train()
    model.encode(image).sum().backward()
    assert image.grad is not None
    with pytest.raises(RuntimeError, match="decoder was stripped"):
        model(image)
    with pytest.raises(ValueError, match="decoder was stripped"):
        model.save_pretrained(tmp_path / "m")  # config.json would promise a decoder the weights lack
    assert not (tmp_path / "m").exists()


def test_pixels_follow_the_weights_dtype():
    model = _small().eval()
    image = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        ref = model.encode(image)
        low = model.to(torch.bfloat16).encode(image)  # an fp32 image into a bf16 model
    assert low.dtype == torch.bfloat16
    torch.testing.assert_close(low.float(), ref, atol=0.1, rtol=0.05)


def test_other_folders_given_as_an_m3ae_checkpoint_say_what_they_are(tmp_path):
    from m3ae.eval.finetune import Classifier

    Classifier(_small(), 3).save_pretrained(tmp_path / "clf")
    with pytest.raises(ConfigError, match=r"is a fine-tuned classifier .*Classifier\.from_pretrained"):
        M3AE.from_pretrained(tmp_path / "clf")
    from safetensors.torch import save_file

    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"architectures": ["ViTModel"], "model_type": "vit"}))
    save_file({"w": torch.zeros(1)}, str(tmp_path / "hf" / "model.safetensors"))
    with pytest.raises(ConfigError, match="exported for transformers or timm"):
        M3AE.from_pretrained(tmp_path / "hf")


def _with(masks, **change):
    from dataclasses import replace

    return replace(masks, **change)


def test_bad_token_ids_are_clear_errors(nano_model):
    # Was: an IndexError inside the embedding ("index out of range in self"), or for float ids a
    # RuntimeError naming the embedding's arguments.
    image, text, padding = random_batch()
    for bad, message in ((text.float(), "text must hold token ids .* got torch.float32"),
                         (text.to(torch.int16), "got torch.int16"),
                         (text.masked_fill(padding, 40), r"token id 40, outside 0\.\.39 \(vocab_size 40\)"),
                         (text.masked_fill(padding, -1), r"token id -1, outside 0\.\.39")):
        with pytest.raises(ValueError, match=message):
            nano_model(image, bad, padding)
        with pytest.raises(ValueError, match=message):
            nano_model.encode(image, bad, padding)
    assert torch.isfinite(nano_model(image, text.int(), padding).loss)  # int32 ids are fine


def test_bad_explicit_masks_are_clear_errors(nano_model):
    # Each was an index error deep inside (gather / scatter), or ran on with wrong losses (a repeated
    # position: a token both kept and hidden, another never seen).
    image, text, padding = random_batch()
    good = nano_model.make_masks(4, True, padding, None, torch.Generator().manual_seed(3))
    repeated = good.image_ids.clone()
    repeated[1, 0] = repeated[1, 1]
    cases = [
        ("not masks", "masks must be an m3ae.masking.Masks, got str"),
        (_with(good, image_ids=good.image_ids.int()), r"masks.image_ids must be a torch.long tensor .* torch.int32"),
        (_with(good, image_ids=good.image_ids[:3]), r"masks.image_ids must be \(batch, image positions\) = \(4, 16\) "
                                                    r"for this input, got \(3, 16\)"),
        (_with(good, text_ids=good.text_ids[:, :5]), r"masks.text_ids must be .* = \(4, 12\) .* got \(4, 5\)"),
        (_with(good, image_keep=17), r"masks.image_keep must be an int in 0\.\.16, got 17"),
        (_with(good, image_keep=torch.tensor(4)), r"masks.image_keep must be an int"),
        (_with(good, text_keep=-1), r"masks.text_keep must be an int in 0\.\.12"),
        (_with(good, image_ids=repeated), r"masks.image_ids: each row must be a permutation of the positions 0\.\.15"),
        (_with(good, text_ids=good.text_ids + 1), r"masks.text_ids: each row must be a permutation"),
        (_with(good, text_targets=good.text_targets.int()), r"masks.text_targets must be a 1-D torch.long"),
        (_with(good, text_targets=good.text_targets[None]), r"masks.text_targets must be a 1-D torch.long"),
        (_with(good, text_targets=torch.tensor([4 * (12 - good.text_keep)])),
         rf"masks.text_targets holds {4 * (12 - good.text_keep)}, outside the hidden text slots"),
    ]
    for masks, message in cases:
        with pytest.raises(ValueError, match=message):
            nano_model(image, text, padding, masks=masks)
    assert torch.isfinite(nano_model(image, text, padding, masks=good).loss)
    # check_values=False (the trainer's step, whose masks are valid by construction) reads no values.
    out = nano_model(image, text, padding, masks=_with(good, image_ids=repeated), check_values=False)
    assert torch.isfinite(out.loss)


def test_the_training_step_reads_no_values_of_its_batches(monkeypatch):
    # The loader's ids and masks are valid by construction: the step must not pay for value checks.
    import contextlib

    import m3ae.model
    from m3ae.train.bench import BenchOptions, synthetic_batches
    from m3ae.train.step import TrainStep

    cfg = nano_config()
    torch.manual_seed(0)
    model = M3AE(cfg)
    (batch,) = synthetic_batches(cfg, BenchOptions(cfg, batch=4, pool=1))

    def refuse(t):
        raise AssertionError("a value check ran in the training step")
    monkeypatch.setattr(m3ae.model, "_values_readable", refuse)
    step = TrainStep(model, model, torch.optim.SGD(model.parameters(), lr=0.1), device=torch.device("cpu"),
                     autocast=contextlib.nullcontext(), clip_grad=None)
    metrics, norm = step.backward([batch])
    assert torch.isfinite(metrics[0]) and torch.isfinite(norm)
    with pytest.raises(AssertionError, match="a value check ran"):  # the public forward does check
        model(**batch.parts[0].model_inputs())
