"""Built-in synthetic captioned images: two coloured shapes and a caption that describes them.

"a small red circle above a large blue square". Every sample is a pure function of (seed, index),
so the set needs no download, is identical on every machine, and resumes exactly. It is read as a
data source (spec `demo`, see sources/synthetic.py).
"""
from __future__ import annotations

import numpy as np
from PIL import Image, ImageDraw

COLORS = {
    "red": (220, 40, 40), "green": (40, 170, 60), "blue": (40, 80, 220), "yellow": (235, 205, 40),
    "purple": (140, 60, 180), "orange": (245, 140, 30), "white": (250, 250, 250), "black": (25, 25, 25),
}
SHAPES = ("circle", "square", "triangle", "diamond")
SIZES = {"small": 0.2, "large": 0.36}  # shape size as a fraction of the image side
RELATIONS = ("above", "below", "left of", "right of")
PAD, UNK = "[PAD]", "[UNK]"


def demo_vocabulary() -> list[str]:
    words = ["a", *SIZES, *COLORS, *SHAPES, "above", "below", "left", "right", "of"]
    return [PAD, UNK, *words]


def build_demo_tokenizer():
    """A word-level HF tokenizer over the demo vocabulary (lower-cased, no special tokens added)."""
    from tokenizers import Tokenizer, models, normalizers, pre_tokenizers

    vocab = {w: i for i, w in enumerate(demo_vocabulary())}
    tok = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    tok.normalizer = normalizers.Lowercase()
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _draw(draw: ImageDraw.ImageDraw, shape: str, cx: float, cy: float, r: float, color) -> None:
    if shape == "circle":
        draw.ellipse([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "square":
        draw.rectangle([cx - r, cy - r, cx + r, cy + r], fill=color)
    elif shape == "triangle":
        draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=color)
    else:  # diamond
        draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=color)


def render_sample(seed: int, index: int, image_size: int = 64) -> tuple[Image.Image, str]:
    """One (image, caption) pair, deterministic in (seed, index)."""
    rng = np.random.default_rng([seed, index])
    names = list(COLORS)
    c1, c2 = rng.choice(len(names), size=2, replace=False)
    s1, s2 = rng.integers(len(SHAPES), size=2)
    z1, z2 = rng.integers(2, size=2)
    relation = RELATIONS[rng.integers(len(RELATIONS))]
    size_names = list(SIZES)
    r1 = SIZES[size_names[z1]] * image_size / 2
    r2 = SIZES[size_names[z2]] * image_size / 2
    # Object 1 sits in the half the relation names; object 2 in the opposite half.
    lo, hi = 0.27 * image_size, 0.73 * image_size
    along = (lo, hi) if relation in ("above", "left of") else (hi, lo)
    across = rng.uniform(0.3, 0.7, size=2) * image_size
    jitter = rng.uniform(-0.05, 0.05, size=2) * image_size
    if relation in ("above", "below"):
        p1, p2 = (across[0], along[0] + jitter[0]), (across[1], along[1] + jitter[1])
    else:
        p1, p2 = (along[0] + jitter[0], across[0]), (along[1] + jitter[1], across[1])
    background = tuple(int(v) for v in rng.integers(120, 170, size=3))
    image = Image.new("RGB", (image_size, image_size), background)
    draw = ImageDraw.Draw(image)
    _draw(draw, SHAPES[s1], *p1, r1, COLORS[names[c1]])
    _draw(draw, SHAPES[s2], *p2, r2, COLORS[names[c2]])
    caption = (f"a {size_names[z1]} {names[c1]} {SHAPES[s1]} {relation} "
               f"a {size_names[z2]} {names[c2]} {SHAPES[s2]}")
    return image, caption
