"""Shared helpers of the evaluation tests: tiny models and small synthetic labelled sets."""
from __future__ import annotations

import io
import pickle
import tarfile
from pathlib import Path

import numpy as np
from PIL import Image

from m3ae import M3AE, M3AEConfig

COLOURS = [(220, 30, 30), (30, 200, 40), (30, 60, 220), (230, 220, 30)]


def tiny_model(seed: int = 0, **overrides) -> M3AE:
    import torch
    torch.manual_seed(seed)
    base = dict(image_size=16, patch_size=8, emb_dim=32, depth=2, num_heads=2, dec_emb_dim=16, dec_depth=1,
                dec_num_heads=2, vocab_size=20, text_length=8)
    return M3AE(M3AEConfig(**{**base, **overrides}))


def colour_image(label: int, rng: np.random.Generator, size: int = 16) -> np.ndarray:
    """An image whose class is its dominant colour, with noise and a random distractor patch."""
    base = np.array(COLOURS[label], dtype=np.float64)
    img = base + rng.normal(0, 25, (size, size, 3))
    y, x = rng.integers(0, size // 2, 2)
    img[y: y + size // 4, x: x + size // 4] = rng.integers(0, 255, 3)
    return np.clip(img, 0, 255).astype(np.uint8)


def write_cifar_batch(path: Path, n: int, seed: int = 0, classes: int = 4) -> list[int]:
    rng = np.random.default_rng(seed)
    labels = [int(i % classes) for i in range(n)]
    data = np.stack([colour_image(l, rng, 32).transpose(2, 0, 1).reshape(-1) for l in labels])
    with open(path, "wb") as f:
        pickle.dump({b"data": data, b"labels": labels, b"batch_label": b"test"}, f)
    return labels


def jpeg_bytes(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(array).save(buf, format="JPEG", quality=95)
    return buf.getvalue()


def write_class_folders(root: Path, per_class: int, seed: int = 0, classes: int = 4) -> None:
    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class_{c}").mkdir(parents=True, exist_ok=True)
        for i in range(per_class):
            Image.fromarray(colour_image(c, rng)).save(root / f"class_{c}" / f"{i:03d}.png")


def write_shard(path: Path, n: int, seed: int = 0, classes: int = 4, corrupt: int = 0) -> None:
    rng = np.random.default_rng(seed)
    with tarfile.open(path, "w:gz") as tar:
        for i in range(n):
            label = i % classes
            payload = b"not a jpeg" if i < corrupt else jpeg_bytes(colour_image(label, rng))
            for ext, data in (("jpg", payload), ("cls", str(label).encode())):
                info = tarfile.TarInfo(f"s{seed}_{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def write_hdf5(path: Path, n_train: int, n_val: int, classes: int = 4) -> None:
    import h5py
    rng = np.random.default_rng(0)
    with h5py.File(path, "w") as f:
        for split, n in (("train", n_train), ("val", n_val)):
            blobs = [np.frombuffer(jpeg_bytes(colour_image(i % classes, rng)), dtype=np.uint8) for i in range(n)]
            ds = f.create_dataset(f"{split}_jpg", (n,), dtype=h5py.vlen_dtype(np.uint8))
            for i, b in enumerate(blobs):
                ds[i] = b
            f.create_dataset(f"{split}_labels", data=np.arange(n) % classes)
