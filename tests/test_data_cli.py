from pathlib import Path

import pytest
from data_files import write_class_folder, write_manifest, write_text

from m3ae.cli import main


def test_data_stats_and_shard_roundtrip(tmp_path, capsys):
    manifest = write_manifest(tmp_path, n=7)
    (tmp_path / "images" / "img002.jpg").write_bytes(b"")  # one bad image
    assert main(["data", "stats", f"{manifest},text={write_text(tmp_path)}"]) == 0
    out = capsys.readouterr().out
    assert "samples: 6" in out and "empty: 1" in out and "caption length (words)" in out and "image width" in out
    pattern = str(tmp_path / "shards" / "s-%03d.tar")
    assert main(["data", "shard", manifest, "--out", pattern, "--per-shard", "4", "--shorter-side", "20"]) == 0
    assert "wrote 6 samples to 2 shards" in capsys.readouterr().out
    assert main(["data", "stats", f"wds:{tmp_path}/shards/s-{{000..001}}.tar"]) == 0
    out = capsys.readouterr().out
    assert "samples: 6" in out and "shorter side: min 20" in out


def test_stats_count_captions_over_the_runs_text_length(tmp_path, capsys):
    # "over 64" was fixed: a run with model.text_length=16 (the fashion recipe) could not ask
    manifest = write_manifest(tmp_path, n=4)
    assert main(["data", "stats", manifest]) == 0
    assert "; over 64: 0" in capsys.readouterr().out
    assert main(["data", "stats", manifest, "--text-length", "1"]) == 0
    assert "; over 1: 4" in capsys.readouterr().out


def test_stats_of_missing_path_is_a_clear_error(tmp_path, capsys):
    assert main(["data", "stats", f"{tmp_path}/nothing-*.tar"]) == 2
    assert "error" in capsys.readouterr().err


def test_stats_and_shard_stop_past_max_bad_fraction(tmp_path, capsys):
    # Was: `data stats` counted any share of bad records and exited 0; now the training policy
    # (data.max_bad_fraction after data.bad_min_samples) holds here too.
    manifest = write_manifest(tmp_path, n=10)
    for i in range(6):  # 60 % bad
        (tmp_path / "images" / f"img{i:03d}.jpg").write_bytes(b"")
    spec = f"{manifest},text={write_text(tmp_path)}"
    assert main(["data", "stats", spec, "--bad-min-samples", "5", "--max-bad-fraction", "0.3"]) == 1
    captured = capsys.readouterr()
    last = captured.err.strip().splitlines()[-1]
    assert last.startswith("m3ae data: stopped:") and "max_bad_fraction 30.0%" in last and "empty" in last
    assert "stopped: past --max-bad-fraction" in captured.out  # the counts read so far are printed
    assert main(["data", "stats", spec, "--bad-min-samples", "5", "--max-bad-fraction", "0.7"]) == 0
    assert "bad: 6 (60.00%)" in capsys.readouterr().out
    pattern = str(tmp_path / "shards" / "s-%03d.tar")
    assert main(["data", "shard", manifest, "--out", pattern, "--bad-min-samples", "5",
                 "--max-bad-fraction", "0.3"]) == 1
    assert "max_bad_fraction" in capsys.readouterr().err
    for value in ("2", "nan"):  # refused by the option's type, before any record is read
        with pytest.raises(SystemExit) as exit_:
            main(["data", "stats", spec, "--max-bad-fraction", value])
        assert exit_.value.code == 2
        assert "argument --max-bad-fraction: must be a finite number >= 0 and <= 1" in capsys.readouterr().err


def test_stats_default_policy_is_the_training_one(tmp_path, capsys):
    # 250 records naming one empty file: past the default 5 % once 200 were read.
    (tmp_path / "empty.jpg").write_bytes(b"")
    manifest = tmp_path / "m.csv"
    manifest.write_text("image,caption\n" + "".join(f"empty.jpg,a dog {i}\n" for i in range(250)))
    assert main(["data", "stats", str(manifest)]) == 1
    captured = capsys.readouterr()
    assert "200 of 200 samples were unusable" in captured.err and "bad: 200 (100.00%)" in captured.out


def test_shard_keeps_source_metadata_counts_empty_captions_and_checks_options(tmp_path, capsys):
    import json
    import tarfile

    from data_files import write_img2dataset_tar

    source = write_img2dataset_tar(str(tmp_path / "src-00000.tar"), n=3, json_captions=True)
    pattern = str(tmp_path / "out" / "s-%03d.tar")
    assert main(["data", "shard", f"wds:{source}", "--out", pattern]) == 0
    with tarfile.open(tmp_path / "out" / "s-000.tar") as tar:
        meta = [json.loads(tar.extractfile(m).read()) for m in tar.getmembers() if m.name.endswith(".json")]
    assert len(meta) == 3 and all(m["url"] == "x" and m["source_key"] and m["caption"] for m in meta)
    # Empty captions in a captioned set: counted and left out, as `data stats` and training count them.
    manifest = write_manifest(tmp_path, n=4)
    image = Path(manifest).read_text().splitlines()[1].split(",")[0]
    with open(manifest, "a") as f:
        f.write(f"{image},\n{image},   \n")
    capsys.readouterr()
    assert main(["data", "shard", str(manifest), "--out", str(tmp_path / "m" / "s-%03d.tar")]) == 0
    assert "wrote 4 samples" in (out := capsys.readouterr().out) and "'empty': 2" in out, out
    (tmp_path / "corpus.txt").write_text("a caption\nanother one\n")
    assert main(["data", "shard", f"text={tmp_path / 'corpus.txt'}", "--out", pattern]) == 2
    assert "has no images" in capsys.readouterr().err
    for option, value in (("--per-shard", "0"), ("--quality", "500"), ("--shorter-side", "-1"), ("--limit", "-1")):
        with pytest.raises(SystemExit) as exit_:
            main(["data", "shard", str(manifest), "--out", pattern, option, value])
        assert exit_.value.code == 2
        assert f"argument {option}" in (err := capsys.readouterr().err) and "must be" in err, err


