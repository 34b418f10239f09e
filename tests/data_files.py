"""Small data files written into tmp_path for the data tests (nothing is read from outside)."""
from __future__ import annotations

import io
import json
import os
import tarfile

import numpy as np
from PIL import Image

WORDS = "a dog cat runs jumps on the grass red ball man woman beach water blue sky child plays".split()


def jpeg_bytes(w=48, h=40, seed=0, mode="RGB", fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    image = Image.fromarray(rng.integers(0, 255, (h, w, 3), dtype=np.uint8)).convert(mode)
    buf = io.BytesIO()
    image.save(buf, fmt)
    return buf.getvalue()


def caption(i: int) -> str:
    rng = np.random.default_rng(i)
    return " ".join(rng.choice(WORDS, size=int(rng.integers(3, 9))))


def write_tokenizer(tmp_path) -> str:
    from m3ae.data.tokenizer import train_wordpiece

    tok = train_wordpiece([caption(i) for i in range(200)] + WORDS, vocab_size=200, min_frequency=1)
    path = os.path.join(tmp_path, "tok.json")
    tok.save(path)
    return path


def write_manifest(tmp_path, n=12, name="captions.csv", subdir="images") -> str:
    os.makedirs(os.path.join(tmp_path, subdir), exist_ok=True)
    rows = []
    for i in range(n):
        fname = f"img{i:03d}.jpg"
        with open(os.path.join(tmp_path, subdir, fname), "wb") as f:
            f.write(jpeg_bytes(40 + i, 36, seed=i))
        rows.append((fname, caption(i)))
    path = os.path.join(tmp_path, name)
    if name.endswith(".jsonl"):
        with open(path, "w") as f:
            for fname, cap in rows:
                f.write(json.dumps({"image": f"{subdir}/{fname}", "caption": cap}) + "\n")
    else:
        with open(path, "w") as f:
            f.write("image,caption\n" + "".join(f"{a},{b}\n" for a, b in rows))
    return path


def write_img2dataset_tar(path, n=6, start=0, json_captions=False, labels=False) -> str:
    """img2dataset layout written with the standard tarfile module."""
    with tarfile.open(path, "w:gz" if path.endswith(".gz") else "w") as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            members = {"jpg": jpeg_bytes(seed=i)}
            if json_captions:
                members["json"] = json.dumps({"caption": caption(i), "url": "x"}).encode()
            else:
                members["txt"] = caption(i).encode()
            if labels:
                members["cls"] = str(i % 3).encode()
            for ext, data in members.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


def write_text(tmp_path, n=30, name="corpus.txt") -> str:
    path = os.path.join(tmp_path, name)
    with open(path, "w") as f:
        f.write("".join(caption(1000 + i) + "\n" for i in range(n)))
    return path


def write_img2dataset_parquet(folder, shards=2, n=6, failed=(), row_group=4) -> str:
    """img2dataset's `parquet` output, written with pyarrow as it writes it: per shard NNNNN.parquet
    (key, url, caption, status, error_message, width, height, jpg; failed downloads have a null
    jpg) + NNNNN_stats.json. Rows listed in `failed` (global index) are failed downloads."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    os.makedirs(folder, exist_ok=True)
    for s in range(shards):
        rows = range(s * n, (s + 1) * n)
        ok = [i not in failed for i in rows]
        table = pa.table({
            "key": [f"{s:05d}{i:04d}" for i in rows],
            "url": [f"http://example.invalid/{i}.jpg" for i in rows],
            "caption": [caption(i) for i in rows],
            "status": ["success" if good else "failed_to_download" for good in ok],
            "error_message": [None if good else "404" for good in ok],
            "width": pa.array([48 if good else None for good in ok], pa.int64()),
            "height": pa.array([40 if good else None for good in ok], pa.int64()),
            "jpg": pa.array([jpeg_bytes(seed=i) if good else None for i, good in zip(rows, ok)], pa.binary()),
        })
        pq.write_table(table, os.path.join(folder, f"{s:05d}.parquet"), row_group_size=row_group)
        with open(os.path.join(folder, f"{s:05d}_stats.json"), "w") as f:
            json.dump({"count": n, "successes": sum(ok), "failed_to_download": n - sum(ok)}, f)
    return str(folder)


def write_hdf5_table(path, n=8, table="train/rows", images_dir=None, chunks=None) -> str:
    """A compound HDF5 dataset written with h5py, one row per sample: `jpg` (variable-length uint8:
    encoded bytes), `blob` (the same bytes in a fixed-length byte string), `file` (a relative path,
    written under `images_dir` when given), `title` (a UTF-8 string), `y` (an integer label),
    `pix` (a raw pixel array) and `score` (a float). `chunks` with gzip when given."""
    import h5py

    dtype = np.dtype([("jpg", h5py.vlen_dtype(np.uint8)), ("blob", "S4096"), ("file", "S32"),
                      ("title", h5py.string_dtype()), ("y", "<i8"), ("pix", "u1", (4, 4, 3)), ("score", "<f4")])
    rows = np.zeros(n, dtype=dtype)
    for i in range(n):
        data = jpeg_bytes(seed=i)
        rows[i] = (np.frombuffer(data, np.uint8), data, f"p{i}.jpg".encode(), caption(i), i % 2, 0, i / n)
        if images_dir is not None:
            os.makedirs(images_dir, exist_ok=True)
            with open(os.path.join(images_dir, f"p{i}.jpg"), "wb") as f:
                f.write(data)
    with h5py.File(path, "w") as f:
        f.create_dataset(table, data=rows, chunks=chunks, compression="gzip" if chunks else None)
    return str(path)


def write_class_folder(root, classes, per_class=1) -> str:
    """DIR/<class>/<i>.png for each class name (an image folder with labels)."""
    for c, name in enumerate(classes):
        os.makedirs(os.path.join(root, name))
        for i in range(per_class):
            with open(os.path.join(root, name, f"{i}.png"), "wb") as f:
                f.write(jpeg_bytes(seed=10 * c + i, fmt="PNG"))
    return str(root)
