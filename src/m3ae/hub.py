"""Checkpoints on the Hugging Face Hub: resolve a hub id to a local folder, push a folder, write
its model card. Everything goes through `huggingface_hub` (its cache layout, offline mode, auth)."""
from __future__ import annotations

import os
import shutil
import tempfile
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
    the folder has one), preprocessing, how to load it, and measured results when given. Classifier
    folders (m3ae finetune) and encoders exported for transformers / timm (m3ae export) get a card
    for what they are and the loader that reads them."""
    from .validate import folder_kind, read_config_json

    folder = Path(folder)
    config = read_config_json(folder / "config.json")
    kind = folder_kind(config)
    name = repr(repo_id or str(folder))
    try:
        if kind == "transformers":
            arch = (f"- ViT encoder for transformers (`{config.get('architectures', ['ViTModel'])[0]}`): "
                    f"{config['hidden_size']} wide x {config['num_hidden_layers']} blocks, "
                    f"{config['num_attention_heads']} heads, patch {config['patch_size']} px, "
                    f"{config['image_size']} px")
            library, what = "transformers", "image encoder exported for transformers (`m3ae export`)"
        elif kind == "timm":
            a = config["model_args"]
            arch = (f"- timm VisionTransformer: {a['embed_dim']} wide x {a['depth']} blocks, {a['num_heads']} heads, "
                    f"patch {a['patch_size']} px, {a['img_size']} px, no classifier head")
            library, what = "timm", "image encoder exported for timm (`m3ae export`)"
        else:
            c = config["encoder"] if kind == "classifier" else config
            kinds = "M3AE (image + text)" if c.get("vocab_size", 0) > 0 else "MAE (image only, vocab_size=0)"
            arch = (f"- encoder: {c['emb_dim']} wide x {c['depth']} blocks, {c['num_heads']} heads; "
                    f"decoder {c['dec_emb_dim']} x {c['dec_depth']}, {c['dec_num_heads']} heads\n"
                    f"- patch {c['patch_size']} px, trained at {c['image_size']} px (any size divisible by "
                    f"the patch works); text up to {c['text_length']} tokens, vocabulary {c['vocab_size']}\n"
                    f"- mask ratios: image {c['image_mask_ratio']}, text {c['text_mask_ratio']}")
            library, what = "m3ae", f"{kinds} encoder-decoder"
            if kind == "classifier":
                arch = (arch.split("\n")[0].replace("; decoder", " (decoder not kept; it had")
                        + ")\n- classifier: LayerNorm + linear head over "
                        + ("the [CLS] token" if config["pool"] == "cls" else "the mean of the image tokens")
                        + ", "
                        f"{config['num_classes']} classes")
                what = f"{kinds} encoder fine-tuned as an image classifier (`m3ae finetune`)"
    except (KeyError, TypeError) as err:  # a hand-edited or foreign config.json
        raise ValueError(f"{folder / 'config.json'} lacks {err} for a model card; is it a folder m3ae wrote?") from None
    lines = ["---", f"library_name: {library}", "tags:", "- m3ae", "- masked-autoencoder", "- vision",
             "license: apache-2.0", "---", "", f"# {repo_id or folder.name}", "",
             f"An {what}, pretrained with masked autoencoding "
             "([Geng et al., 2022](https://arxiv.org/abs/2205.14204)) by the `m3ae` package.", "",
             "## Architecture", "", arch, ""]
    from .checkpoint import RUN_CONFIG_NAME

    run = folder / RUN_CONFIG_NAME
    if run.is_file():
        from omegaconf import OmegaConf

        from .train.config import load_settings_yaml

        cfg = load_settings_yaml(run)
        pick = {k: OmegaConf.select(cfg, k) for k in ("data.spec", "data.tokenizer", "steps", "batch_size",
                                                     "optim.lr", "optim.weight_decay", "optim.warmup_steps", "seed")}
        lines += ["## Data and recipe", ""] + [f"- {k}: {v}" for k, v in pick.items() if v is not None] + [""]
    pre = folder / "preprocessor_config.json"
    p = read_config_json(pre) if pre.is_file() else (config.get("pretrained_cfg") or {})
    if p.get("processor") == "m3ae" or kind == "timm":
        size = p.get("image_size") or p.get("input_size", [0, 0, 0])[-1]
        lines += ["## Preprocessing", "",
                  f"Resize the shorter side to {size} / {p.get('crop_pct', 1.0)}, centre-crop {size}, "
                  f"normalise with mean {p.get('mean')} and std {p.get('std')}"
                  + {"m3ae": " (`preprocessor_config.json`; `m3ae.load` applies it).",
                     "classifier": " (`preprocessor_config.json`; `m3ae ood` applies it).",
                     "timm": " (`pretrained_cfg` in `config.json`)."}.get(kind, "."), ""]
    elif "image_mean" in p:
        lines += ["## Preprocessing", "",
                  f"`{p.get('image_processor_type', 'image processor')}` (`preprocessor_config.json`): normalise "
                  f"with mean {p['image_mean']} and std {p['image_std']}; `AutoImageProcessor` applies it.", ""]
    if results:
        lines += ["## Results", "", "| metric | value |", "|---|---|"]
        lines += [f"| {k} | {v} |" for k, v in results.items()] + [""]
    use = {
        "m3ae": ["import m3ae", "", f"m = m3ae.load({name})   # model + preprocessing + tokenizer",
                 "features = m.features(images=[\"photo.jpg\"])   # (1, D) [CLS] features"],
        "classifier": ["from m3ae.eval.finetune import Classifier", "",
                       f"classifier = Classifier.from_pretrained({name})   # logits = classifier(images)"],
        "transformers": [f"from transformers import AutoImageProcessor, {config.get('architectures', ['ViTModel'])[0]}",
                         "", f"processor = AutoImageProcessor.from_pretrained({name})",
                         f"model = {config.get('architectures', ['ViTModel'])[0]}.from_pretrained({name}"
                         + (", add_pooling_layer=False)" if config.get("model_type") == "vit" else ")")],
        "timm": ["import timm", "",
                 f"model = timm.create_model('hf-hub:{repo_id}', pretrained=True)" if repo_id else
                 f"model = timm.create_model('local-dir:{folder}', pretrained=True)"],
    }[kind]
    lines += ["## Use", "", "```python", *use, "```", ""]
    return "\n".join(lines)


def push_to_hub(folder: str | os.PathLike, repo_id: str, *, private: bool = False, revision: str | None = None,
                commit_message: str = "Upload M3AE checkpoint", token: str | None = None,
                results: dict[str, Any] | None = None, api=None):
    """Upload a checkpoint folder's model files (HUB_FILES) to `repo_id` in one commit, with the
    folder's own README.md or else a model card generated for this repository and `results` (uploaded,
    not written into the folder: a card names its repository). Returns huggingface_hub's CommitInfo;
    a Hub that cannot be reached or refuses raises HubError (an OSError) saying so.

    The repository then describes exactly this folder: a model file (a HUB_FILES name) an earlier push
    left there that this one does not upload (a tokenizer.json, when this model has none) is deleted
    in the same commit. Nothing else in the repository is touched. The commit is made on the revision
    as it was listed (parent_commit): had another push landed meanwhile, it fails instead of deleting
    from a state it did not see."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = Path(folder)
    for name in ("config.json", "model.safetensors"):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder} has no {name}; is it an M3AE checkpoint folder?")
    _refuse_outside_links(folder)
    card = folder / CARD_NAME
    if card.is_file() and results:
        warnings.warn(f"{card} is the folder's own model card: it is uploaded as it is, without the results",
                      stacklevel=2)
    with tempfile.TemporaryDirectory() as tmp:
        # An older checkpoint gets its tokenizer and image rule from its run folder, which stays
        # behind: without them the Hub copy would load with other preprocessing and no tokenizer.
        added = _completed(folder, Path(tmp))
        source = {**{name: folder / name for name in HUB_FILES if (folder / name).is_file()}, **added}
        operations = [CommitOperationAdd(path_in_repo=name, path_or_fileobj=str(path))
                      for name, path in source.items() if name != CARD_NAME]
        if card.is_file():
            card_bytes = card.read_bytes()
        else:
            card_folder = Path(tmp) if added else folder  # the card describes the files uploaded
            for name in ("config.json", "run_config.yaml"):
                if added and (folder / name).is_file():
                    shutil.copyfile(folder / name, card_folder / name)
            card_bytes = model_card(card_folder, repo_id, results).encode()
        operations.append(CommitOperationAdd(path_in_repo=CARD_NAME, path_or_fileobj=card_bytes))
        api = api or HfApi(token=token)  # `api`: an HfApi for another endpoint (a mirror, tests)
        try:
            api.create_repo(repo_id, private=private, exist_ok=True)
            present, parent = _repo_files(api, repo_id, revision)
            uploaded = {op.path_in_repo for op in operations}
            deletions = [CommitOperationDelete(path_in_repo=name)
                         for name in HUB_FILES if name in present and name not in uploaded]
            return api.create_commit(repo_id, operations=[*operations, *deletions], revision=revision,
                                     commit_message=commit_message, parent_commit=parent)
        except _hub_errors() as err:
            raise HubError(f"pushing to {repo_id} failed: {type(err).__name__}: {err} (is the Hugging Face Hub "
                           "reachable, and are you logged in: `hf auth login` or HF_TOKEN?)") from err


