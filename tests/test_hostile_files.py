"""Hostile or broken files and settings: each is refused with the file and field named (or counted
as one bad sample), before anything large is allocated or anything blocks."""
import io
import json
import logging
import os
import struct
import tarfile
import time

import pytest
import torch

from conftest import nano_config
from data_files import jpeg_bytes, write_img2dataset_tar, write_manifest
from m3ae import M3AE
from m3ae.checkpoint import load_train_state
from m3ae.config import ConfigError, check_fits_memory
from m3ae.data.bad import BadSample
from m3ae.data.images import read_image_file
from m3ae.data.sources.wds import iter_tar
from m3ae.train.loop import pretrain
from test_train import tiny_config


@pytest.fixture
def saved(tmp_path, nano_model):
    return nano_model.save_pretrained(tmp_path / "ckpt")


def edit_config(folder, **changes):
    path = folder / "config.json"
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))


@pytest.mark.parametrize("field, value, message", [
    ("depth", 2.5, "depth must be int"),
    ("depth", "2", "depth must be int"),
    ("depth", True, "depth must be int"),
    ("depth", -1, "depth must be >= 1"),
    ("image_loss_weight", -1, "image_loss_weight must be >= 0"),
    ("text_loss_weight", float("nan"), "text_loss_weight must be a finite float"),
    ("masking", 3, "masking must be str"),
    ("mlp_ratio", 0, "mlp_ratio must be > 0"),
    ("format_version", 2, "format_version 2: this m3ae reads format_version 1 to 1"),
    ("format_version", "1", "format_version '1': this m3ae reads"),
])
def test_config_json_types_and_ranges_name_the_file_and_field(saved, field, value, message):
    edit_config(saved, **{field: value})
    with pytest.raises(ConfigError, match=message) as err:
        M3AE.from_pretrained(saved)
    assert str(saved / "config.json") in str(err.value)


def test_a_huge_model_is_refused_before_allocating(saved):
    # Was: depth 1000000 built the model first (59 s, > 8 GB).
    edit_config(saved, depth=1_000_000, emb_dim=1024, num_heads=16)
    start = time.perf_counter()
    with pytest.raises(ConfigError, match="parameters .* more than this machine's memory"):
        M3AE.from_pretrained(saved)
    assert time.perf_counter() - start < 2
    with pytest.raises(ConfigError, match="more than this machine's memory"):
        check_fits_memory(nano_config(), memory_bytes=1000)
    # Position tables are buffers, not parameters, and can be as large.
    with pytest.raises(ConfigError, match="more than this machine's memory"):
        M3AE(nano_config(text_length=10**12))


def test_the_parameter_count_is_known_before_building():
    for config in (nano_config(), nano_config(vocab_size=0), nano_config(output_head_depth=2, mlp_ratio=3.0),
                   nano_config(use_type_embedding=False)):
        assert config.num_parameters() == M3AE(config).num_parameters()


def test_deeply_nested_or_non_object_json_is_a_clear_error(saved):
    (saved / "config.json").write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(ConfigError, match="config.json"):
        M3AE.from_pretrained(saved)
    (saved / "config.json").write_text("[1, 2]")
    with pytest.raises(ConfigError, match="must hold a JSON object"):
        M3AE.from_pretrained(saved)


def _rewrite_header(path, edit):
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    edit(header)
    new = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(new)) + new + raw[8 + n:])


@pytest.mark.parametrize("edit, message", [
    (lambda h: h["cls_token"].update(shape=[1, 1, 65]), "cls_token has shape"),
    (lambda h: h["cls_token"].update(data_offsets=[0, 10**12]), "cls_token's bytes"),
    (lambda h: h["cls_token"].update(dtype="I64"), "not a float type"),
    (lambda h: h.pop("cls_token"), "missing \\['cls_token'\\]"),
    (lambda h: h["cls_token"].update(shape="big"), "malformed"),
])
def test_safetensors_headers_are_checked_against_the_config(saved, edit, message):
    _rewrite_header(saved / "model.safetensors", edit)
    with pytest.raises(ConfigError, match=message):
        M3AE.from_pretrained(saved)


def test_a_safetensors_header_length_past_the_file_is_refused(saved):
    path = saved / "model.safetensors"
    path.write_bytes(struct.pack("<Q", 2**40) + path.read_bytes()[8:])
    with pytest.raises(ConfigError, match="does not fit in the file"):
        M3AE.from_pretrained(saved)


class Payload:  # a pickled object of a non-allowlisted class: weights_only refuses it
    def __reduce__(self):
        return (os.getcwd, ())


def test_train_state_is_loaded_without_unpickling_objects(tmp_path):
    torch.save({"step": 1, "evil": Payload()}, tmp_path / "train_state.pt")
    with pytest.raises(Exception, match="[Ww]eights only load failed|Unsupported global"):
        load_train_state(tmp_path)


