import json

import numpy as np
import torch

from _eval_util import tiny_model, write_shard
from m3ae.cli import main


def test_eval_commands_end_to_end(tmp_path, capsys):
    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    write_shard(tmp_path / "train-00000.tar.gz", 24, seed=0)
    write_shard(tmp_path / "test-00000.tar.gz", 12, seed=1)
    train, val = str(tmp_path / "train-0000{0..0}.tar.gz"), str(tmp_path / "test-00000.tar.gz")
    common = ["--checkpoint", str(ckpt), "--num-workers", "0", "--quiet", "--batch-size", "8"]

    feats = tmp_path / "f.npz"
    assert main(["embed", *common, "--data", val, "--out", str(feats), "--pool", "mean"]) == 0
    with np.load(feats) as z:
        assert z["features"].shape == (12, 32) and z["labels"].dtype == np.int64 and len(z["keys"]) == 12

    res = tmp_path / "fast.json"
    assert main(["probe", *common, "--train", train, "--val", val, "--fast", "--knn", "--result", str(res)]) == 0
    record = json.loads(res.read_text())
    assert {"top1", "top5", "knn_top1"} <= set(record["metrics"]) and record["checkpoint"] == str(ckpt)
    assert record["data"]["train"] == train and "probe --fast" in capsys.readouterr().out

    assert main(["knn", *common, "--train", train, "--val", val, "--result", str(tmp_path / "knn.json")]) == 0
    assert main(["probe", *common, "--train", train, "--val", val, "--epochs", "1", "--warmup-epochs", "0",
                 "--probe-batch-size", "16", "--out", str(tmp_path / "probe")]) == 0
    assert (tmp_path / "probe" / "probe_head.safetensors").is_file()
    assert main(["finetune", *common, "--train", train, "--val", val, "--epochs", "1", "--ft-batch-size", "8",
                 "--out", str(tmp_path / "ft")]) == 0
    assert "top1" in json.loads((tmp_path / "ft" / "result.json").read_text())["metrics"]
    assert main(["ood", *common, "--in-train", train, "--in-test", val, "--in-classes", "0-1",
                 "--out-classes", "2-3", "--out", str(tmp_path / "ood")]) == 0
    ood = json.loads((tmp_path / "ood" / "ood.json").read_text())
    assert {"auroc_mahalanobis", "auroc_max_softmax"} <= set(ood["metrics"])
    assert (tmp_path / "ood" / "ood_hist.png").stat().st_size > 1000
    assert main(["ood", *common, "--checkpoint", str(tmp_path / "ft"), "--in-train", train, "--in-test", val,
                 "--out-test", val, "--out", str(tmp_path / "ood2")]) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 5 and "ood:" in out  # one summary line per command


