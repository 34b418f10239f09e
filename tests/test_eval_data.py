import io
import logging
import pickle

import numpy as np
import pytest
import torch

from _eval_util import python2_cifar_pickle, write_cifar_batch, write_class_folders, write_hdf5, write_shard
from m3ae.eval.labelled import EvalTransform, TrainTransform, expand_braces, labelled_dataset, load_cifar_batch


def _check(ds, n, size=16, classes=4):
    assert len(ds) == n
    image, label = ds[0]
    assert image.shape == (3, size, size) and image.dtype == torch.float32
    assert 0 <= label < classes
    assert sorted(set(ds.labels)) == list(range(classes))


def test_cifar_batches(tmp_path):
    labels = write_cifar_batch(tmp_path / "test_batch", 12)
    for i in range(1, 6):
        write_cifar_batch(tmp_path / f"data_batch_{i}", 4, seed=i)
    val = labelled_dataset(str(tmp_path), "val", 16)
    _check(val, 12)
    assert val.labels == labels
    _check(labelled_dataset(f"cifar:{tmp_path}", "train", 16, train_transform=True), 20)
    _check(labelled_dataset(str(tmp_path / "test_batch"), "val", 16), 12)


def test_python2_cifar_pickle(tmp_path):
    """The real CIFAR-10 python batches were written by Python 2: str keys, numpy 1.x arrays."""
    import pickletools

    rng = np.random.default_rng(0)
    data = rng.integers(0, 256, (3, 3072), dtype=np.uint8)
    raw = python2_cifar_pickle(data, [3, 1, 4])
    pickletools.dis(raw, out=io.StringIO())  # a well-formed pickle stream
    (tmp_path / "test_batch").write_bytes(raw)
    batch = load_cifar_batch(tmp_path / "test_batch")
    assert batch[b"labels"] == [3, 1, 4] and batch[b"batch_label"] == b"testing batch 1 of 1"
    assert np.array_equal(np.asarray(batch[b"data"]), data)
    ds = labelled_dataset(str(tmp_path), "val", 16)
    assert ds.labels == [3, 1, 4] and len(ds) == 3


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def test_malicious_cifar_pickle_is_refused(tmp_path):
    path = tmp_path / "test_batch"
    with open(path, "wb") as f:
        pickle.dump({b"data": np.zeros((1, 3072), np.uint8), b"labels": [0], b"x": _Evil()}, f)
    with pytest.raises(pickle.UnpicklingError, match="builtins.print"):
        load_cifar_batch(path)
    with pytest.raises(pickle.UnpicklingError):
        labelled_dataset(str(tmp_path), "val", 16)


def test_class_folders(tmp_path):
    write_class_folders(tmp_path, 3)
    ds = labelled_dataset(str(tmp_path), "train", 16)
    _check(ds, 12)
    assert ds.classes == [f"class_{c}" for c in range(4)]


def test_tar_shards_with_brace_expansion_and_bad_images(tmp_path, caplog):
    write_shard(tmp_path / "train-00000.tar.gz", 8, seed=0, corrupt=1)
    write_shard(tmp_path / "train-00001.tar.gz", 8, seed=1)
    ds = labelled_dataset(str(tmp_path / "train-0000{0..1}.tar.gz"), "train", 16)
    _check(ds, 16)
    images = [ds[i][0] for i in range(len(ds))]  # the undecodable one is skipped, counted, logged
    assert ds.skipped == 1
    assert [r.levelno for r in caplog.records if "undecodable" in r.getMessage()] == [logging.WARNING]
    assert len(images) == 16
    assert len(labelled_dataset(str(tmp_path / "train-*.tar.gz"), "train", 16)) == 16
    assert len(labelled_dataset(str(tmp_path / "train-0000{0..1}.tar.gz"), "train", 16, limit=5)) == 5


def test_hdf5_layout(tmp_path):
    write_hdf5(tmp_path / "set.h5", 8, 4)
    _check(labelled_dataset(str(tmp_path / "set.h5"), "train", 16), 8)
    _check(labelled_dataset(str(tmp_path / "set.h5"), "val", 16), 4)


def test_missing_paths_are_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError):
        labelled_dataset(str(tmp_path / "nope"), "train", 16)
    with pytest.raises(FileNotFoundError):
        labelled_dataset(str(tmp_path / "x-{0..2}.tar"), "train", 16)


