"""The Multimodal Masked Autoencoder: one encoder over [CLS] + image patches + text tokens."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .config import ConfigError, M3AEConfig, check_fits_memory
from .files import atomic_write, remove_stale
from .linear_cross_entropy import linear_cross_entropy
from .losses import normalize_patches, packed_token_weights, patch_mse, token_cross_entropy
from .layers import Attention, OutputHead, Transformer, gather_rows
from .masking import Masks, masks_for, text_target_index
from .patches import patchify
from .posembed import image_position_table, text_position_table
from .preprocessing import Preprocessing

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
# Files of a checkpoint folder that a save writes only sometimes: one it does not write is removed.
OPTIONAL_NAMES = (TOKENIZER_NAME,)


@dataclass
class M3AEOutput:
    """What one masked forward pass produced. Losses are None for modalities that were absent."""

    loss: torch.Tensor
    image_loss: torch.Tensor | None = None
    text_loss: torch.Tensor | None = None
    text_accuracy: torch.Tensor | None = None
    masks: Masks | None = None
    image_mask: torch.Tensor | None = None  # (B, N) bool, True = hidden
    text_mask: torch.Tensor | None = None  # (B, L) bool, True = hidden (padding included)
    # Full-position predictions, only with full_outputs=True (visualisation, parity checks).
    image_output: torch.Tensor | None = None  # (B, N, p*p*C)
    text_output: torch.Tensor | None = None  # (B, L, vocab)
    encoder_output: torch.Tensor | None = None  # (B, 1 + kept image + kept text, D)
    attentions: dict[str, list[torch.Tensor]] = field(default_factory=dict)


@dataclass
class ModelInputs:
    """One batch as the model's stages take it (`M3AE.prepare`): the image cut into patches."""

    batch: int
    grid: tuple[int, int]  # (rows, cols) of patches; the configured grid when there is no image
    patches: torch.Tensor | None = None  # (B, N, p*p*C)
    text: torch.Tensor | None = None  # (B, L) token ids
    padding: torch.Tensor | None = None  # (B, L) bool, True = padding; None: no padding mask

    @property
    def num_patches(self) -> int:
        return self.grid[0] * self.grid[1]

    @property
    def image_slots(self) -> int:
        """Image positions in the whole sequence: N with an image, else 0."""
        return self.num_patches if self.patches is not None else 0


def _order(ids: torch.Tensor | None, modality: str) -> torch.Tensor:
    """A modality's keep-order from Masks, or a clear error when the masks lack a part the input has."""
    if ids is None:
        raise ValueError(f"the masks have no {modality} part ({modality}_ids) but the input has {modality}")
    return ids


# Token ids the embedding takes (int16 / uint8 ids fail inside it).
_TOKEN_DTYPES = (torch.int64, torch.int32)


def _values_readable(t: torch.Tensor) -> bool:
    """Whether a value check of `t` is free: a CPU tensor, outside torch.compile (where reading a
    value would break the graph). Not on CUDA: reading a value waits for the device (a host sync
    per step), and torch._assert_async fails as a device-side assert, which reports no value and
    leaves the CUDA context unusable, as the embedding's own index check already does; two more
    kernels a step for no clearer error."""
    return t.device.type == "cpu" and not torch.compiler.is_compiling()


def _is_permutation(ids: torch.Tensor) -> bool:
    """Every row of (B, n) `ids` holds each of 0..n-1 once: n values in range that hit every position
    (a scatter: ~5x cheaper than sorting the rows)."""
    low, high = (int(v) for v in torch.aminmax(ids))
    if low < 0 or high >= ids.shape[1]:
        return False
    return bool(torch.zeros(ids.shape, dtype=torch.bool, device=ids.device).scatter_(1, ids, True).all())


def _text_key_padding(padding: torch.Tensor, n_front: int) -> torch.Tensor:
    """Attention key padding (B, n_front + L) for n_front tokens ([CLS], image) before the text."""
    return torch.cat([padding.new_zeros(padding.shape[0], n_front), padding], dim=1)


