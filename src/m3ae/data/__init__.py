"""Data: sample sources, collation into model batches, and the built-in synthetic demo set.

Contract between sources and the trainer: a source yields *samples*, dicts with
  "image": float tensor (C, H, W), normalised — or absent/None for text-only samples
  "text":  long tensor (n,) of token ids, n <= text_length — or absent/None/empty for image-only
  "key":   str identifying the sample (for logs and bad-data reports)
  "step":  int, the micro-batch index this sample belongs to (set by the sampler; seeds masks)
`Collator` turns a list of samples into a batch of modality groups, each with its masks.
"""
from .collate import Batch, BatchPart, Collator

__all__ = ["Batch", "BatchPart", "Collator"]