def test_brace_expansion():
    assert expand_braces("a-{008..010}.tar") == ["a-008.tar", "a-009.tar", "a-010.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]


def test_transforms_shapes_and_determinism():
    from PIL import Image
    img = Image.fromarray(np.random.default_rng(0).integers(0, 255, (20, 30, 3), dtype=np.uint8))
    ev = EvalTransform(16, stats="imagenet")
    assert torch.equal(ev(img), ev(img)) and ev(img).shape == (3, 16, 16)
    tr = TrainTransform(16, stats="imagenet")
    assert tr(img).shape == (3, 16, 16)


def _named_manifest(path, classes, n=30):
    """A CSV of n distinct images labelled by class name, round-robin over `classes`."""
    from PIL import Image

    rng = np.random.default_rng(0)
    rows = ["image,label"]
    for i in range(n):
        name = classes[i % len(classes)]
        if not (path.parent / f"{i}.png").exists():
            Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(path.parent / f"{i}.png")
        rows.append(f"{i}.png,{name}")
    path.write_text("\n".join(rows) + "\n")


def test_validation_labels_follow_the_training_class_names(tmp_path):
    # Was: each set numbered its own names, so a val set without "cat" had dog=0, fish=1 against
    # the training set's dog=1, fish=2: every label shifted and the metrics silently wrong.
    _named_manifest(tmp_path / "tr.csv", ["cat", "dog", "fish"])
    rows = (tmp_path / "tr.csv").read_text().splitlines()
    (tmp_path / "va.csv").write_text("\n".join([rows[0], *(r for r in rows[1:] if not r.endswith(",cat"))]) + "\n")
    train = labelled_dataset(str(tmp_path / "tr.csv"), "train", 16)
    val = labelled_dataset(str(tmp_path / "va.csv"), "val", 16)
    val.number_like(train)
    by_key = dict(zip(train.keys, train.labels))
    assert val.labels == [by_key[k] for k in val.keys] and set(val.labels) == {1, 2}
    assert val.classes == ["cat", "dog", "fish"] and val.num_classes == 3
    write_class_folders(tmp_path / "ftr", 2, classes=3)
    write_class_folders(tmp_path / "fva", 2, classes=3)
    import shutil

    shutil.rmtree(tmp_path / "fva" / "class_0")
    ftr, fva = labelled_dataset(str(tmp_path / "ftr"), "train", 16), labelled_dataset(str(tmp_path / "fva"), "val", 16)
    fva.number_like(ftr)
    assert fva.labels == [1, 1, 2, 2]


def test_a_validation_class_unknown_to_training_is_an_error(tmp_path):
    _named_manifest(tmp_path / "tr.csv", ["dog", "fish"])
    train = labelled_dataset(str(tmp_path / "tr.csv"), "train", 16)
    _named_manifest(tmp_path / "va.csv", ["cat", "dog"])
    with pytest.raises(ValueError, match=r"va\.csv.*\['cat'\].*not in the training set"):
        labelled_dataset(str(tmp_path / "va.csv"), "val", 16).number_like(train)
    write_cifar_batch(tmp_path / "test_batch", 4)
    with pytest.raises(ValueError, match="integer labels"):
        labelled_dataset(str(tmp_path / "test_batch"), "val", 16).number_like(train)


def test_hdf5_tables_are_labelled_sets(tmp_path):
    # Was: every hdf5 item got #split= added, which a #table= item refuses ("#split= is for the
    # authors' layout"), so no evaluation command could read a table.
    import h5py

    from data_files import write_hdf5_table

    path = write_hdf5_table(tmp_path / "t.h5", n=6, table="train/rows")
    for split in ("train", "val"):
        ds = labelled_dataset(f"{path}#table=train/rows#label=y", split, 16)
        assert len(ds) == 6 and ds.labels == [0, 1] * 3 and ds[0][0].shape == (3, 16, 16)
    with h5py.File(path, "r") as f:  # the same rows without a caption field: labels are all it needs
        rows = f["train/rows"].fields(["jpg", "y"])[:]
    with h5py.File(tmp_path / "nocap.h5", "w") as f:
        f.create_dataset("rows", data=rows)
    assert labelled_dataset(f"{tmp_path / 'nocap.h5'}#table=rows#label=y", "val", 16).labels == [0, 1] * 3
    write_hdf5(tmp_path / "set.h5", 8, 4)  # the authors' layout still picks its split
    assert len(labelled_dataset(str(tmp_path / "set.h5"), "val", 16)) == 4
