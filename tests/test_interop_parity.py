"""Numerical parity with the authors' JAX M3AE (tests/fixtures/jax_reference, see tiny.json)."""
from __future__ import annotations

import argparse

import numpy as np
import pytest
import torch

from _jax_reference import (CHECKPOINT, arrays, call_masks, group, info, inputs, reference_model,
                            shared_ids, t, to_flax_layout)
from m3ae import M3AE, Masks
from m3ae.cli import convert_jax
from m3ae.interop.convert import ConversionError, convert_params, infer_config, model_from_params
from m3ae.interop.flax_names import torch_name
from m3ae.interop.jax_checkpoint import load_jax_checkpoint
from m3ae.optim import build_optimizer, clip_grad_norm, lr_at, param_groups

FWD = dict(atol=1e-5, rtol=1e-5)
TRAJ = dict(atol=1e-4, rtol=1e-4)


def close(actual: torch.Tensor, key: str, **tol) -> None:
    torch.testing.assert_close(actual.detach().float(), t(key).float(), **(tol or FWD), msg=key)


@pytest.fixture(scope="module")
def model() -> M3AE:
    return reference_model().eval()


def test_inferred_config_matches_reference():
    c = reference_model().config
    ref = info()["config"]["model"]
    assert (c.emb_dim, c.depth, c.num_heads) == (ref["emb_dim"], ref["depth"], ref["num_heads"])
    assert (c.dec_emb_dim, c.dec_depth, c.dec_num_heads) == (ref["dec_emb_dim"], ref["dec_depth"],
                                                             ref["dec_num_heads"])
    assert (c.patch_size, c.vocab_size, c.use_type_embedding, c.output_head_depth) == (8, 100, True, 0)
    assert reference_model().num_parameters() == info()["config"]["num_parameters"]


@torch.no_grad()
def test_encode_matches_repr(model):
    image, text, padding = inputs()
    close(model.encode(image, text, padding), "repr/image_text")
    close(model.encode(image), "repr/image_only")
    close(model.encode(None, text, padding), "repr/text_only_via_encoder")


@torch.no_grad()
def test_masked_forward_matches_call(model):
    image, text, padding = inputs()
    out = model(image, text, padding, masks=call_masks(), full_outputs=True, return_attention=True)
    close(out.image_output, "call/image_output")
    close(out.text_output, "call/text_output")
    close(out.image_mask.float(), "call/image_mask")
    close(out.text_mask.float(), "call/text_mask")
    keep_image = call_masks().image_keep
    close(out.encoder_output[:, :1], "call/encoder_cls")
    close(out.encoder_output[:, 1: 1 + keep_image], "call/encoder_image")
    close(out.encoder_output[:, 1 + keep_image:], "call/encoder_text")
    for tower, weights in out.attentions.items():
        assert len(weights) == len(group(f"call/attention/{tower}/"))
        for i, w in enumerate(weights):
            close(w, f"call/attention/{tower}/Block_{i}/Attention_0")
    close(out.image_loss, "loss/image_loss")
    close(out.text_loss, "loss/text_loss")
    close(out.text_accuracy, "loss/text_accuracy")
    close(out.loss, "loss/total")


@torch.no_grad()
def test_single_modality_calls(model):
    image, text, padding = inputs()
    masks = Masks(image_ids=shared_ids("call_image_only/image_ids_shuffle"), image_keep=4)
    out = model(image, masks=masks, full_outputs=True)
    close(out.image_output, "call_image_only/image_output")
    close(out.image_mask.float(), "call_image_only/image_mask")
    masks = Masks(text_ids=shared_ids("call_text_only/text_ids_shuffle"), text_keep=4)
    out = model(None, text, padding, masks=masks, full_outputs=True)
    close(out.text_output, "call_text_only/text_output")
    close(out.text_mask.float(), "call_text_only/text_mask")


