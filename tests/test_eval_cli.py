import json

import numpy as np

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