def test_missing_data_is_a_clear_cli_error(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    code = main(["knn", "--checkpoint", str(tmp_path / "ckpt"), "--train", str(tmp_path / "none.tar"),
                 "--val", str(tmp_path / "none.tar"), "--quiet"])
    assert code == 2 and "not found" in capsys.readouterr().err


def test_eval_commands_apply_the_thread_policy_and_restore_it(tmp_path, capsys):
    from PIL import Image

    tiny_model(vocab_size=32).save_pretrained(tmp_path / "ckpt")
    (tmp_path / "photos").mkdir()
    for i in range(3):
        Image.new("RGB", (20, 20), (40 * i, 0, 0)).save(tmp_path / "photos" / f"{i}.png")
    before = torch.get_num_threads()
    seen = []
    import m3ae.cli.embed as embed

    real = embed.run
    embed_run = lambda args: seen.append(torch.get_num_threads()) or real(args)  # noqa: E731
    parser_args = ["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "photos"),
                   "--quiet", "--num-workers", "0", "--threads", str(before + 1), "--out", str(tmp_path / "f.npz")]
    from m3ae.cli import build_parser, _run

    args = build_parser().parse_args(parser_args)
    args.func = embed_run
    assert _run(args) == 0
    assert seen == [before + 1] and torch.get_num_threads() == before
    assert f"threads {before + 1} (threads setting)" in capsys.readouterr().err


def test_embed_text_and_joint_from_a_manifest(tmp_path):
    from PIL import Image

    from m3ae.data.synthetic import build_demo_tokenizer
    from m3ae.eval.features import load_features

    tiny_model(vocab_size=32).save_pretrained(tmp_path / "ckpt")
    build_demo_tokenizer().save(str(tmp_path / "tokenizer.json"))
    rows = ["image,label,caption"]
    for i, (colour, words) in enumerate([("red", "a red circle"), ("blue", "a large blue square above a circle")] * 3):
        Image.new("RGB", (20, 20), colour).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{colour},{words}")
    (tmp_path / "m.csv").write_text("\n".join(rows) + "\n")
    common = ["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "m.csv"), "--quiet",
              "--num-workers", "0", "--tokenizer", str(tmp_path / "tokenizer.json")]
    results = {}
    for inputs, pool in (("image", "cls"), ("text", "mean"), ("joint", "cls")):
        out = tmp_path / f"{inputs}.safetensors"
        assert main([*common, "--inputs", inputs, "--pool", pool, "--out", str(out)]) == 0
        feats, labels, keys = load_features(out)
        assert feats.shape == (6, 32) and labels.tolist() == [1, 0] * 3 and keys[0] == "0.png"
        results[inputs] = feats
    assert not torch.allclose(results["image"], results["joint"])


def test_embed_counts_a_caption_that_is_not_utf8_as_bad_text(tmp_path, caplog):
    from PIL import Image

    from m3ae.data.synthetic import build_demo_tokenizer
    from m3ae.eval.features import load_features

    tiny_model(vocab_size=32).save_pretrained(tmp_path / "ckpt")
    build_demo_tokenizer().save(str(tmp_path / "tokenizer.json"))
    for i in range(3):
        Image.new("RGB", (20, 20), "red").save(tmp_path / f"g0{i}.png")
    (tmp_path / "nu.csv").write_bytes(b"image,caption\ng00.png,a red circle\ng01.png,caf\xe9 latin1\n"
                                      b"g02.png,a blue square\n")
    for inputs in ("text", "joint"):  # was: TypeError: TextInputSequence must be str
        out = tmp_path / f"{inputs}.npz"
        assert main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--data", str(tmp_path / "nu.csv"),
                     "--quiet", "--num-workers", "0", "--tokenizer", str(tmp_path / "tokenizer.json"),
                     "--inputs", inputs, "--out", str(out)]) == 0
        assert "skipping 'g01.png' (bad_text: not UTF-8)" in caplog.text
        caplog.clear()
        features, _, keys = load_features(out)  # the unusable row is left out, keys aligned
        assert features.shape == (2, 32) and [k.split("/")[-1] for k in keys] == ["g00.png", "g02.png"]


def test_eval_commands_can_pad_photos_to_a_square(tmp_path):
    from data_files import write_img2dataset_tar

    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    data = write_img2dataset_tar(str(tmp_path / "s.tar"), n=6, labels=True)  # 48x40 photos
    common = ["--checkpoint", str(ckpt), "--num-workers", "0", "--quiet", "--data", data]
    for square in ("crop", "pad"):
        assert main(["embed", *common, "--square", square, "--out", str(tmp_path / f"{square}.npz")]) == 0
    with np.load(tmp_path / "crop.npz") as a, np.load(tmp_path / "pad.npz") as b:
        assert a["features"].shape == b["features"].shape == (6, 32)
        assert not np.allclose(a["features"], b["features"])  # the padded view is another image


def test_evaluation_on_extreme_aspect_photos_counts_what_fails(tmp_path, capsys, monkeypatch):
    # Was: 4:1 photos with a ~100 px shorter side raised "box offset can't be negative" in a loader
    # worker and ended the whole command; any one image's failure now is one counted skip.
    from PIL import Image

    from m3ae.data.images import EvalTransform

    for c in range(2):
        (tmp_path / "photos" / f"class_{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (399 + i, 98 + c), (40 * i, 100 * c, 50)).save(
                tmp_path / "photos" / f"class_{c}" / f"{i}.jpg", quality=90)
    tiny_model().save_pretrained(tmp_path / "ckpt")
    real = EvalTransform._apply

    def flaky(self, data, key):  # an error no decoder check foresaw, on one image
        if key.endswith("class_1/3.jpg"):
            raise ZeroDivisionError("unforeseen")
        return real(self, data, key)
    monkeypatch.setattr(EvalTransform, "_apply", flaky)
    common = ["--checkpoint", str(tmp_path / "ckpt"), "--num-workers", "0", "--quiet", "--batch-size", "4",
              "--crop-pct", "1.0"]
    assert main(["embed", *common, "--data", str(tmp_path / "photos"), "--out", str(tmp_path / "f.npz")]) == 0
    err = capsys.readouterr().err
    assert "skipping" in err and "class_1/3.jpg" in err and "ZeroDivisionError: unforeseen" in err


