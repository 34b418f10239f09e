import os
import re

import h5py
import numpy as np
import pytest
from PIL import Image

from data_files import (caption, jpeg_bytes, write_img2dataset_tar, write_manifest, write_text)
from m3ae.data.sources import ShardWriter, build_source, iter_tar, list_shards
from m3ae.data.sources.wds import expand_braces
from m3ae.data.spec import parse_spec


def records(source, n=None):
    n = len(source) if n is None else n
    return [source.record(i) for i in range(n)]


def test_spec_syntax(tmp_path):
    items = parse_spec("paired=wds:s/{000..002}.tar@0.7,text=text:c.csv#caption@0.3,x.h5#split=val")
    assert [(i.role, i.kind, i.path, i.weight) for i in items] == [
        ("paired", "wds", "s/{000..002}.tar", 0.7), ("text", "text", "c.csv", 0.3), (None, "hdf5", "x.h5", 1.0)]
    assert items[1].options == {"column": "caption"} and items[2].options == {"split": "val"}
    assert parse_spec("s3://bucket/a-{0..1}.tar")[0].kind == "wds"
    assert parse_spec("a.jsonl")[0].kind == "jsonl"
    with pytest.raises(ValueError, match="unknown source kind"):
        parse_spec("zip:foo")
    with pytest.raises(FileNotFoundError):
        parse_spec(str(tmp_path / "nothing"))


def test_brace_expansion():
    assert expand_braces("a/{00..02}.tar") == ["a/00.tar", "a/01.tar", "a/02.tar"]
    assert expand_braces("{x,y}-{1..2}") == ["x-1", "x-2", "y-1", "y-2"]


def test_csv_and_jsonl_manifests(tmp_path):
    path = write_manifest(tmp_path)  # images/ beside the manifest: found automatically
    src = build_source(parse_spec(path)[0])
    assert len(src) == 12 and src.provides == {"image", "text"}
    r = src.record(3)
    assert r.caption == caption(3) and os.path.exists(r.image)
    jl = write_manifest(tmp_path / "j", name="m.jsonl", subdir="pics")
    src = build_source(parse_spec(jl)[0])
    assert src.record(0).caption == caption(0) and os.path.exists(src.record(0).image)
    image_only = build_source(parse_spec(f"image={path}")[0])
    assert image_only.provides == {"image"}
    with pytest.raises(FileNotFoundError, match="root"):
        build_source(parse_spec(f"csv:{path}#root=nowhere")[0])


@pytest.mark.parametrize("name", ["m.csv", "m.tsv", "m.jsonl"])
def test_a_byte_order_mark_is_not_part_of_the_first_column_name(tmp_path, name):
    (tmp_path / "g00.jpg").write_bytes(jpeg_bytes(seed=0))
    body = {"m.csv": "image,caption\r\ng00.jpg,hi\r\n", "m.tsv": "image\tcaption\ng00.jpg\thi\n",
            "m.jsonl": '{"image": "g00.jpg", "caption": "hi"}\n'}[name]
    (tmp_path / name).write_bytes(b"\xef\xbb\xbf" + body.encode())  # Excel's "CSV UTF-8"
    src = build_source(parse_spec(str(tmp_path / name))[0])
    assert src.record(0).caption == "hi" and src.record(0).image == str(tmp_path / "g00.jpg")


@pytest.mark.parametrize("line", ['["list"]', "42", "null", '"a string"'])
def test_a_jsonl_line_that_is_not_an_object_names_the_file_and_line(tmp_path, line):
    jl = write_manifest(tmp_path, n=3, name="m.jsonl")
    with open(jl, "a") as f:
        f.write("\n" + line + "\n")  # line 5: the blank line 4 still counts
    with pytest.raises(ValueError, match=re.escape(f"m.jsonl:5: not a JSON object (got {line!r})")):
        build_source(parse_spec(jl)[0])