def _check_masks(masks: Masks, inputs: ModelInputs, check_values: bool = True) -> None:
    """Given masks against the inputs they mask: a wrong one was an obscure index error deep inside,
    or silently wrong losses. Types and shapes always (free); values only where reading them is free
    (`_values_readable`) and wanted: each ids row a permutation of the positions, text_targets in range."""
    if not isinstance(masks, Masks):
        raise ValueError(f"masks must be an m3ae.masking.Masks, got {type(masks).__name__}")
    parts = []
    if inputs.patches is not None:
        parts.append(("image", _order(masks.image_ids, "image"), masks.image_keep, inputs.num_patches))
    if inputs.text is not None:
        parts.append(("text", _order(masks.text_ids, "text"), masks.text_keep, inputs.text.shape[1]))
    for name, ids, keep, length in parts:
        if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
            raise ValueError(f"masks.{name}_ids must be a torch.long tensor of positions, got "
                             f"{getattr(ids, 'dtype', type(ids).__name__)}")
        if tuple(ids.shape) != (inputs.batch, length):
            raise ValueError(f"masks.{name}_ids must be (batch, {name} positions) = ({inputs.batch}, {length}) for "
                             f"this input, got {tuple(ids.shape)}")
        if isinstance(keep, bool) or not isinstance(keep, int) or not 0 <= keep <= length:
            raise ValueError(f"masks.{name}_keep must be an int in 0..{length}, got {keep!r}")
        if check_values and _values_readable(ids) and ids.numel() and not _is_permutation(ids):
            raise ValueError(f"masks.{name}_ids: each row must be a permutation of the positions 0..{length - 1} "
                             "(kept ones first)")
    targets = masks.text_targets
    if inputs.text is not None and targets is not None:
        if not isinstance(targets, torch.Tensor) or targets.dtype != torch.int64 or targets.ndim != 1:
            raise ValueError("masks.text_targets must be a 1-D torch.long tensor (flat indices of the hidden "
                             "text slots that are real tokens), or None")
        slots = inputs.batch * (inputs.text.shape[1] - masks.text_keep)
        if check_values and _values_readable(targets) and targets.numel():
            low, high = (int(v) for v in torch.aminmax(targets))
            if low < 0 or high >= slots:
                raise ValueError(f"masks.text_targets holds {low if low < 0 else high}, outside the hidden text "
                                 f"slots 0..{slots - 1}; masks drawn for another batch?")


# What only the masked-autoencoding stages use (strip_decoder).
_DECODER_PARTS = ("decoder_input_projection", "decoder", "image_head", "text_head", "image_mask_token",
                  "text_mask_token", "decoder_image_type", "decoder_text_type")

# The authors' no-decay lists (prefixes of their Flax paths, in our names): decay_mode="reference".
_REFERENCE_M3AE_NO_DECAY = ("cls_token", "encoder_image_type", "encoder_text_type", "decoder_image_type",
                            "decoder_text_type", "image_mask_token", "text_mask_token", "text_embedding")
_REFERENCE_MAE_NO_DECAY = ("cls_token", "encoder_image_type", "image_mask_token")


