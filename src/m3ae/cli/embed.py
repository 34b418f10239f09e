"""`m3ae embed`: export frozen-encoder features (+ labels, keys) to .safetensors / .npz / .npy."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from . import _evalargs as E


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("embed", help="export encoder features of an image set (labelled or not)",
                       description="Write features (N, D) float32, labels (N,) int64 and keys. Data without "
                                   "labels (a folder of photos, a manifest without a label column, shards "
                                   "without .cls) gets label -1 everywhere.")
    E.add_model_args(p)
    p.add_argument("--data", required=True, help="data spec, labelled or not (see m3ae.eval.labelled)")
    p.add_argument("--split", default="val", help="which part of CIFAR / HDF5 data: train | val")
    p.add_argument("--out", required=True, help="FILE.safetensors | FILE.npz | FILE.npy")
    p.add_argument("--inputs", choices=("image", "text", "joint"), default="image",
                   help="text / joint need a CSV manifest with a caption column")
    p.add_argument("--tokenizer", default=None,
                   help="tokenizer.json / vocab.txt for text / joint inputs (default: the checkpoint's)")
    p.add_argument("--limit", type=int, default=None, help="a fixed random subset of this many items")
    p.set_defaults(func=run)


class _Captioned:
    """Wraps a manifest dataset: items become dicts with image and / or token ids."""

    def __init__(self, ds, tokenizer, text_length: int, inputs: str):
        self.ds, self.tokenizer, self.text_length, self.inputs = ds, tokenizer, text_length, inputs

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        image, label = self.ds[i]
        ids = self.tokenizer.encode(self.ds.captions[i], add_special_tokens=False).ids[: self.text_length]
        item = {"text": ids, "label": label}
        if self.inputs == "joint":
            item["image"] = image
        return item


def _collate(items):
    import torch
    from ..data.collate import pad_texts
    text, pad = pad_texts([torch.as_tensor(it["text"], dtype=torch.long) for it in items])
    out = {"text": text, "text_padding_mask": pad, "label": torch.tensor([it["label"] for it in items])}
    if "image" in items[0]:
        out["image"] = torch.stack([it["image"] for it in items])
    return out


def run(args: argparse.Namespace) -> int:
    from ..eval.features import extract_features, save_features
    from ..eval.results import summary_line, write_result

    t0 = time.perf_counter()
    from ..distributed import pick_device  # torch: imported when run, not for --help
    device = pick_device(args.device)
    model = E.load_encoder(args.checkpoint, device)
    ds = E.dataset(args, args.data, args.split, model.config.image_size, False, args.limit, unlabelled=True)
    collate = None
    if args.inputs != "image":
        if not hasattr(ds, "captions"):
            raise ValueError("--inputs text/joint needs a CSV manifest (image,label,caption) as --data")
        if not model.config.has_text:
            raise ValueError("this model is image-only; it takes no text")
        from ..hub import resolve_checkpoint
        from ..pretrained import checkpoint_tokenizer
        tokenizer = checkpoint_tokenizer(resolve_checkpoint(args.checkpoint), model.config.vocab_size, args.tokenizer)
        if tokenizer is None:
            raise ValueError(f"{args.checkpoint} has no tokenizer.json; pass --tokenizer")
        ds, collate = _Captioned(ds, tokenizer, model.config.text_length, args.inputs), _collate
    feats, labels = extract_features(model, ds, args.pool, args.batch_size, device, args.num_workers,
                                     progress=not args.quiet, desc="embed", collate=collate)
    keys = ds.ds.keys if collate else ds.keys
    meta = {"checkpoint": args.checkpoint, "data": args.data, "pool": args.pool, "inputs": args.inputs}
    save_features(args.out, feats, labels, keys, meta)
    seconds = time.perf_counter() - t0
    metrics = {"samples": int(len(labels)), "dim": int(feats.shape[1])}
    path = write_result(E.result_path(args, "embed", str(Path(args.out).parent)), "embed",
                        checkpoint=args.checkpoint, data=E.data_record(args), settings=E.settings_record(args),
                        metrics=metrics, seconds=seconds, extra={"features": args.out})
    print(summary_line("embed", metrics, seconds) + f" -> {args.out} (result {path})")
    return 0
