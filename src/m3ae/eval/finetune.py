"""End-to-end fine-tuning: encoder + LayerNorm + Linear on [CLS] or pooled image tokens, with
layer-wise lr decay, drop path, mixup / cutmix, label smoothing, warmup + cosine, bf16 on CUDA.

A saved classifier is a folder: config.json ({"kind", "format_version", "encoder": M3AEConfig,
"num_classes", "pool"}) + model.safetensors (encoder weights without the decoder, plus the head) +
preprocessor_config.json (the image preparation it was trained with, so `m3ae ood --checkpoint
FOLDER` reads images alike).
"""
from __future__ import annotations

import json
import math
import time
from dataclasses import asdict
from pathlib import Path
from typing import Callable

import torch

from ..precision import autocast
import torch.nn.functional as F
from torch import nn

from ..config import CLASSIFIER_FORMAT_VERSION, M3AEConfig
from ..distributed import pick_device
from ..files import atomic_write, remove_stale
from ..model import M3AE, OPTIONAL_NAMES
from ..preprocessing import Preprocessing
from .features import pool_tokens
from .knn import topk_accuracy
from .results import EvalResult
from .recipes import FinetuneConfig
from .settings import EvalSettings, Runtime

CLASSIFIER_CONFIG = "config.json"
CLASSIFIER_WEIGHTS = "model.safetensors"


class Classifier(nn.Module):
    """An M3AE encoder + LayerNorm + linear head over pooled tokens. It takes `encoder` over: its
    decoder is stripped in place (the model passed in can only encode() afterwards)."""

    def __init__(self, encoder: M3AE, num_classes: int, pool: str = "cls", head_init_std: float = 2e-5):
        super().__init__()
        self.encoder = encoder.strip_decoder()  # the encoder is all it uses
        self.pool, self.num_classes = pool, num_classes
        dim = encoder.config.emb_dim
        self.norm = nn.LayerNorm(dim, eps=encoder.config.layer_norm_eps)
        self.head = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=head_init_std)
        nn.init.zeros_(self.head.bias)

    @property
    def config(self) -> M3AEConfig:
        return self.encoder.config

    def features(self, image: torch.Tensor) -> torch.Tensor:
        """The normalised pre-logit features (used by OOD scoring)."""
        tokens = self.encoder.encode(image)
        return self.norm(pool_tokens(tokens, self.pool, tokens.shape[1] - 1))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(image))

    def save_pretrained(self, directory: str | Path, preprocessing: Preprocessing | None = None) -> Path:
        """`preprocessing`: the image rule it was trained with (default, as M3AE.save_pretrained's:
        the config's image size, CC12M statistics, the whole shorter side)."""
        from safetensors.torch import save_file

        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        state = {k: v.detach().contiguous().cpu() for k, v in self.state_dict().items()}
        config = {"kind": "m3ae-classifier", "format_version": CLASSIFIER_FORMAT_VERSION,
                  "encoder": self.encoder.config.to_dict(),
                  "num_classes": self.num_classes, "pool": self.pool}
        remove_stale(directory, OPTIONAL_NAMES)  # a checkpoint's tokenizer.json: not this classifier's
        atomic_write(directory / CLASSIFIER_WEIGHTS, lambda p: save_file(state, str(p)))
        atomic_write(directory / CLASSIFIER_CONFIG, lambda p: Path(p).write_text(json.dumps(config, indent=2)))
        # Without it the folder reads as "an older checkpoint" and is evaluated with the defaults.
        (preprocessing or Preprocessing(image_size=self.config.image_size)).save(directory)
        return directory

    @classmethod
    def from_pretrained(cls, name_or_path: str | Path, map_location: str | torch.device = "cpu", *,
                        revision: str | None = None, cache_dir: str | Path | None = None,
                        local_files_only: bool = False) -> "Classifier":
        """A folder written by save_pretrained (or a hub id), in eval mode as M3AE.from_pretrained:
        the saved encoder config keeps the fine-tuning drop_path, which would make train-mode
        outputs random. The config and the weights' header are checked before any tensor is read."""
        from safetensors.torch import load_file

        from ..hub import resolve_checkpoint
        from ..validate import check_safetensors, read_classifier_config

        directory = resolve_checkpoint(name_or_path, revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only)
        for name in (CLASSIFIER_CONFIG, CLASSIFIER_WEIGHTS):
            if not (directory / name).is_file():
                raise FileNotFoundError(f"{directory} has no {name}; is it a fine-tuned classifier folder?")
        encoder, num_classes, pool = read_classifier_config(directory / CLASSIFIER_CONFIG)
        model = cls(M3AE(encoder), num_classes, pool)
        weights = directory / CLASSIFIER_WEIGHTS
        check_safetensors(weights, model.state_dict())
        model.load_state_dict(load_file(str(weights), device=str(map_location)), strict=True)
        return model.eval()