@pytest.mark.parametrize("override, message", [
    ("model.image_loss_weight=-1", "image_loss_weight must be >= 0"),
    ("model.depth=-1", "depth must be >= 1"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be >= 0"),
    ("optim.warmup_steps=-5", "optim.warmup_steps must be >= 0"),
    ("optim.clip_grad=0", "optim.clip_grad must be > 0, or null"),
    ("optim.clip_grad=-1", "optim.clip_grad must be > 0, or null"),
    ("model.text_loss_weight=nan", "text_loss_weight must be a finite float"),
    ("optim.lr=-1e-3", "optim.lr must be > 0"),
    ("optim.beta2=1.0", "optim.beta2 must be in \\[0, 1\\)"),
    ("keep_last=-1", "keep_last must be >= 0"),
    ("data.crop_scale_min=0", "data.crop_scale_min"),
    ("data.max_bad_fraction=2", "data.max_bad_fraction must be in \\[0, 1\\]"),
    ("data.num_workers=-1", "data.num_workers must be >= 0"),
    ("data.caption_drop=1.5", "data.caption_drop must be in \\[0, 1\\]"),
])
def test_every_setting_is_checked_against_its_range(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)
    assert tiny_config("optim.clip_grad=null").optim.clip_grad is None  # clipping off, explicitly


def test_resume_reports_changed_settings_and_refuses_inexact_ones(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="m3ae")  # the library logs; no CLI handler here
    pretrain(tiny_config("steps=4"), tmp_path, stop_at_step=2)
    with pytest.raises(ConfigError, match="batch_size: 8 -> 16 \\(not exact\\).*--allow-changes"):
        pretrain(tiny_config("steps=4", "batch_size=16"), tmp_path, resume="auto")
    # Logging and speed settings may change freely; they are still reported.
    pretrain(tiny_config("steps=4", "log_every=2"), tmp_path, resume="auto", stop_at_step=3)
    assert "changed since the checkpoint: log_every: 1 -> 2" in caplog.text
    caplog.clear()  # the next resume's report only
    result = pretrain(tiny_config("steps=4", "optim.lr=1e-2", "log_every=2"), tmp_path, resume="auto",
                      allow_changes=True)
    assert result.step == 4 and "optim.lr: 0.002 -> 0.01 (not exact)" in caplog.text


# -- bounded resources -------------------------------------------------------------------------------
def test_only_regular_files_are_read_as_images(tmp_path):
    fifo = tmp_path / "fifo.jpg"
    os.mkfifo(fifo)  # opening it would block forever
    (tmp_path / "dir.jpg").mkdir()
    loop = tmp_path / "loop.jpg"
    os.symlink(loop, loop)
    cases = {str(fifo): "not_a_file", "/dev/zero": "not_a_file", str(tmp_path / "dir.jpg"): "not_a_file",
             str(loop): "missing_image", "a\0b.jpg": "missing_image", str(tmp_path / "none.jpg"): "missing_image"}
    for path, reason in cases.items():
        with pytest.raises(BadSample) as err:
            read_image_file(path)
        assert err.value.reason == reason, path
    big = tmp_path / "big.jpg"
    big.write_bytes(jpeg_bytes())
    with pytest.raises(BadSample, match="too_large"):
        read_image_file(str(big), max_bytes=100)
    assert read_image_file(str(big)) == big.read_bytes()


def test_a_manifest_with_hostile_paths_trains_and_counts_them(tmp_path):
    manifest = write_manifest(tmp_path, n=12)
    os.mkfifo(tmp_path / "images" / "fifo.jpg")
    with open(manifest, "a") as f:
        f.write("fifo.jpg,a fifo\n/dev/zero,endless zeros\n/,a directory\n")
    config = tiny_config("steps=3", f"data.spec={manifest}", "model.vocab_size=256", "data.max_bad_fraction=1",
                         f"data.tokenizer={_tokenizer(tmp_path)}")
    result = pretrain(config, tmp_path / "run")
    assert result.step == 3 and result.history[-1]["bad_samples"] >= 1


def _tokenizer(tmp_path):
    from data_files import write_tokenizer
    return write_tokenizer(tmp_path)


def _add(tar, name, data):
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_tar_members_over_the_byte_budget_are_skipped_unread(tmp_path):
    path = str(tmp_path / "s.tar")
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.jpg", jpeg_bytes(seed=1))
        _add(tar, "a.txt", b"fine")
        _add(tar, "b.jpg", b"\0" * 50_000)  # over a 10 kB budget
        _add(tar, "b.txt", b"huge")
        _add(tar, "c.jpg", jpeg_bytes(seed=2))
    records = list(iter_tar(path, max_member_bytes=10_000))
    assert [(r.key.split("/")[1], r.missing) for r in records] == [("a", None), ("b", "too_large"), ("c", None)]
    assert records[2].image == jpeg_bytes(seed=2)


def test_a_gzip_bomb_stops_at_the_shard_budget(tmp_path):
    path = str(tmp_path / "bomb.tar.gz")
    with tarfile.open(path, "w:gz") as tar:
        _add(tar, "a.jpg", jpeg_bytes(seed=1))
        for i in range(20):
            _add(tar, f"z{i:02d}.jpg", b"\0" * 1_000_000)  # 20 MB of zeros, ~20 kB compressed
    assert os.path.getsize(path) < 200_000
    records = list(iter_tar(path, max_member_bytes=2_000_000, max_shard_bytes=3_000_000))
    assert records[0].missing is None and records[-1].missing == "too_large" and len(records) <= 4


@pytest.mark.parametrize("header", [b"A" * 512, bytes(512)], ids=["garbage", "zeroed"])
@pytest.mark.parametrize("gz", [False, True])
def test_a_corrupt_header_mid_shard_is_a_counted_truncated_shard(tmp_path, header, gz):
    import gzip

    plain = write_img2dataset_tar(str(tmp_path / "whole.tar"), n=10)
    with tarfile.open(plain) as tar:
        offset = tar.getmember("000000005.jpg").offset
    data = bytearray(open(plain, "rb").read())
    data[offset:offset + 512] = header  # tarfile alone would take this for the end of the archive
    path = tmp_path / ("s.tar.gz" if gz else "s.tar")
    path.write_bytes(gzip.compress(bytes(data)) if gz else bytes(data))
    records = list(iter_tar(str(path)))
    assert [r.missing for r in records] == [None] * 4 + ["truncated_tar"]
    assert records[-1].key.startswith(f"{path.name}/000000004 (") and "byte" in records[-1].key
    assert all(r.missing is None for r in iter_tar(plain))  # a whole shard, end padding and all


def _extended_header(kind, size):
    info = tarfile.TarInfo("././@LongLink")
    info.type, info.size = kind, size
    return info.tobuf(tarfile.GNU_FORMAT)


@pytest.mark.parametrize("kind", [tarfile.GNUTYPE_LONGNAME, tarfile.XHDTYPE])
def test_extended_tar_headers_are_bounded(tmp_path, kind):
    import gzip
    import resource

    # Was: tarfile read a pax / GNU long-name header whole (a .tar.gz of 0.5 MB holding one 512 MiB "name"
    # took over 1 GB), and each one reads the next recursively (a chain: RecursionError, the run died).
    bomb = tmp_path / "bomb.tar.gz"
    with gzip.open(bomb, "wb", compresslevel=1) as g:
        g.write(_extended_header(kind, 1 << 29))
        for _ in range(1 << 9):
            g.write(bytes(1 << 20))
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    (record,) = iter_tar(str(bomb))
    assert record.missing == "truncated_tar" and "extended header of 536870912 bytes" in record.key
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before < 200_000  # kB
    chain = tmp_path / "chain.tar"
    with open(chain, "wb") as f:
        entry = b"12 comment=\n" if kind == tarfile.XHDTYPE else b"a.jpg\0"
        f.write((_extended_header(kind, len(entry)) + entry.ljust(512, b"\0")) * 3000)
        with tarfile.open(fileobj=f, mode="w") as tar:
            _add(tar, "b.jpg", jpeg_bytes())
    (record,) = iter_tar(str(chain))
    assert record.missing == "truncated_tar" and "extended headers in a row" in record.key
    fine = tmp_path / "long.tar"  # a real long name still reads
    with tarfile.open(fine, "w", format=tarfile.PAX_FORMAT) as tar:
        _add(tar, "d" * 300 + "/ü.jpg", jpeg_bytes())
    (record,) = iter_tar(str(fine))
    assert record.missing is None and record.key.endswith("d" * 300 + "/ü")


def test_deeply_nested_json_in_a_shard_is_no_metadata(tmp_path):
    # Was: json.loads' RecursionError escaped iter_tar and ended the run.
    path = str(tmp_path / "s.tar")
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.jpg", jpeg_bytes())
        _add(tar, "a.json", b"[" * 100_000 + b"]" * 100_000)
        _add(tar, "a.txt", b"a caption")
    (record,) = iter_tar(path)
    assert record.missing is None and record.meta is None and record.caption == b"a caption"


def test_zero_padding_after_the_end_is_read_within_the_shard_budget(tmp_path):
    import gzip

    # Was: a gzip of gigabytes of zeros after the end-of-archive block was read to its end.
    plain = write_img2dataset_tar(str(tmp_path / "s.tar"), n=2)
    path = tmp_path / "s.tar.gz"
    path.write_bytes(gzip.compress(open(plain, "rb").read() + bytes(20_000_000)))
    assert [r.missing for r in iter_tar(str(path))] == [None, None]
    records = list(iter_tar(str(path), max_shard_bytes=1_000_000))
    assert records[-1].missing == "truncated_tar" and "padding" in records[-1].key


def test_a_shard_whose_members_fill_the_budget_keeps_its_last_group(tmp_path):
    # The budget counts member bytes, and the limit itself is allowed; the record padding every tar
    # writer adds after the end-of-archive block (10 KiB here) is no reason to lose the last group.
    path = str(tmp_path / "s.tar")
    with tarfile.open(path, "w") as tar:
        _add(tar, "a.jpg", b"x" * 1000)
        _add(tar, "b.jpg", b"y" * 1000)
    for budget in (2000, 2100):
        records = list(iter_tar(path, max_member_bytes=2000, max_shard_bytes=budget))
        assert [(r.key, r.missing) for r in records] == [("s.tar/a", None), ("s.tar/b", None)], budget


@pytest.mark.parametrize("content, why", [(b"", "empty file"), (b"not a tar\n" * 100, "not a tar archive")])
def test_an_empty_or_non_tar_shard_is_counted_with_its_path(tmp_path, content, why):
    path = tmp_path / "x-00000.tar"
    path.write_bytes(content)
    (record,) = iter_tar(str(path))
    assert record.missing == "truncated_tar" and record.key.startswith(str(path)) and why in record.key


def test_tar_budgets_come_from_the_data_settings(tmp_path):
    from m3ae.data.loader import source_uses

    write_img2dataset_tar(str(tmp_path / "s.tar"))
    config = tiny_config(f"data.spec=wds:{tmp_path / 's.tar'}", "data.max_member_bytes=1234",
                         "data.max_shard_bytes=99999")
    (use,) = source_uses(config.data, config.model)
    assert (use.source.max_member_bytes, use.source.max_shard_bytes) == (1234, 99999)


# -- one bad record is one counted sample -------------------------------------------------------------
def test_csv_rows_that_cannot_be_parsed_are_counted_and_the_rest_read(tmp_path):
    from m3ae.data.sources.manifest import ManifestSource

    write_manifest(tmp_path, n=6)
    lines = (tmp_path / "captions.csv").read_text().splitlines(keepends=True)
    long_row = "img001.jpg," + "word " * 200_000 + "\n"  # 1e6 characters: over the csv field limit
    open_quote = 'img002.jpg,"a quote never closed\n'
    extra_comma = "img003.jpg,a caption, cut at its comma\n"  # one field too many: not half a caption
    (tmp_path / "bad.csv").write_text("".join(lines[:2] + [long_row] + lines[2:3] + [open_quote] + lines[3:]
                                              + [extra_comma]))
    source = ManifestSource(str(tmp_path / "bad.csv"))
    records = [source.record(i) for i in range(len(source))]
    assert [r.missing for r in records] == [None, "bad_text", None, "bad_text", None, None, None, None, "bad_text"]
    assert "bad.csv:3: field larger" in records[1].key and "bad.csv:5: unexpected end of data" in records[3].key
    assert "bad.csv:10: 3 fields for 2 columns (an unquoted comma" in records[8].key
    assert [r.key for r in records if not r.missing] == [f"img{i:03d}.jpg" for i in range(6)]


def test_hdf5_short_caption_lists_and_integer_captions_are_counted(tmp_path):
    import h5py
    import numpy as np

    from m3ae.data.sources.hdf5 import HDF5Source

    path = tmp_path / "d.h5"
    with h5py.File(path, "w") as f:
        jpg = f.create_dataset("jpg", (4,), dtype=h5py.vlen_dtype(np.uint8))
        for i in range(4):
            jpg[i] = np.frombuffer(jpeg_bytes(seed=i), dtype=np.uint8)
        f.create_dataset("caption", data=np.array([b"one", b"two"], dtype=object), dtype=h5py.string_dtype())
    source = HDF5Source(str(path))
    assert [source.record(i).missing for i in range(4)] == [None, None, "missing_caption", "missing_caption"]
    with h5py.File(tmp_path / "ints.h5", "w") as f:
        f.create_dataset("text", data=np.arange(3))
    source = HDF5Source(str(tmp_path / "ints.h5"))
    assert [source.record(i).missing for i in range(3)] == ["bad_text"] * 3
    cut = tmp_path / "cut.h5"  # a truncated download: an error naming the file
    cut.write_bytes(path.read_bytes()[:1000])
    with pytest.raises(ValueError, match=f"{cut}: not a readable HDF5 file"):
        HDF5Source(str(cut))


def test_hdf5_table_bad_rows_are_counted_and_bad_fields_named(tmp_path, capsys):
    h5py = pytest.importorskip("h5py")
    import numpy as np

    from data_files import write_hdf5_table
    from m3ae.cli import main
    from m3ae.data.sources import build_source
    from m3ae.data.spec import parse_item

    path = write_hdf5_table(tmp_path / "t.h5", n=8, table="rows", chunks=(2,))
    with h5py.File(path, "r+") as f:
        rows = f["rows"]
        row = rows[1]
        row["jpg"], row["title"] = np.zeros(0, np.uint8), ""  # an empty image, an empty caption
        rows[1] = row
        f.create_dataset("plain", data=np.arange(3))
        blobs = np.empty(2, dtype=[("text", h5py.vlen_dtype(np.uint8))])  # captions as bytes
        blobs[0], blobs[1] = (np.frombuffer(b"\xff\xfe not UTF-8", np.uint8),), (np.frombuffer(b"ok", np.uint8),)
        f.create_dataset("blobs", data=blobs)
        chunk = rows.id.get_chunk_info_by_coord((4,))  # rows 4-5, gzip: garbage makes them unreadable
    with open(path, "r+b") as raw:
        raw.seek(chunk.byte_offset)
        raw.write(b"\xff" * chunk.size)
    source = build_source(parse_item(f"{path}#table=rows#caption=title"))
    got = [source.record(i) for i in range(8)]
    assert [r.missing for r in got] == [None] * 4 + ["bad_table"] * 2 + [None] * 2
    assert got[4].key.startswith("rows[4] (") and got[7].image == jpeg_bytes(seed=7)
    assert main(["data", "stats", f"{path}#table=rows#caption=title"]) == 0  # counted, the run goes on
    out = capsys.readouterr().out
    assert "samples: 5" in out and "bad_table: 2" in out and "empty: 1" in out
    bad_text = build_source(parse_item(f"text={path}#table=blobs"))
    assert bad_text.provides == {"text"} and bad_text.record(0).caption.startswith(b"\xff")
    assert main(["data", "stats", f"text={path}#table=blobs"]) == 0
    assert "bad_text: 1" in capsys.readouterr().out

    # Tables and fields that cannot be read are refused up front, naming the file and the field.
    for options, message in (
            ("#table=nope", "'nope' is no such dataset.*tables here: \\['blobs', 'rows'\\]"),
            ("#table=plain", "'plain' is not a table \\(dtype int64\\)"),
            ("#table=rows#image=pix#caption=title", "image field 'pix' is .*raw pixel arrays are not read"),
            ("#table=rows#caption=score", "caption field 'score' is float32, not text"),
            ("#table=rows#caption=title#label=file", "label field 'file' is \\|S32, not integers"),
            ("#table=rows#image=photo", "no field 'photo' \\(fields: \\['jpg', 'blob', 'file', 'title'"),
            ("#table=blobs", "no image field; name one with #image=FIELD"),
            ("#table=rows#split=val", "#split= is for the authors' layout"),
            ("#image=rows", "'rows' is a table .*read it with #table=rows"),
            ("", "#image=NAME.*or read a table with #table=NAME \\(tables here: \\['blobs', 'rows'\\]\\)")):
        with pytest.raises(ValueError, match=message) as err:
            build_source(parse_item(path + options))
        assert path in str(err.value)


# -- feature files (m3ae embed's output, read by knn / probe) -----------------------------------------
def _features_npz(path, **arrays):
    import numpy as np

    base = dict(features=np.random.default_rng(0).normal(size=(6, 4)).astype("float32"),
                labels=np.arange(6) % 2)
    np.savez(path, **{**base, **arrays})
    return str(path)


@pytest.mark.parametrize("arrays, message", [
    (dict(features=None), "Object arrays cannot be loaded when allow_pickle=False"),
    (dict(labels=None), "Object arrays cannot be loaded"),
    (dict(features="zeros(6)"), "'features' must be a real \\(N, D\\) array.*\\(6,\\)"),
    (dict(features="zeros((6, 0))"), "'features' must be a real \\(N, D\\) array"),
    (dict(features="full((6, 4), 'x')"), "'features' must be a real.*<U1"),
    (dict(features="zeros((6, 4), complex)"), "'features' must be a real.*complex"),
    (dict(features="full((6, 4), nan)"), "6 of 6 feature rows hold NaN or inf"),
    (dict(labels="arange(2)"), "'labels' must be \\(N,\\) = \\(6,\\)"),
    (dict(labels="full(6, 0.5)"), "'labels' must be integer class indices, got float64"),
    (dict(labels="full(6, 'cat')"), "'labels' must be integer class indices"),
    (dict(labels="full(6, 10**12)"), "labels must be class indices in \\[-1, 1048575\\]"),  # a memory bomb
    (dict(labels="full(6, 2**63 + 5, uint64)"), "labels must be class indices"),  # not -9223372036854775803
    (dict(keys="array(['a'])"), "'keys' must be 6 strings, one a row, got 1"),
    (dict(keys="zeros(6)"), "'keys' must be a 1-D string array, got float64"),
])
def test_a_hostile_feature_file_is_refused_naming_it(tmp_path, arrays, message):
    # Was: object arrays, text and missing arrays failed with torch or numpy errors not naming the file;
    # NaN features and 0.5 labels scored silently; a label of 10^12 allocated 80 TB for the kNN scores.
    import numpy as np

    from m3ae.eval.features import load_features

    values = {k: np.array([object()] * 6, dtype=object) if v is None else eval(v, vars(np)) for k, v in arrays.items()}
    path = _features_npz(tmp_path / "f.npz", **values)
    with pytest.raises(ValueError, match=message) as err:
        load_features(path)
    assert path in str(err.value)


def test_feature_files_missing_arrays_or_corrupt_name_the_file(tmp_path, capsys):
    import numpy as np
    from safetensors.numpy import save_file

    from m3ae.cli import main
    from m3ae.eval.features import load_features

    np.savez(tmp_path / "nolabels.npz", features=np.zeros((3, 2), "float32"))
    (tmp_path / "cut.npz").write_bytes(b"PK\3\4 not a whole zip")
    save_file({"features": np.zeros((3, 2), "float32")}, tmp_path / "nolabels.safetensors")
    save_file({"features": np.zeros((3, 2), "float32"), "labels": np.zeros(3, "int64")}, tmp_path / "keys.safetensors",
              metadata={"keys": "{not json"})
    for name, message in (("nolabels.npz", "no 'labels' array"), ("cut.npz", "not a readable feature file"),
                          ("nolabels.safetensors", "no 'labels' tensor"), ("keys.safetensors", "JSONDecodeError")):
        with pytest.raises(ValueError, match=message) as err:
            load_features(tmp_path / name)
        assert str(tmp_path / name) in str(err.value)
    good = _features_npz(tmp_path / "good.npz")
    assert main(["knn", "--checkpoint", "unused", "--train", str(tmp_path / "nolabels.safetensors"),
                 "--val", good, "--device", "cpu", "--quiet"]) == 2  # an error line, no traceback
    assert "nolabels.safetensors: not a readable feature file" in capsys.readouterr().err
    feats, labels, keys = load_features(good)
    assert feats.dtype == torch.float32 and labels.tolist() == [0, 1] * 3 and keys == [str(i) for i in range(6)]


# -- preprocessor_config.json ---------------------------------------------------------------------------
@pytest.mark.parametrize("changes, message", [
    ({"image_size": 10**9}, "image_size must be an integer in 1..8192"),  # was: resize to 10^9 px (3 EB)
    ({"image_size": 32.5}, "image_size must be an integer"),  # was: a torch TypeError per image
    ({"mean": [float("nan")] * 3}, "3 means and 3 positive stds, all finite"),  # was: NaN features, silently
    ({"std": [float("inf")] * 3}, "all finite"),  # was: all-zero inputs
    ({"pad_value": 3.7, "square": "pad"}, "pad_value a grey level"),
])
def test_preprocessor_config_values_are_checked(saved, changes, message):
    import m3ae
    from m3ae.preprocessing import PREPROCESSOR_NAME

    path = saved / PREPROCESSOR_NAME
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))
    with pytest.raises(ValueError, match=message) as err:
        m3ae.load(saved)
    assert str(path) in str(err.value)