def test_gradients_match(model):
    model.zero_grad()
    image, text, padding = inputs()
    model(image, text, padding, masks=call_masks()).loss.backward()
    params = dict(model.named_parameters())
    grads = group("grads/params/")
    assert len(grads) == len(params)
    for name, ref in grads.items():
        got = to_flax_layout(name, params[torch_name(name)].grad)
        np.testing.assert_allclose(got, ref, atol=1e-4, rtol=1e-4, err_msg=name)
    for block in model.encoder.blocks:  # why key biases are excluded below
        dim = block.attn.qkv.bias.shape[0] // 3
        assert block.attn.qkv.bias.grad[dim: 2 * dim].abs().max() < 1e-6
    norm = clip_grad_norm(model.parameters(), max_norm=None)  # measure only
    close(norm, "grads/global_norm", **TRAJ)
    model.zero_grad()


def test_reference_decay_mask_matches_wd_mask():
    model = reference_model()
    groups = param_groups(model, 0.05, mode="reference")
    decayed = {id(p) for p in groups[0]["params"]}
    params = dict(model.named_parameters())
    mask = group("wd_mask/params/")
    assert len(mask) == len(params)
    for name, decay in mask.items():
        assert (id(params[torch_name(name)]) in decayed) == bool(decay), name
    # The authors' image-only MaskedAutoencoder excludes only these (and biases).
    mae = model_from_params(_mae_params(), image_size=32).model
    no_decay = {id(p) for p in param_groups(mae, 0.05, mode="reference")[1]["params"]}
    names = {n for n, p in mae.named_parameters() if id(p) in no_decay}
    assert names == {"cls_token", "encoder_image_type", "image_mask_token"} | {
        n for n, _ in mae.named_parameters() if n.endswith(".bias")}


def test_two_adamw_steps_match_train_trajectory():
    opt_cfg = info()["optimizer"]
    sched = opt_cfg["schedule"]
    model = reference_model().train()
    optimizer = build_optimizer(model, lr=sched["peak_value"], weight_decay=opt_cfg["weight_decay"],
                                betas=(opt_cfg["b1"], opt_cfg["b2"]), eps=opt_cfg["eps"],
                                decay_mode="reference")
    image, text, padding = inputs()
    for step in range(opt_cfg["steps"]):
        lr = lr_at(step, sched["peak_value"], sched["warmup_steps"], sched["decay_steps"],
                   sched["end_value"])
        np.testing.assert_allclose(lr, arrays()["train/lr_per_step"][step], rtol=1e-6)
        for g in optimizer.param_groups:
            g["lr"] = lr
        optimizer.zero_grad(set_to_none=True)
        loss = model(image, text, padding, masks=call_masks()).loss  # same batch and masks
        np.testing.assert_allclose(loss.item(), arrays()["train/loss_per_step"][step], atol=1e-5)
        loss.backward()
        clip_grad_norm(model.parameters(), opt_cfg["clip_gradient"])
        optimizer.step()

    params = dict(model.named_parameters())
    for name, ref in group("train/step2/params/").items():
        param = params[torch_name(name)]
        state = optimizer.state[param]
        assert int(state["step"]) == int(arrays()["train/step2/adam_count"])
        got = to_flax_layout(name, param)
        if name.endswith("Attention_0/Dense_0/bias"):
            # The key bias has an exactly-zero true gradient (softmax ignores a per-query shift),
            # so Adam normalises rounding noise into +-lr steps: only the scale is comparable.
            dim = got.shape[0] // 3
            key = slice(dim, 2 * dim)
            assert np.abs(got[key] - ref[key]).max() <= 2 * 2 * sched["peak_value"]
            got, ref = np.delete(got, np.r_[key]), np.delete(ref, np.r_[key])
        np.testing.assert_allclose(got, ref, **TRAJ, err_msg=name)
        np.testing.assert_allclose(to_flax_layout(name, state["exp_avg"]),
                                   arrays()[f"train/step2/adam_mu/params/{name}"], **TRAJ, err_msg=name)
        np.testing.assert_allclose(to_flax_layout(name, state["exp_avg_sq"]),
                                   arrays()[f"train/step2/adam_nu/params/{name}"], **TRAJ, err_msg=name)

    # The authors' own checkpoint after those 2 steps, imported, is the model we just trained.
    imported = model_from_params(load_jax_checkpoint(CHECKPOINT).params, image_size=32).model
    with torch.no_grad():
        torch.testing.assert_close(imported.encode(image, text, padding),
                                   model.encode(image, text, padding), **TRAJ)