def is_classifier_dir(directory: str | Path) -> bool:
    """config.json says "kind": "m3ae-classifier" (an unreadable one is left for the loader to report)."""
    path = Path(directory) / CLASSIFIER_CONFIG
    try:
        data = json.loads(path.read_text()) if path.is_file() else None
    except (OSError, ValueError, RecursionError):
        return False
    return isinstance(data, dict) and data.get("kind") == "m3ae-classifier"


# -- layer-wise lr decay -----------------------------------------------------------------------
def layer_id(name: str, depth: int) -> int:
    """0: embeddings and tokens; i + 1: encoder block i; depth + 1: final norm and head."""
    if name.startswith("encoder.encoder.blocks."):
        return int(name.split(".")[3]) + 1
    if name.startswith("encoder.") and not name.startswith("encoder.encoder.norm"):
        return 0
    return depth + 1


def layer_decay_groups(model: Classifier, weight_decay: float, layer_decay: float) -> list[dict]:
    """Groups with `lr_scale` = layer_decay ** (depth + 1 - layer); biases, 1-D tensors and the
    learned tokens / embeddings are not weight-decayed."""
    depth = model.encoder.config.depth
    encoder_skip = {"encoder." + n for n in model.encoder.no_weight_decay()}
    groups: dict[tuple[int, bool], dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = name in encoder_skip or (not name.startswith("encoder.") and (p.ndim <= 1 or name.endswith(".bias")))
        lid = layer_id(name, depth)
        group = groups.setdefault((lid, no_decay), {
            "params": [], "names": [], "layer": lid, "lr_scale": layer_decay ** (depth + 1 - lid),
            "weight_decay": 0.0 if no_decay else weight_decay})
        group["params"].append(p)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# -- mixup / cutmix / label smoothing ----------------------------------------------------------
def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float) -> torch.Tensor:
    off = smoothing / num_classes
    return torch.full((len(labels), num_classes), off, device=labels.device).scatter_(
        1, labels.view(-1, 1), 1.0 - smoothing + off)


_CUTMIX_SHARE = 0.5  # with both on, the share of batches that get cutmix (MAE's recipe)


