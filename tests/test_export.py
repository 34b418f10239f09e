"""`m3ae export`: the encoder loads in transformers (the real library, numerically) and in timm's
key layout. timm cannot be imported with this CPU torch build, so its export is checked against
timm's documented VisionTransformer keys and tied numerically to the transformers export (same
kernels, fused qkv = the three transformers projections stacked)."""
from __future__ import annotations

import json

import pytest
import torch

from m3ae import M3AE, M3AEConfig, Preprocessing
from m3ae.cli import main
from m3ae.interop.export import export, hf_state_dict, timm_state_dict

transformers = pytest.importorskip("transformers")


def _checkpoint(tmp_path, **kw):
    torch.manual_seed(0)
    model = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=40, text_length=16, **kw))
    with torch.no_grad():  # non-trivial type embedding and [CLS], so their mapping is tested
        model.encoder_image_type.normal_()
        model.cls_token.normal_()
    preprocessing = Preprocessing.from_stats(32, "imagenet")
    return model.eval(), model.save_pretrained(tmp_path / "ckpt", preprocessing=preprocessing)


def _loaded(cls, folder, **kw):
    model, info = cls.from_pretrained(folder, output_loading_info=True, **kw)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"], info
    return model.eval()


@torch.no_grad()
def test_hf_vit_export_matches(tmp_path):
    model, ckpt = _checkpoint(tmp_path)
    assert main(["export", str(ckpt), str(tmp_path / "vit"), "--to", "hf-vit"]) == 0
    vit = _loaded(transformers.ViTModel, tmp_path / "vit", add_pooling_layer=False)
    image = torch.randn(2, 3, 32, 32)
    torch.testing.assert_close(vit(pixel_values=image).last_hidden_state, model.encode(image), atol=1e-5, rtol=1e-4)
    processor = json.loads((tmp_path / "vit" / "preprocessor_config.json").read_text())
    assert processor["image_mean"] == [0.485, 0.456, 0.406] and processor["crop_size"] == {"height": 32, "width": 32}


def test_hf_image_processor_applies_the_checkpoints_rule(tmp_path):
    """AutoImageProcessor on the export gives m3ae's pixels for non-square photos and crop_pct < 1
    (the ViTImageProcessor written before squashed every photo to a square: mean error ~0.2-0.8)."""
    import numpy as np
    from PIL import Image

    import m3ae

    model = M3AE(M3AEConfig.from_preset("nano", image_size=32, patch_size=8, vocab_size=0))
    for crop_pct in (1.0, 0.875):
        ckpt = model.save_pretrained(tmp_path / f"ckpt{crop_pct}", preprocessing=Preprocessing(32, crop_pct=crop_pct))
        export(model, m3ae.load(ckpt).preprocessing, "hf-vit", tmp_path / f"vit{crop_pct}")
        processor = transformers.AutoImageProcessor.from_pretrained(tmp_path / f"vit{crop_pct}")
        for h, w in ((80, 100), (120, 50)):
            y, x = np.mgrid[0:h, 0:w]  # smooth content: resampling details stay below a grey level
            photo = Image.fromarray(np.stack([127 + 100 * np.sin(x / 9), 127 + 100 * np.cos(y / 13),
                                              127 + 100 * np.sin((x + y) / 17)], -1).astype(np.uint8))
            theirs = processor(images=[photo], return_tensors="pt")["pixel_values"]
            ours = m3ae.load(ckpt).images([photo])
            assert theirs.shape == ours.shape == (1, 3, 32, 32)
            # crop_pct < 1: the crop lands on whole pixels of the resized photo there, of the photo here.
            assert (theirs - ours).abs().mean() < (0.02 if crop_pct == 1.0 else 0.1), (crop_pct, h, w)
    pad = Preprocessing(32, square="pad")
    with pytest.warns(UserWarning, match="square: pad"):
        export(model, pad, "hf-vit", tmp_path / "padded")


@torch.no_grad()
def test_hf_vitmae_export_matches(tmp_path):
    model, ckpt = _checkpoint(tmp_path)
    assert main(["export", str(ckpt), str(tmp_path / "mae"), "--to", "hf-vitmae", "--image-size", "48"]) == 0
    mae = _loaded(transformers.ViTMAEModel, tmp_path / "mae")
    image = torch.randn(2, 3, 48, 48)  # exported at another size than trained: tables for 6 x 6
    noise = torch.arange(36, dtype=torch.float).expand(2, -1)  # keep the patch order
    out = mae(pixel_values=image, noise=noise).last_hidden_state
    torch.testing.assert_close(out, model.encode(image), atol=1e-5, rtol=1e-4)
    shuffled = mae(pixel_values=image).last_hidden_state  # a plain call permutes patches; [CLS] is the same
    torch.testing.assert_close(shuffled[:, 0], out[:, 0], atol=1e-5, rtol=1e-4)


