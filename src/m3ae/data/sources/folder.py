"""Image folders: DIR/*.jpg (unlabelled) or DIR/<class>/*.jpg (class index = sorted folder order).
A caption may sit beside an image as the same name with .txt (img2dataset's folder layout).
img2dataset's `files` output (DIR/00000/*.jpg + .txt, DIR/00000_stats.json) is unlabelled: its
sub-folders are shards, not classes."""
from __future__ import annotations

import os

from .base import IndexedSource, Record, require_path
from .registry import SourceKind

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif", ".tif", ".tiff")


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
        has_txt = os.path.exists(os.path.splitext(files[0][0])[0] + ".txt")
        self.captions = (role != "image" and has_txt) if captions is None else captions
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
        caption = None
        if self.captions:
            try:
                with open(os.path.splitext(path)[0] + ".txt", "rb") as f:
                    caption = f.read()
            except FileNotFoundError:
                caption = None
        return Record(key=os.path.relpath(path, self.name), image=path, caption=caption, label=label)


def _folder(item, role: str, context) -> ImageFolder:
    o = item.options
    captions = None if "captions" not in o else o["captions"].lower() in ("1", "true", "yes")
    return ImageFolder(item.path, role=role, captions=captions)


# Last in registry.MODULES: any directory no other kind claims is an image folder.
KINDS = (SourceKind("folder", _folder, frozenset({"captions"}), aliases=("dir",),
                    claims_directory=lambda path, names: True),)
