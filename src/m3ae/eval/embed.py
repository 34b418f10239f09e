"""Exporting features: a checkpoint's pooled features of a data spec (images, captions or both) to a
feature file (m3ae.eval.features format), in one call (`m3ae embed`)."""
from __future__ import annotations

import time
from pathlib import Path

from .results import EvalResult
from .settings import EvalSettings

INPUTS = ("image", "text", "joint")


def collate_captioned(items):
    """collate_kept's batch of CaptionedItems, with the usable items' token ids padded."""
    import torch

    from ..data.collate import pad_texts
    from .labelled import collate_kept

    out = collate_kept(items)
    good = [it for it in items if "bad" not in it]
    if good:
        out["text"], out["text_padding_mask"] = pad_texts([torch.as_tensor(it["text"], dtype=torch.long)
                                                           for it in good])
    return out


def run_embed(settings: EvalSettings, data: str, out: str | Path, *, split: str = "val", inputs: str = "image",
              tokenizer: str | None = None, limit: int | None = None) -> EvalResult:
    """Features (N, D), labels (-1 for unlabelled data) and keys of `data` written to `out`
    (.safetensors | .npz | .npy). Text / joint inputs need a CSV manifest with a caption column."""
    from .features import extract_kept_features, save_features
    from .labelled import CaptionedItems

    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    t0 = time.perf_counter()
    with settings.applied():
        device = settings.torch_device()
        model = settings.load_encoder(device)
        ds = settings.dataset(data, split, model.config.image_size, False, limit, unlabelled=True)
        collate, data_set = None, ds
        if inputs != "image":
            if not hasattr(ds, "captions"):
                raise ValueError("text / joint inputs need a CSV manifest (image,label,caption) as the data")
            if not model.config.has_text:
                raise ValueError("this model is image-only; it takes no text")
            from ..hub import resolve_checkpoint
            from ..pretrained import checkpoint_tokenizer

            tok = checkpoint_tokenizer(resolve_checkpoint(settings.checkpoint), model.config.vocab_size, tokenizer)
            if tok is None:
                raise ValueError(f"{settings.checkpoint} has no tokenizer.json; pass a tokenizer")
            data_set, collate = CaptionedItems(ds, tok, model.config.text_length, inputs), collate_captioned
        feats, labels, kept = extract_kept_features(model, data_set, settings.pool, settings.batch_size, device,
                                                    settings.num_workers, progress=not settings.quiet, desc="embed",
                                                    collate=collate, threads=settings.extraction_threads())
        keys = [ds.keys[i] for i in kept.tolist()]  # unusable images left out: keys stay with their rows
    meta = {"checkpoint": settings.checkpoint, "data": data, "pool": settings.pool, "inputs": inputs}
    save_features(out, feats, labels, keys, meta)
    metrics = {"samples": int(len(labels)), "dim": int(feats.shape[1])}
    return EvalResult("embed", metrics, {"features": str(out)}, time.perf_counter() - t0)