def test_manifest_labels_numbers_or_class_names(tmp_path):
    for i in range(4):
        (tmp_path / f"{i}.jpg").write_bytes(jpeg_bytes(seed=i))
    (tmp_path / "ids.csv").write_text("image,label\n0.jpg,2\n1.jpg,0\n2.jpg,\n3.jpg,-1\n")
    ids = build_source(parse_spec(str(tmp_path / "ids.csv"))[0], default_role="labelled")
    assert ids.provides == {"image", "label"} and ids.classes is None
    assert ids.labels() == [r.label for r in records(ids)] == [2, 0, None, -1]
    (tmp_path / "names.csv").write_text("image,class,caption\n0.jpg,dog,a\n1.jpg,cat,b\n2.jpg,dog,c\n")
    names = build_source(parse_spec(str(tmp_path / "names.csv"))[0], default_role="labelled")
    assert names.classes == ["cat", "dog"] and names.provides == {"image", "text", "label"}
    assert names.labels() == [r.label for r in records(names)] == [1, 0, 1]
    assert names.keys() == [r.key for r in records(names)] == ["0.jpg", "1.jpg", "2.jpg"]
    with pytest.raises(ValueError, match="caption"):  # paired (the default role) needs captions
        build_source(parse_spec(str(tmp_path / "ids.csv"))[0])


def test_text_corpora(tmp_path):
    txt = build_source(parse_spec(write_text(tmp_path))[0])
    assert len(txt) == 30 and txt.record(0).caption == caption(1000).encode()
    manifest = write_manifest(tmp_path)
    col = build_source(parse_spec(f"text:{manifest}#caption")[0])
    assert col.provides == {"text"} and col.record(2).caption == caption(2)


def test_image_folder_with_classes(tmp_path):
    for c, cls in enumerate(["cat", "dog"]):
        os.makedirs(tmp_path / cls)
        for i in range(3):
            (tmp_path / cls / f"{i}.png").write_bytes(jpeg_bytes(seed=c * 10 + i, fmt="PNG"))
    src = build_source(parse_spec(f"folder:{tmp_path}")[0])
    assert len(src) == 6 and src.provides == {"image", "label"}
    assert [r.label for r in records(src)] == src.labels() == [0, 0, 0, 1, 1, 1]
    assert [r.key for r in records(src)] == src.keys() and src.keys()[3] == os.path.join("dog", "0.png")


def test_hdf5_authors_layout(tmp_path):
    path = str(tmp_path / "pairs.h5")
    vlen = h5py.vlen_dtype(np.dtype("uint8"))
    with h5py.File(path, "w") as f:
        jpg = f.create_dataset("jpg", (4,), dtype=vlen)
        for i in range(4):
            jpg[i] = np.frombuffer(jpeg_bytes(seed=i), dtype=np.uint8)
        f.create_dataset("caption", data=np.array([caption(i).encode() for i in range(4)], dtype=object),
                         dtype=h5py.string_dtype("utf-8"))
    src = build_source(parse_spec(path)[0])
    assert src.provides == {"image", "text"} and len(src) == 4
    r = src.record(1)
    assert Image.open(__import__("io").BytesIO(r.image)).size == (48, 40)
    assert (r.caption.decode() if isinstance(r.caption, bytes) else r.caption) == caption(1)

    cls = str(tmp_path / "cls.h5")
    with h5py.File(cls, "w") as f:
        for split, n in (("train", 5), ("val", 2)):
            d = f.create_dataset(f"{split}_jpg", (n,), dtype=vlen)
            for i in range(n):
                d[i] = np.frombuffer(jpeg_bytes(seed=i), dtype=np.uint8)
            f.create_dataset(f"{split}_labels", data=np.arange(n) % 2)
    train = build_source(parse_spec(cls)[0])
    val = build_source(parse_spec(f"{cls}#split=val")[0])
    assert (len(train), len(val)) == (5, 2) and train.provides == {"image", "label"}
    assert val.record(1).label == 1
    assert train.labels() == [r.label for r in records(train)] == [0, 1, 0, 1, 0]
    assert train.keys() == [r.key for r in records(train)]
    assert src.labels() == [None] * 4  # pairs carry no labels

    text = str(tmp_path / "text.h5")
    with h5py.File(text, "w") as f:
        f.create_dataset("text", data=np.array([b"one text", b"two"], dtype=object), dtype=h5py.string_dtype())
    src = build_source(parse_spec(text)[0])
    assert src.provides == {"text"} and src.record(1).caption in (b"two", "two")