def _repo_files(api, repo_id: str, revision: str | None) -> tuple[set[str], str | None]:
    """The files at the top of `repo_id` at `revision` (default main, where create_commit commits)
    and the commit they were listed at; (set(), None) for a repository that does not exist or has no
    commit yet (nothing to delete). Folders are not listed: a folder named like a model file is not
    one of ours. An unknown revision raises (the commit could not be made either)."""
    from huggingface_hub import RepoFile, constants
    from huggingface_hub.errors import RepositoryNotFoundError

    try:
        sha = api.repo_info(repo_id, revision=revision or constants.DEFAULT_REVISION).sha
    except RepositoryNotFoundError:
        return set(), None
    if sha is None:
        return set(), None
    # Listed at that commit, not at the branch: the listing and parent_commit are one state.
    return {entry.path for entry in api.list_repo_tree(repo_id, revision=sha)
            if isinstance(entry, RepoFile)}, sha


def _refuse_outside_links(folder: Path) -> None:
    """A folder from someone else may hold README.md -> ~/.ssh/id_rsa: its bytes would be uploaded as
    the model card. Uploaded files must stay inside the folder, or inside the Hugging Face cache
    repository it is a snapshot of (snapshots/REV/NAME -> ../../blobs/HASH)."""
    root = folder.resolve()
    blobs = root.parent.parent / "blobs" if root.parent.name == "snapshots" else None
    for name in HUB_FILES:
        path = folder / name
        if not path.is_symlink():
            continue
        target = path.resolve()
        if not (target.is_relative_to(root) or (blobs is not None and target.is_relative_to(blobs))):
            raise ValueError(f"{path} is a link to {target}, outside the checkpoint folder: not uploaded "
                             "(copy the file into the folder if it is meant to be published)")


