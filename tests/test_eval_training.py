import json

import torch

from _eval_util import tiny_model, write_class_folders, write_shard
from m3ae.eval.finetune import Classifier, FinetuneConfig, finetune
from m3ae.eval.labelled import labelled_dataset
from m3ae.eval.linear_probe import ProbeConfig, train_linear_probe
from m3ae.eval.monitor import probe_metrics
from m3ae.eval.settings import Runtime


def _sets(tmp_path, per_class_train=30, per_class_val=10):
    write_class_folders(tmp_path / "train", per_class_train, seed=0)
    write_class_folders(tmp_path / "val", per_class_val, seed=1)
    return (labelled_dataset(str(tmp_path / "train"), "train", 16, True, crop_scale=(0.5, 1.0)),
            labelled_dataset(str(tmp_path / "val"), "val", 16))


def test_finetune_improves_on_dominant_colour_task(tmp_path):
    train, val = _sets(tmp_path)
    config = FinetuneConfig(epochs=6, warmup_epochs=1, batch_size=16, base_lr=1e-2, drop_path=0.1,
                            mixup=0.0, cutmix=0.0, smoothing=0.1, layer_decay=0.75)
    model, res = finetune(tiny_model(drop_path=0.1), train, val, 4, config, Runtime(num_workers=0))
    assert res["top1"] >= 75 and res["top1"] > res["top1_before"] + 20, res
    model.save_pretrained(tmp_path / "clf")
    loaded = Classifier.from_pretrained(tmp_path / "clf").eval()
    x = torch.stack([val[i][0] for i in range(4)])
    model.eval()
    with torch.no_grad():
        assert torch.allclose(model(x), loaded(x), atol=1e-5)
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["num_classes"] == 4


def test_linear_probe_learns_and_reports_per_epoch(tmp_path):
    train, val = _sets(tmp_path)
    rows = []
    config = ProbeConfig(epochs=4, warmup_epochs=1, batch_size=32, base_lr=2.0, optimizer="sgd")
    model = tiny_model()
    before = [p.detach().clone() for p in model.parameters()]
    res = train_linear_probe(model, train, val, 4, config, Runtime(num_workers=0), on_epoch=rows.append)
    assert len(rows) == 4 and {"top1", "top5", "loss"} <= set(rows[0])
    assert res["best_top1"] > 60, res["history"]
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # encoder frozen


def _monitored_config(tmp_path, *, log_every: int, eval_every: int):
    """A 4-step demo-data run whose evaluation monitor reads a 16-image labelled shard."""
    from m3ae.train.config import load_config

    write_shard(tmp_path / "eval.tar.gz", 16, classes=4)
    return load_config(None, ["model.image_size=16", "model.patch_size=8", "model.emb_dim=32", "model.depth=1",
                              "model.num_heads=2", "model.dec_emb_dim=16", "model.dec_depth=1",
                              "model.dec_num_heads=2", "model.vocab_size=32", "model.text_length=16",
                              "data.num_workers=0", "data.demo_samples=64", "steps=4", "batch_size=8",
                              f"log_every={log_every}", "progress=false", "device=cpu", f"eval_every={eval_every}",
                              f"eval_train={tmp_path / 'eval.tar.gz'}", f"eval_val={tmp_path / 'eval.tar.gz'}"])


def test_probe_metrics_and_training_loop_hook(tmp_path):
    train, val = _sets(tmp_path, 10, 5)
    metrics = probe_metrics(tiny_model(), train, val)
    assert set(metrics) == {"probe_top1", "knn_top1"}
    from m3ae.train.loop import pretrain
    pretrain(_monitored_config(tmp_path, log_every=2, eval_every=2), tmp_path / "run")
    rows = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    evals = [r for r in rows if "knn_top1" in r]
    assert [r["step"] for r in evals] == [2, 4] and all("probe_top1" in r for r in evals)


def test_a_stopped_and_resumed_run_writes_the_eval_rows_of_an_uninterrupted_one(tmp_path):
    # Was: --stop-at-step evaluated at the stop step too, an extra row in metrics.jsonl that an
    # uninterrupted run does not have.
    from m3ae.train.loop import pretrain
    config = _monitored_config(tmp_path, log_every=1, eval_every=3)
    pretrain(config, tmp_path / "straight")
    pretrain(config, tmp_path / "split", stop_at_step=2)
    pretrain(config, tmp_path / "split", resume="auto")

    def rows(run):
        return [{k: v for k, v in json.loads(line).items() if k in ("step", "step_losses", "knn_top1")}
                for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows("straight") if "knn_top1" in r] == [3, 4]
    assert rows("split") == rows("straight")


def test_monitor_sets_number_val_by_the_train_class_names(tmp_path):
    import shutil

    from m3ae.eval.monitor import monitor_sets

    write_class_folders(tmp_path / "tr", 2, classes=3)
    write_class_folders(tmp_path / "va", 2, classes=3)
    shutil.rmtree(tmp_path / "va" / "class_0")  # was: class_1 -> 0, class_2 -> 1 in val alone
    train, val = monitor_sets(str(tmp_path / "tr"), str(tmp_path / "va"), 16)
    assert val.labels == [1, 1, 2, 2] and val.classes == train.classes