def mix_batch(images: torch.Tensor, labels: torch.Tensor, num_classes: int, mixup_alpha: float = 0.8,
              cutmix_alpha: float = 1.0, smoothing: float = 0.1,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Batch-level mixup or cutmix with the batch reversed as partner; returns (images, soft targets)."""
    targets = smooth_one_hot(labels, num_classes, smoothing)
    use_mixup, use_cutmix = mixup_alpha > 0, cutmix_alpha > 0
    if not (use_mixup or use_cutmix):
        return images, targets
    cutmix = use_cutmix and (not use_mixup or bool(torch.rand((), generator=generator) < _CUTMIX_SHARE))
    alpha = cutmix_alpha if cutmix else mixup_alpha
    lam = float(torch.distributions.Beta(alpha, alpha).sample())
    partner = images.flip(0)
    if cutmix:
        h, w = images.shape[-2:]
        cut = math.sqrt(1.0 - lam)
        ch, cw = int(h * cut), int(w * cut)
        cy = int(torch.randint(0, h, (), generator=generator))
        cx = int(torch.randint(0, w, (), generator=generator))
        y0, y1 = max(cy - ch // 2, 0), min(cy + ch // 2, h)
        x0, x1 = max(cx - cw // 2, 0), min(cx + cw // 2, w)
        images = images.clone()
        images[..., y0:y1, x0:x1] = partner[..., y0:y1, x0:x1]
        lam = 1.0 - (y1 - y0) * (x1 - x0) / (h * w)  # the area actually pasted
    else:
        images = images * lam + partner * (1.0 - lam)
    return images, targets * lam + targets.flip(0) * (1.0 - lam)


# -- training ----------------------------------------------------------------------------------
@torch.no_grad()
def evaluate_classifier(model: nn.Module, loader, device) -> dict[str, float]:
    was = model.training
    model.eval()
    scores, labels = [], []
    for image, label in loader:
        with _autocast(device):
            scores.append(model(image.to(device)).float().cpu())
        labels.append(label)
    model.train(was)
    return topk_accuracy(torch.cat(scores), torch.cat(labels))


def _autocast(device: torch.device):
    return autocast(device, device.type == "cuda")  # CPU fine-tuning stays fp32


def finetune(encoder: M3AE, train_set, val_set, num_classes: int, config: FinetuneConfig,
             runtime: Runtime | None = None, on_epoch: Callable[[dict], None] | None = None,
             progress: bool = False) -> tuple[Classifier, dict]:
    """Fine-tune; `encoder` should carry config.drop_path already (see `load_for_finetune`)."""
    runtime = runtime or Runtime()
    device = pick_device(runtime.device)
    torch.manual_seed(runtime.seed)
    model = Classifier(encoder, num_classes, runtime.pool).to(device)
    groups = layer_decay_groups(model, config.weight_decay, config.layer_decay)
    optimizer = torch.optim.AdamW([{k: v for k, v in g.items() if k != "names"} for g in groups],
                                  lr=config.peak_lr(), betas=(0.9, 0.999))
    loader, val_loader = runtime.loaders(train_set, val_set, config.batch_size,
                                         drop_last=len(train_set) > config.batch_size)
    before = evaluate_classifier(model, val_loader, device)

    def train_step(image: torch.Tensor, label: torch.Tensor, lr: float) -> torch.Tensor:
        for g in optimizer.param_groups:
            g["lr"] = lr * g["lr_scale"]
        image, label = image.to(device), label.to(device)
        image, target = mix_batch(image, label, num_classes, config.mixup, config.cutmix, smoothing=config.smoothing)
        with _autocast(device):
            logits = model(image)
        loss = torch.sum(-target * F.log_softmax(logits.float(), dim=-1), dim=-1).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if config.clip_grad:
            torch.nn.utils.clip_grad_norm_(model.parameters(), config.clip_grad)
        optimizer.step()
        return loss

    history = config.run_epochs("finetune", loader, train_step, lambda: evaluate_classifier(model, val_loader, device),
                                start_epoch=model.train, progress=progress, on_epoch=on_epoch)
    last = history[-1] if history else {**before}
    return model, {"top1": last["top1"], "top5": last["top5"], "top1_before": before["top1"],
                   "best_top1": max((h["top1"] for h in history), default=before["top1"]),
                   "history": history, "config": asdict(config)}


def load_for_finetune(checkpoint: str | Path, drop_path: float) -> M3AE:
    return M3AE.from_pretrained(checkpoint, drop_path=drop_path)


def run_finetune(settings: EvalSettings, train: str, val: str, out: str | Path,
                 config: FinetuneConfig | None = None, *, limit_train: int | None = None,
                 limit_val: int | None = None) -> EvalResult:
    """Fine-tune a checkpoint into the classifier folder `out`, in one call (`m3ae finetune`)."""
    t0 = time.perf_counter()
    config = config or FinetuneConfig()
    with settings.applied():
        encoder = load_for_finetune(settings.checkpoint, config.drop_path)
        train_set, val_set, classes = settings.train_val_sets(train, val, encoder.config.image_size,
                                                              config.crop_scale, limit_train, limit_val)
        model, res = finetune(encoder, train_set, val_set, classes, config, settings, progress=not settings.quiet)
    model.save_pretrained(out, settings.preprocessing(encoder.config.image_size))  # what it was trained with
    metrics = {k: res[k] for k in ("top1", "top5", "best_top1", "top1_before")}
    metrics.update(n_train=len(train_set) - train_set.skipped, n_val=len(val_set) - val_set.skipped)  # images used
    return EvalResult("finetune", metrics, {"history": res["history"], "classifier": str(out)},
                      time.perf_counter() - t0)