def _completed(folder: Path, tmp: Path) -> dict[str, Path]:
    """For an M3AE checkpoint lacking preprocessor_config.json or (with text) tokenizer.json: those
    files as m3ae.load finds them for it (run_config.yaml, the run's tokenizer), written into `tmp`,
    with a warning naming them; {} for a complete folder and for other kinds of folder."""
    from .pretrained import checkpoint_preprocessing, checkpoint_tokenizer
    from .validate import folder_kind, read_config_json, read_model_config

    if folder_kind(read_config_json(folder / "config.json")) != "m3ae":
        return {}
    config = read_model_config(folder / "config.json")
    wanted = ["preprocessor_config.json"] + (["tokenizer.json"] if config.has_text else [])
    missing = [name for name in wanted if not (folder / name).is_file()]
    if not missing:
        return {}
    out: dict[str, Path] = {}
    with warnings.catch_warnings():  # theirs advise re-saving; the one below says what is uploaded
        warnings.simplefilter("ignore")
        if "preprocessor_config.json" in missing:
            out["preprocessor_config.json"] = checkpoint_preprocessing(folder, config.image_size).save(tmp)
        tokenizer = checkpoint_tokenizer(folder, config.vocab_size) if "tokenizer.json" in missing else None
    if tokenizer is not None:
        tokenizer.save(str(tmp / "tokenizer.json"))
        out["tokenizer.json"] = tmp / "tokenizer.json"
    lost = sorted(set(missing) - set(out))
    warnings.warn(f"{folder} has no {' / '.join(missing)} (an older checkpoint): uploading "
                  + (f"{' and '.join(sorted(out))} as m3ae.load finds them for it (its run folder)" if out else
                     "without them")
                  + (f"; nothing says which {lost[0].split('.')[0]} it used, so the Hub copy has none" if lost
                     else ""), stacklevel=3)
    return out


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