def test_evaluation_stops_past_the_bad_data_threshold(tmp_path, capsys):
    tiny_model().save_pretrained(tmp_path / "ckpt")
    write_shard(tmp_path / "bad.tar.gz", 300, corrupt=200)  # two thirds undecodable
    code = main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--num-workers", "0", "--quiet",
                 "--data", str(tmp_path / "bad.tar.gz"), "--out", str(tmp_path / "f.npz")])
    assert code == 1 and "max_bad_fraction" in capsys.readouterr().err
    assert main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--num-workers", "0", "--quiet",
                 "--data", str(tmp_path / "bad.tar.gz"), "--out", str(tmp_path / "f.npz"),
                 "--max-bad-fraction", "1.0"]) == 0  # keep going whatever the share


def test_knn_reads_hdf5_tables(tmp_path, capsys):
    from data_files import write_hdf5_table

    tiny_model().save_pretrained(tmp_path / "ckpt")
    spec = write_hdf5_table(tmp_path / "t.h5", n=8, table="train/rows") + "#table=train/rows#label=y"
    code = main(["knn", "--checkpoint", str(tmp_path / "ckpt"), "--train", spec, "--val", spec, "--k", "1",
                 "--num-workers", "0", "--quiet", "--result", str(tmp_path / "knn.json")])
    assert code == 0, capsys.readouterr().err
    assert json.loads((tmp_path / "knn.json").read_text())["metrics"]["top1"] == 100.0


