import io
import logging
import os
import tarfile
from collections import Counter

import pytest
import torch

from data_files import (jpeg_bytes, write_class_folder, write_img2dataset_tar, write_manifest, write_text,
                        write_tokenizer)
from m3ae.config import M3AEConfig
from m3ae.data.bad import BadCounter, DataQualityError
from m3ae.data.config import DataConfig
from m3ae.data.loader import build_train_data
from m3ae.data.pipeline import SlotSchedule

MODEL = M3AEConfig.from_preset("nano", image_size=32, patch_size=16, vocab_size=300, text_length=16)


def take(td, n):
    out = []
    for b in td.batches:
        out.append(b)
        if len(out) == n:
            return out
    return out


def keys(batch):
    return sorted(k for p in batch.parts for k in p.keys)


def cfg(spec, tmp_path, **kw):
    return DataConfig(spec=spec, tokenizer=write_tokenizer(tmp_path), num_workers=kw.pop("num_workers", 0), **kw)


def test_slot_schedule_exact_proportions():
    sched = SlotSchedule([0.7, 0.2, 0.1], seed=3)
    picks = [sched(p) for p in range(3000)]
    counts = Counter(s for s, _ in picks)
    assert counts == {0: 2100, 1: 600, 2: 300}
    for s in range(3):  # each source's positions count up 0, 1, 2, ... without gaps
        assert [k for t, k in picks if t == s] == list(range(counts[s]))


def test_mixture_and_caption_drop(tmp_path):
    manifest = write_manifest(tmp_path, n=20)
    corpus = write_text(tmp_path)
    data = cfg(f"paired={manifest},text={corpus}@0.25", tmp_path, caption_drop=0.5)
    kinds = Counter()
    for b in take(build_train_data(data, MODEL, seed=0, micro_batch=16), 25):
        for p in b.parts:
            kinds[(p.image is not None, p.text is not None)] += p.size
    total = sum(kinds.values())
    assert abs(kinds[(False, True)] / total - 0.2) < 0.03  # 0.25 / 1.25
    pairs, image_only = kinds[(True, True)], kinds[(True, False)]
    assert abs(image_only / (pairs + image_only) - 0.5) < 0.07
    # paired= promises images and captions: a text corpus named so is refused, not trained text-only.
    with pytest.raises(ValueError, match="named paired= but provides \\['text'\\]"):
        build_train_data(cfg(f"paired={corpus}", tmp_path), MODEL, seed=0, micro_batch=4)


def test_indexed_resume_is_exact_and_ranks_disjoint(tmp_path):
    manifest = write_manifest(tmp_path, n=40)
    data = cfg(manifest, tmp_path, num_workers=2)
    full = take(build_train_data(data, MODEL, seed=1, micro_batch=4), 6)
    resumed = take(build_train_data(data, MODEL, seed=1, micro_batch=4, start_micro_batch=3), 3)
    for a, b in zip(full[3:], resumed):
        assert a.step == b.step and keys(a) == keys(b)
        assert all(torch.equal(x.image, y.image) for x, y in zip(a.parts, b.parts))
    r0 = take(build_train_data(data, MODEL, seed=1, micro_batch=4, rank=0, world_size=2), 5)
    r1 = take(build_train_data(data, MODEL, seed=1, micro_batch=4, rank=1, world_size=2), 5)
    seen0 = [k for b in r0 for k in keys(b)]
    seen1 = [k for b in r1 for k in keys(b)]
    assert len(set(seen0) | set(seen1)) == 40 and not set(seen0) & set(seen1)  # one epoch, disjoint


def shards(tmp_path, counts):
    d = tmp_path / "shards"
    os.makedirs(d, exist_ok=True)
    start = 0
    for i, n in enumerate(counts):
        write_img2dataset_tar(str(d / f"s-{i:03d}.tar"), n=n, start=start)
        start += n
    return f"wds:{d}/s-{{000..{len(counts) - 1:03d}}}.tar"


