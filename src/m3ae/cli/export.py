"""`m3ae export CKPT --to hf-vit|hf-vitmae|timm OUT`: the image encoder in another library's format."""
from __future__ import annotations

import argparse
from . import _checks as C


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("export", help="write the image encoder for transformers (ViT, ViTMAE) or timm",
                       description="Rewrites the encoder's weights under the target library's key names, "
                                   "with its config, so its own loader reads them: "
                                   "transformers.ViTModel/ViTMAEModel.from_pretrained(OUT) or "
                                   "timm.create_model(ARCH, pretrained=True, pretrained_cfg_overlay="
                                   "dict(file='OUT/model.safetensors'), **model_args) (see docs/checkpoints.md).")
    p.add_argument("checkpoint", help="checkpoint folder or hub id")
    p.add_argument("out_dir", type=C.output_folder, help="folder to write")
    p.add_argument("--to", required=True, choices=("hf-vit", "hf-vitmae", "timm"), dest="format")
    p.add_argument("--image-size", type=C.positive, default=None,
                   help="image size of the exported position table (default: the checkpoint's)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..hub import resolve_checkpoint
    from ..interop.export import export
    from ..model import M3AE
    from ..pretrained import checkpoint_preprocessing

    # The image encoder and its image rule only: no tokenizer (nor a warning about a missing one).
    folder = resolve_checkpoint(args.checkpoint)
    model = M3AE.from_pretrained(folder)
    out = export(model, checkpoint_preprocessing(folder, model.config.image_size), args.format, args.out_dir,
                 args.image_size)
    c = model.config
    print(f"wrote {out} ({args.format}: encoder {c.emb_dim}x{c.depth}, patch {c.patch_size}, "
          f"image {args.image_size or c.image_size})")
    return 0