def _captioned_manifest(folder, n=8, bad=(2, 5)):
    """image,label,caption rows of n distinct photos; rows in `bad`: a missing file, then truncated."""
    from PIL import Image

    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    rows = ["image,label,caption"]
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows.append(f"{i}.png,{('red', 'blue')[i % 2]},{('a red circle', 'a blue square')[i % 2]} {i}")
    (folder / "all.csv").write_text("\n".join(rows) + "\n")
    (folder / "good.csv").write_text("\n".join(r for j, r in enumerate(rows) if j - 1 not in bad) + "\n")
    (folder / f"{bad[0]}.png").unlink()
    data = (folder / f"{bad[1]}.png").read_bytes()
    (folder / f"{bad[1]}.png").write_bytes(data[: len(data) // 2])
    return folder / "all.csv", folder / "good.csv"


def test_embed_leaves_skipped_images_out_of_every_output(tmp_path, capsys):
    # Was: a bad row was replaced by the next good one under the bad row's key: the output had all
    # 8 keys, two of them with another image's features (and, with --inputs joint, the wrong caption).
    from m3ae.data.synthetic import build_demo_tokenizer
    from m3ae.eval.features import load_features

    tiny_model(vocab_size=32).save_pretrained(tmp_path / "ckpt")
    build_demo_tokenizer().save(str(tmp_path / "tok.json"))
    everything, good = _captioned_manifest(tmp_path / "d")
    common = ["embed", "--checkpoint", str(tmp_path / "ckpt"), "--quiet", "--num-workers", "1", "--batch-size", "3",
              "--tokenizer", str(tmp_path / "tok.json"), "--max-bad-fraction", "1"]
    for inputs in ("image", "joint"):
        for name, data in (("all", everything), ("good", good)):
            assert main([*common, "--inputs", inputs, "--data", str(data), "--out", str(tmp_path / f"{name}.npz")]) == 0
        feats, labels, keys = load_features(tmp_path / "all.npz")
        ref, ref_labels, ref_keys = load_features(tmp_path / "good.npz")
        assert keys == ref_keys == ["0.png", "1.png", "3.png", "4.png", "6.png", "7.png"]
        assert torch.allclose(feats, ref, atol=1e-5) and torch.equal(labels, ref_labels)
    assert "2.png" in capsys.readouterr().err
    result = tmp_path / "knn.json"
    assert main(["knn", "--checkpoint", str(tmp_path / "ckpt"), "--quiet", "--num-workers", "0", "--k", "1",
                 "--max-bad-fraction", "1", "--train", str(good), "--val", str(everything),
                 "--result", str(result)]) == 0
    metrics = json.loads(result.read_text())["metrics"]
    assert metrics["n_val"] == 6 and metrics["top1"] == 100.0  # each kept image finds itself


def test_the_bad_data_stop_in_a_loader_worker_is_one_line(tmp_path, capsys):
    # Was: raised in the worker, the stop came wrapped in its ~40-line traceback ("Caught
    # DataQualityError in DataLoader worker process 0. Original Traceback ...").
    tiny_model().save_pretrained(tmp_path / "ckpt")
    write_shard(tmp_path / "s-0.tar.gz", 240)
    write_shard(tmp_path / "s-1.tar.gz", 60, seed=1, corrupt=60)  # past the first 200: the check is on
    code = main(["embed", "--checkpoint", str(tmp_path / "ckpt"), "--num-workers", "1", "--quiet",
                 "--data", str(tmp_path / "s-{0..1}.tar.gz"), "--out", str(tmp_path / "f.npz")])
    err = capsys.readouterr().err
    stops = [line for line in err.splitlines() if line.startswith("m3ae embed: stopped:")]
    assert code == 1 and len(stops) == 1 and "max_bad_fraction" in stops[0], err
    assert "Traceback" not in err and "DataLoader worker" not in err
    assert not (tmp_path / "f.npz").exists()


def test_eval_settings_and_recipes_refuse_values_that_would_run_wrong():
    # Each was accepted: nan never trips the bad-data stop, 0 epochs wrote an untrained head's
    # result, a nan mixup / negative momentum trained nonsense, limit 0 read everything and -1
    # all but one item (a slice).
    import pytest

    from m3ae.eval.recipes import FinetuneConfig, ProbeConfig
    from m3ae.eval.settings import EvalSettings

    for make, message in ((lambda: EvalSettings(checkpoint="c", max_bad_fraction=float("nan")), "max_bad_fraction"),
                          (lambda: EvalSettings(checkpoint="c", seed=-1), "seed"),
                          (lambda: ProbeConfig(epochs=0), "epochs"), (lambda: ProbeConfig(momentum=-0.1), "momentum"),
                          (lambda: ProbeConfig(base_lr=float("nan")), "base_lr"),
                          (lambda: FinetuneConfig(mixup=float("nan")), "mixup"),
                          (lambda: FinetuneConfig(crop_scale=(0.9, 0.1)), "crop_scale"),
                          # A typo'd batch failed deep inside an allocation.
                          (lambda: EvalSettings(checkpoint="c", batch_size=10**9),
                           r"batch_size must be in 1\.\.1048576, got 1000000000"),
                          (lambda: ProbeConfig(batch_size=2**20 + 1), r"batch_size must be in 1\.\.1048576"),
                          (lambda: FinetuneConfig(batch_size=0), r"batch_size must be in 1\.\.1048576")):
        with pytest.raises(ValueError, match=message):
            make()
    with pytest.raises(ValueError, match="limit must be >= 1"):
        EvalSettings(checkpoint="c").features(None, "f.npz", "val", limit=-1)


def test_eval_help_says_image_preparation_defaults_to_the_checkpoints(capsys):
    # The help said nothing of the default: the comment saying it sat above the fields, which the
    # help generator does not read for a field with its own comment.
    import re

    import pytest

    for command in ("knn", "probe", "finetune", "embed", "ood"):
        with pytest.raises(SystemExit):
            main([command, "--help"])
        out = " ".join(capsys.readouterr().out.split())
        for option in ("--normalization", "--crop-pct", "--square", "--pad-value"):
            meaning = re.search(re.escape(option) + r" [A-Z_]+ (.*?)(?= --|$)", out).group(1)
            assert "default: the checkpoint's" in meaning, (command, option, meaning)
