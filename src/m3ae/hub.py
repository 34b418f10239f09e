"""Checkpoints on the Hugging Face Hub: resolve a hub id to a local folder, push a folder, write
its model card. Everything goes through `huggingface_hub` (its cache layout, offline mode, auth)."""
from __future__ import annotations

import json
import os
import warnings
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
    if path.is_file():
        raise FileNotFoundError(f"{path} is a file: pass the checkpoint folder that holds it ({path.parent})")
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
        from huggingface_hub import constants

        why = ("downloading is off (offline mode); run once online" if local_files_only or constants.HF_HUB_OFFLINE
               else "the Hugging Face Hub could not be reached to download it")
        raise FileNotFoundError(f"{name}{'@' + revision if revision else ''} is not a local folder and is not in "
                                f"the Hugging Face cache, and {why}; or pass a folder") from None
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
    """Upload a checkpoint folder's model files (HUB_FILES) to `repo_id` in one commit, with the
    folder's own README.md or else a model card generated for this repository and `results` (uploaded,
    not written into the folder: a card names its repository). Returns huggingface_hub's CommitInfo;
    a Hub that cannot be reached or refuses raises HubError (an OSError) saying so."""
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}; is it an M3AE checkpoint folder?")
    card = folder / CARD_NAME
    if card.is_file() and results:
        warnings.warn(f"{card} is the folder's own model card: it is uploaded as it is, without the results",
                      stacklevel=2)
    operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(folder / name))
                  for name in HUB_FILES if name != CARD_NAME and (folder / name).is_file()]
    operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card.read_bytes() if card.is_file()
                                         else model_card(folder, repo_id, results).encode()))
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.create_commit(repo_id, operations=operations, revision=revision, commit_message=commit_message)
    except _hub_errors() as err:
        raise HubError(f"pushing to {repo_id} failed: {type(err).__name__}: {err} (is the Hugging Face Hub "
                       "reachable, and are you logged in: `hf auth login` or HF_TOKEN?)") from err


class HubError(OSError):
    """The Hugging Face Hub could not be reached, or refused the request."""


def _hub_errors() -> tuple[type[BaseException], ...]:
    """What a failed Hub request raises: huggingface_hub's HTTP errors and its HTTP client's (httpx,
    httpx2 or requests, by huggingface_hub version) transport errors."""
    import importlib

    from huggingface_hub.errors import HfHubHTTPError

    errors: list[type[BaseException]] = [HfHubHTTPError, OSError]
    for module, name in (("httpx", "HTTPError"), ("httpx2", "HTTPError"), ("requests", "RequestException")):
        try:
            errors.append(getattr(importlib.import_module(module), name))
        except (ImportError, AttributeError):
            pass
    return tuple(errors)
