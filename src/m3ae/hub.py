"""Checkpoints on the Hugging Face Hub: resolve a hub id to a local folder, push a folder, write
its model card. Everything goes through `huggingface_hub` (its cache layout, offline mode, auth)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

# The files of a checkpoint folder a model needs (training state and run files stay behind).
HUB_FILES = ["config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json", "README.md"]
CARD_NAME = "README.md"


def is_hub_id(name: str) -> bool:
    """"owner/name": one slash, not a path that exists or starts like one."""
    return name.count("/") == 1 and not name.startswith((".", "/", "~")) and not os.path.exists(name)


def resolve_checkpoint(name_or_path: str | os.PathLike, *, revision: str | None = None,
                       cache_dir: str | os.PathLike | None = None, local_files_only: bool = False) -> Path:
    """A local checkpoint folder as it is; otherwise a hub id ("user/repo") downloaded into (or, when
    offline, read from) the Hugging Face cache. A local folder always wins over a hub id.

    Offline: `local_files_only=True` or HF_HUB_OFFLINE=1 read the cache only."""
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    name = os.fspath(name_or_path)
    if not is_hub_id(name):
        raise FileNotFoundError(f"checkpoint folder not found: {name} (nor is it a hub id like 'user/repo')")
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (HFValidationError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    try:
        folder = snapshot_download(name, revision=revision, cache_dir=None if cache_dir is None else str(cache_dir),
                                   local_files_only=local_files_only, allow_patterns=HUB_FILES, library_name="m3ae")
    except HFValidationError as err:
        raise FileNotFoundError(f"checkpoint folder not found: {name} ({err})") from None
    except LocalEntryNotFoundError:
        raise FileNotFoundError(
            f"{name}{'@' + revision if revision else ''} is not a local folder and is not in the Hugging Face "
            "cache, and downloading is off (offline mode); run once online, or pass a folder") from None
    except (RepositoryNotFoundError, RevisionNotFoundError) as err:
        raise FileNotFoundError(f"hub repository {name} (revision {revision or 'main'}) not found: {err}") from None
    except HfHubHTTPError as err:
        raise FileNotFoundError(f"could not download {name} from the Hugging Face Hub: {err}") from None
    return Path(folder)


def model_card(folder: str | os.PathLike, repo_id: str | None = None, results: dict[str, Any] | None = None) -> str:
    """A README.md for a checkpoint folder: architecture, data and recipe (from run_config.yaml when
    the folder has one), preprocessing, how to load it, and measured results when given."""
    folder = Path(folder)
    config = json.loads((folder / "config.json").read_text())
    kind = "M3AE (image + text)" if config.get("vocab_size", 0) > 0 else "MAE (image only, vocab_size=0)"
    lines = ["---", "library_name: m3ae", "tags:", "- m3ae", "- masked-autoencoder", "- vision", "license: apache-2.0",
             "---", "", f"# {repo_id or folder.name}", "",
             f"A {kind} encoder-decoder trained with masked autoencoding "
             "([Geng et al., 2022](https://arxiv.org/abs/2205.14204)), saved by the `m3ae` package.", "",
             "## Architecture", "",
             f"- encoder: {config['emb_dim']} wide x {config['depth']} blocks, {config['num_heads']} heads; "
             f"decoder {config['dec_emb_dim']} x {config['dec_depth']}, {config['dec_num_heads']} heads",
             f"- patch {config['patch_size']} px, trained at {config['image_size']} px (any size divisible by "
             f"the patch works); text up to {config['text_length']} tokens, vocabulary {config['vocab_size']}",
             f"- mask ratios: image {config['image_mask_ratio']}, text {config['text_mask_ratio']}", ""]
    from .checkpoint import RUN_CONFIG_NAME

    run = folder / RUN_CONFIG_NAME
    if run.is_file():
        from omegaconf import OmegaConf

        cfg = OmegaConf.load(run)
        pick = {k: OmegaConf.select(cfg, k) for k in ("data.spec", "data.tokenizer", "steps", "batch_size",
                                                     "optim.lr", "optim.weight_decay", "optim.warmup_steps", "seed")}
        lines += ["## Data and recipe", ""] + [f"- {k}: {v}" for k, v in pick.items() if v is not None] + [""]
    pre = folder / "preprocessor_config.json"
    if pre.is_file():
        p = json.loads(pre.read_text())
        lines += ["## Preprocessing", "",
                  f"Resize the shorter side to {p['image_size']} / {p['crop_pct']}, centre-crop {p['image_size']}, "
                  f"normalise with mean {p['mean']} and std {p['std']} (`preprocessor_config.json`; "
                  "`m3ae.load` applies it).", ""]
    if results:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in results.items()] + [""]
    lines += ["## Use", "", "```python", "import m3ae", "",
              f"m = m3ae.load({(repo_id or str(folder))!r})   # model + preprocessing + tokenizer",
              "features = m.features(images=[\"photo.jpg\"])   # (1, D) [CLS] features", "```", ""]
    return "\n".join(lines)


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str = "Upload M3AE checkpoint", token: str | None = None,
                results: dict[str, Any] | None = None, api=None):
    """Upload a checkpoint folder's model files (HUB_FILES) to `repo_id`, writing a model card first
    when the folder has none. Returns huggingface_hub's CommitInfo."""
    from huggingface_hub import HfApi

    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}; is it an M3AE checkpoint folder?")
    card = folder / CARD_NAME
    if not card.is_file():
        from .files import atomic_write

        atomic_write(card, lambda p: Path(p).write_text(model_card(folder, repo_id, results)))
    api = HfApi(token=token)
    api.create_repo(repo_id, private=private, exist_ok=True)
    return api.upload_folder(repo_id=repo_id, folder_path=str(folder), allow_patterns=HUB_FILES,
                             revision=revision, commit_message=commit_message)
