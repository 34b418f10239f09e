"""A checkpoint as a user wants it: model, image preprocessing and tokenizer in one object, and
features of photos and captions in one call.

    import m3ae
    m = m3ae.load("runs/demo/checkpoints/step_00000600")   # or a hub id "user/repo"
    feats = m.features(images=["a.jpg", "b.png"])           # (2, D) [CLS] features

Older checkpoints without tokenizer.json / preprocessor_config.json still load: the tokenizer and
normalisation are then taken from the run folder (run_config.yaml, OUT/tokenizer.json), with a warning.
"""
from __future__ import annotations

import os
import warnings
from collections import abc
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

import torch

from .checkpoint import RUN_CONFIG_NAME
from .model import M3AE, TOKENIZER_NAME
from .preprocessing import PREPROCESSOR_NAME, Preprocessing


@dataclass
class Pretrained:
    model: M3AE
    preprocessing: Preprocessing
    tokenizer: Any | None  # a `tokenizers.Tokenizer`; None for image-only models or when none was found
    source: str = ""

    def __post_init__(self) -> None:
        if self.tokenizer is not None and self.model.config.has_text:
            from .data.tokenizer import check_vocab_size

            check_vocab_size(self.tokenizer, self.model.config.vocab_size, f"the tokenizer of {self.source}")

    # -- inputs -------------------------------------------------------------------------------------
    def images(self, images: Sequence[Any] | torch.Tensor) -> torch.Tensor:
        """A normalised (B, 3, S, S) batch from PIL images, file paths or encoded bytes, with the
        checkpoint's preprocessing. A tensor is taken as already preprocessed model input."""
        if isinstance(images, torch.Tensor):
            return _model_input(images.unsqueeze(0) if images.ndim == 3 else images)
        import numpy as np
        from PIL import Image

        _require_sequence(images, "images")
        transform = self.preprocessing.transform()
        out = []
        for i, item in enumerate(images):
            if isinstance(item, torch.Tensor):
                out.append(_model_input(item))
                continue
            key = os.fspath(item) if isinstance(item, (str, os.PathLike)) else f"image {i}"
            if isinstance(item, os.PathLike):
                item = os.fspath(item)
            if isinstance(item, np.ndarray):  # pixels as (H, W[, C]) uint8, as PIL and OpenCV hand them out
                if item.dtype != np.uint8 or item.ndim not in (2, 3):
                    raise ValueError(f"image {i}: an array must be (H, W) or (H, W, C) uint8 pixels, got "
                                     f"{item.dtype} {item.shape}")
                item = Image.fromarray(item)
            out.append(_decode(transform, item, key))
        return torch.stack(out)

    def texts(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids (B, L), padding mask (B, L), True = padding): the pretraining rule (no special tokens,
        truncated to the model's text_length, right-padded)."""
        from .data.collate import pad_texts
        from .data.tokenizer import encode_batch

        if not self.model.config.has_text:
            raise ValueError("this model is image-only (vocab_size=0); it takes no captions")
        if self.tokenizer is None:
            raise ValueError(f"{self.source} has no tokenizer.json; pass tokenizer= to m3ae.load")
        _require_sequence(captions, "captions")
        for i, caption in enumerate(captions):
            if not isinstance(caption, str):
                raise ValueError(f"caption {i} is a {type(caption).__name__}, not a str")
        ids = encode_batch(self.tokenizer, list(captions), self.model.config.text_length)
        if any(len(row) == 0 for row in ids):
            raise ValueError("a caption has no tokens (empty caption?)")
        return pad_texts(ids)

    # -- features -----------------------------------------------------------------------------------
    @torch.no_grad()
    def features(self, images: Sequence[Any] | torch.Tensor | None = None, captions: Sequence[str] | None = None,
                 pool: str = "cls", batch_size: int = 64, all_tokens: bool = False) -> torch.Tensor:
        """Frozen-encoder features, (N, D) float32 on the CPU, computed `batch_size` at a time.

        Images alone, captions alone, or both (pairs: joint features). `pool`: "cls" or "mean";
        `all_tokens=True` returns the whole (N, 1 + tokens, D) encoder output instead (images of one
        size; captions all padded to the longest one, whose padding mask `texts(captions)` gives)."""
        from .eval.features import num_image_tokens, pool_tokens

        if images is None and captions is None:
            raise ValueError("give images, captions, or both")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if images is not None and not isinstance(images, torch.Tensor):
            _require_sequence(images, "images")
        n = len(images) if images is not None else len(captions)  # type: ignore[arg-type]
        if captions is not None:
            _require_sequence(captions, "captions")
            if images is not None and len(captions) != n:
                raise ValueError(f"{n} images but {len(captions)} captions")
        if n == 0:
            raise ValueError("no images or captions given (an empty list)")
        # One padding for all captions when every token is returned, so the batches' outputs align.
        all_texts = self.texts(captions) if captions is not None and all_tokens else None
        model = self.model
        was_training = model.training
        model.eval()
        device = next(model.parameters()).device
        out = []
        try:
            for start in range(0, n, batch_size):
                end = min(start + batch_size, n)
                image = self.images(images[start:end]).to(device) if images is not None else None
                text = padding = None
                if all_texts is not None:
                    text, padding = (t[start:end].to(device) for t in all_texts)
                elif captions is not None:
                    text, padding = (t.to(device) for t in self.texts(captions[start:end]))
                tokens = model.encode(image, text, padding)
                out.append(tokens.float().cpu() if all_tokens else
                           pool_tokens(tokens, pool, num_image_tokens(model, image), padding).float().cpu())
        finally:
            model.train(was_training)
        return torch.cat(out)

    # -- saving -------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> Path:
        return self.model.save_pretrained(directory, tokenizer=self.tokenizer, preprocessing=self.preprocessing)

    def push_to_hub(self, repo_id: str, **kwargs: Any):
        return self.model.push_to_hub(repo_id, tokenizer=self.tokenizer, preprocessing=self.preprocessing, **kwargs)


def _require_sequence(items: Any, what: str) -> None:
    """A list (or tuple) of items, not one item that happens to be iterable (a path, bytes, an array)."""
    if isinstance(items, (str, bytes, os.PathLike)) or not isinstance(items, abc.Sequence):
        raise ValueError(f"{what} must be a list, got a {type(items).__name__}"
                         + (f"; wrap one item as {what}=[...]" if isinstance(items, (str, bytes, os.PathLike))
                            else ""))


def _model_input(pixels: torch.Tensor) -> torch.Tensor:
    """A tensor taken as preprocessed model input: floating point (normalised). The model casts it to
    its weights' dtype (M3AE.prepare)."""
    if not pixels.is_floating_point():
        raise ValueError(f"an image tensor is taken as normalised model input and must be floating point, got "
                         f"{pixels.dtype}; pass PIL images, paths or bytes to get the checkpoint's preprocessing")
    return pixels


def _decode(transform, item, key: str) -> torch.Tensor:
    from .data.bad import BadSample

    try:
        return transform(item, key=key)
    except BadSample as err:  # an image a user asked for: an error naming it, not a skip
        raise ValueError(f"cannot use image {key}: {err}") from None


def load(name_or_path: str | os.PathLike, *, revision: str | None = None,
         cache_dir: str | os.PathLike | None = None, local_files_only: bool = False,
         device: str | torch.device = "cpu", tokenizer: str | os.PathLike | None = None) -> Pretrained:
    """Model + image preprocessing + tokenizer of a checkpoint folder or hub id, model in eval mode.

    `tokenizer`: a tokenizer file / hub name instead of the checkpoint's own."""
    from .hub import resolve_checkpoint

    device = torch.device(device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device {device} asked for, but torch {torch.__version__} sees no CUDA device")
    folder = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir,
                                local_files_only=local_files_only)
    model = M3AE._from_folder(folder).to(device).eval()
    c = model.config
    return Pretrained(model, checkpoint_preprocessing(folder, c.image_size),
                      checkpoint_tokenizer(folder, c.vocab_size, tokenizer), os.fspath(name_or_path))


def checkpoint_preprocessing(folder: str | os.PathLike, image_size: int) -> Preprocessing:
    """preprocessor_config.json; for older checkpoints the run's data settings (run_config.yaml in the
    folder), else the defaults, with a warning."""
    folder = Path(folder)
    if (folder / PREPROCESSOR_NAME).is_file():
        return Preprocessing.load(folder)
    run = folder / RUN_CONFIG_NAME
    settings: dict[str, Any] = {}
    if run.is_file():
        from omegaconf import OmegaConf

        from .train.config import load_settings_yaml

        cfg = load_settings_yaml(run)
        settings = {k: OmegaConf.select(cfg, f"data.{k}") for k in ("normalization", "square", "pad_value")}
        settings = {k: v for k, v in settings.items() if v is not None}
    stats = settings.pop("normalization", "cc12m")
    warnings.warn(f"{folder} has no {PREPROCESSOR_NAME} (an older checkpoint): using normalisation {stats!r} "
                  f"{'from its run_config.yaml' if run.is_file() else '(the default)'}, whole shorter side, "
                  f"{image_size} px; re-save it with save_pretrained to make it self-describing", stacklevel=3)
    return Preprocessing.from_stats(image_size, stats, **settings)


def checkpoint_tokenizer(folder: str | os.PathLike, vocab_size: int, explicit: str | os.PathLike | None = None):
    """The checkpoint's tokenizer.json (or `explicit`), checked against the model's vocab_size.

    Older checkpoints have none: then, with a warning, a tokenizer.json in the run folder above it,
    else the run's `data.tokenizer`, else its data's own vocabulary (demo runs); None (and a
    warning) when nothing is known, and None for image-only models."""
    from .data.tokenizer import load_tokenizer

    folder = Path(folder)
    if explicit is not None:
        return load_tokenizer(explicit, vocab_size=vocab_size if vocab_size > 0 else None)
    if vocab_size <= 0:
        return None
    if (folder / TOKENIZER_NAME).is_file():
        return load_tokenizer(folder / TOKENIZER_NAME, vocab_size=vocab_size)
    found, where = _legacy_tokenizer(folder)
    if found is None:
        warnings.warn(f"{folder} has no {TOKENIZER_NAME} and its run does not say which tokenizer it used; "
                      "captions need an explicit tokenizer (tokenizer= / --tokenizer)", stacklevel=3)
        return None
    warnings.warn(f"{folder} has no {TOKENIZER_NAME} (an older checkpoint): using {where}", stacklevel=3)
    if isinstance(found, str):
        return load_tokenizer(found, vocab_size=vocab_size)
    from .data.tokenizer import check_vocab_size

    check_vocab_size(found, vocab_size, where)
    return found


def _legacy_tokenizer(folder: Path) -> tuple[Any, str]:
    """(a tokenizer name/path or object, a description) for a checkpoint written before checkpoints
    carried their tokenizer; (None, '') when the run does not say."""
    parent = folder.resolve()
    for _ in range(3):  # the demo's layout: OUT/tokenizer.json beside OUT/checkpoints/
        parent = parent.parent
        if (parent / TOKENIZER_NAME).is_file():
            return str(parent / TOKENIZER_NAME), f"the run's {parent / TOKENIZER_NAME}"
    for run in (folder / RUN_CONFIG_NAME, folder.parent.parent / RUN_CONFIG_NAME):
        if run.is_file():
            from omegaconf import OmegaConf

            from .train.config import load_settings_yaml

            cfg = load_settings_yaml(run)
            name, spec = OmegaConf.select(cfg, "data.tokenizer"), OmegaConf.select(cfg, "data.spec")
            if isinstance(name, str) and name:
                return name, f"the tokenizer named in {run} ({name})"
            from .data.sources import spec_tokenizer

            own = spec_tokenizer(spec) if isinstance(spec, str) else None
            if own is not None:  # the demo's synthetic shapes bring their own vocabulary
                return own, f"the vocabulary of its data spec {spec!r} ({run})"
            from .data.loader import DEFAULT_TOKENIZER

            return DEFAULT_TOKENIZER, f"the default tokenizer of real-data runs ({DEFAULT_TOKENIZER}, per {run})"
    return None, ""
