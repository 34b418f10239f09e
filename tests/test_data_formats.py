"""Parquet, img2dataset output folders, Hugging Face datasets on disk and HDF5 with named datasets:
each written with its real writer library, then read through `m3ae data stats`, `m3ae pretrain`
(with an exact resume) and `m3ae embed`."""
import json
import os
import re
import tarfile

import numpy as np
import pytest

from data_files import (caption, jpeg_bytes, write_hdf5_table, write_img2dataset_parquet, write_img2dataset_tar,
                        write_tokenizer)
from m3ae.cli import main
from m3ae.data.sources import build_source
from m3ae.data.spec import parse_item

pa = pytest.importorskip("pyarrow")
pq = pytest.importorskip("pyarrow.parquet")

TINY = ["model.image_size=32", "model.patch_size=16", "model.emb_dim=32", "model.depth=1", "model.num_heads=2",
        "model.dec_emb_dim=32", "model.dec_depth=1", "model.dec_num_heads=2", "model.vocab_size=300",
        "data.num_workers=0", "batch_size=4", "log_every=1", "progress=false", "optim.warmup_steps=1",
        "ckpt_every=100", "steps=6"]


def losses(out) -> list[float]:
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [x for r in rows for x in r.get("step_losses", [])]


def pretrain_and_resume(tmp_path, spec, *extra):
    """A straight run and a run stopped at step 3 then resumed see the same losses."""
    args = ["pretrain", "--config", "demo", "--data", spec, *TINY, f"data.tokenizer={write_tokenizer(tmp_path)}",
            *extra]
    assert main(args + ["--out", str(tmp_path / "straight")]) == 0
    assert main(args + ["--out", str(tmp_path / "split"), "--stop-at-step", "3"]) == 0
    assert main(args + ["--out", str(tmp_path / "split"), "--resume", "auto"]) == 0
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert len(straight) == 6 and all(np.isfinite(straight))
    assert split == pytest.approx(straight, abs=1e-6)


def records(source):
    return [r for _, r in source.iterate(0, 1, seed=0, epochs=1)]


def test_img2dataset_parquet_folder_stats_pretrain_resume(tmp_path, capsys):
    folder = write_img2dataset_parquet(tmp_path / "i2d", shards=2, n=6, failed={3, 8})
    item = parse_item(folder)
    assert item.kind == "parquet"  # a folder of .parquet (+ _stats.json) files is recognised as written
    src = build_source(item)
    assert src.provides == {"image", "text"} and len(src) == 12 and len(src.units) == 4  # 2 row groups a file
    got = records(src)
    assert sorted(r.caption for r in got) == sorted(caption(i) for i in range(12))
    assert sum(r.image is None for r in got) == 2  # failed downloads: null jpg
    assert main(["data", "stats", folder]) == 0
    out = capsys.readouterr().out
    assert "samples: 10" in out and "missing_image: 2" in out and "image width:  min 48" in out
    pretrain_and_resume(tmp_path, folder)


def test_parquet_resume_position_is_exact_within_a_row_group(tmp_path):
    folder = write_img2dataset_parquet(tmp_path / "p", shards=1, n=10, row_group=5)
    src = build_source(parse_item(folder))
    src.shuffle_block, src.batch_rows = 3, 2  # blocks and decoded batches cross each other
    full = list(src.iterate(0, 2, seed=7, epochs=2))
    assert sorted(r.key for _, r in full[:5]) != [r.key for _, r in full[:5]]  # shuffled within the unit
    for cut in (1, 3, 4):
        rest = list(src.iterate(0, 2, seed=7, state=full[cut - 1][0], epochs=2))
        assert [r.key for _, r in rest] == [r.key for _, r in full[cut:]]
    # shares are disjoint within an epoch and together read every row once
    one_epoch = [r.key for p in range(2) for _, r in src.iterate(p, 2, seed=7, epochs=1)]
    assert len(one_epoch) == len(set(one_epoch)) == 10