def test_webdataset_img2dataset_layout_and_own_writer(tmp_path):
    a = write_img2dataset_tar(str(tmp_path / "a-000.tar"), n=4, labels=True)
    write_img2dataset_tar(str(tmp_path / "a-001.tar.gz"), n=3, start=4, json_captions=True)
    recs = list(iter_tar(a))
    assert [r.caption for r in recs] == [caption(i).encode() for i in range(4)]
    assert [r.label for r in recs] == [0, 1, 2, 0]
    gz = list(iter_tar(str(tmp_path / "a-001.tar.gz")))
    assert [r.caption for r in gz] == [caption(i) for i in range(4, 7)]
    src = build_source(parse_spec(str(tmp_path / "a-*"))[0])
    assert len(src.shards) == 2

    with ShardWriter(str(tmp_path / "own" / "s-%03d.tar"), max_count=2) as w:
        for i in range(5):
            w.write({"__key__": f"k{i}", "jpg": jpeg_bytes(seed=i), "txt": caption(i), "cls": i})
    assert len(w.written) == 3
    src = build_source(parse_spec(f"wds:{tmp_path}/own/s-{{000..002}}.tar")[0])
    got = [r for _, r in src.iterate(0, 1, seed=0, epochs=1)]
    assert sorted(r.label for r in got) == list(range(5)) and src.provides == {"image", "text", "label"}


def test_webdataset_modalities_are_not_decided_by_the_first_record(tmp_path):
    from m3ae.data.sources.wds import WebDatasetSource

    with ShardWriter(str(tmp_path / "x-%05d.tar"), max_count=30) as w:
        for i in range(30):
            sample = {"__key__": f"k{i:02d}", "jpg": jpeg_bytes(seed=i), "cls": i % 3}
            if i:  # only the first sample lacks its caption (and its label)
                sample["txt"] = caption(i)
            else:
                del sample["cls"]
            w.write(sample)
    src = WebDatasetSource(str(tmp_path / "x-00000.tar"))
    assert src.provides == {"image", "text", "label"}
    assert WebDatasetSource(str(tmp_path / "x-00000.tar"), role="image").provides == {"image", "label"}
    # A first shard that cannot be read at all: the next shards decide.
    (tmp_path / "a-0.tar").write_bytes(b"")
    write_img2dataset_tar(str(tmp_path / "a-1.tar"), n=2, labels=True)
    assert WebDatasetSource(f"{tmp_path}/a-{{0..1}}.tar").provides == {"image", "text", "label"}


def test_missing_path_and_empty_glob_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no shards match"):
        list_shards(str(tmp_path / "x-*.tar"))
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_shards(str(tmp_path / "x-{0..3}.tar"))
    with pytest.raises(FileNotFoundError):
        build_source(parse_spec(f"csv:{tmp_path}/missing.csv")[0])
    os.makedirs(tmp_path / "empty")
    with pytest.raises(FileNotFoundError, match="no images"):
        build_source(parse_spec(f"folder:{tmp_path}/empty")[0])


def test_webdataset_shuffle_blocks_are_seeded_complete_and_resumable(tmp_path):
    from m3ae.data.sources.wds import WebDatasetSource

    write_img2dataset_tar(str(tmp_path / "s-0.tar"), n=10, start=0)
    write_img2dataset_tar(str(tmp_path / "s-1.tar"), n=10, start=10)
    pattern = str(tmp_path / "s-{0..1}.tar")
    plain = [r.key for _, r in WebDatasetSource(pattern).iterate(0, 1, seed=0, epochs=1)]
    source = WebDatasetSource(pattern, shuffle_block=4)
    items = list(source.iterate(0, 1, seed=0, epochs=1))
    keys = [r.key for _, r in items]
    assert sorted(keys) == sorted(plain) and keys != plain  # every record once, not in stored order
    # Blocks of 4 consecutive stored records stay together (memory is bounded by the block).
    for shard_keys in (keys[:10], keys[10:]):
        stored = [k for k in plain if k.split("/")[0] == shard_keys[0].split("/")[0]]
        for b in range(0, 10, 4):
            assert sorted(shard_keys[b:b + 4]) == sorted(stored[b:b + 4])
    assert keys == [r.key for _, r in source.iterate(0, 1, seed=0, epochs=1)]  # seeded
    assert keys != [r.key for _, r in source.iterate(0, 1, seed=1, epochs=1)]
    # Resume from any position: the same continuation.
    for cut in (3, 10, 13):
        position = items[cut - 1][0]
        rest = [r.key for _, r in source.iterate(0, 1, seed=0, state=position, epochs=1)]
        assert rest == keys[cut:]


