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


def python2_cifar_pickle(data: np.ndarray, labels: list[int]) -> bytes:
    """The bytes Python 2's cPickle (protocol 2) writes for a CIFAR batch dict with numpy 1.x:
    py2 `str` keys and raw data as SHORT_BINSTRING / BINSTRING, the array as numpy's
    _reconstruct + __setstate__ with a dtype built from 'u1'. Assembled opcode by opcode."""
    import struct

    def string(b: bytes) -> bytes:  # a py2 str
        return b"U" + bytes([len(b)]) + b if len(b) < 256 else b"T" + struct.pack("<i", len(b)) + b

    def small_int(v: int) -> bytes:
        return b"K" + bytes([v]) if v < 256 else b"M" + struct.pack("<H", v)

    assert data.dtype == np.uint8 and data.ndim == 2
    array = (b"cnumpy.core.multiarray\n_reconstruct\n" + b"cnumpy\nndarray\n" + small_int(0) + b"\x85"
             + string(b"b") + b"\x87R"
             + b"(" + small_int(1) + small_int(data.shape[0]) + small_int(data.shape[1]) + b"\x86"
             + b"cnumpy\ndtype\n" + string(b"u1") + small_int(0) + small_int(1) + b"\x87R"
             + b"(" + small_int(3) + string(b"|") + b"NNN" + b"J\xff\xff\xff\xff" * 2 + small_int(0) + b"tb"
             + b"\x89" + string(data.tobytes()) + b"tb")
    label_list = b"](" + b"".join(small_int(v) for v in labels) + b"e"
    return (b"\x80\x02}(" + string(b"data") + array + string(b"labels") + label_list
            + string(b"batch_label") + string(b"testing batch 1 of 1") + b"u.")


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
