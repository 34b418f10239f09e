"""`m3ae reconstruct`: masked images and captions, and what a checkpoint makes of them."""
from __future__ import annotations

import argparse
from . import _checks as C

_RATIO = C.number(0, 1, below=True)  # a mask ratio: 1 would hide everything


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("reconstruct", help="draw masked reconstructions of images and captions",
                       description="One row per sample: original, masked input, reconstruction; beneath "
                                   "it the caption with hidden words in [brackets] and the predicted "
                                   "words. With --caption, also the same image reconstructed with the "
                                   "true caption, no caption, and the given caption (captions visible).")
    p.add_argument("--checkpoint", required=True, help="checkpoint folder (config.json + model.safetensors) or hub id")
    p.add_argument("--data", default="demo", help="'demo', a CSV (image,caption), an image folder or an image")
    p.add_argument("--out", required=True, type=C.figure_file, help="output image (.png, .jpg, .pdf, .svg)")
    p.add_argument("--n", type=C.figure_rows, default=4,
                   help=f"samples (rows, 1..{C.MAX_FIGURE_ROWS}; default %(default)s)")
    p.add_argument("--offset", type=C.non_negative, default=0, help="skip this many samples of --data")
    p.add_argument("--image-mask-ratio", type=_RATIO, default=None, help="default: the model's")
    p.add_argument("--text-mask-ratio", type=_RATIO, default=None,
                   help="default: the model's; 0 with --caption (the caption is the condition)")
    p.add_argument("--caption", type=C.text, default=None, help="also reconstruct conditioned on this caption")
    p.add_argument("--tokenizer", default=None, help="tokenizer.json / vocab.txt (default: the checkpoint's)")
    p.add_argument("--stats", default=None, help="pixel normalisation (default: the run's, else cc12m)")
    p.add_argument("--restore", choices=("local", "global", "true"), default="local",
                   help="norm_pix models: patch statistics from nearby (local) or all visible patches, "
                        "or each hidden patch's own (true: a display oracle, two numbers per patch)")
    p.add_argument("--seed", type=C.seed, default=0, help="mask seed (default %(default)s)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..viz import inputs
    from ..viz.reconstruction import reconstruction_columns, reconstruction_figure

    loaded = inputs.load_checkpoint(args.checkpoint, args.tokenizer)
    model = loaded.model
    c = model.config
    if args.caption and not c.has_text:
        raise ValueError("--caption needs a model with text; this one is image-only (vocab_size=0)")
    preprocessing = inputs.preprocessing_for(loaded, args.stats)
    stats = preprocessing.stats
    samples = inputs.load_samples(args.data, preprocessing, args.n, args.offset)
    image = inputs.stack_images(samples)
    captions = [s.caption for s in samples]
    decode = text = padding = caption = None
    if c.has_text and (any(captions) or args.caption):
        tokenizer = inputs.require_tokenizer(loaded)
        decode = inputs.decoder_for(tokenizer)
        if any(captions):
            text, padding = inputs.text_batch(tokenizer, captions, c.text_length)
        if args.caption:
            caption = (args.caption, *inputs.text_batch(tokenizer, [args.caption] * len(samples), c.text_length))
    columns = reconstruction_columns(model, image, text, padding, caption=caption, image_ratio=args.image_mask_ratio,
                                     text_ratio=args.text_mask_ratio, seed=args.seed, restore=args.restore)
    ratio = c.image_mask_ratio if args.image_mask_ratio is None else args.image_mask_ratio
    title = f"{args.checkpoint.rstrip('/').split('/')[-1]}: {ratio:.0%} of patches hidden"
    path = reconstruction_figure(columns, args.out, decode=decode, stats=stats, title=title)
    print(f"wrote {path}")
    return 0