@pytest.mark.parametrize("weight", ["-1", "abc", " 2", ""])
def test_a_bad_weight_is_named_as_a_weight(tmp_path, weight):
    from m3ae.data.spec import parse_item

    (tmp_path / "m.csv").write_text("image,caption\n")
    with pytest.raises(ValueError, match="the weight after '@' .* must be a positive number"):
        parse_item(f"{tmp_path}/m.csv@{weight}")
    assert parse_item(f"{tmp_path}/m.csv@0.5").weight == 0.5


def test_a_json_array_file_is_named_as_such(tmp_path):
    (tmp_path / "arr.json").write_text('[\n {"image": "a.jpg", "caption": "x"}\n]\n')
    with pytest.raises(ValueError, match="a JSON array; manifests are JSON Lines"):
        build_source(parse_spec(str(tmp_path / "arr.json"))[0])


@pytest.mark.parametrize("char", [",", "#", "@"])
def test_a_path_with_a_spec_character_is_written_with_a_backslash(tmp_path, char):
    folder = tmp_path / f"photos{char}2024"  # an image folder whose name holds the character
    folder.mkdir()
    (folder / "x.jpg").write_bytes(jpeg_bytes(seed=1))
    manifest = write_manifest(tmp_path / f"m{char}n", n=2, name=f"caps{char}v1.csv")  # the file's name too
    written = {p: p.replace(char, "\\" + char) for p in (str(folder), manifest)}
    spec = f"image=folder:{written[str(folder)]}#captions=0@0.25,{written[manifest]}#root=images@0.75"
    items = parse_spec(spec)
    assert [(i.role, i.kind, i.path, i.options, i.weight) for i in items] == [
        ("image", "folder", str(folder), {"captions": "0"}, 0.25), (None, "csv", manifest, {"root": "images"}, 0.75)]
    assert len(build_source(items[0])) == 1 and build_source(items[1]).record(1).caption == caption(1)
    assert parse_spec(",".join(str(i) for i in items)) == items  # str() escapes, so it reads back
    assert parse_spec(f"{written[str(folder)]}")[0].kind == "folder"  # the kind is guessed from the real path
    # Unescaped, the path is cut there: whatever the error, it says how to write the character.
    with pytest.raises((FileNotFoundError, ValueError), match=re.escape("written '\\,', '\\#' or '\\@'")):
        for item in parse_spec(f"folder:{folder}"):
            build_source(item)


def test_a_backslash_before_another_character_is_kept():
    from m3ae.data.spec import parse_item

    item = parse_item("folder:C:\\data\\x\\\\y#captions=0")  # "\d" and "\\y" are kept as they are
    assert item.path == "C:\\data\\x\\\\y" and item.options == {"captions": "0"}


def test_windows_paths_keep_their_backslashes():
    # Was: every "\\" was read as one backslash, so a UNC path lost its leading one and named
    # another folder than before escapes existed.
    from m3ae.data.spec import SourceSpec, parse_item

    for path in ("\\\\server\\share\\photos", "\\\\?\\C:\\data", "C:\\data\\"):
        assert parse_item(f"folder:{path}").path == path
    # A backslash ending a path, before a separator: doubled, as str() writes it.
    items = parse_spec("folder:C:\\data\\\\#captions=0@0.5,csv:D:\\m\\\\,csv:x\\\\\\@y\\\\")
    assert [(i.path, i.options, i.weight) for i in items] == [
        ("C:\\data\\", {"captions": "0"}, 0.5), ("D:\\m\\", {}, 1.0), ("x\\@y\\", {}, 1.0)]
    for path in ("C:\\data\\", "\\\\server\\a,b\\", "a\\,b", "x\\\\"):
        spec = SourceSpec("folder", path, None, 0.5, {"v": path})
        assert parse_spec(f"{spec},{spec}") == [spec, spec], str(spec)
