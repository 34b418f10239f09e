"""Shared helpers for the visualisation tests: tiny models, a demo-like checkpoint folder."""
from __future__ import annotations

from pathlib import Path

import torch

from m3ae import M3AE, M3AEConfig
from m3ae.data.synthetic import build_demo_tokenizer


def tiny_config(**overrides) -> M3AEConfig:
    base = dict(image_size=32, patch_size=8, vocab_size=40, text_length=16)
    return M3AEConfig.from_preset("nano", **{**base, **overrides})


def tiny_model(seed: int = 0, **overrides) -> M3AE:
    torch.manual_seed(seed)
    return M3AE(tiny_config(**overrides)).eval()


def tiny_checkpoint(root: Path, **overrides) -> Path:
    """A run folder like the demo's: OUT/tokenizer.json + OUT/checkpoints/step_00000001/."""
    model = tiny_model(**overrides)
    ckpt = root / "checkpoints" / "step_00000001"
    model.save_pretrained(ckpt)
    build_demo_tokenizer().save(str(root / "tokenizer.json"))
    return ckpt


def write_png(path: Path, size=(48, 40), colour=(200, 30, 30)) -> Path:
    from PIL import Image

    Image.new("RGB", size, colour).save(path)
    return path


def is_png(path: Path) -> bool:
    return path.is_file() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