def test_img2dataset_webdataset_folder_is_read_as_shards(tmp_path, capsys):
    folder = tmp_path / "i2d_wds"
    folder.mkdir()
    for s in range(2):  # what img2dataset --output_format webdataset writes per shard
        write_img2dataset_tar(str(folder / f"{s:05d}.tar"), n=4, start=4 * s, json_captions=True)
        pq.write_table(pa.table({"key": [f"{i:09d}" for i in range(4 * s, 4 * s + 4)], "status": ["success"] * 4}),
                       folder / f"{s:05d}.parquet")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": 4, "successes": 4}))
    item = parse_item(str(folder))
    assert item.kind == "wds"
    assert main(["data", "stats", str(folder)]) == 0
    assert "samples: 8" in capsys.readouterr().out
    pretrain_and_resume(tmp_path, str(folder))


def test_parquet_paths_column_mapping_and_labels(tmp_path, capsys):
    os.makedirs(tmp_path / "imgs")
    for i in range(5):
        (tmp_path / "imgs" / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    pq.write_table(pa.table({"file": [f"{i}.jpg" for i in range(5)], "alt_text": [caption(i) for i in range(5)],
                             "y": pa.array([i % 2 for i in range(5)], pa.int32())}), tmp_path / "meta.parquet")
    spec = f"{tmp_path}/meta.parquet#image=file#caption=alt_text#label=y#root=imgs"
    src = build_source(parse_item(spec))
    assert src.provides == {"image", "text", "label"}
    got = sorted(records(src), key=lambda r: r.image)
    assert got[2].image == str(tmp_path / "imgs" / "2.jpg") and got[2].caption == caption(2) and got[2].label == 0
    with pytest.raises(ValueError, match="no column 'nope'.*alt_text"):
        build_source(parse_item(f"{tmp_path}/meta.parquet#caption=nope"))
    with pytest.raises(ValueError, match="no caption column; name one with #caption="):
        build_source(parse_item(f"{tmp_path}/meta.parquet#image=file"))
    pq.write_table(pa.table({"jpg": [jpeg_bytes(seed=0)], "caption": [["two", "captions"]]}), tmp_path / "l.parquet")
    with pytest.raises(ValueError, match="caption column 'caption' is list<.*not text"):
        build_source(parse_item(f"{tmp_path}/l.parquet"))
    assert main(["data", "stats", spec]) == 0
    assert "samples: 5" in capsys.readouterr().out


def test_parquet_bad_data_is_counted_or_a_clear_error(tmp_path, capsys):
    # a corrupt image and a non-UTF-8 caption: counted skips
    pq.write_table(pa.table({"jpg": [jpeg_bytes(seed=0), b"not an image", jpeg_bytes(seed=2)],
                             "txt": pa.array([b"a dog", b"a cat", b"\xff\xfe"], pa.binary())}), tmp_path / "b.parquet")
    assert main(["data", "stats", str(tmp_path / "b.parquet")]) == 0
    out = capsys.readouterr().out
    assert "samples: 1" in out and "undecodable: 1" in out and "bad_text: 1" in out
    # not Parquet at all: an error naming the file, before anything runs
    (tmp_path / "junk.parquet").write_bytes(b"PAR1 this is not parquet")
    assert main(["data", "stats", str(tmp_path / "junk.parquet")]) == 2
    assert "junk.parquet: not a readable Parquet file" in capsys.readouterr().err
    # a damaged row group (its pages overwritten) in an otherwise good file: its rows are counted skips
    good = tmp_path / "dmg.parquet"
    pq.write_table(pa.table({"jpg": [jpeg_bytes(seed=i) for i in range(8)], "txt": [caption(i) for i in range(8)]}),
                   good, row_group_size=4, compression="none")
    meta = pq.ParquetFile(good).metadata.row_group(0).column(0)
    data = bytearray(good.read_bytes())
    start = meta.dictionary_page_offset or meta.data_page_offset
    data[start:start + 64] = b"\x00" * 64
    good.write_bytes(bytes(data))
    assert main(["data", "stats", str(good)]) == 0
    out = capsys.readouterr().out
    assert "samples: 4" in out and "bad_table: 4" in out


def test_hf_save_to_disk_dataset_and_dict(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"image": datasets.Image(), "text": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=["a", "b", "c"])})
    rows = {"image": [{"bytes": jpeg_bytes(seed=i), "path": None} for i in range(9)],
            "text": [caption(i) for i in range(9)], "label": [i % 3 for i in range(9)]}
    ds = datasets.Dataset.from_dict(rows, features=features)
    ds.save_to_disk(str(tmp_path / "one"), max_shard_size="2KB")  # several arrow files
    datasets.DatasetDict({"train": ds, "test": ds.select(range(3))}).save_to_disk(str(tmp_path / "dict"))
    assert parse_item(str(tmp_path / "one")).kind == "hf"
    src = build_source(parse_item(f"hf:{tmp_path}/one"))
    assert src.provides == {"image", "text", "label"} and len(src) == 9
    got = records(src)
    assert sorted(r.label for r in got) == sorted(rows["label"]) and isinstance(got[0].image, bytes)
    test = build_source(parse_item(f"hf:{tmp_path}/dict#split=test"))
    assert len(test) == 3
    with pytest.raises(ValueError, match="no split 'val'"):
        build_source(parse_item(f"hf:{tmp_path}/dict#split=val"))
    assert main(["data", "stats", f"hf:{tmp_path}/dict"]) == 0
    out = capsys.readouterr().out
    assert "samples: 9" in out and "labels: 3 classes" in out
    pretrain_and_resume(tmp_path, f"hf:{tmp_path}/dict", "data.num_workers=2")
    arrow = sorted((tmp_path / "one").glob("*.arrow"))[-1]  # a truncated file: an error naming it
    arrow.write_bytes(arrow.read_bytes()[: arrow.stat().st_size // 2])
    assert main(["data", "stats", f"hf:{tmp_path}/one"]) == 2
    assert f"{arrow.name}: not a readable Arrow stream file" in capsys.readouterr().err
    from m3ae.eval.labelled import labelled_dataset

    labelled = labelled_dataset(f"hf:{tmp_path}/dict", "train", 32)  # ClassLabel -> evaluation labels
    assert len(labelled) == 9 and sorted(labelled.labels) == sorted(rows["label"])
    image, label = labelled[0]
    assert tuple(image.shape) == (3, 32, 32) and label in (0, 1, 2)


def test_hf_parquet_shards_as_on_the_hub(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    features = datasets.Features({"img": datasets.Image(), "sentence": datasets.Value("string")})
    for split, n in (("train", 6), ("validation", 2)):
        ds = datasets.Dataset.from_dict({"img": [{"bytes": jpeg_bytes(seed=i), "path": None} for i in range(n)],
                                         "sentence": [caption(i) for i in range(n)]}, features=features)
        os.makedirs(tmp_path / "repo" / "data", exist_ok=True)
        ds.to_parquet(str(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet"))
    train = build_source(parse_item(f"hf:{tmp_path}/repo"))
    val = build_source(parse_item(f"hf:{tmp_path}/repo#split=validation"))
    assert (len(train), len(val)) == (6, 2) and train.provides == {"image", "text"}
    assert main(["data", "stats", f"hf:{tmp_path}/repo"]) == 0
    assert "samples: 6" in capsys.readouterr().out
    pretrain_and_resume(tmp_path, f"hf:{tmp_path}/repo#image=img")
    with pytest.raises(FileNotFoundError, match="saved on disk"):
        build_source(parse_item("hf:someone/some-dataset"))


def test_a_hub_style_parquet_folder_without_hf_prefix_says_to_use_it(tmp_path, caplog):
    def shard(path):
        path.parent.mkdir(parents=True, exist_ok=True)
        pq.write_table(pa.table({"image": [{"bytes": jpeg_bytes(seed=0), "path": None}], "text": ["a dog"]}), path)

    for split in ("train", "test"):  # as on the Hub: data/{split}-*.parquet (the kind is guessed: folder)
        shard(tmp_path / "repo" / "data" / f"{split}-00000-of-00001.parquet")
    said = f"like a Hugging Face dataset as on the Hub (a data/ folder of Parquet files): read it with hf:{tmp_path}"
    with pytest.raises(FileNotFoundError, match=f"no images .*; .*{re.escape(said)}/repo"):
        build_source(parse_item(str(tmp_path / "repo")))
    assert len(build_source(parse_item(f"hf:{tmp_path}/repo"))) == 1  # what the hint says works
    # A dataset card with configs: and the shards beside it: guessed as plain Parquet, every split read.
    for split in ("train", "test"):
        shard(tmp_path / "card" / f"{split}-00000.parquet")
    (tmp_path / "card" / "README.md").write_text("---\nconfigs:\n- config_name: default\n  data_files:\n"
                                                 "  - split: train\n    path: train-*.parquet\n---\n# card\n")
    assert len(build_source(parse_item(str(tmp_path / "card")))) == 2
    assert f"reads all 2 Parquet files together (every split); {tmp_path}/card looks like a Hugging Face" in caplog.text
    caplog.clear()
    build_source(parse_item(write_img2dataset_parquet(tmp_path / "i2d", shards=1, n=2)))  # no card, no data/
    assert "Hugging Face" not in caplog.text


def test_hdf5_named_datasets(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    path = str(tmp_path / "mine.h5")
    vlen = h5py.vlen_dtype(np.dtype("uint8"))
    with h5py.File(path, "w") as f:
        g = f.create_group("train")
        images = g.create_dataset("images", (8,), dtype=vlen)
        for i in range(8):
            images[i] = np.frombuffer(jpeg_bytes(seed=i), dtype=np.uint8)
        g.create_dataset("titles", data=[caption(i).encode() for i in range(8)], dtype=h5py.string_dtype())
        g.create_dataset("y", data=np.arange(8) % 2)
        g.create_dataset("short", data=np.arange(3))
    spec = f"{path}#image=train/images#caption=train/titles#label=train/y"
    src = build_source(parse_item(spec))
    assert src.provides == {"image", "text", "label"} and len(src) == 8 and src.record(3).label == 1
    with pytest.raises(ValueError, match="no datasets of the M3AE layout.*#image=NAME"):
        build_source(parse_item(path))
    # A caption list shorter than the image list: the records past its end are counted, not fatal.
    short = build_source(parse_item(f"{path}#image=train/images#caption=train/short"))
    assert short.record(5).missing == "missing_caption" and "it has 3 entries" in short.record(5).key
    assert main(["data", "stats", spec]) == 0
    assert "samples: 8" in capsys.readouterr().out
    pretrain_and_resume(tmp_path, spec)


def test_hdf5_table_stats_pretrain_resume(tmp_path, capsys):
    import pickle

    pytest.importorskip("h5py")
    path = write_hdf5_table(tmp_path / "table.h5", n=8, images_dir=tmp_path / "imgs")
    spec = f"{path}#table=train/rows#caption=title#label=y"  # the image field `jpg` is found by its name
    src = build_source(parse_item(spec))
    assert src.provides == {"image", "text", "label"} and len(src) == 8
    assert "#table=train/rows (8 rows; fields image=jpg, caption=title, label=y)" in src.describe()
    r = src.record(3)
    assert (r.key, r.image, r.caption.decode(), r.label) == ("train/rows[3]", jpeg_bytes(seed=3), caption(3), 1)
    assert src.labels() == [src.record(i).label for i in range(8)] == [0, 1] * 4
    assert src.keys() == [src.record(i).key for i in range(8)] == [f"train/rows[{i}]" for i in range(8)]
    assert sorted(r.key for r in records(src)) == sorted(src.keys())  # one epoch reads every row once
    assert pickle.loads(pickle.dumps(src)).record(5).image == jpeg_bytes(seed=5)  # an open handle is not pickled
    # Encoded bytes in a fixed-length byte string; paths relative to #root= (itself beside the file).
    assert build_source(parse_item(f"{path}#table=train/rows#image=blob#caption=title")).record(2).image == \
        jpeg_bytes(seed=2)
    by_path = f"{path}#table=train/rows#image=file#caption=title#root=imgs"
    assert build_source(parse_item(by_path)).record(4).image == str(tmp_path / "imgs" / "p4.jpg")
    images_only = build_source(parse_item(f"image={path}#table=train/rows"))  # y is not a label by name
    assert images_only.provides == {"image"} and images_only.record(0).caption is None
    assert main(["data", "stats", spec]) == 0
    out = capsys.readouterr().out
    assert "samples: 8" in out and "image width:  min 48" in out
    os.remove(tmp_path / "imgs" / "p6.jpg")  # a path to nothing: a counted skip
    assert main(["data", "stats", by_path]) == 0
    out = capsys.readouterr().out
    assert "samples: 7" in out and "missing_image: 1" in out
    pretrain_and_resume(tmp_path, spec)


def test_embed_unlabelled_folder_manifest_shards_and_parquet(tmp_path):
    from m3ae.eval.features import load_features

    assert main(["pretrain", "--config", "demo", "--out", str(tmp_path / "run"), *TINY, "steps=1"]) == 0
    ckpt = str(next((tmp_path / "run" / "checkpoints").iterdir()))
    photos = tmp_path / "photos"
    photos.mkdir()
    for i in range(3):
        (photos / f"p{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    (tmp_path / "list.csv").write_text("image\n" + "".join(f"photos/p{i}.jpg\n" for i in range(3)))
    shard = write_img2dataset_tar(str(tmp_path / "s.tar"), n=3)  # no .cls members
    parquet = write_img2dataset_parquet(tmp_path / "pq", shards=1, n=3)
    for spec in (str(photos), str(tmp_path / "list.csv"), shard, parquet):
        out = tmp_path / f"f{abs(hash(spec))}.npz"
        assert main(["embed", "--checkpoint", ckpt, "--data", spec, "--out", str(out), "--quiet",
                     "--num-workers", "0", "--device", "cpu"]) == 0
        feats, labels, keys = load_features(out)
        assert feats.shape == (3, 32) and labels.tolist() == [-1, -1, -1] and len(set(keys)) == 3


def test_shard_bench_and_tokenizer_from_parquet_hf_and_hdf5(tmp_path, capsys):
    datasets = pytest.importorskip("datasets")
    folder = write_img2dataset_parquet(tmp_path / "i2d", shards=1, n=5, failed={1})
    ds = datasets.Dataset.from_dict({"image": [{"bytes": jpeg_bytes(seed=i), "path": None} for i in range(3)],
                                     "caption": [caption(i) for i in range(3)]},
                                    features=datasets.Features({"image": datasets.Image(),
                                                                "caption": datasets.Value("string")}))
    ds.save_to_disk(str(tmp_path / "hf"))
    for spec, n in ((folder, 4), (f"hf:{tmp_path}/hf", 3)):
        pattern = str(tmp_path / f"out{n}" / "s-%03d.tar")
        assert main(["data", "shard", spec, "--out", pattern, "--per-shard", "2"]) == 0
        assert f"wrote {n} samples" in capsys.readouterr().out
        assert main(["data", "stats", str(tmp_path / f"out{n}")]) == 0
        assert f"samples: {n}" in capsys.readouterr().out
        with tarfile.open(pattern % 0) as tar:
            assert {m.name.split(".", 1)[1] for m in tar.getmembers()} == {"jpg", "txt", "json"}
    assert main(["bench", "data", folder, "--samples", "8", "--workers", "1", "--batch", "4",
                 "--image-size", "32", "--rounds", "2", "--json", str(tmp_path / "data.json")]) == 0
    out = capsys.readouterr().out
    assert out.count("/s") >= 4 and "columns jpg, caption" in out  # ours and the baseline, in-process and 1 worker
    header = next(line for line in out.splitlines() if line.startswith("source"))
    assert header.split()[-5:] == ["in-process", "vs", "baseline", "1", "worker"]  # three columns, three names
    rows = {row["pipeline"]: row for row in json.loads((tmp_path / "data.json").read_text())["rows"]}
    assert rows["baseline"]["vs_baseline"] == 1.0 and " 1.00x " in out  # each round's ratio, then the median
    for row in rows.values():
        assert len(row["one_worker_rounds"]) == 2 and row["one_worker"] > 0
    # A source too long for its column keeps its end, marked as cut (was cut silently: "older:...").
    assert len(folder) > 48
    assert all(line.split()[0].startswith("...") for line in out.splitlines() if line.endswith("/s"))
    tok = str(tmp_path / "tok.json")
    assert main(["tokenizer", "train", f"text={folder}", "--vocab-size", "120", "--min-frequency", "1",
                 "--out", tok]) == 0
    from tokenizers import Tokenizer

    assert Tokenizer.from_file(tok).token_to_id("grass") is not None


def test_img2dataset_files_folder_is_unlabelled_captioned_images(tmp_path, capsys):
    folder = tmp_path / "i2d_files"
    for s in range(2):  # what img2dataset --output_format files writes per shard
        shard = folder / f"{s:05d}"
        shard.mkdir(parents=True)
        for i in range(s * 3, s * 3 + 3):
            (shard / f"{s:05d}{i:04d}.jpg").write_bytes(jpeg_bytes(seed=i))
            (shard / f"{s:05d}{i:04d}.txt").write_text(caption(i))
            (shard / f"{s:05d}{i:04d}.json").write_text(json.dumps({"caption": caption(i)}))
        pq.write_table(pa.table({"key": [f"{s:05d}{i:04d}" for i in range(3)], "status": ["success"] * 3}),
                       folder / f"{s:05d}.parquet")
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": 3}))
    item = parse_item(str(folder))
    assert item.kind == "folder"
    src = build_source(item)
    assert src.provides == {"image", "text"} and len(src) == 6  # shard folders are not classes
    assert sorted(src.record(i).caption.decode() for i in range(6)) == sorted(caption(i) for i in range(6))
    assert main(["data", "stats", str(folder)]) == 0
    assert "samples: 6" in capsys.readouterr().out
    pretrain_and_resume(tmp_path, str(folder))


def write_img2dataset_files(folder, captions: str) -> None:
    """img2dataset's `files` output, 2 shards of 3: captions in .txt + .json ("both"), in the .json
    only ("json"), or nowhere ("none")."""
    for s in range(2):
        shard = folder / f"{s:05d}"
        shard.mkdir(parents=True)
        for i in range(s * 3, s * 3 + 3):
            (shard / f"{s:05d}{i:04d}.jpg").write_bytes(jpeg_bytes(seed=i))
            if captions == "both":
                (shard / f"{s:05d}{i:04d}.txt").write_text(caption(i))
            meta = {"url": f"https://x/{i}.jpg", **({"caption": caption(i)} if captions != "none" else {})}
            (shard / f"{s:05d}{i:04d}.json").write_text(json.dumps(meta))
        (folder / f"{s:05d}_stats.json").write_text(json.dumps({"count": 3}))


def test_img2dataset_files_captions_only_in_the_json_are_read(tmp_path, capsys):
    folder = tmp_path / "i2d_json"
    write_img2dataset_files(folder, "json")
    (folder / "00001" / "000010005.json").write_text('{"caption": "cut sho')  # a torn .json: no caption
    (folder / "00001" / "000010004.json").unlink()
    (folder / "00001" / "000010004.json").mkdir()  # not a file: no caption either, and no crash
    src = build_source(parse_item(str(folder)))
    assert src.provides == {"image", "text"} and len(src) == 6
    assert [src.record(i).caption for i in range(6)] == [caption(i) for i in range(4)] + [None, None]
    assert main(["data", "stats", str(folder)]) == 0
    out = capsys.readouterr().out
    assert "samples: 4" in out and "missing_caption: 2" in out and "00001/000010005.jpg" in out  # counted


def test_img2dataset_files_without_any_caption_is_said(tmp_path, caplog):
    folder = tmp_path / "i2d_none"
    write_img2dataset_files(folder, "none")
    src = build_source(parse_item(str(folder)))
    assert src.provides == {"image"}
    assert f"folder:{folder}: img2dataset output without captions" in caplog.text
    caplog.clear()
    build_source(parse_item(f"image={folder}"))  # images asked for: nothing to say
    assert "without captions" not in caplog.text


def test_remote_parquet_with_image_urls_through_fsspec(tmp_path, capsys):
    """A Parquet file and the images its URL column names, in an fsspec in-memory 'bucket' (the
    s3:// / gs:// / https:// code path without a network)."""
    fsspec = pytest.importorskip("fsspec")
    fs, root = fsspec.filesystem("memory"), f"/m3ae-pq-{os.getpid()}-{tmp_path.name}"
    try:
        for i in range(4):
            fs.pipe(f"{root}/img/{i}.jpg", jpeg_bytes(seed=i))
        local = tmp_path / "urls.parquet"
        pq.write_table(pa.table({"URL": [f"memory://{root}/img/{i}.jpg" for i in range(4)] + ["memory://nope.jpg"],
                                 "TEXT": [caption(i) for i in range(5)]}), local)
        fs.put(str(local), f"{root}/meta/urls.parquet")
        spec = f"parquet:memory://{root}/meta/urls.parquet#image=URL"
        assert main(["data", "stats", spec]) == 0
        out = capsys.readouterr().out
        assert "samples: 4" in out and "missing_image: 1" in out  # TEXT found as the caption, any case
    finally:
        fs.rm(root, recursive=True)


def test_open_files_are_bounded_closed_when_dropped_and_never_cross_processes(monkeypatch):
    import pickle

    from m3ae.data.sources.table import OpenFiles

    closed, opened = [], []

    class Handle:
        def __init__(self, key):
            self.key = key
            opened.append(key)

    cache = OpenFiles(size=2, close=closed.append)
    first = cache.get("a", lambda: Handle("a"))
    assert cache.get("a", lambda: Handle("again")) is first  # reused, not reopened
    cache.get("b", lambda: Handle("b"))
    cache.get("c", lambda: Handle("c"))  # full: the oldest ("a") is dropped and closed
    assert [h.key for h in closed] == ["a"] and opened == ["a", "b", "c"]
    assert cache.get("a", lambda: Handle("a2")).key == "a2"
    plain = OpenFiles(size=2)
    plain.get("b", lambda: "opened in the parent")
    copy = pickle.loads(pickle.dumps(plain))  # what a worker receives: no handles
    assert copy.get("b", lambda: "opened in the worker") == "opened in the worker"
    assert plain.get("b", lambda: "reopened") == "opened in the parent"
    monkeypatch.setattr(os, "getpid", lambda: -1)  # as after a fork: inherited handles are not reused
    assert cache.get("c", lambda: Handle("c-forked")).key == "c-forked"


def test_a_url_whose_filesystem_package_is_missing_is_one_clear_error(tmp_path, capsys):
    # Was: a 70-line traceback for a manifest URL, and "undecodable" per sample for image URLs.
    from m3ae.cli import main

    fsspec = pytest.importorskip("fsspec")
    fsspec.register_implementation("m3aetest", "m3ae_no_such_module.FileSystem", clobber=True,
                                   errtxt="Install m3ae-no-such-package to access it")
    (tmp_path / "urls.csv").write_text("image,caption\nm3aetest://bucket/x.jpg,a thing\n")
    for spec in ("m3aetest://bucket/m.jsonl", str(tmp_path / "urls.csv")):
        assert main(["data", "stats", spec]) == 2
        err = capsys.readouterr().err
        assert "reading m3aetest:// needs a package fsspec asks for: Install m3ae-no-such-package" in err, err
        assert "Traceback" not in err


def test_a_parquet_label_column_of_strings_is_said_not_silently_dropped(tmp_path, caplog):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq

    from data_files import jpeg_bytes
    from m3ae.data.sources import build_source
    from m3ae.data.spec import parse_item

    pq.write_table(pa.table({"jpg": [jpeg_bytes(seed=0)], "caption": ["a cat"], "label": ["cat"]}),
                   tmp_path / "s.parquet")
    source = build_source(parse_item(str(tmp_path / "s.parquet")))
    assert "label" not in source.provides
    assert "column 'label' holds string, not integer labels" in caplog.text