def test_pickle_and_npz_convert_to_the_same_tensors():
    ckpt = load_jax_checkpoint(CHECKPOINT)
    config = infer_config(ckpt.params, ckpt.variant, image_size=32)
    from_pickle = convert_params(ckpt.params, config)
    from_npz = convert_params(group("train/step2/params/"), config)
    assert from_pickle.keys() == from_npz.keys()
    for key in from_pickle:
        assert torch.equal(from_pickle[key], from_npz[key]), key


# -- the convert-jax command ----------------------------------------------------------------------
def _cli(*argv: str) -> int:
    parser = argparse.ArgumentParser()
    convert_jax.register(parser.add_subparsers())
    args = parser.parse_args(["convert-jax", *argv])
    return args.func(args)


def _mae_params() -> dict[str, np.ndarray]:
    text = ("text_embedding/", "text_mask_embedding", "encoder_text_type_embedding",
            "decoder_text_type_embedding", "decoder_text_output/")
    return {k: v for k, v in group("params/").items() if not k.startswith(text)}


def test_cli_converts_the_authors_checkpoint(tmp_path, capsys):
    assert _cli(str(CHECKPOINT), str(tmp_path / "out"), "--image-size", "32") == 0
    printed = capsys.readouterr().out
    assert "model kind M3AE" in printed and "143,652 parameters" in printed and "step 1" in printed
    model = M3AE.from_pretrained(tmp_path / "out")
    assert model.config.image_size == 32 and model.config.num_heads == 4
    params = dict(model.named_parameters())
    for name, ref in group("train/step2/params/").items():
        np.testing.assert_array_equal(to_flax_layout(name, params[torch_name(name)]), ref, err_msg=name)


def test_cli_npz_reproduces_repr(tmp_path, capsys):
    np.savez(tmp_path / "params.npz", **{f"params/{k}": v for k, v in group("params/").items()})
    assert _cli(str(tmp_path / "params.npz"), str(tmp_path / "out"), "--image-size", "32") == 0
    assert "note: num_heads = 4 (preset for width 64" in capsys.readouterr().out
    model = M3AE.from_pretrained(tmp_path / "out").eval()
    image, text, padding = inputs()
    with torch.no_grad():
        close(model.encode(image, text, padding), "repr/image_text")


def test_cli_mae_kind_checkpoint(tmp_path, capsys):
    np.savez(tmp_path / "mae.npz", **_mae_params())
    assert _cli(str(tmp_path / "mae.npz"), str(tmp_path / "out"), "--image-size", "32",
                "--patch-size", "8", "--num-heads", "4", "--dec-num-heads", "4") == 0
    assert "model kind MAE" in capsys.readouterr().out
    model = M3AE.from_pretrained(tmp_path / "out").eval()
    assert model.config.vocab_size == 0 and not model.config.has_text
    with torch.no_grad():
        close(model.encode(inputs()[0]), "repr/image_only")


