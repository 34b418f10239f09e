"""`m3ae attention`: where a word looks in the image, and which words an image region looks at."""
from __future__ import annotations

import argparse
import re

from . import _checks as C


def _layer(text: str) -> int | str:
    """--layer: 'mean' or a block index."""
    if text == "mean":
        return text
    try:
        return int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a block number or 'mean', got {text!r}") from None


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("attention", help="cross-modal attention maps (text token <-> image patches)",
                       description="Encoder attention over the unmasked image + caption: from a word to "
                                   "the image patches (heatmap), and from an image region to the words.")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + model.safetensors) or hub id")
    p.add_argument("--image", required=True,
                   help="image file, or a data spec whose first sample is used (e.g. 'demo': a synthetic one)")
    p.add_argument("--caption", default=None, help="caption (default: the sample's own, from a data spec)")
    p.add_argument("--out", required=True, type=C.figure_file, help="output image (.png, .jpg, .pdf, .svg)")
    p.add_argument("--layer", type=_layer, default=-1, help="encoder block (negative counts from the last) or 'mean'")
    p.add_argument("--token", type=C.text, default=None, help="word of the caption (default: its first content word)")
    p.add_argument("--region", default=None,
                   help="ROW,COL patch whose attention to the words is shown; negative ones count from the "
                        "last row / column (default: the patch the word attends to most)")
    # argparse (before Python 3.13) takes an argument starting with '-' for an option unless it is a
    # plain number, so "--region -1,0" would be refused; a ROW,COL pair counts as a number here.
    p._negative_number_matcher = re.compile(r"^-\d+$|^-\d*\.\d+$|^-?\d+,-?\d+$")
    p.add_argument("--per-head", action="store_true", help="one map per head instead of the head average")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / vocab.txt (default: the checkpoint's)")
    p.add_argument("--stats", default=None, help="pixel normalisation (default: the run's, else cc12m)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..viz import inputs
    from ..viz.attention import (attention_analysis, attention_figure, default_token, find_token,
                                 parse_region, tokenize_caption)

    loaded = inputs.load_checkpoint(args.checkpoint, args.tokenizer)
    model = loaded.model
    c = model.config
    if not c.has_text:
        raise ValueError("cross-modal attention needs a model with text (this one has vocab_size=0)")
    preprocessing = inputs.preprocessing_for(loaded, args.stats)
    stats = preprocessing.stats
    sample = inputs.load_samples(args.image, preprocessing, 1, 0)[0]
    image, caption = sample.image, sample.caption if args.caption is None else args.caption.strip()
    if not caption:
        raise ValueError("--caption is empty" if args.caption is not None
                         else f"--caption is required: {args.image} has no caption")
    tokenizer = inputs.require_tokenizer(loaded)
    tokens = tokenize_caption(tokenizer, caption, c.text_length)
    positions = find_token(tokens, args.token) if args.token else default_token(tokens)
    region = parse_region(args.region, c.grid_size) if args.region else None
    result = attention_analysis(model, image, tokens, positions, args.layer, region)
    path = attention_figure(result, args.out, stats=stats, per_head=args.per_head)
    print(f"wrote {path}")
    return 0