def test_stream_shares_disjoint_and_equal_batch_counts(tmp_path):
    spec = shards(tmp_path, [5, 7, 3, 6, 4])  # uneven shards, 5 shards over 4 shares
    data = cfg(spec, tmp_path, num_workers=2)
    per_rank = []
    for rank in range(2):
        td = build_train_data(data, MODEL, seed=0, micro_batch=3, rank=rank, world_size=2)
        batches = take(td, 12)  # endless: every rank yields as many batches as asked
        assert len(batches) == 12 and [b.step for b in batches] == list(range(12))
        per_rank.append(batches)
    for rank, batches in enumerate(per_rank):  # share ids: rank * workers + worker
        assert {g // 2 for b in batches for g in b.stream.shares} == {rank}
        assert all(len(b.stream.shares) == 1 and b.stream.parts == 4 for b in batches)
    # Disjointness, checked directly on the share iterators for one epoch:
    from m3ae.data.sources import build_source
    from m3ae.data.spec import parse_spec

    src = build_source(parse_spec(spec)[0])
    got = [[r.key for _, r in src.iterate(p, 4, seed=0, epochs=1)] for p in range(4)]
    flat = [k for g in got for k in g]
    assert len(flat) == len(set(flat)) == 25


@pytest.mark.parametrize("stream", [False, True])
def test_worker_batches_carry_the_workers_cpu_time(tmp_path, stream):
    """What the trainer's thread policy weighs (m3ae.threads): the CPU seconds the worker process
    spent since its previous batch; none for batches made in the training process itself."""
    spec = shards(tmp_path, [6, 6]) if stream else write_manifest(tmp_path, n=12)
    for workers in (0, 1):
        batches = take(build_train_data(cfg(spec, tmp_path, num_workers=workers), MODEL, seed=0, micro_batch=3), 4)
        spent = [b.loader_cpu_s for b in batches]
        if workers == 0:
            assert spent == [None] * 4
        else:
            assert all(isinstance(s, float) and 0 < s < 60 for s in spent)


def test_stream_resume_continues_from_saved_position(tmp_path):
    spec = shards(tmp_path, [6, 6, 6, 6])
    data = cfg(spec, tmp_path, num_workers=2)
    td = build_train_data(data, MODEL, seed=0, micro_batch=4)
    first = take(td, 4)
    state = td.state(4)
    assert state["exact"] is False and state["stream"]["parts"] == 2
    full = take(build_train_data(data, MODEL, seed=0, micro_batch=4), 8)
    resumed = take(build_train_data(data, MODEL, seed=0, micro_batch=4, start_micro_batch=4, resume_state=state), 4)
    assert [b.step for b in resumed] == [4, 5, 6, 7]
    assert [keys(b) for b in resumed] == [keys(b) for b in full[4:]]
    assert [keys(b) for b in first] == [keys(b) for b in full[:4]]
    # A different worker count still resumes (shard level), without repeating from the start.
    other = DataConfig(**{**data.__dict__, "num_workers": 1})
    again = take(build_train_data(other, MODEL, seed=0, micro_batch=4, start_micro_batch=4, resume_state=state), 2)
    assert len(again) == 2


def test_a_jsonl_caption_that_is_not_a_string_is_a_counted_bad_text(tmp_path, capsys):
    import json

    from m3ae.cli import main

    manifest = write_manifest(tmp_path, n=6, name="m.jsonl")
    with open(manifest, "a") as f:
        for cap in (123, ["a", "list"], {"an": "object"}):
            f.write(json.dumps({"image": "images/img000.jpg", "caption": cap}) + "\n")
    td = build_train_data(cfg(manifest, tmp_path, max_bad_fraction=1.0), MODEL, seed=0, micro_batch=4)
    take(td, 6)  # was: 'int' object has no attribute 'encode', in the worker
    assert set(td.stats()["bad"]) == {"bad_text"}
    assert main(["data", "stats", manifest]) == 0  # was the same crash
    assert "samples: 6   bad: 3" in capsys.readouterr().out


def test_every_bad_reason_counted_and_threshold(tmp_path):
    d = tmp_path / "bad"
    os.makedirs(d / "images")
    good = jpeg_bytes(40, 40)
    files = {"ok.jpg": good, "empty.jpg": b"", "junk.jpg": b"garbage", "half.jpg": good[: len(good) // 2],
             "huge.jpg": jpeg_bytes(400, 400)}
    for name, data in files.items():
        (d / "images" / name).write_bytes(data)
    rows = ["ok.jpg,a dog", "empty.jpg,a dog", "junk.jpg,a dog", "half.jpg,a dog", "huge.jpg,a dog",
            "gone.jpg,a dog", "ok.jpg,"]
    (d / "m.csv").write_bytes(("image,caption\n" + "\n".join(rows) + "\n").encode() + b"ok.jpg,\xff\xfe dog\n")
    # A text corpus line that is not UTF-8, and a shard cut in the middle of a member.
    (d / "corpus.txt").write_bytes(b"fine text\n\xff\xfe broken\n")
    tar = write_img2dataset_tar(str(d / "t.tar"), n=3)
    raw = open(tar, "rb").read()
    open(tar, "wb").write(raw[: 512 * 3 + 100])
    spec = f"{d}/m.csv,text={d}/corpus.txt@0.3,wds:{d}/t.tar@0.3"
    data = cfg(spec, tmp_path, max_bad_fraction=1.0, max_image_pixels=100_000)
    td = build_train_data(data, MODEL, seed=0, micro_batch=8)
    take(td, 10)
    reasons = set(td.stats()["bad"])
    assert reasons >= {"empty", "undecodable", "truncated", "too_large", "missing_image", "bad_text", "truncated_tar"}
    assert td.stats()["bad_keys"]
    for spec_caption in (f"{d}/m.csv",):
        data = cfg(spec_caption, tmp_path, max_bad_fraction=0.2, bad_min_samples=10, max_image_pixels=100_000)
        with pytest.raises(DataQualityError, match="max_bad_fraction"):
            take(build_train_data(data, MODEL, seed=0, micro_batch=8), 20)


def test_missing_caption_counted(tmp_path):
    d = tmp_path / "mc"
    os.makedirs(d)
    with tarfile.open(d / "x.tar", "w") as tar:
        import io
        for i in range(4):
            members = (("jpg", jpeg_bytes(seed=i)), ("txt", b"a dog")) if i % 2 == 0 else (("jpg", jpeg_bytes()),)
            for ext, data in members:
                info = tarfile.TarInfo(f"k{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    td = build_train_data(cfg(f"wds:{d}/x.tar", tmp_path, max_bad_fraction=1.0), MODEL, seed=0, micro_batch=4)
    take(td, 2)
    assert td.stats()["bad"].get("missing_caption", 0) > 0


def test_missing_spec_path_is_an_error_before_training(tmp_path):
    with pytest.raises(FileNotFoundError):
        build_train_data(cfg(f"{tmp_path}/none.csv", tmp_path), MODEL, seed=0, micro_batch=4)
    with pytest.raises(FileNotFoundError):
        build_train_data(cfg(f"wds:{tmp_path}/none-*.tar", tmp_path), MODEL, seed=0, micro_batch=4)


@pytest.mark.parametrize("stream", [False, True])
def test_static_shapes_reach_the_loader(tmp_path, stream):
    from m3ae.masking import keep_count

    manifest = write_manifest(tmp_path, n=12)
    spec = f"wds:{write_img2dataset_tar(str(tmp_path / 's.tar'), n=12)}" if stream else manifest
    data = cfg(spec, tmp_path)
    texts = 0
    for b in take(build_train_data(data, MODEL, seed=0, micro_batch=4, static_shapes=True), 3):
        for p in b.parts:
            if p.text is not None:
                texts += p.size
                assert p.text.shape[1] == MODEL.text_length
                assert p.masks.text_keep == keep_count(MODEL.text_length, MODEL.text_mask_ratio)
    assert texts == 12


@pytest.fixture
def memory_bucket(tmp_path):
    """An fsspec in-memory 'bucket' standing in for s3:// / gs:// (same code path, no network)."""
    fsspec = pytest.importorskip("fsspec")
    fs = fsspec.filesystem("memory")
    root = f"/m3ae-test-{os.getpid()}-{tmp_path.name}"
    yield fs, root
    fs.rm(root, recursive=True)


def test_remote_shards_and_manifest_through_fsspec(tmp_path, memory_bucket):
    fs, root = memory_bucket
    for i in range(2):
        fs.put(write_img2dataset_tar(str(tmp_path / f"s-{i}.tar"), n=4, start=4 * i), f"{root}/shards/s-{i}.tar")
    manifest = write_manifest(tmp_path, n=5)  # captions.csv + images/ beside it
    fs.put(manifest, f"{root}/flickr/captions.csv")
    for name in os.listdir(tmp_path / "images"):
        fs.put(str(tmp_path / "images" / name), f"{root}/flickr/images/{name}")
    for spec, n in ((f"wds:memory://{root}/shards/s-{{0..1}}.tar", 8), (f"memory://{root}/flickr/captions.csv", 5)):
        td = build_train_data(cfg(spec, tmp_path), MODEL, seed=0, micro_batch=4)
        seen = {k for b in take(td, 4) for p in b.parts for k in p.keys}
        assert len(seen) == n  # every record read, images decoded (a missing one would be skipped)
        assert td.counter is None or td.counter.total_bad == 0


def test_stream_resume_at_an_odd_micro_batch_with_two_workers(tmp_path):
    """Micro-batch m comes from share m % workers: resuming at an odd m must not swap the shares."""
    spec = shards(tmp_path, [6, 6, 6, 6])
    data = cfg(spec, tmp_path, num_workers=2)
    full = take(build_train_data(data, MODEL, seed=0, micro_batch=4), 6)
    td = build_train_data(data, MODEL, seed=0, micro_batch=4)
    take(td, 3)
    resumed = take(build_train_data(data, MODEL, seed=0, micro_batch=4, start_micro_batch=3,
                                    resume_state=td.state(3)), 3)
    assert [b.step for b in resumed] == [3, 4, 5]
    assert [keys(b) for b in resumed] == [keys(b) for b in full[3:]]


def test_batches_are_pinned_only_for_a_gpu_run(tmp_path, monkeypatch):
    # Pinning a CPU run's batches only costs page-locked memory; a GPU run needs it to overlap copies.
    made = []
    real = torch.utils.data.DataLoader

    def recording_loader(*args, **kwargs):
        made.append(kwargs["pin_memory"])
        return real(*args, **{**kwargs, "pin_memory": False})  # CPU torch cannot pin

    monkeypatch.setattr(torch.utils.data, "DataLoader", recording_loader)
    data = cfg(write_manifest(tmp_path, n=8), tmp_path)
    for pin in (False, True):
        assert len(take(build_train_data(data, MODEL, seed=0, micro_batch=4, pin_memory=pin), 1)) == 1
    assert made == [False, True]


def test_training_images_travel_as_uint8_and_are_normalised_on_arrival(tmp_path):
    data = cfg(write_manifest(tmp_path, n=8), tmp_path, normalization="imagenet")
    part = take(build_train_data(data, MODEL, seed=3, micro_batch=4), 1)[0].parts[0]
    assert part.image.dtype == torch.uint8 and part.pixel_stats == "imagenet"
    image = part.model_inputs()["image"]
    assert image.dtype == torch.float32 and image.shape == (4, 3, 32, 32)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(3, 1, 1)
    torch.testing.assert_close(image, (part.image.float() / 255 - mean) / std)


def test_a_stream_of_only_bad_records_stops_instead_of_hanging(tmp_path, capsys):
    # Was: the worker never filled a batch, so the run's bad-fraction check never ran and it waited
    # forever. The worker now applies the same limit over its own share; the CLI prints one line.
    import io

    from m3ae.cli import main

    with tarfile.open(tmp_path / "allbad-00000.tar", "w") as tar:
        for i in range(10):
            for ext, data in (("jpg", b"\xff\xd8not a jpeg"), ("txt", b"a small red circle")):
                info = tarfile.TarInfo(f"z{i}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    args = ["pretrain", "--config", "demo", "--out", str(tmp_path / "run"),
            "--data", str(tmp_path / "allbad-00000.tar"), "--steps", "2",
            f"data.tokenizer={write_tokenizer(tmp_path)}", "model.vocab_size=256",
            "data.num_workers=1", "data.bad_min_samples=30", "progress=false"]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert "stopped: 30 of 30 samples were unusable" in err and "Traceback" not in err, err[-2000:]


def test_a_mixture_of_sources_naming_other_classes_is_said(tmp_path, caplog):
    from m3ae.data.loader import source_uses

    a = write_class_folder(tmp_path / "a", ["cat", "dog"])
    b = write_class_folder(tmp_path / "b", ["bird", "cat", "cow", "eel", "emu", "fox"])
    source_uses(DataConfig(spec=f"{a},{b}@0.5"), MODEL)  # label 0: cat in a, bird in b
    assert (f"folder:{a} and folder:{b} name different classes (only in the first: 'dog'; only in the second: "
            "'bird', 'cow', 'eel', 'emu' and 1 more)") in caplog.text
    (tmp_path / "lab.csv").write_text("image,label\na/cat/0.png,3\n")
    caplog.clear()
    source_uses(DataConfig(spec=f"{a},image={tmp_path}/lab.csv"), MODEL)
    assert f"folder:{a} names its classes ('cat', 'dog') but csv:{tmp_path}/lab.csv has integer labels" in caplog.text
    caplog.clear()
    same = write_class_folder(tmp_path / "same", ["cat", "dog"])
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "x.png").write_bytes(jpeg_bytes(fmt="PNG"))  # no class folders: no labels
    unlabelled = str(tmp_path / "flat")
    source_uses(DataConfig(spec=f"{a},{same},{unlabelled}"), MODEL)  # one label space indeed
    assert "label spaces" not in caplog.text


def test_bad_sample_lines_stay_capped_across_per_batch_takes(caplog):
    # Workers `take` (and reset) their counts every batch; the cap on logged lines must hold over
    # the whole run, not per batch, or a long run on data with bad samples logs without end.
    counter = BadCounter(max_logged=5)
    with caplog.at_level(logging.WARNING, logger="m3ae.data"):
        for batch in range(50):
            for i in range(3):
                counter.record_bad("empty", f"k{batch}-{i}", "empty caption")
            counter.take()
    lines = [r.getMessage() for r in caplog.records]
    assert sum(m.startswith("skipping bad sample") for m in lines) == 5
    assert lines[-1] == "further bad samples are counted, not logged"


def test_a_stream_with_many_bad_records_logs_a_bounded_number_of_them(tmp_path, caplog):
    path = str(tmp_path / "t.tar")
    with tarfile.open(path, "w") as tar:
        for i in range(120):  # every other record has an empty caption
            for ext, data in (("jpg", jpeg_bytes(seed=i)), ("txt", b"" if i % 2 else b"a dog runs")):
                info = tarfile.TarInfo(f"{i:09d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    td = build_train_data(cfg(f"wds:{path}", tmp_path, max_bad_fraction=0.9), MODEL, seed=0, micro_batch=4)
    with caplog.at_level(logging.WARNING, logger="m3ae.data"):
        take(td, 30)  # 120 good samples read, about as many bad ones skipped
    assert td.stats()["bad"]["empty"] >= 100
    assert sum(r.getMessage().startswith("skipping bad sample") for r in caplog.records) == 20


def test_a_streams_own_bad_data_count_continues_across_a_resume(tmp_path):
    # Was: the worker's count over its own share (which stops a share that yields nothing usable)
    # started again from zero at a resume: here 8 good then only bad records; uninterrupted it
    # stopped at 9 bad of 17, resumed after the good ones only at 10 of 10 (and with a larger
    # bad_min_samples much later than an uninterrupted run would).
    with tarfile.open(tmp_path / "mixed-00000.tar", "w") as tar:
        for i in range(48):
            members = (("jpg", jpeg_bytes(seed=i) if i < 8 else b"\xff\xd8not a jpeg"), ("txt", b"a red ball"))
            for ext, data in members:
                info = tarfile.TarInfo(f"r{i:03d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    data = cfg(f"wds:{tmp_path}/mixed-00000.tar", tmp_path, shuffle_buffer=0, bad_min_samples=10,
               max_bad_fraction=0.5)

    def stop(td):
        with pytest.raises(DataQualityError) as err:
            take(td, 100)
        return str(err.value).split(":")[0]
    straight = stop(build_train_data(data, MODEL, seed=0, micro_batch=4))
    assert straight.startswith("9 of 17 samples were unusable"), straight
    td = build_train_data(data, MODEL, seed=0, micro_batch=4)
    assert len(take(td, 2)) == 2  # the 8 good records
    state = td.state(2)
    assert state["stream"]["workers"]["0"]["bad"]["samples"] == 8
    assert stop(build_train_data(data, MODEL, seed=0, micro_batch=4, start_micro_batch=2,
                                 resume_state=state)) == straight