def test_unused_or_missing_tensors_are_named():
    params = dict(group("params/"))
    params["encoder/Block_0/Extra_0/kernel"] = np.zeros((2, 2), np.float32)
    with pytest.raises(ConversionError, match="encoder/Block_0/Extra_0/kernel"):
        model_from_params(params, image_size=32)
    params = dict(group("params/"))
    del params["encoder/LayerNorm_0/scale"]
    with pytest.raises(ConversionError, match=r"missing \['encoder/LayerNorm_0/scale'\]"):  # as Flax names it
        model_from_params(params, image_size=32)
    params = dict(group("params/"))
    params["decoder_input_projection/kernel"] = np.zeros((63, 32), np.float32)
    with pytest.raises(ConversionError, match=r"shape mismatch \['decoder_input_projection/kernel: \(63, 32\) vs "
                                              r"\(64, 32\)'\]"):  # in Flax's (in, out) layout
        model_from_params(params, image_size=32)
    with pytest.raises(ConversionError, match="patch size 5"):
        model_from_params(group("params/"), patch_size=5)


@pytest.mark.parametrize("head_depth", [0, 1, 2])
def test_flax_name_inverts_torch_name(head_depth):
    from m3ae import M3AEConfig
    from m3ae.interop.flax_names import flax_name

    config = M3AEConfig.from_preset("nano", output_head_depth=head_depth, use_type_embedding=True)
    for key in M3AE(config).state_dict():
        assert torch_name(flax_name(key, head_depth), head_depth) == key, key


def test_npz_with_params_beside_other_groups(tmp_path):
    # The reference fixture's layout: params/ next to inputs/, grads/, train/ and so on.
    from m3ae.interop.jax_checkpoint import CheckpointFormatError, load_jax_checkpoint

    np.savez(tmp_path / "mixed.npz", **{f"params/{k}": v for k, v in group("params/").items()},
             **{"inputs/image": np.zeros((2, 3), np.float32), "grads/cls_token": np.zeros((1, 1, 64), np.float32)})
    ckpt = load_jax_checkpoint(tmp_path / "mixed.npz")
    assert ckpt.location == "params/" and ckpt.params.keys() == group("params/").keys()
    np.savez(tmp_path / "none.npz", **{"inputs/image": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointFormatError, match=r"groups: \['inputs'\]"):
        load_jax_checkpoint(tmp_path / "none.npz")


def test_cli_tokenizer_is_saved_and_the_folder_must_be_new(tmp_path, capsys):
    from m3ae.data.tokenizer import load_tokenizer

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "a", "red", "circle"]) + "\n")
    out = tmp_path / "out"
    assert _cli(str(CHECKPOINT), str(out), "--image-size", "32", "--tokenizer", str(vocab)) == 0
    assert load_tokenizer(out / "tokenizer.json").encode("a red circle", add_special_tokens=False).ids == [5, 6, 7]
    # Into a folder that holds anything (here the conversion just written): refused, nothing touched.
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    with pytest.raises(ValueError, match="not an empty folder"):
        _cli(str(CHECKPOINT), str(out), "--image-size", "32")
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
    (tmp_path / "empty").mkdir()
    assert _cli(str(CHECKPOINT), str(tmp_path / "empty"), "--image-size", "32") == 0
    with pytest.raises(SystemExit) as exited:  # a usage error now, before the checkpoint is read
        _cli(str(CHECKPOINT), str(tmp_path / "t0"), "--text-length", "0")
    assert exited.value.code == 2 and not (tmp_path / "t0").exists()


def test_cli_error_is_clean(tmp_path):
    params = dict(group("params/"))
    params["mystery"] = np.zeros(3, np.float32)
    np.savez(tmp_path / "bad.npz", **params)
    with pytest.raises(ValueError, match="mystery"):
        _cli(str(tmp_path / "bad.npz"), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()


def _gelu(x):
    return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))


def _layer_norm(x, scale, bias):
    mean = x.mean(-1, keepdims=True)
    var = x.var(-1, keepdims=True)
    return (x - mean) / np.sqrt(var + 1e-6) * scale + bias