@pytest.mark.parametrize("content", [b"[" * 100_000 + b"]" * 100_000, b"\xff\xfe{}"], ids=["nested", "not-utf8"])
def test_an_unparseable_preprocessor_config_is_a_config_error(saved, content):
    # Was: a RecursionError / UnicodeDecodeError not naming the file.
    import m3ae
    from m3ae.preprocessing import PREPROCESSOR_NAME

    (saved / PREPROCESSOR_NAME).write_bytes(content)
    with pytest.raises(ConfigError, match=f"{saved / PREPROCESSOR_NAME} is not valid JSON"):
        m3ae.load(saved)


def test_a_tokenizer_with_sparse_ids_past_the_vocab_is_refused(tmp_path, saved):
    # Was: 4 tokens passed the vocab_size check, and "dog" (id 10^9) failed the embedding lookup
    # mid-run with "IndexError: index out of range in self".
    from tokenizers import Tokenizer, models, pre_tokenizers

    import m3ae
    from m3ae.data.tokenizer import load_tokenizer

    tok = Tokenizer(models.WordLevel({"[PAD]": 0, "[UNK]": 1, "cat": 2, "dog": 10**9}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(saved / "tokenizer.json"))
    with pytest.raises(ValueError, match="has 4 tokens but the model.s vocab_size is 40 \\(its ids reach 10{9}\\)"):
        m3ae.load(saved)
    with pytest.raises(ValueError, match="its ids reach 1000000000"):
        load_tokenizer(saved / "tokenizer.json", vocab_size=40)
    assert load_tokenizer(saved / "tokenizer.json", vocab_size=10**9 + 1).encode("dog").ids == [10**9]


def test_labels_that_are_no_class_index_are_counted_or_refused(tmp_path):
    # Was: a .cls of 10^12 made knn / probe allocate 10^12 classes (24 TB), "-7" an IndexError in the
    # probe and 40 nines an OverflowError; each is now one counted bad sample of the shard.
    from m3ae.eval.labelled import labelled_dataset

    path = tmp_path / "s.tar"
    with tarfile.open(path, "w") as tar:
        for i, cls in enumerate(["0", str(10**12), "-7", "9" * 40, "1"]):
            _add(tar, f"{i:03d}.jpg", jpeg_bytes(seed=i))
            _add(tar, f"{i:03d}.cls", cls.encode())
    (record,) = [r for r in iter_tar(str(path)) if r.key.endswith("/001")]
    assert record.label is None and "is not a class index" in record.bad_label
    ds = labelled_dataset(f"wds:{path}", "train", 32)
    assert ds.labels == [0, 1] and ds.num_classes == 2 and ds.skipped == 3
    # Other sources (manifest label columns, HDF5, tables): an error naming the item.
    (tmp_path / "images").mkdir()
    (tmp_path / "images" / "a.jpg").write_bytes(jpeg_bytes())
    (tmp_path / "m.csv").write_text(f"image,caption,label\na.jpg,a photo,{10**12}\n")
    with pytest.raises(ValueError, match="item a.jpg has label 1000000000000, not a class index"):
        labelled_dataset(f"{tmp_path / 'm.csv'}#root={tmp_path / 'images'}", "train", 32)


# -- YAML settings files ---------------------------------------------------------------------------------
def test_settings_files_may_not_call_resolvers(tmp_path, saved, monkeypatch):
    # Was: `${oc.env:HF_TOKEN}` in a downloaded preset, study or checkpoint's run_config.yaml read the
    # token into the settings: into run_config.yaml and the model card, or sent to the hub as a
    # tokenizer name by m3ae.load.
    import warnings

    import m3ae
    from m3ae.study.spec import load_study
    from m3ae.train.config import load_config

    monkeypatch.setenv("SECRET_TOKEN", "hf_secret")
    evil = "${oc.env:SECRET_TOKEN}"
    (tmp_path / "p.yaml").write_text(f"steps: 2\ndata:\n  tokenizer: '{evil}'\n")
    with pytest.raises(ConfigError, match="p.yaml: data.tokenizer: .* calls an OmegaConf resolver"):
        load_config(str(tmp_path / "p.yaml"))
    (tmp_path / "s.yaml").write_text(f"arms:\n  a:\n    settings: ['data.spec={evil}']\n")
    with pytest.raises(ConfigError, match="s.yaml: arms.a.settings\\[0\\]: .* calls an OmegaConf resolver"):
        load_study(tmp_path / "s.yaml")
    (saved / "preprocessor_config.json").unlink()  # an older checkpoint: its run_config.yaml is read
    (saved / "run_config.yaml").write_text(f"data:\n  normalization: imagenet\n  tokenizer: '{evil}'\n")
    with warnings.catch_warnings(), pytest.raises(ConfigError, match="run_config.yaml: data.tokenizer"):
        warnings.simplefilter("ignore")
        m3ae.load(saved)
    (tmp_path / "ok.yaml").write_text("steps: 7\nlog_every: ${steps}\n")  # a reference: harmless
    assert load_config(str(tmp_path / "ok.yaml")).log_every == 7
    (tmp_path / "tag.yaml").write_text("steps: !!python/object/apply:os.getcwd []\n")
    with pytest.raises(ConfigError, match="tag.yaml is not valid YAML: could not determine a constructor"):
        load_config(str(tmp_path / "tag.yaml"))


# -- checkpoint folders --------------------------------------------------------------------------------------
def test_push_refuses_files_linked_from_outside_the_folder(tmp_path, saved):
    # Was: README.md -> a private file elsewhere was uploaded to the Hub as the model card. Checked
    # before the Hub is contacted (api=None would otherwise build a real HfApi).
    from m3ae.hub import push_to_hub

    secret = tmp_path / "id_rsa"
    secret.write_text("PRIVATE KEY")
    (saved / "README.md").symlink_to(secret)
    with pytest.raises(ValueError, match="README.md is a link to .*id_rsa, outside the checkpoint folder"):
        push_to_hub(saved, "someone/x", api=object())
    # A Hugging Face cache snapshot links its files into the repository's blobs/: allowed.
    repo = tmp_path / "models--someone--x"
    (repo / "blobs").mkdir(parents=True)
    (repo / "snapshots").mkdir()
    snap = repo / "snapshots" / "abc"
    snap.mkdir()
    for name in ("config.json", "model.safetensors"):
        (saved / name).rename(repo / "blobs" / name)
        (snap / name).symlink_to(f"../../blobs/{name}")
    from m3ae.hub import _refuse_outside_links

    _refuse_outside_links(snap)


def _npy_declaring(shape: tuple[int, ...], data: bytes = b"\0" * 64) -> bytes:
    import numpy as np

    buf = io.BytesIO()
    np.lib.format.write_array_header_1_0(buf, {"descr": "<f4", "fortran_order": False, "shape": shape})
    return buf.getvalue() + data


def test_numpy_headers_are_checked_before_numpy_allocates(tmp_path):
    # Was: numpy allocated what a header declared (here 16 TB) before reading: a MemoryError or the
    # machine's memory, from a 200-byte download. Feature files (knn, probe, tsne) and JAX checkpoints.
    import zipfile

    import numpy as np

    from m3ae.eval.features import load_features
    from m3ae.interop.jax_checkpoint import load_jax_checkpoint
    from m3ae.numpy_files import check_numpy_file
    from m3ae.viz.tsne import load_features as load_tsne_features

    lying = _npy_declaring((10**12, 4))
    npz = tmp_path / "lie.npz"
    with zipfile.ZipFile(npz, "w") as z:
        z.writestr("features.npy", lying)
        z.writestr("labels.npy", lying)
    (tmp_path / "lie.npy").write_bytes(lying)
    message = r"features.npy: its header declares \(1000000000000, 4\) float32 \(16,000,000,000,000 bytes\)"
    for load in (load_features, load_tsne_features, load_jax_checkpoint):
        with pytest.raises(ValueError, match=message):
            load(npz)
    with pytest.raises(ValueError, match=r"lie.npy: its header declares .* the file holds 64"):
        load_features(tmp_path / "lie.npy")
    # A compressed array whose true size exceeds the machine's memory (a zip bomb: zeros compress
    # 1000:1) is refused by its size; the same file passes where memory allows.
    bomb = tmp_path / "bomb.npz"
    np.savez_compressed(bomb, features=np.zeros((1000, 1000), np.float32))
    assert bomb.stat().st_size < 20_000
    check_numpy_file(bomb)
    with pytest.raises(ValueError, match=r"features.npy: \(1000, 1000\) float32 would take .* more than this "
                                         r"machine's memory"):
        check_numpy_file(bomb, memory_bytes=1 << 20)
    (tmp_path / "junk.npy").write_bytes(b"not numpy at all")
    with pytest.raises(ValueError, match="junk.npy: not a numpy array"):
        load_features(tmp_path / "junk.npy")


@pytest.mark.parametrize("name, content, message", [
    ("state.json", "[]", "'_data_files' must be a list"),
    ("state.json", '{"_data_files": [1]}', "holds 1, not a plain name"),
    ("state.json", '{"_data_files": [{"filename": "/dev/zero"}]}', "holds '/dev/zero', not a plain name"),
    ("state.json", '{"_data_files": [{"filename": "../other/data.arrow"}]}', "holds '../other/data.arrow'"),
    ("state.json", "[" * 100_000, "not a JSON listing \\(RecursionError"),
    ("dataset_dict.json", '{"splits": ["../../etc"]}', "holds '../../etc', not a plain name"),
    ("dataset_dict.json", '{"splits": [{"a": 1}]}', "not a plain name"),
    ("dataset_dict.json", '{"splits": "train"}', "'splits' must be a list"),  # was: splits t, r, a, i, n
])
def test_hf_listings_are_checked_and_point_inside_the_folder(tmp_path, name, content, message):
    # Was: AttributeError / TypeError / RecursionError tracebacks, and data files or splits
    # named by state.json / dataset_dict.json read from anywhere (/dev/zero, ../other).
    from m3ae.data.sources.hf import open_hf

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / name).write_text(content)
    with pytest.raises(ValueError, match=message) as err:
        open_hf(str(tmp_path / "d"))
    assert str(err.value).startswith(str(tmp_path / "d" / name))


def test_a_deeply_nested_jsonl_row_is_an_error_naming_its_line(tmp_path):
    from m3ae.data.sources.manifest import read_rows

    path = tmp_path / "m.jsonl"
    path.write_text('{"image": "a.jpg", "caption": "fine"}\n{"caption": ' + "[" * 100_000 + "}\n")
    with pytest.raises(ValueError, match=f"^{path}:2: JSON nested too deeply"):
        read_rows(str(path))
