"""Samples -> batches. Masks are drawn here, in the loader workers, so the step never syncs."""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Sequence

import torch

from ..config import M3AEConfig
from ..masking import Masks, masks_for
from .normalization import normalize_uint8

if TYPE_CHECKING:
    from .stream_position import StreamPosition


@dataclass
class BatchPart:
    """Samples of one modality combination: image+text, image only, or text only."""

    image: torch.Tensor | None
    text: torch.Tensor | None
    text_padding_mask: torch.Tensor | None
    masks: Masks
    keys: list[str]
    labels: torch.Tensor | None = None  # (size,) class labels, in this part's row order
    # Set when `image` is uint8 (the transport format of training loaders): its normalisation,
    # applied by model_inputs() on whatever device the part has been moved to.
    pixel_stats: str | tuple | None = None

    @property
    def size(self) -> int:
        return len(self.keys)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "BatchPart":
        """The same part with `fn` applied to every tensor, masks included."""
        def apply(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)
        return BatchPart(apply(self.image), apply(self.text), apply(self.text_padding_mask),
                         self.masks.map_tensors(fn), self.keys, apply(self.labels), self.pixel_stats)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "BatchPart":
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def normalized_image(self) -> torch.Tensor | None:
        """The images as the model takes them: normalised float (uint8 ones are converted here, on
        their device)."""
        if self.image is None or self.image.dtype != torch.uint8:
            return self.image
        if self.pixel_stats is None:
            raise ValueError("uint8 images need pixel_stats (the data's normalization) to be normalised")
        return normalize_uint8(self.image, self.pixel_stats)

    def model_inputs(self) -> dict[str, Any]:
        return dict(image=self.normalized_image(), text=self.text, text_padding_mask=self.text_padding_mask,
                    masks=self.masks)


@dataclass
class Batch:
    parts: list[BatchPart]
    step: int = 0  # the micro-batch index (its masks were drawn from it)
    stats: dict[str, Any] | None = None  # data counts since the last batch (used, skipped by reason)
    stream: StreamPosition | None = None  # streams: the position, after this batch, of the share that made it
    # CPU seconds the loader worker process that made this batch used since its previous one (None:
    # made in the training process). What the loader costs the cores the step shares with it.
    loader_cpu_s: float | None = None

    @property
    def size(self) -> int:
        return sum(p.size for p in self.parts)

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Batch":
        return Batch([p.map_tensors(fn) for p in self.parts], self.step, self.stats, self.stream, self.loader_cpu_s)

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Batch":
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    def pin_memory(self) -> "Batch":
        """Page-locked copies, so `.to(cuda, non_blocking=True)` overlaps the copy with compute.

        DataLoader(pin_memory=True) calls this on each batch (it pins only tensors, mappings,
        sequences and objects with this method: without it our batches stayed pageable and every
        host-to-GPU copy was synchronous)."""
        return self.map_tensors(lambda t: t.pin_memory())


def mask_seed(seed: int, step: int, rank: int = 0) -> int:
    """A seed for the masks of one micro-batch: depends only on (run seed, step, rank)."""
    return (seed * 1_000_003 + step * 9_176 + rank * 7_919_317 + 12_345) % (2**63 - 1)


def pad_texts(texts: Sequence[torch.Tensor], length: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to `length`, by default the longest text in the batch (at least 1). Padding id 0,
    mask True."""
    longest = max(1, max(int(t.numel()) for t in texts))
    if length is not None and length < longest:
        raise ValueError(f"a text has {longest} tokens, more than the padded length {length}")
    length = length or longest
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    padding = torch.ones(len(texts), length, dtype=torch.bool)
    for i, t in enumerate(texts):
        ids[i, : t.numel()] = t
        padding[i, : t.numel()] = False
    return ids, padding


def static_shapes_in_use(compile: bool, static_shapes: bool | None) -> bool:
    """Whether a run's batches have static shapes (see Collator): as set, else exactly when compiled."""
    return compile if static_shapes is None else static_shapes


class Collator:
    """Groups samples by modality, stacks images, pads texts, draws masks from a seeded generator.

    `static_shapes`: pad every text to text_length and keep a fixed number of text slots visible,
    so tensor shapes do not change from batch to batch (for torch.compile). For given masks the
    losses are the same (the extra visible slots are key-masked padding); the random draw itself is
    over the padded length, so a run with static shapes is not bit-identical to one without. The
    decoder also runs over the extra padding slots.
    """

    def __init__(self, model_config: M3AEConfig, seed: int = 0, rank: int = 0, static_shapes: bool = False,
                 pixel_stats: str | tuple | None = None):
        self.config = model_config
        self.seed = seed
        self.rank = rank
        self.static_shapes = static_shapes
        self.pixel_stats = pixel_stats  # the normalisation of uint8 sample images (see BatchPart)

    def __call__(self, samples: list[dict[str, Any]], step: int = 0) -> Batch:
        """Micro-batch `step` (it seeds the masks) of `samples`."""
        if not samples:
            raise ValueError("cannot collate an empty batch")
        if "step" in samples[0]:  # the old place of the step: refuse rather than draw other masks
            raise ValueError("pass a micro-batch's step as Collator(...)(samples, step), not in its samples")
        generator = torch.Generator().manual_seed(mask_seed(self.seed, step, self.rank))
        groups: dict[tuple[bool, bool], list[dict[str, Any]]] = {}
        for s in samples:
            has_image = s.get("image") is not None
            text = s.get("text")
            has_text = text is not None and len(text) > 0 and self.config.has_text
            if not (has_image or has_text):
                raise ValueError(f"sample {s.get('key')!r} has neither an image nor a text")
            groups.setdefault((has_image, has_text), []).append(s)
        parts = []
        for (has_image, has_text), group in sorted(groups.items(), reverse=True):
            image = self._stack_images([s["image"] for s in group]) if has_image else None
            text = padding = None
            if has_text:
                text, padding = pad_texts([torch.as_tensor(s["text"], dtype=torch.long)[: self.config.text_length]
                                           for s in group], self.config.text_length if self.static_shapes else None)
            masks = masks_for(self.config, len(group), has_image=has_image, text_padding=padding,
                              generator=generator, static_text_keep=self.static_shapes)
            labels = (torch.tensor([int(s.get("label", -1)) for s in group])
                      if any("label" in s for s in group) else None)
            stats = self.pixel_stats if image is not None and image.dtype == torch.uint8 else None
            parts.append(BatchPart(image, text, padding, masks, [str(s.get("key", "")) for s in group], labels,
                                   stats))
        return Batch(parts, step)

    def _stack_images(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 images stay uint8; a group mixing them with float ones (a synthetic source beside a
        photo source) is normalised here to float."""
        raw = [i.dtype == torch.uint8 for i in images]
        if not any(raw):
            return torch.stack(images)
        stats = self.pixel_stats
        if stats is None:
            raise ValueError("uint8 sample images need Collator(pixel_stats=...) (the data's normalization)")
        if not all(raw):
            images = [normalize_uint8(i, stats) if r else i for i, r in zip(images, raw)]
        return torch.stack(images)