def test_mlp_output_heads_are_mapped_like_the_authors_mlp():
    """output_head_depth=2: input LayerNorm_0, then Dense_i -> gelu -> LayerNorm_{i+1} (residual
    after the first), then Dense_2 (the authors' MLP module, written out in numpy)."""
    rng = np.random.default_rng(0)
    params = {k: v for k, v in group("params/").items()
              if not k.startswith(("decoder_image_output/", "decoder_text_output/"))}
    heads = {}
    for head, out_dim in (("decoder_image_output", 192), ("decoder_text_output", 100)):
        h = {"LayerNorm_0/scale": 1 + 0.1 * rng.standard_normal(32), "LayerNorm_0/bias": 0.1 * rng.standard_normal(32)}
        for i in range(2):
            h[f"Dense_{i}/kernel"] = 0.2 * rng.standard_normal((32, 32))
            h[f"Dense_{i}/bias"] = 0.1 * rng.standard_normal(32)
            h[f"LayerNorm_{i + 1}/scale"] = 1 + 0.1 * rng.standard_normal(32)
            h[f"LayerNorm_{i + 1}/bias"] = 0.1 * rng.standard_normal(32)
        h["Dense_2/kernel"] = 0.2 * rng.standard_normal((32, out_dim))
        h["Dense_2/bias"] = 0.1 * rng.standard_normal(out_dim)
        h = {k: v.astype(np.float32) for k, v in h.items()}
        heads[head] = h
        params.update({f"{head}/{k}": v for k, v in h.items()})
    model = model_from_params(params, image_size=32).model
    assert model.config.output_head_depth == 2
    x = rng.standard_normal((5, 32)).astype(np.float32)
    for head, ours in (("decoder_image_output", model.image_head), ("decoder_text_output", model.text_head)):
        h = heads[head]
        y = _layer_norm(x, h["LayerNorm_0/scale"], h["LayerNorm_0/bias"])
        for i in range(2):
            z = _layer_norm(_gelu(y @ h[f"Dense_{i}/kernel"] + h[f"Dense_{i}/bias"]),
                            h[f"LayerNorm_{i + 1}/scale"], h[f"LayerNorm_{i + 1}/bias"])
            y = y + z if i > 0 else z
        expected = y @ h["Dense_2/kernel"] + h["Dense_2/bias"]
        with torch.no_grad():
            got = ours(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(got, expected, atol=1e-4, rtol=1e-4, err_msg=head)


def test_type_embeddings_absent_and_heads_override():
    params = {k: v for k, v in group("params/").items() if "type_embedding" not in k}
    converted = model_from_params(params, image_size=32, num_heads=2, dec_num_heads=2)
    c = converted.model.config
    assert not c.use_type_embedding and c.num_heads == 2 and c.dec_num_heads == 2
    assert converted.notes == ["patch_size = 8 (from image_embedding, assuming 3 channels)",
                               "text_length = 64 (default: the longest caption, in tokens; longer needs --text-length)"]
    # Given, the text length is no guess.
    converted = model_from_params(params, image_size=32, num_heads=2, dec_num_heads=2, text_length=16)
    assert converted.model.config.text_length == 16 and not any("text_length" in n for n in converted.notes)


def test_heads_follow_the_variants_model_type():
    """The authors' flags keep num_heads at its default (16) when model_type picks a preset."""
    shapes = {"image_embedding/kernel": (768, 768), "decoder_input_projection/kernel": (768, 512),
              "encoder/Block_0/TransformerMLP_0/fc1/kernel": (768, 3072),
              "decoder/Block_0/TransformerMLP_0/fc1/kernel": (512, 2048),
              "decoder_image_output/Dense_0/kernel": (512, 768)}
    params = {k: np.zeros(s, np.float32) for k, s in shapes.items()}
    variant = {"mae.model_type": "base", "mae.num_heads": 16, "mae.dec_num_heads": 16, "patch_size": 16}
    c = infer_config(params, variant)
    assert (c.num_heads, c.dec_num_heads, c.patch_size, c.image_size) == (12, 16, 16, 256)
    assert infer_config(params, {}, num_heads=6).num_heads == 6
    assert infer_config(params, {}).num_heads == 12  # preset by width
