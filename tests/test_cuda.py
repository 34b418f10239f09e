"""CUDA-only paths (skipped without a GPU; `m3ae bench check` runs them on a GPU machine)."""
import json
import math

import pytest
import torch

from m3ae import M3AE, M3AEConfig
from m3ae.data.collate import pad_texts
from m3ae.masking import make_masks
from m3ae.train.config import load_config
from m3ae.train.loop import pretrain

pytestmark = [pytest.mark.cuda,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")]

TINY = ["model.image_size=32", "model.patch_size=8", "model.emb_dim=64", "model.depth=2", "model.num_heads=4",
        "model.dec_emb_dim=32", "model.dec_depth=1", "model.dec_num_heads=4", "model.vocab_size=32",
        "model.text_length=16", "data.spec=demo", "data.num_workers=0", "progress=false", "log_every=5",
        "batch_size=32", "optim.lr=2e-3", "optim.warmup_steps=5", "device=cuda"]


def _inputs(cfg, device, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    image = torch.randn(b, 3, cfg.image_size, cfg.image_size, generator=g)
    text, pad = pad_texts([torch.randint(1, cfg.vocab_size, (n,), generator=g) for n in (3, 9, 16, 5)][:b])
    masks = make_masks(b, num_patches=cfg.num_patches, text_padding=pad, image_ratio=0.75, text_ratio=0.75,
                       generator=g)
    return dict(image=image.to(device), text=text.to(device), text_padding_mask=pad.to(device),
                masks=masks.to(device))


def test_bf16_training_on_cuda_learns_and_saves_fp32_weights(tmp_path):
    result = pretrain(load_config(None, TINY + ["steps=40"]), tmp_path)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert all(math.isfinite(r["loss"]) for r in rows)
    assert rows[-1]["loss"] < rows[0]["loss"]
    cpu = M3AE.from_pretrained(result.checkpoint)
    assert next(iter(cpu.parameters())).dtype == torch.float32


def test_cuda_forward_matches_cpu():
    cfg = M3AEConfig(image_size=32, patch_size=8, emb_dim=64, depth=2, num_heads=4, dec_emb_dim=32, dec_depth=1,
                     dec_num_heads=4, vocab_size=32, text_length=16)
    torch.manual_seed(0)
    model = M3AE(cfg).eval()
    cpu = model(**_inputs(cfg, "cpu"))
    gpu = model.to("cuda")(**_inputs(cfg, "cuda"))
    torch.testing.assert_close(gpu.loss.cpu(), cpu.loss, rtol=1e-3, atol=1e-4)


def test_fused_adamw_and_fused_text_head_on_cuda():
    from m3ae.linear_cross_entropy import linear_cross_entropy
    from m3ae.optim import build_optimizer

    model = M3AE(M3AEConfig.from_preset("nano")).cuda()
    assert build_optimizer(model, 1e-3, 0.05).defaults["fused"]
    g = torch.Generator(device="cuda").manual_seed(0)
    hidden = torch.randn(300, 64, device="cuda", generator=g)
    weight = torch.randn(1000, 64, device="cuda", generator=g)
    targets = torch.randint(0, 1000, (300,), device="cuda", generator=g)
    tw = torch.full((300,), 1 / 300, device="cuda")
    loss = linear_cross_entropy(hidden, weight, None, targets, tw, chunk_rows=64)[0]
    ref = (torch.nn.functional.cross_entropy(hidden @ weight.T, targets, reduction="none") * tw).sum()
    torch.testing.assert_close(loss, ref, rtol=1e-4, atol=1e-5)


def test_compiled_training_on_cuda_runs(tmp_path):
    result = pretrain(load_config(None, TINY + ["steps=6", "compile=true"]), tmp_path)
    assert result.status == "finished"
    assert all(math.isfinite(x) for r in result.history for x in r["step_losses"])
