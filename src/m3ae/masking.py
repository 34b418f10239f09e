"""Which tokens the encoder sees.

A `Masks` holds, per modality, a permutation of positions (B, length) and how many of its first
entries are kept (visible). Everything after the kept prefix is hidden; for text, hidden positions
that are padding carry no loss. The model only consumes `Masks`, so masks can be drawn in the data
loader (no host sync in the step), replayed from the authors' fixtures, or made by hand.

Per-sample text masking orders each row as [kept real tokens, padding, masked real tokens] and keeps
the batch-wide maximum of kept counts; rows with fewer kept tokens fill the extra slots with padding
positions (always enough of them, because round(r*n) is monotone in n), which are key-masked in
attention and never reach a loss. So padding is never visible and the shapes stay rectangular.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch


@dataclass
class Masks:
    image_ids: torch.Tensor | None = None  # (B, N) long: kept positions first
    image_keep: int = 0
    text_ids: torch.Tensor | None = None  # (B, L) long: kept positions first
    text_keep: int = 0
    # Optional (M,) long: flat indices into the (B, L - text_keep) hidden slots that are real tokens
    # (the ones carrying a loss). Computed where masks are drawn (the loader) so the model can run
    # the 30k-wide text head on exactly those M rows without a host sync; None: the model derives it.
    text_targets: torch.Tensor | None = None

    def map_tensors(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Masks":
        """The same masks with `fn` applied to every tensor (moves, pinning)."""
        def apply(t: torch.Tensor | None) -> torch.Tensor | None:
            return None if t is None else fn(t)
        return Masks(apply(self.image_ids), self.image_keep, apply(self.text_ids), self.text_keep,
                     apply(self.text_targets))

    def to(self, device: torch.device | str, non_blocking: bool = False) -> "Masks":
        return self.map_tensors(lambda t: t.to(device, non_blocking=non_blocking))

    @staticmethod
    def hidden(ids: torch.Tensor, keep: int) -> torch.Tensor:
        """(B, length) bool, True where the position is hidden from the encoder."""
        mask = torch.ones(ids.shape, dtype=torch.bool, device=ids.device)
        return mask.scatter(1, ids[:, :keep], False)

    def image_mask(self) -> torch.Tensor:
        assert self.image_ids is not None
        return self.hidden(self.image_ids, self.image_keep)

    def text_mask(self) -> torch.Tensor:
        assert self.text_ids is not None
        return self.hidden(self.text_ids, self.text_keep)


def keep_count(length: int, ratio: float) -> int:
    """Visible tokens out of `length`, as the authors compute it."""
    return int(length * (1.0 - ratio))


def random_image_ids(batch: int, num_patches: int, generator: torch.Generator | None = None,
                     shared: bool = False, device: torch.device | str = "cpu") -> torch.Tensor:
    """A random permutation per sample, or one shared by the batch (reference mode)."""
    rows = 1 if shared else batch
    noise = torch.rand(rows, num_patches, generator=generator, device=device)
    return noise.argsort(dim=1).expand(batch, -1).contiguous()


def per_sample_text_ids(padding: torch.Tensor, ratio: float, generator: torch.Generator | None = None,
                        min_keep: int = 0) -> tuple[torch.Tensor, int]:
    """Padding-aware per-sample text masking: round(ratio * n_real) real tokens hidden per row.

    Returns the (B, L) order [kept real, padding, hidden real] and the number of kept slots: the
    batch maximum, raised to `min_keep` (a fixed encoder length, for static shapes) as far as every
    row has padding to fill the extra slots; the extra slots never reveal a hidden token.
    """
    padding = padding.bool()
    batch, length = padding.shape
    real = ~padding
    n_real = real.sum(dim=1)
    n_hidden = torch.floor(n_real.double() * ratio + 0.5).long()  # round half up
    n_keep = n_real - n_hidden
    noise = torch.rand(batch, length, generator=generator, device=padding.device)
    # Rank real tokens by noise (padding last); the n_keep lowest ranks stay visible.
    rank = noise.masked_fill(padding, 2.0).argsort(dim=1).argsort(dim=1)
    kept = real & (rank < n_keep[:, None])
    group = torch.where(kept, 0.0, torch.where(padding, 1.0, 2.0))
    ids = (group + noise).argsort(dim=1)
    keep = int(n_keep.max().item()) if batch > 0 else 0
    if min_keep > keep and batch > 0:
        keep = max(keep, min(min_keep, int((length - n_hidden).min().item())))
    return ids, keep


def make_masks(batch: int, *, num_patches: int | None, text_padding: torch.Tensor | None,
               text_length: int | None = None, image_ratio: float, text_ratio: float,
               mode: str = "per_sample", generator: torch.Generator | None = None,
               device: torch.device | str = "cpu", static_text_keep: bool = False) -> Masks:
    """Draw masks for a batch. Image before text, as in the reference.

    `static_text_keep`: per-sample mode keeps keep_count(L) text slots (not the batch maximum), so
    the encoder length depends on L alone (static shapes for torch.compile); same losses.
    """
    for name, ratio in (("image_ratio", image_ratio), ("text_ratio", text_ratio)):
        if not 0.0 <= ratio < 1.0:  # 1.0 would hide everything: nothing left to encode
            raise ValueError(f"{name} must be in [0, 1), got {ratio}")
    masks = Masks()
    shared = mode == "reference"
    if num_patches is not None:
        masks.image_ids = random_image_ids(batch, num_patches, generator, shared, device)
        masks.image_keep = keep_count(num_patches, image_ratio)
    if text_padding is not None or text_length is not None:
        if text_padding is None:
            assert text_length is not None
            text_padding = torch.zeros(batch, text_length, dtype=torch.bool, device=device)
        length = text_padding.shape[1]
        if shared:
            masks.text_ids = random_image_ids(batch, length, generator, True, device)
            masks.text_keep = keep_count(length, text_ratio)
        else:
            min_keep = keep_count(length, text_ratio) if static_text_keep else 0
            masks.text_ids, masks.text_keep = per_sample_text_ids(text_padding, text_ratio, generator, min_keep)
        masks.text_targets = text_target_index(masks.text_ids, masks.text_keep, text_padding)
    return masks


def text_target_index(ids: torch.Tensor, keep: int, padding: torch.Tensor) -> torch.Tensor:
    """Flat indices into the (B, L - keep) hidden slots of `ids` that hold real (non-padding) tokens.

    Uses nonzero (a host sync on CUDA), so call it where masks are drawn, not in the step.
    """
    real = ~padding.bool().gather(1, ids[:, keep:])
    return real.flatten().nonzero().squeeze(1)


def masks_for(config, batch: int, *, has_image: bool, text_padding: torch.Tensor | None,
              text_length: int | None = None, generator: torch.Generator | None = None,
              device: torch.device | str = "cpu", num_patches: int | None = None, mode: str | None = None,
              image_ratio: float | None = None, text_ratio: float | None = None,
              static_text_keep: bool = False) -> Masks:
    """Masks as a model config asks for them (its ratios, masking mode and patch count), each
    overridable: the one place a config becomes masks (model, collator, benchmark, pictures)."""
    return make_masks(batch, num_patches=(num_patches or config.num_patches) if has_image else None,
                      text_padding=text_padding, text_length=text_length,
                      image_ratio=config.image_mask_ratio if image_ratio is None else image_ratio,
                      text_ratio=config.text_mask_ratio if text_ratio is None else text_ratio,
                      mode=config.masking if mode is None else mode, generator=generator, device=device,
                      static_text_keep=static_text_keep)
