"""The Multimodal Masked Autoencoder: one encoder over [CLS] + image patches + text tokens."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from .config import ConfigError, M3AEConfig, check_fits_memory
from .files import atomic_write
from .linear_cross_entropy import linear_cross_entropy
from .losses import normalize_patches, packed_token_weights, patch_mse, token_cross_entropy
from .layers import OutputHead, Transformer, gather_rows
from .masking import Masks, masks_for, text_target_index
from .patches import patchify
from .posembed import image_position_table, text_position_table
from .preprocessing import Preprocessing

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"


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


# The authors' no-decay lists (prefixes of their Flax paths, in our names): decay_mode="reference".
_REFERENCE_M3AE_NO_DECAY = ("cls_token", "encoder_image_type", "encoder_text_type", "decoder_image_type",
                            "decoder_text_type", "image_mask_token", "text_mask_token", "text_embedding")
_REFERENCE_MAE_NO_DECAY = ("cls_token", "encoder_image_type", "image_mask_token")


class M3AE(nn.Module):
    def __init__(self, config: M3AEConfig):
        super().__init__()
        config.validate()
        check_fits_memory(config)  # before allocating anything
        self.config = c = config
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
        common = dict(mlp_ratio=c.mlp_ratio, drop=c.drop, att_drop=c.att_drop, drop_path=c.drop_path,
                      eps=c.layer_norm_eps, grad_checkpointing=c.grad_checkpointing,
                      explicit_attention=c.attention == "explicit")
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
                      text_padding_mask: torch.Tensor | None) -> None:
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
        self._check_inputs(image, text, text_padding_mask)
        batch = image.shape[0] if image is not None else text.shape[0]
        tokens = [self.cls_token.expand(batch, -1, -1)]
        padding = None
        if image is not None:
            tokens.append(self.embed_image(patchify(image, self.config.patch_size), grid=self.patch_grid(image)))
        if text is not None:
            tokens.append(self.embed_text(text))
            if text_padding_mask is not None:
                n_front = sum(t.shape[1] for t in tokens[:-1])
                padding = torch.cat([text_padding_mask.new_zeros(batch, n_front, dtype=torch.bool),
                                     text_padding_mask.bool()], dim=1)
        x, attentions = self.encoder(torch.cat(tokens, dim=1), padding, return_attention)
        return (x, attentions) if return_attention else x

    # -- masked autoencoding -------------------------------------------------------------------
    def make_masks(self, batch: int, has_image: bool, text_padding_mask: torch.Tensor | None,
                   text_length: int | None, generator: torch.Generator | None = None,
                   device: torch.device | str = "cpu", num_patches: int | None = None) -> Masks:
        return masks_for(self.config, batch, has_image=has_image, text_padding=text_padding_mask,
                         text_length=text_length, generator=generator, device=device, num_patches=num_patches)

    def forward(self, image: torch.Tensor | None = None, text: torch.Tensor | None = None,
                text_padding_mask: torch.Tensor | None = None, *, masks: Masks | None = None,
                generator: torch.Generator | None = None, full_outputs: bool = False,
                return_attention: bool = False) -> M3AEOutput:
        """Mask, encode the visible tokens, decode everything, and take the losses.

        `masks` replays given keep-orders; otherwise they are drawn with `generator`. Output heads
        run only where a loss is taken (hidden patches, hidden real tokens). `full_outputs` runs
        them everywhere and takes the mask-weighted loss from those outputs (same value; slower).
        """
        c = self.config
        self._check_inputs(image, text, text_padding_mask)
        batch = image.shape[0] if image is not None else text.shape[0]
        device = self.cls_token.device
        padding = None
        if text is not None:
            padding = (text_padding_mask.bool() if text_padding_mask is not None
                       else torch.zeros_like(text, dtype=torch.bool))
        grid = self.patch_grid(image) if image is not None else (c.grid_size, c.grid_size)
        num_patches = grid[0] * grid[1]
        if masks is None:
            masks = self.make_masks(batch, image is not None, padding,
                                    None if text is None else text.shape[1], generator, device, num_patches)
        patches = patchify(image, c.patch_size) if image is not None else None

        # Encoder over [CLS] + kept image + kept text.
        tokens = [self.cls_token.expand(batch, -1, -1)]
        key_padding = None
        if patches is not None:
            tokens.append(self.embed_image(patches, masks.image_ids[:, : masks.image_keep], grid))
        if text is not None:
            text_kept = masks.text_ids[:, : masks.text_keep]
            tokens.append(self.embed_text(text, text_kept))
            n_front = 1 + (masks.image_keep if patches is not None else 0)
            key_padding = torch.cat([padding.new_zeros(batch, n_front), padding.gather(1, text_kept)], 1)
        enc, enc_att = self.encoder(torch.cat(tokens, dim=1), key_padding, return_attention)

        # Decoder over [CLS] + every image slot + every text slot, in original order.
        proj = self.decoder_input_projection(enc)
        dd = c.dec_emb_dim
        parts = [proj[:, :1]]
        offset = 1
        if patches is not None:
            kept = proj[:, offset: offset + masks.image_keep]
            offset += masks.image_keep
            slots = self.image_mask_token.expand(batch, num_patches, dd).to(kept.dtype)
            slots = slots.scatter(1, masks.image_ids[:, : masks.image_keep, None].expand(-1, -1, dd), kept)
            parts.append(slots + self.image_positions("dec", grid) + self._type("decoder_image_type"))
        if text is not None:
            length = text.shape[1]
            kept = proj[:, offset:]
            slots = self.text_mask_token.expand(batch, length, dd).to(kept.dtype)
            slots = slots.scatter(1, masks.text_ids[:, : masks.text_keep, None].expand(-1, -1, dd), kept)
            parts.append(slots + self.dec_text_pos[:, :length] + self._type("decoder_text_type"))
        dec_padding = None
        n_front = 1 + (num_patches if patches is not None else 0)
        if text is not None:
            dec_padding = torch.cat([padding.new_zeros(batch, n_front), padding], dim=1)
        # Only hidden slots reach a loss: unless every output is wanted, the decoder returns just
        # [hidden patches (in mask order), hidden text slots (in mask order)].
        subset = not (full_outputs or return_attention)
        output_rows = None
        if subset:
            rows = []
            if patches is not None:
                rows.append(1 + masks.image_ids[:, masks.image_keep:])
            if text is not None:
                rows.append(n_front + masks.text_ids[:, masks.text_keep:])
            output_rows = torch.cat(rows, dim=1)
        dec, dec_att = self.decoder(torch.cat(parts, dim=1), dec_padding, return_attention, output_rows)

        out = M3AEOutput(loss=dec.new_zeros(()), masks=masks, encoder_output=enc)
        if return_attention:
            out.attentions = {"encoder": enc_att, "decoder": dec_att}
        offset = 0 if subset else 1
        if patches is not None:
            target = normalize_patches(patches) if c.norm_pix_loss else patches
            out.image_mask = masks.image_mask()
            hidden_ids = masks.image_ids[:, masks.image_keep:]
            if subset:
                pred = self.image_head(dec[:, : hidden_ids.shape[1]])
                offset += hidden_ids.shape[1]
                out.image_loss = patch_mse(pred, gather_rows(target, hidden_ids))
            else:
                dec_image = dec[:, 1: 1 + num_patches]
                offset += num_patches
                if full_outputs:
                    # Heads everywhere, loss weighted by the mask (the reference's way; parity checks).
                    out.image_output = self.image_head(dec_image)
                    out.image_loss = patch_mse(out.image_output, target, out.image_mask)
                else:
                    pred = self.image_head(gather_rows(dec_image, hidden_ids))
                    out.image_loss = patch_mse(pred, gather_rows(target, hidden_ids))
            out.loss = out.loss + c.image_loss_weight * out.image_loss
        if text is not None:
            dec_text = dec[:, offset:]  # subset: the hidden slots only, in mask order
            average = "batch" if c.masking == "reference" else "samples_with_targets"
            out.text_mask = masks.text_mask()
            if full_outputs:
                out.text_output = self.text_head(dec_text)
                out.text_loss, out.text_accuracy = token_cross_entropy(
                    out.text_output, text, out.text_mask & ~padding, average)
            else:
                # The 30k-wide head runs only on hidden real tokens, packed to (M, dd): no padding rows.
                hidden_ids = masks.text_ids[:, masks.text_keep:]
                flat = masks.text_targets
                if flat is None:  # hand-made masks: derive it here (a host sync on CUDA)
                    flat = text_target_index(masks.text_ids, masks.text_keep, padding)
                length, n_hidden = text.shape[1], hidden_ids.shape[1]
                rows = torch.div(flat, n_hidden, rounding_mode="floor")
                where = rows * length + hidden_ids.reshape(-1)[flat]
                # Head and cross-entropy fused over row chunks: the (M, vocab) logits never exist.
                picked = (dec_text.reshape(batch * n_hidden, -1)[flat] if subset
                          else dec_text.reshape(batch * length, -1)[where])
                features = self.text_head.features(picked)
                weight = packed_token_weights(rows, batch, average)
                text_loss, _, correct = linear_cross_entropy(
                    features, self.text_head.out.weight, self.text_head.out.bias, text.reshape(-1)[where],
                    weight)
                out.text_loss = text_loss.float()  # fp32 like the unfused path (float64 models stay exact inside)
                out.text_accuracy = (correct.to(weight.dtype) * weight).sum()
            out.loss = out.loss + c.text_loss_weight * out.text_loss
        return out

    # -- persistence ---------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike,
                        state_dict: dict[str, torch.Tensor] | None = None, *, tokenizer=None,
                        preprocessing: Preprocessing | None = None) -> Path:
        """Write config.json + model.safetensors + preprocessor_config.json (+ tokenizer.json when a
        tokenizer is given) into `directory`, each atomically: the folder is all a user needs.

        `state_dict`: weights to write instead of this module's own (e.g. gathered from FSDP shards).
        `preprocessing`: the image rule the model was trained for (default: the config's image size,
        CC12M statistics, the whole shorter side).
        """
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        source = self.state_dict() if state_dict is None else state_dict
        state = {k: v.detach().contiguous().cpu() for k, v in source.items()}
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
        HF_HUB_OFFLINE=1). A local folder of that name wins over the hub."""
        from .hub import resolve_checkpoint

        directory = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only)
        return cls._from_folder(directory, map_location, **config_overrides)

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

    # -- runtime switches (timm-style): how the model runs, not what it computes ------------------
    def set_grad_checkpointing(self, enable: bool = True) -> "M3AE":
        """Recompute each block's activations in backward (less memory, slower; same values)."""
        for transformer in (self.encoder, self.decoder):
            transformer.grad_checkpointing = enable
        self.config.grad_checkpointing = enable
        return self

    def set_attention(self, kind: str) -> "M3AE":
        """"sdpa" (fused) or "explicit" (softmax(QK^T) as the authors compute it)."""
        if kind not in ("sdpa", "explicit"):
            raise ValueError(f"attention must be 'sdpa' or 'explicit', got {kind!r}")
        for transformer in (self.encoder, self.decoder):
            for block in transformer.blocks:
                block.attn.explicit = kind == "explicit"
        self.config.attention = kind
        return self

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
