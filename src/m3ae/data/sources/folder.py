"""Image folders: DIR/*.jpg (unlabelled) or DIR/<class>/*.jpg (class index = sorted folder order).
A caption may sit beside an image as the same name with .txt (img2dataset's folder layout), or,
without a .txt, as the "caption" of the same name with .json (img2dataset writes both; some
pipelines keep only the .json). img2dataset's `files` output (DIR/00000/*.jpg + .txt/.json,
DIR/00000_stats.json) is unlabelled: its sub-folders are shards, not classes."""
from __future__ import annotations

import json
import logging
import os

from .base import IndexedSource, Record, require_path
from .registry import SourceKind

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")
MAX_JSON_BYTES = 1 << 20  # img2dataset's per-sample .json is a few hundred bytes
PEEK_IMAGES = 16  # images whose caption files are looked for: one without a caption must not decide for all

log = logging.getLogger("m3ae.data")


def read_caption(image: str) -> str | bytes | None:
    """The caption beside an image: its .txt (bytes, decoded and checked in the worker), else the
    "caption" string of its .json, else None (a counted `missing_caption` where pairs are read). A
    .json that cannot be parsed, or is not a file, is no caption, as in tar shards (wds.py)."""
    stem = os.path.splitext(image)[0]
    try:
        with open(stem + ".txt", "rb") as f:
            return f.read()
    except FileNotFoundError:
        pass
    except OSError:  # a directory or unreadable file named like a caption: this sample's skip, not the run's end
        return None
    try:
        with open(stem + ".json", "rb") as f:
            raw = f.read(MAX_JSON_BYTES + 1)
        if len(raw) > MAX_JSON_BYTES:  # metadata, not a caption: never read whole
            return None
        meta = json.loads(raw.decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError):  # ValueError: JSONDecodeError
        return None
    caption = meta.get("caption") if isinstance(meta, dict) else None
    return caption if isinstance(caption, str) else None


def is_img2dataset_files(path: str, entries: list[str]) -> bool:
    """img2dataset's `files` output: numbered shard folders with a NNNNN_stats.json beside each."""
    return any(n.endswith("_stats.json") and os.path.isdir(os.path.join(path, n[: -len("_stats.json")]))
               for n in entries)


class ImageFolder(IndexedSource):
    kind = "folder"

    def __init__(self, path: str, role: str = "image", captions: bool | None = None):
        self.name = path
        require_path(path, "image folder")
        if not os.path.isdir(path):
            raise ValueError(f"folder:{path} is not a directory")
        entries = sorted(os.listdir(path))
        self.classes = [d for d in entries if os.path.isdir(os.path.join(path, d)) and not d.startswith(".")]
        shards = is_img2dataset_files(path, entries)
        files: list[tuple[str, int | None]] = []
        if shards:
            files = [(os.path.join(path, d, n), None) for d in self.classes
                     for n in sorted(os.listdir(os.path.join(path, d))) if n.lower().endswith(IMAGE_EXTENSIONS)]
            self.classes = []
        elif self.classes:
            for label, cls in enumerate(self.classes):
                for dirpath, dirnames, names in os.walk(os.path.join(path, cls)):
                    dirnames.sort()
                    files += [(os.path.join(dirpath, n), label) for n in sorted(names)
                              if n.lower().endswith(IMAGE_EXTENSIONS)]
        else:
            files = [(os.path.join(path, n), None) for n in entries if n.lower().endswith(IMAGE_EXTENSIONS)]
        if not files:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) in folder {path}")
        self.files = files
        if captions is None:  # found beside the images, unless only the images are wanted
            captions = role != "image" and any(read_caption(f) is not None for f, _ in files[:PEEK_IMAGES])
            if shards and role != "image" and not captions:  # img2dataset output is meant to be captioned
                log.warning("folder:%s: img2dataset output without captions (no .txt, no \"caption\" in the .json "
                            "beside the first %d images): read as images only", path, min(len(files), PEEK_IMAGES))
        self.captions = captions
        self.provides = frozenset({"image"} | ({"label"} if self.classes else set())
                                  | ({"text"} if self.captions else set()))

    def __len__(self) -> int:
        return len(self.files)

    def labels(self) -> list[int | None]:
        return [label for _, label in self.files]

    def keys(self) -> list[str]:
        return [os.path.relpath(path, self.name) for path, _ in self.files]

    def record(self, index: int) -> Record:
        path, label = self.files[index]
        caption = read_caption(path) if self.captions else None
        return Record(key=os.path.relpath(path, self.name), image=path, caption=caption, label=label)


def _folder(item, role: str, context) -> ImageFolder:
    o = item.options
    captions = None if "captions" not in o else o["captions"].lower() in ("1", "true", "yes")
    try:
        return ImageFolder(item.path, role=role, captions=captions)
    except FileNotFoundError as err:
        from .hf import hub_hint

        hint = hub_hint(item.path)  # a Hub dataset's Parquet shards under data/ are not images
        if hint:
            raise FileNotFoundError(f"{err}; {hint}") from None
        raise


# Last in registry.MODULES: any directory no other kind claims is an image folder.
KINDS = (SourceKind("folder", _folder, frozenset({"captions"}), aliases=("dir",),
                    claims_directory=lambda path, names: True),)