def test_an_unreadable_label_spoils_the_sample_only_where_labels_are_used(tmp_path, capsys):
    # Was: a bad .cls made the whole sample bad_text, so pretraining lost an image and a caption it
    # could use. Now `data stats` reports it, evaluation leaves it out, pretraining keeps the sample.
    import io
    import tarfile

    from data_files import jpeg_bytes, write_img2dataset_tar
    from m3ae.data.sources.wds import iter_tar
    from m3ae.eval.labelled import labelled_dataset

    shard = write_img2dataset_tar(str(tmp_path / "s-00000.tar"), n=4, labels=True)
    with tarfile.open(shard, "a") as tar:
        for ext, data in (("jpg", jpeg_bytes(seed=9)), ("txt", b"a caption"), ("cls", b"cat")):
            info = tarfile.TarInfo(f"badcls.{ext}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    records = {r.key.split("/")[-1]: r for r in iter_tar(shard)}
    assert records["badcls"].missing is None and records["badcls"].label is None
    assert "not an integer" in records["badcls"].bad_label
    assert main(["data", "stats", f"wds:{shard}"]) == 0
    out = capsys.readouterr().out
    assert "samples: 5" in out and "unreadable labels: 1" in out and "badcls" in out
    ds = labelled_dataset(f"wds:{shard}", "val", 32)
    assert len(ds) == 4 and dict(ds.counter.bad) == {"bad_text": 1}


def test_stats_and_shard_read_labelled_sets_without_captions(tmp_path, capsys):
    from PIL import Image

    for i in range(3):
        Image.new("RGB", (24, 20), (80 * i, 0, 0)).save(tmp_path / f"g{i}.png")
    (tmp_path / "lab.csv").write_text("image,label\ng0.png,0\ng1.png,1\ng2.png,1\n")
    assert main(["data", "stats", str(tmp_path / "lab.csv")]) == 0
    assert "(provides image, label)" in capsys.readouterr().out
    assert main(["data", "shard", str(tmp_path / "lab.csv"), "--out", str(tmp_path / "o" / "s-%03d.tar")]) == 0
    assert "wrote 3 samples" in capsys.readouterr().out
    assert main(["data", "stats", f"wds:{tmp_path}/o/s-000.tar"]) == 0
    assert "(provides image, label)" in (out := capsys.readouterr().out) and "labels: 2 classes" in out


def test_stats_of_a_source_without_one_usable_sample_fails(tmp_path, capsys):
    (tmp_path / "bad.jpg").write_bytes(b"not a jpeg")
    (tmp_path / "m.csv").write_text("image,caption\nbad.jpg,a caption\n")
    assert main(["data", "stats", str(tmp_path / "m.csv")]) == 1
    assert "no usable sample among 1" in capsys.readouterr().err


def test_shard_refuses_to_merge_sources_naming_other_classes(tmp_path, capsys):
    a = write_class_folder(tmp_path / "a", ["cat", "dog"])
    b = write_class_folder(tmp_path / "b", ["bird", "cat"])
    out = tmp_path / "o"
    assert main(["data", "shard", f"{a},{b}", "--out", str(out / "s-%03d.tar")]) == 2
    err = capsys.readouterr().err
    assert f"folder:{a} and folder:{b} name different classes (only in the first: 'dog'; only in the second: " \
           "'bird')" in err and "shard each source on its own" in err
    assert not out.exists() or not any(out.iterdir())  # refused before anything is written
    same = write_class_folder(tmp_path / "same", ["cat", "dog"])
    assert main(["data", "shard", f"{a},{same}", "--out", str(out / "s-%03d.tar")]) == 0
    assert "wrote 4 samples" in capsys.readouterr().out


def test_shard_and_stats_apply_the_exif_orientation(tmp_path, capsys):
    # Was: `data shard` re-encoded a phone photo (EXIF orientation 6: stored on its side) without
    # its EXIF and without turning it, so shards held it sideways while training on the files
    # turned it upright; `data stats` reported it turned as well.
    import io

    import numpy as np
    from PIL import Image

    from m3ae.data.sources.wds import iter_tar

    ramp = np.linspace(0, 255, 64)[None, :, None] * np.ones((40, 1, 3))  # smooth: JPEG keeps it
    stored = Image.fromarray(ramp.astype(np.uint8))
    exif = Image.Exif()
    exif[0x0112] = 6  # 6: the stored picture is to be turned 90 degrees clockwise
    (tmp_path / "images").mkdir()
    stored.save(tmp_path / "images" / "phone.jpg", "JPEG", quality=95, exif=exif.tobytes())
    (tmp_path / "m.csv").write_text("image,caption\nphone.jpg,a photo\n")
    assert main(["data", "stats", str(tmp_path / "m.csv")]) == 0
    assert "image width:  min 40" in capsys.readouterr().out
    assert main(["data", "shard", str(tmp_path / "m.csv"), "--out", str(tmp_path / "o" / "s-%03d.tar"),
                 "--shorter-side", "0"]) == 0
    (record,) = iter_tar(str(tmp_path / "o" / "s-000.tar"))
    written = Image.open(io.BytesIO(record.image))
    assert written.size == (40, 64)
    upright = np.asarray(stored.transpose(Image.Transpose.ROTATE_270), dtype=np.float64)
    assert np.abs(np.asarray(written, dtype=np.float64) - upright).mean() < 3  # JPEG twice, nothing else
