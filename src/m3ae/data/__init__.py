"""Data: sample sources (the built-in synthetic demo set among them), collation into model batches.

Contract between the pipeline and the collator: *samples* are dicts with
  "image": float tensor (C, H, W), normalised — or absent/None for text-only samples
  "text":  long tensor (n,) of token ids, n <= text_length — or absent/None/empty for image-only
  "key":   str identifying the sample (for logs and bad-data reports)
  "label": int, optional
`Collator(samples, step)` turns them into a `Batch` of modality groups, each with its masks (drawn
from the micro-batch index `step`). What travels with a batch (its step, data counts, stream
position) is in typed fields of `Batch`, never in the samples.
"""
from __future__ import annotations


def __getattr__(name: str):
    # Lazy (collate imports torch): `m3ae.data.bad` and `m3ae.data.spec` stay light for the CLI.
    if name in ("Batch", "BatchPart", "Collator"):
        from . import collate

        return getattr(collate, name)
    raise AttributeError(f"module 'm3ae.data' has no attribute {name!r}")


__all__ = ["Batch", "BatchPart", "Collator"]
