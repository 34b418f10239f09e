"""Data: sample sources, collation into model batches, and the built-in synthetic demo set.

Contract between sources and the trainer: a source yields *samples*, dicts with
  "image": float tensor (C, H, W), normalised — or absent/None for text-only samples
  "text":  long tensor (n,) of token ids, n <= text_length — or absent/None/empty for image-only
  "key":   str identifying the sample (for logs and bad-data reports)
  "step":  int, the micro-batch index this sample belongs to (set by the sampler; seeds masks)
`Collator` turns a list of samples into a batch of modality groups, each with its masks.
"""
from __future__ import annotations


def __getattr__(name: str):
    # Lazy (collate imports torch): `m3ae.data.bad` and `m3ae.data.spec` stay light for the CLI.
    if name in ("Batch", "BatchPart", "Collator"):
        from . import collate

        return getattr(collate, name)
    raise AttributeError(f"module 'm3ae.data' has no attribute {name!r}")


__all__ = ["Batch", "BatchPart", "Collator"]