def test_timm_export_follows_timms_layout(tmp_path):
    model, ckpt = _checkpoint(tmp_path)
    assert main(["export", str(ckpt), str(tmp_path / "timm"), "--to", "timm"]) == 0
    config = json.loads((tmp_path / "timm" / "config.json").read_text())
    assert config["architecture"] == "vit_base_patch16_224" and config["num_classes"] == 0
    args = config["model_args"]
    assert (args["act_layer"], args["embed_dim"], args["patch_size"], args["img_size"]) == ("gelu_tanh", 64, 8, 32)
    assert config["pretrained_cfg"]["mean"] == [0.485, 0.456, 0.406]
    from safetensors.torch import load_file

    timm = load_file(str(tmp_path / "timm" / "model.safetensors"))
    # timm's VisionTransformer (class token, no head): these names and shapes, nothing else
    d, n = 64, 16
    expected = {"cls_token": (1, 1, d), "pos_embed": (1, 1 + n, d), "patch_embed.proj.weight": (d, 3, 8, 8),
                "patch_embed.proj.bias": (d,), "norm.weight": (d,), "norm.bias": (d,)}
    for i in range(2):
        expected.update({f"blocks.{i}.norm1.weight": (d,), f"blocks.{i}.norm1.bias": (d,),
                         f"blocks.{i}.attn.qkv.weight": (3 * d, d), f"blocks.{i}.attn.qkv.bias": (3 * d,),
                         f"blocks.{i}.attn.proj.weight": (d, d), f"blocks.{i}.attn.proj.bias": (d,),
                         f"blocks.{i}.norm2.weight": (d,), f"blocks.{i}.norm2.bias": (d,),
                         f"blocks.{i}.mlp.fc1.weight": (4 * d, d), f"blocks.{i}.mlp.fc1.bias": (4 * d,),
                         f"blocks.{i}.mlp.fc2.weight": (d, 4 * d), f"blocks.{i}.mlp.fc2.bias": (d,)})
    assert {k: tuple(v.shape) for k, v in timm.items()} == expected
    # the same tensors as the transformers export, which is checked numerically above
    hf = hf_state_dict(model)
    assert torch.equal(timm["patch_embed.proj.weight"], hf["embeddings.patch_embeddings.projection.weight"])
    assert torch.equal(timm["pos_embed"], hf["embeddings.position_embeddings"])
    for i in range(2):
        stacked = torch.cat([hf[f"encoder.layer.{i}.attention.attention.{x}.weight"]
                             for x in ("query", "key", "value")])
        assert torch.equal(timm[f"blocks.{i}.attn.qkv.weight"], stacked)
        assert torch.equal(timm[f"blocks.{i}.mlp.fc1.weight"], hf[f"encoder.layer.{i}.intermediate.dense.weight"])
    assert timm_state_dict(model).keys() == timm.keys()


def test_export_refuses_what_it_cannot_write(tmp_path, capsys):
    _, ckpt = _checkpoint(tmp_path)
    assert main(["export", str(ckpt), str(tmp_path / "x"), "--to", "hf-vit", "--image-size", "30"]) == 2
    assert "not divisible by the patch size 8" in capsys.readouterr().err
    # 0 was taken as "the checkpoint's size" and a negative size failed with a RuntimeError traceback.
    for size in ("0", "-8"):
        with pytest.raises(SystemExit) as exited:  # a usage error, before anything is read or written
            main(["export", str(ckpt), str(tmp_path / f"x{size}"), "--to", "hf-vit", "--image-size", size])
        assert exited.value.code == 2
        assert f"argument --image-size: must be >= 1, got {size}" in capsys.readouterr().err
        assert not (tmp_path / f"x{size}").exists()
    # Into a folder that holds anything, e.g. the checkpoint itself: refused, nothing replaced.
    before = {p.name: p.read_bytes() for p in ckpt.iterdir()}
    assert main(["export", str(ckpt), str(ckpt), "--to", "hf-vit"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert {p.name: p.read_bytes() for p in ckpt.iterdir()} == before
    # A folder holding only what a killed export left (its abandoned temp files) is empty again; one
    # whose temp file may be a live writer's (fresh) is still refused.
    import os
    import time

    killed = tmp_path / "killed"
    killed.mkdir()
    left = killed / ".model.safetensors.0123456789ab.tmp"
    left.write_bytes(b"half the weights")
    os.utime(left, (time.time() - 3600, time.time() - 3600))
    live = tmp_path / "live"
    live.mkdir()
    (live / ".config.json.0123456789ab.tmp").write_text("{")
    assert main(["export", str(ckpt), str(live), "--to", "hf-vit"]) == 2
    assert "not an empty folder" in capsys.readouterr().err
    assert main(["export", str(ckpt), str(killed), "--to", "hf-vit"]) == 0
    assert sorted(p.name for p in killed.iterdir()) == ["config.json", "model.safetensors", "preprocessor_config.json"]