class M3AE(nn.Module):
    # Fixed sin-cos tables (non-persistent buffers), declared for type checkers.
    enc_image_pos: torch.Tensor
    dec_image_pos: torch.Tensor
    enc_text_pos: torch.Tensor
    dec_text_pos: torch.Tensor

    def __init__(self, config: M3AEConfig):
        super().__init__()
        config.validate()
        check_fits_memory(config)  # before allocating anything
        self.config = c = config
        self.decoder_stripped = False  # strip_decoder(): encode() only, and not saved as an M3AE
        d, dd = c.emb_dim, c.dec_emb_dim
        self.cls_token = nn.Parameter(torch.zeros(1, 1, d))
        self.image_embedding = nn.Linear(c.patch_dim, d)
        self.image_mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        if c.has_text:
            self.text_embedding = nn.Embedding(c.vocab_size, d)
            self.text_mask_token = nn.Parameter(torch.zeros(1, 1, dd))
        if c.use_type_embedding:
            self.encoder_image_type = nn.Parameter(torch.zeros(1, 1, d))
            self.decoder_image_type = nn.Parameter(torch.zeros(1, 1, dd))
            if c.has_text:
                self.encoder_text_type = nn.Parameter(torch.zeros(1, 1, d))
                self.decoder_text_type = nn.Parameter(torch.zeros(1, 1, dd))
        common: dict[str, Any] = dict(
            mlp_ratio=c.mlp_ratio, drop=c.drop, att_drop=c.att_drop, drop_path=c.drop_path, eps=c.layer_norm_eps,
            grad_checkpointing=c.grad_checkpointing, explicit_attention=c.attention == "explicit")
        self.encoder = Transformer(d, c.depth, c.num_heads, **common)
        self.decoder_input_projection = nn.Linear(d, dd)
        self.decoder = Transformer(dd, c.dec_depth, c.dec_num_heads, **common)
        self.image_head = OutputHead(dd, c.patch_dim, c.output_head_depth, c.layer_norm_eps)
        if c.has_text:
            self.text_head = OutputHead(dd, c.vocab_size, c.output_head_depth, c.layer_norm_eps)
        g = c.grid_size
        self.register_buffer("enc_image_pos", image_position_table(d, g), persistent=False)
        self.register_buffer("dec_image_pos", image_position_table(dd, g), persistent=False)
        self.register_buffer("enc_text_pos", text_position_table(d, c.text_length), persistent=False)
        self.register_buffer("dec_text_pos", text_position_table(dd, c.text_length), persistent=False)
        # Tables for other input grids, built on first use (the reference computes them from the
        # input's grid); a plain dict, so they are neither parameters nor saved.
        self._grid_tables: dict[tuple, torch.Tensor] = {}
        self.reset_parameters()

    # -- initialisation (as the reference) ------------------------------------------------------
    def reset_parameters(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.LayerNorm):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
        for name, param in self.named_parameters():
            if "." not in name:  # learned tokens and type embeddings
                nn.init.normal_(param, std=0.02)
        if self.config.has_text:
            nn.init.normal_(self.text_embedding.weight, std=1.0)

    # -- embeddings -----------------------------------------------------------------------------
    def _type(self, name: str) -> torch.Tensor | float:
        return getattr(self, name) if self.config.use_type_embedding else 0.0

    def _check_inputs(self, image: torch.Tensor | None, text: torch.Tensor | None,
                      text_padding_mask: torch.Tensor | None, check_values: bool = True) -> None:
        c = self.config
        if image is None and text is None:
            raise ValueError("need an image, a text, or both")
        if image is not None:
            if image.ndim != 4 or image.shape[1] != c.in_chans:
                raise ValueError(f"image must be (B, {c.in_chans}, H, W), got {tuple(image.shape)}")
            h, w = image.shape[-2:]
            if h % c.patch_size or w % c.patch_size or h == 0 or w == 0:
                raise ValueError(f"image height and width must be positive multiples of the patch size "
                                 f"{c.patch_size}, got {h}x{w}")
        if text is not None:
            if not c.has_text:
                raise ValueError("this model is image-only (vocab_size=0); it takes no text")
            if text.ndim != 2 or text.shape[1] > c.text_length:
                raise ValueError(f"text must be (B, L) with L <= {c.text_length}, got {tuple(text.shape)}")
            if text.dtype not in _TOKEN_DTYPES:
                raise ValueError(f"text must hold token ids (torch.long or torch.int32), got {text.dtype}")
            if check_values and _values_readable(text) and text.numel():  # else an IndexError deep inside
                low, high = (int(v) for v in torch.aminmax(text))
                if low < 0 or high >= c.vocab_size:
                    bad = low if low < 0 else high
                    raise ValueError(f"text holds token id {bad}, outside 0..{c.vocab_size - 1} (vocab_size "
                                     f"{c.vocab_size}); was it tokenized with another tokenizer?")
            if text_padding_mask is not None and text_padding_mask.shape != text.shape:
                raise ValueError("text_padding_mask must have the shape of text")
            if image is not None and image.shape[0] != text.shape[0]:
                raise ValueError("image and text batch sizes differ")

    def image_positions(self, which: str, grid: tuple[int, int]) -> torch.Tensor:
        """(1, gh*gw, D) sin-cos table of the encoder ("enc") or decoder ("dec") for a patch grid:
        the buffer for the configured grid, else one built for `grid` and cached."""
        buffer = self.enc_image_pos if which == "enc" else self.dec_image_pos
        g = self.config.grid_size
        if tuple(grid) == (g, g):
            return buffer
        key = (which, *grid, buffer.device, buffer.dtype)
        if key not in self._grid_tables:
            table = image_position_table(buffer.shape[-1], grid[0], grid[1])
            self._grid_tables[key] = table.to(device=buffer.device, dtype=buffer.dtype)
        return self._grid_tables[key]

    def patch_grid(self, image: torch.Tensor) -> tuple[int, int]:
        p = self.config.patch_size
        return image.shape[-2] // p, image.shape[-1] // p

    def embed_image(self, patches: torch.Tensor, ids: torch.Tensor | None = None,
                    grid: tuple[int, int] | None = None) -> torch.Tensor:
        """Patch embedding + position + type; only at `ids` (B, K) when given (cheaper, same values).
        `grid`: the (rows, cols) of patches; default the configured square grid."""
        g = self.config.grid_size
        pos = self.image_positions("enc", grid or (g, g))
        if ids is not None:
            patches = gather_rows(patches, ids)
            pos = gather_rows(pos.expand(patches.shape[0], -1, -1), ids)
        return self.image_embedding(patches) + pos + self._type("encoder_image_type")

    def embed_text(self, text: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        pos = self.enc_text_pos[:, : text.shape[1]]
        if ids is not None:
            text = text.gather(1, ids)
            pos = gather_rows(pos.expand(text.shape[0], -1, -1), ids)
        return self.text_embedding(text) + pos + self._type("encoder_text_type")

    # -- representation ------------------------------------------------------------------------
    def encode(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
               text_padding_mask: torch.Tensor | None = None, return_attention: bool = False):
        """Encoder output over [CLS] + image tokens + text tokens, no masking, after the final norm.

        Returns (B, 1 + N + L, D); with return_attention, also the per-block attention weights.
        """
        x, attentions = self.forward_encoder(self.prepare(image, text, text_padding_mask),
                                             return_attention=return_attention)
        return (x, attentions) if return_attention else x

    # -- masked autoencoding: the stages, in the order forward runs them -----------------------
    def make_masks(self, batch: int, has_image: bool, text_padding_mask: torch.Tensor | None,
                   text_length: int | None, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", num_patches: int | None = None) -> Masks:
        return masks_for(self.config, batch, has_image=has_image, text_padding=text_padding_mask,
                         text_length=text_length, generator=generator, device=device, num_patches=num_patches)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_padding_mask: torch.Tensor | None = None, *, masks: Masks | None = None,
                generator: torch.Generator | None = None, full_outputs: bool = False,
                return_attention: bool = False, check_values: bool = True) -> M3AEOutput:
        """Mask, encode the visible tokens, decode every slot, and take the losses.

        `masks` replays given keep-orders; otherwise they are drawn with `generator`. Output heads
        run only where a loss is taken (hidden patches, hidden real tokens). `full_outputs` runs
        them everywhere and takes the mask-weighted loss from those outputs (same value; slower).
        The stages, each a method below: prepare -> masks -> forward_encoder (embed, keep the
        visible tokens, encode) -> forward_decoder -> image_loss, text_loss.

        The inputs' types and shapes are always checked, and on the CPU the values too (token ids
        within the vocabulary; each `masks` row a permutation). `check_values=False` skips the value
        checks, for a caller whose batches are valid by construction (the trainer's step).
        """
        c = self.config
        if self.decoder_stripped:
            raise RuntimeError("this model's decoder was stripped (strip_decoder()): it can only encode()")
        if text is not None and text_padding_mask is None:  # the losses and masks need one
            text_padding_mask = torch.zeros_like(text, dtype=torch.bool)
        inputs = self.prepare(image, text, text_padding_mask, check_values=check_values)
        if masks is None:
            masks = self.make_masks(inputs.batch, image is not None, inputs.padding,
                                    None if text is None else text.shape[1], generator, self.cls_token.device,
                                    inputs.num_patches)
        else:
            _check_masks(masks, inputs, check_values)
        latent, enc_att = self.forward_encoder(inputs, masks, return_attention)
        image_dec, text_dec, dec_att = self.forward_decoder(latent, inputs, masks, every_slot=full_outputs,
                                                            return_attention=return_attention)
        out = M3AEOutput(loss=latent.new_zeros(()), masks=masks, encoder_output=latent)
        if return_attention:
            out.attentions = {"encoder": enc_att, "decoder": dec_att}
        if image_dec is not None:
            out.image_mask = masks.image_mask()
            out.image_loss, out.image_output = self.image_loss(image_dec, inputs, masks, every_slot=full_outputs)
            out.loss = out.loss + c.image_loss_weight * out.image_loss
        if text_dec is not None:
            out.text_mask = masks.text_mask()
            out.text_loss, out.text_accuracy, out.text_output = self.text_loss(text_dec, inputs, masks,
                                                                               every_slot=full_outputs)
            out.loss = out.loss + c.text_loss_weight * out.text_loss
        return out

    def prepare(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_padding_mask: torch.Tensor | None = None, *, check_values: bool = True) -> ModelInputs:
        """Check the inputs and cut the image (B, C, H, W) into patches: the batch every stage takes.
        `check_values`: also check the token ids' values (CPU tensors only, as forward)."""
        self._check_inputs(image, text, text_padding_mask, check_values)
        c = self.config
        weight_dtype = self.image_embedding.weight.dtype
        if image is not None and image.is_floating_point() and image.dtype != weight_dtype:
            image = image.to(weight_dtype)  # pixels follow the weights (a model cast to bf16), as in transformers
        first = image if image is not None else text
        assert first is not None  # _check_inputs refused neither
        grid = self.patch_grid(image) if image is not None else (c.grid_size, c.grid_size)
        return ModelInputs(
            batch=first.shape[0], grid=grid,
            patches=None if image is None else patchify(image, c.patch_size),
            text=text,
            padding=None if text is None or text_padding_mask is None else text_padding_mask.bool())

    def embed(self, inputs: ModelInputs, masks: Masks | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The encoder's input: [CLS] + image tokens + text tokens (B, T, D) and its key-padding mask
        (B, T) bool (None when `inputs` have no text padding mask). With `masks`, each modality keeps
        only its visible tokens, in keep order (masking comes after position and type embeddings)."""
        tokens = [self.cls_token.expand(inputs.batch, -1, -1)]
        key_padding = None
        if inputs.patches is not None:
            kept = None if masks is None else _order(masks.image_ids, "image")[:, : masks.image_keep]
            tokens.append(self.embed_image(inputs.patches, kept, inputs.grid))
        if inputs.text is not None:
            kept = None if masks is None else _order(masks.text_ids, "text")[:, : masks.text_keep]
            tokens.append(self.embed_text(inputs.text, kept))
            if inputs.padding is not None:
                padding = inputs.padding if kept is None else inputs.padding.gather(1, kept)
                key_padding = _text_key_padding(padding, sum(t.shape[1] for t in tokens[:-1]))
        return torch.cat(tokens, dim=1), key_padding

    def forward_encoder(self, inputs: ModelInputs, masks: Masks | None = None, return_attention: bool = False
                        ) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Encode the visible tokens (every token without `masks`): (B, 1 + kept image + kept text, D)
        after the final norm, and the per-block attention weights (empty unless return_attention)."""
        tokens, key_padding = self.embed(inputs, masks)
        return self.encoder(tokens, key_padding, return_attention)

    def _decoder_input(self, latent: torch.Tensor, inputs: ModelInputs, masks: Masks
                      ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The decoder's input from the encoder output `latent`: [CLS] + every image slot + every text
        slot in position order (B, 1 + N + L, dd), visible slots projected from `latent`, hidden ones
        the modality's mask token, decoder positions and types added; and its key-padding mask."""
        proj = self.decoder_input_projection(latent)
        parts = [proj[:, :1]]
        offset = 1
        if inputs.patches is not None:
            slots = self._fill_slots(proj[:, offset: offset + masks.image_keep], self.image_mask_token,
                                     _order(masks.image_ids, "image"), inputs.num_patches)
            offset += masks.image_keep
            parts.append(slots + self.image_positions("dec", inputs.grid) + self._type("decoder_image_type"))
        key_padding = None
        if inputs.text is not None:
            length = inputs.text.shape[1]
            slots = self._fill_slots(proj[:, offset:], self.text_mask_token, _order(masks.text_ids, "text"), length)
            parts.append(slots + self.dec_text_pos[:, :length] + self._type("decoder_text_type"))
            if inputs.padding is not None:
                key_padding = _text_key_padding(inputs.padding, 1 + inputs.image_slots)
        return torch.cat(parts, dim=1), key_padding

    @staticmethod
    def _fill_slots(kept: torch.Tensor, mask_token: torch.Tensor, ids: torch.Tensor, length: int) -> torch.Tensor:
        """(B, length, dd): the mask token everywhere, the kept rows (B, keep, dd) back at ids[:, :keep]."""
        batch, keep, dim = kept.shape
        slots = mask_token.expand(batch, length, dim).to(kept.dtype)
        return slots.scatter(1, ids[:, :keep, None].expand(-1, -1, dim), kept)

    def _loss_rows(self, inputs: ModelInputs, masks: Masks) -> torch.Tensor:
        """(B, Q) rows of the decoder's input that carry a loss: the hidden patches, then the hidden
        text slots (padding included), each in mask order."""
        rows = []
        if inputs.patches is not None:
            rows.append(1 + _order(masks.image_ids, "image")[:, masks.image_keep:])
        if inputs.text is not None:
            rows.append(1 + inputs.image_slots + _order(masks.text_ids, "text")[:, masks.text_keep:])
        return torch.cat(rows, dim=1)

    def forward_decoder(self, latent: torch.Tensor, inputs: ModelInputs, masks: Masks, *, every_slot: bool = False,
                        return_attention: bool = False
                        ) -> tuple[torch.Tensor | None, torch.Tensor | None, list[torch.Tensor]]:
        """Decode the encoder output `latent` over every slot. Returns (image, text, attentions): the
        decoder outputs, after its final norm, of the hidden patches (B, N - image_keep, dd) and of the
        hidden text slots (B, L - text_keep, dd), each in mask order; with `every_slot`, of all slots,
        (B, N, dd) and (B, L, dd) in position order. None for an absent modality. Unless every slot
        or the attention weights are wanted, the last block computes only the hidden rows."""
        x, key_padding = self._decoder_input(latent, inputs, masks)
        rows = None if every_slot else self._loss_rows(inputs, masks)
        dec, attentions = self.decoder(x, key_padding, return_attention, None if return_attention else rows)
        if rows is None:  # every slot
            start, end = 1, 1 + inputs.image_slots  # after [CLS]
        else:
            if return_attention:  # the weights needed every row; the losses need only these
                dec = gather_rows(dec, rows)
            hidden_patches = inputs.image_slots - masks.image_keep if inputs.patches is not None else 0
            start, end = 0, hidden_patches
        image = dec[:, start:end] if inputs.patches is not None else None
        text = dec[:, end:] if inputs.text is not None else None
        return image, text, attentions

    def image_loss(self, decoded: torch.Tensor, inputs: ModelInputs, masks: Masks, *, every_slot: bool = False
                   ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The image head's MSE on the hidden patches (targets standardised per patch with
        norm_pix_loss), from forward_decoder's image output. With `every_slot` (all patch slots in
        position order) the head predicts every patch and the loss is mask-weighted, the reference's
        way; returns (loss, those (B, N, p*p*C) predictions), else (loss, None)."""
        patches = inputs.patches
        assert patches is not None, "image_loss needs an image"
        target = normalize_patches(patches) if self.config.norm_pix_loss else patches
        if every_slot:
            pred = self.image_head(decoded)
            return patch_mse(pred, target, masks.image_mask()), pred
        hidden = _order(masks.image_ids, "image")[:, masks.image_keep:]
        return patch_mse(self.image_head(decoded), gather_rows(target, hidden)), None

    def text_loss(self, decoded: torch.Tensor, inputs: ModelInputs, masks: Masks, *, every_slot: bool = False
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """The text head's cross-entropy and accuracy on the hidden real tokens, from forward_decoder's
        text output: per sample, then over the samples with targets (reference masking: over the
        batch). Returns (loss, accuracy, logits): logits (B, L, vocab) only with `every_slot` (all
        text slots in position order), else the head and the loss are fused over the hidden real
        tokens alone, so the (M, vocab) logits never exist."""
        text, padding = inputs.text, inputs.padding
        assert text is not None and padding is not None, "text_loss needs text and its padding mask"
        average = "batch" if self.config.masking == "reference" else "samples_with_targets"
        if every_slot:
            logits = self.text_head(decoded)
            loss, accuracy = token_cross_entropy(logits, text, masks.text_mask() & ~padding, average)
            return loss, accuracy, logits
        ids = _order(masks.text_ids, "text")
        hidden = ids[:, masks.text_keep:]
        flat = masks.text_targets  # flat indices of the hidden slots that are real tokens
        if flat is None:  # hand-made masks: derive it here (a host sync on CUDA)
            flat = text_target_index(ids, masks.text_keep, padding)
        batch, n_hidden = hidden.shape
        rows = torch.div(flat, n_hidden, rounding_mode="floor")
        features = self.text_head.features(decoded.reshape(-1, decoded.shape[-1])[flat])  # n_hidden may be 0
        targets = text.gather(1, hidden).reshape(-1)[flat]
        weight = packed_token_weights(rows, batch, average)
        head = self.text_head.out
        loss, _, correct = linear_cross_entropy(features, head.weight, head.bias, targets, weight)
        # fp32 like the unfused path (float64 models stay exact inside)
        return loss.float(), (correct.to(weight.dtype) * weight).sum(), None

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None, *, tokenizer=None,
                        preprocessing: Preprocessing | None = None) -> Path:
        """Write config.json + model.safetensors + preprocessor_config.json (+ tokenizer.json when a
        tokenizer is given) into `directory`, each atomically: the folder is all a user needs. A
        tokenizer.json already there is removed when no tokenizer is given (other files stay).

        `state_dict`: weights to write instead of this module's own (e.g. gathered from FSDP shards).
        `preprocessing`: the image rule the model was trained for (default: the config's image size,
        CC12M statistics, the whole shorter side).
        """
        from safetensors.torch import save_file

        if self.decoder_stripped:  # config.json would describe parts it lacks: a folder that cannot be loaded
            raise ValueError("this model's decoder was stripped (strip_decoder()): save it before stripping, "
                             "or export its encoder (m3ae export) or a Classifier holding it")
        if tokenizer is not None and self.config.has_text:  # a folder that could not be loaded back
            from .data.tokenizer import check_vocab_size

            check_vocab_size(tokenizer, self.config.vocab_size, "the tokenizer to save")
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        source = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
        # A tokenizer.json of an earlier save would be read as this model's. Removed (even when a new
        # one follows) before anything new is written: a save killed part-way then leaves a folder
        # lacking a file, which loading reports, never the new weights beside an old model's tokenizer.
        remove_stale(directory, OPTIONAL_NAMES)
        atomic_write(directory / WEIGHTS_NAME, lambda p: save_file(state, str(p), metadata={"format": "pt"}))
        atomic_write(directory / CONFIG_NAME, lambda p: Path(p).write_text(self.config.to_json()))
        (preprocessing or Preprocessing(image_size=self.config.image_size)).save(directory)
        if tokenizer is not None:
            atomic_write(directory / TOKENIZER_NAME, lambda p: tokenizer.save(str(p)))
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | os.PathLike, map_location: str | torch.device = "cpu", *,
                        revision: str | None = None, cache_dir: str | os.PathLike | None = None,
                        local_files_only: bool = False, **config_overrides) -> "M3AE":
        """Load a folder written by `save_pretrained` (or `m3ae convert-jax`), or a Hugging Face Hub
        id ("user/repo", at `revision`, cached in `cache_dir`; offline with `local_files_only` or
        HF_HUB_OFFLINE=1). A local folder of that name wins over the hub. The model comes back in
        eval mode, as transformers' models do (`.train()` before fine-tuning it)."""
        from .hub import resolve_checkpoint

        directory = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only)
        return cls._from_folder(directory, map_location, **config_overrides).eval()

    @classmethod
    def _from_folder(cls, directory: Path, map_location: str | torch.device = "cpu", **config_overrides) -> "M3AE":
        """The one place a checkpoint folder's config and weights are read."""
        from safetensors.torch import load_file

        from .validate import check_safetensors, read_model_config

        directory = Path(directory)
        if not directory.is_dir():
            raise FileNotFoundError(f"checkpoint folder not found: {directory}")
        for name in (CONFIG_NAME, WEIGHTS_NAME):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} has no {name}; is it an M3AE checkpoint folder?")
        # Checked before use: config types, ranges and size; the weights' header against the config.
        model = cls(read_model_config(directory / CONFIG_NAME, **config_overrides))
        check_safetensors(directory / WEIGHTS_NAME, model.state_dict())
        state = load_file(str(directory / WEIGHTS_NAME), device=str(map_location))
        model.load_weights(state, source=str(directory / WEIGHTS_NAME))
        return model

    def push_to_hub(self, repo_id: str, *, tokenizer=None, preprocessing: Preprocessing | None = None,
                    private: bool = False, revision: str | None = None, token: str | None = None,
                    results: dict | None = None):
        """save_pretrained into a temp folder, write a model card, upload (huggingface_hub)."""
        import tempfile

        from .hub import push_to_hub

        with tempfile.TemporaryDirectory() as tmp:
            self.save_pretrained(tmp, tokenizer=tokenizer, preprocessing=preprocessing)
            return push_to_hub(tmp, repo_id, private=private, revision=revision, token=token, results=results)

    def load_weights(self, state: dict[str, torch.Tensor], source: str = "state dict") -> None:
        """Strict load that names every missing, unexpected or mis-shaped tensor."""
        own = self.state_dict()
        missing = sorted(set(own) - set(state))
        unexpected = sorted(set(state) - set(own))
        wrong = sorted(f"{k}: checkpoint {tuple(state[k].shape)} vs model {tuple(own[k].shape)}"
                       for k in set(own) & set(state) if own[k].shape != state[k].shape)
        if missing or unexpected or wrong:
            details = "; ".join(filter(None, [
                f"missing {missing[:8]}" if missing else "",
                f"unexpected {unexpected[:8]}" if unexpected else "",
                f"shape mismatch {wrong[:8]}" if wrong else ""]))
            raise ConfigError(f"{source} does not fit this model ({details}); it was saved from a "
                              "model of another shape")
        self.load_state_dict(state, strict=True)

    def no_weight_decay(self, mode: str = "mae") -> set[str]:
        """Names of the parameters AdamW leaves undecayed. "mae" (ours): all but the weight matrices
        of Linear layers (biases, norms, tokens, type embeddings, the text embedding); "reference":
        the authors' lists (their Flax paths in our names) and biases."""
        names = dict(self.named_parameters())
        if mode == "mae":
            return {n for n, p in names.items()
                    if n.endswith(".bias") or p.ndim != 2 or n.startswith("text_embedding")}
        if mode == "reference":
            listed = _REFERENCE_M3AE_NO_DECAY if self.config.has_text else _REFERENCE_MAE_NO_DECAY
            return {n for n in names if n.endswith(".bias") or n.startswith(listed)}
        raise ValueError(f"unknown weight-decay mode {mode!r}; use 'mae' or 'reference'")

    def strip_decoder(self) -> "M3AE":
        """Drop, in place, every part that encode() never uses (decoder, mask tokens, output heads):
        fewer parameters to carry and save where only the encoder is wanted (fine-tuning)."""
        for name in _DECODER_PARTS:
            if hasattr(self, name):
                delattr(self, name)
        self.decoder_stripped = True
        return self

    # -- runtime switches (timm-style): how the model runs, not what it computes ------------------
    def set_grad_checkpointing(self, enable: bool = True) -> "M3AE":
        """Recompute each block's activations in backward (less memory, slower; same values)."""
        for transformer in (self.encoder, getattr(self, "decoder", None)):  # no decoder once stripped
            if transformer is not None:
                transformer.grad_checkpointing = enable
        self.config.grad_checkpointing = enable
        return self

    def set_attention(self, kind: str) -> "M3AE":
        """"sdpa" (fused) or "explicit" (softmax(QK^T) as the authors compute it)."""
        if kind not in ("sdpa", "explicit"):
            raise ValueError(f"attention must be 'sdpa' or 'explicit', got {kind!r}")
        for module in self.modules():
            if isinstance(module, Attention):
                module.explicit = kind == "explicit"
        self.config.attention = kind
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