def test_head_training_leaves_unusable_images_out_and_counts_them(tmp_path):
    # Was: a bad validation image was replaced by the next one, which was then scored twice.
    from m3ae.eval.linear_probe import run_linear_probe
    from m3ae.eval.settings import EvalSettings

    write_class_folders(tmp_path / "tr", 4, classes=2)
    write_class_folders(tmp_path / "va", 3, classes=2)
    (tmp_path / "va" / "class_1" / "001.png").write_bytes(b"not a png")
    tiny_model().save_pretrained(tmp_path / "ckpt")
    settings = EvalSettings(checkpoint=str(tmp_path / "ckpt"), num_workers=0, quiet=True, max_bad_fraction=1.0)
    res = run_linear_probe(settings, str(tmp_path / "tr"), str(tmp_path / "va"),
                           ProbeConfig(epochs=2, warmup_epochs=0, batch_size=4))
    assert res.metrics["n_train"] == 8 and res.metrics["n_val"] == 5
    train_set, val_set, _ = settings.train_val_sets(str(tmp_path / "tr"), str(tmp_path / "va"), 16)
    _, val_loader = Runtime(num_workers=0).loaders(train_set, val_set, 4)
    assert sum(len(label) for _, label in val_loader) == 5 and val_set.skipped == 1  # scored once each


def test_classifier_loads_in_eval_mode_and_names_broken_folders(tmp_path):
    import pytest

    from m3ae.config import ConfigError

    torch.manual_seed(0)
    # drop_path is saved with the encoder config: a train-mode load would give random outputs.
    Classifier(tiny_model(drop_path=0.5), 3).save_pretrained(tmp_path / "clf")
    loaded = Classifier.from_pretrained(tmp_path / "clf")
    assert not loaded.training
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        assert torch.equal(loaded(x), loaded(x))

    def broken(name, change):
        folder = tmp_path / name
        folder.mkdir()
        for f in (tmp_path / "clf").iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        change(folder)
        return folder

    def edit_config(**change):
        return lambda f: (f / "config.json").write_text(json.dumps({**json.loads((f / "config.json").read_text()),
                                                                    **change}))

    cases = [
        (lambda f: (f / "model.safetensors").unlink(), FileNotFoundError, r"has no model\.safetensors"),
        (lambda f: (f / "config.json").write_text("{"), ConfigError, r"config\.json is not valid JSON"),
        (lambda f: (f / "config.json").write_text("[1]"), ConfigError, r"must hold a JSON object"),
        (lambda f: (f / "model.safetensors").write_bytes((f / "model.safetensors").read_bytes()[:500]),
         ConfigError, r"model\.safetensors: header length"),
        (edit_config(num_classes=5), ConfigError, r"head\.weight has shape"),
        (edit_config(pool="max"), ConfigError, r"pool must be"),
        # A layout from a newer m3ae is refused naming the file, not misread.
        (edit_config(format_version=2), ConfigError, r"case\d+/config\.json: format_version 2: this m3ae reads "
                                                     r"format_version 1 to 1"),
        (edit_config(format_version="1"), ConfigError, r"format_version '1'"),
    ]
    for i, (change, error, message) in enumerate(cases):
        with pytest.raises(error, match=message):
            Classifier.from_pretrained(broken(f"case{i}", change))
    assert json.loads((tmp_path / "clf" / "config.json").read_text())["format_version"] == 1
    # A folder written before the field existed still loads, as the same classifier.
    old = broken("old", lambda f: (f / "config.json").write_text(json.dumps(
        {k: v for k, v in json.loads((f / "config.json").read_text()).items() if k != "format_version"})))
    with torch.no_grad():
        assert torch.equal(Classifier.from_pretrained(old)(x), loaded(x))
    # A corrupt config.json is not taken for a classifier; the checkpoint loader then reports it.
    from m3ae.eval.finetune import is_classifier_dir

    assert not is_classifier_dir(tmp_path / "case1") and is_classifier_dir(tmp_path / "clf")


def test_a_batch_larger_than_the_training_set_is_said(tmp_path, caplog):
    # Was silent: the paper's probe batch (16384) on a 120-image set trains one step an epoch, at a
    # learning rate scaled for 16384.
    import logging

    caplog.set_level(logging.WARNING, logger="m3ae")
    train, val = _sets(tmp_path, 30, 5)
    train_linear_probe(tiny_model(), train, val, 4, ProbeConfig(epochs=1, warmup_epochs=0, batch_size=1024),
                       Runtime(num_workers=0))
    assert "probe: the batch (1024) is larger than the training set (120 samples)" in caplog.text
    caplog.clear()
    train_linear_probe(tiny_model(), train, val, 4, ProbeConfig(epochs=1, warmup_epochs=0, batch_size=32),
                       Runtime(num_workers=0))
    assert "larger than the training set" not in caplog.text
