"""`m3ae convert-jax`: turn a checkpoint of the authors' JAX code into an M3AE folder."""
from __future__ import annotations

import argparse
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "convert-jax", help="convert the authors' JAX/Flax checkpoint to an M3AE folder",
        description="Reads the authors' checkpoint (cloudpickle of the train state, Flax msgpack or "
                    ".npz) without executing anything in it, maps the Flax parameters to this "
                    "package, checks every tensor is used exactly once, and writes config.json + "
                    "model.safetensors for M3AE.from_pretrained.")
    p.add_argument("checkpoint", help="the authors' checkpoint file")
    p.add_argument("out_dir", type=C.output_folder,
                   help="a new or empty folder to write (config.json + model.safetensors)")
    p.add_argument("--patch-size", type=C.positive, default=None,
                   help="patch size (default: saved variant, else from image_embedding with 3 channels)")
    p.add_argument("--num-heads", type=C.positive, default=None,
                   help="encoder heads (default: saved variant, else the preset for the width)")
    p.add_argument("--dec-num-heads", type=C.positive, default=None,
                   help="decoder heads (default: saved variant, else the preset for the width)")
    p.add_argument("--image-size", type=C.positive, default=None,
                   help="the configured image size (default 256; any size divisible by the patch is accepted)")
    p.add_argument("--text-length", type=C.positive, default=None, help="longest text (default 64)")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer to save with the weights (tokenizer.json, vocab.txt or a hub name; the "
                        "authors used bert-base-uncased)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import pickle
    from pathlib import Path

    from ..data.tokenizer import load_tokenizer
    from ..files import require_new_folder
    from ..interop.convert import load_jax_model
    from ..model import CONFIG_NAME, TOKENIZER_NAME, WEIGHTS_NAME
    from ..preprocessing import PREPROCESSOR_NAME

    out_dir = Path(args.out_dir)
    # Files left from another checkpoint (a tokenizer, training state) would be paired with these weights.
    require_new_folder(out_dir, (WEIGHTS_NAME, CONFIG_NAME, PREPROCESSOR_NAME, TOKENIZER_NAME), "convert")
    try:
        converted, ckpt = load_jax_model(
            args.checkpoint, patch_size=args.patch_size, num_heads=args.num_heads,
            dec_num_heads=args.dec_num_heads, image_size=args.image_size,
            text_length=args.text_length)
    except pickle.UnpicklingError as err:  # refused or corrupt pickle: a clean error, no traceback
        raise ValueError(f"cannot read {err}" if str(err).startswith(args.checkpoint)
                         else f"cannot read {args.checkpoint}: {err}") from err
    c = converted.model.config
    print(f"read {args.checkpoint}: {ckpt.format}, parameters at {ckpt.location}")
    if ckpt.step is not None or ckpt.state_step is not None:
        print(f"  step {ckpt.step}, optimizer updates {ckpt.state_step}, epoch {ckpt.epoch}")
    print(f"  model kind {converted.kind}: encoder {c.emb_dim}x{c.depth} ({c.num_heads} heads), "
          f"decoder {c.dec_emb_dim}x{c.dec_depth} ({c.dec_num_heads} heads), patch {c.patch_size}, "
          f"image {c.image_size}, vocab {c.vocab_size}, type embeddings "
          f"{'on' if c.use_type_embedding else 'off'}, output head depth {c.output_head_depth}")
    print(f"  {len(ckpt.params)} tensors, {converted.model.num_parameters():,} parameters, all used")
    for note in converted.notes:
        print(f"  note: {note}")
    tokenizer = None
    if args.tokenizer is not None:
        if not c.has_text:
            raise ValueError(f"--tokenizer: {args.checkpoint} is an image-only MAE (no text)")
        tokenizer = load_tokenizer(args.tokenizer, vocab_size=c.vocab_size)
    out = converted.model.save_pretrained(out_dir, tokenizer=tokenizer)
    print(f"wrote {out} (load with M3AE.from_pretrained)")
    return 0
