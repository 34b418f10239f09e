"""Exporting features: a checkpoint's pooled features of a data spec (images, captions or both) to a
feature file (m3ae.eval.features format), in one call (`m3ae embed`)."""
from __future__ import annotations

import time
from pathlib import Path

from .results import EvalResult
from .settings import EvalSettings

INPUTS = ("image", "text", "joint")


class Captioned:
    """Wraps a manifest dataset: items become dicts with the image and / or the caption's token ids."""

    def __init__(self, ds, tokenizer, text_length: int, inputs: str):
        self.ds, self.tokenizer, self.text_length, self.inputs = ds, tokenizer, text_length, inputs
        self._bad: set[int] = set()

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        from ..data.bad import BadSample
        from ..data.pipeline import decode_caption

        # A caption that is not text (bytes that were not UTF-8) is pretraining's bad_text, by the
        # same rule; like a bad image in the dataset, it is counted and replaced by the next item.
        for attempt in range(len(self)):
            j = (i + attempt) % len(self)
            try:
                caption = decode_caption(self.ds.captions[j])
            except BadSample as err:
                if j not in self._bad:
                    self._bad.add(j)
                    self.ds.skip(self.ds.keys[j], err)
                    self.ds.counter.check()  # past max_bad_fraction: DataQualityError ends the command
                continue
            image, label = self.ds[j]
            ids = self.tokenizer.encode(caption, add_special_tokens=False).ids[: self.text_length]
            item = {"text": ids, "label": label}
            if self.inputs == "joint":
                item["image"] = image
            return item
        raise RuntimeError(f"{self.ds.description}: no usable caption at all ({dict(self.ds.counter.bad)})")


def collate_captioned(items):
    import torch

    from ..data.collate import pad_texts

    text, pad = pad_texts([torch.as_tensor(it["text"], dtype=torch.long) for it in items])
    out = {"text": text, "text_padding_mask": pad, "label": torch.tensor([it["label"] for it in items])}
    if "image" in items[0]:
        out["image"] = torch.stack([it["image"] for it in items])
    return out


def run_embed(settings: EvalSettings, data: str, out: str | Path, *, split: str = "val", inputs: str = "image",
              tokenizer: str | None = None, limit: int | None = None) -> EvalResult:
    """Features (N, D), labels (-1 for unlabelled data) and keys of `data` written to `out`
    (.safetensors | .npz | .npy). Text / joint inputs need a CSV manifest with a caption column."""
    from .features import extract_features, save_features

    if inputs not in INPUTS:
        raise ValueError(f"inputs must be one of {INPUTS}, got {inputs!r}")
    t0 = time.perf_counter()
    with settings.threads_applied():
        device = settings.torch_device()
        model = settings.load_encoder(device)
        ds = settings.dataset(data, split, model.config.image_size, False, limit, unlabelled=True)
        keys, collate = ds.keys, None
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
            ds, collate = Captioned(ds, tok, model.config.text_length, inputs), collate_captioned
        feats, labels = extract_features(model, ds, settings.pool, settings.batch_size, device, settings.num_workers,
                                         progress=not settings.quiet, desc="embed", collate=collate)
    meta = {"checkpoint": settings.checkpoint, "data": data, "pool": settings.pool, "inputs": inputs}
    save_features(out, feats, labels, keys, meta)
    metrics = {"samples": int(len(labels)), "dim": int(feats.shape[1])}
    return EvalResult("embed", metrics, {"features": str(out)}, time.perf_counter() - t0)
