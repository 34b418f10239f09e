"""The evaluations as library calls: one function each, the same numbers as the `m3ae` commands
(which only parse options, call these and print), and one definition of the shared settings."""
import dataclasses
import json

import numpy as np
import pytest
import torch

from _eval_util import tiny_model, write_shard
from m3ae.cli import build_parser, main
from m3ae.eval.embed import run_embed
from m3ae.eval.fast_probe import run_fast_probe
from m3ae.eval.finetune import Classifier, run_finetune
from m3ae.eval.knn import run_knn
from m3ae.eval.linear_probe import ProbeHead, run_linear_probe
from m3ae.eval.ood import run_ood
from m3ae.eval.recipes import FinetuneConfig, ProbeConfig
from m3ae.eval.settings import EvalSettings, Runtime


@pytest.fixture
def data(tmp_path):
    ckpt = tmp_path / "ckpt"
    tiny_model().save_pretrained(ckpt)
    write_shard(tmp_path / "train-00000.tar.gz", 24, seed=0)
    write_shard(tmp_path / "test-00000.tar.gz", 12, seed=1)
    settings = EvalSettings(checkpoint=str(ckpt), num_workers=0, batch_size=8, quiet=True)
    return settings, str(tmp_path / "train-00000.tar.gz"), str(tmp_path / "test-00000.tar.gz")


def _cli_metrics(tmp_path, argv, settings):
    path = tmp_path / f"{argv[0]}.json"
    common = ["--checkpoint", settings.checkpoint, "--num-workers", "0", "--quiet", "--batch-size", "8"]
    assert main([*argv, *common, "--result", str(path)]) == 0
    return json.loads(path.read_text())["metrics"]


def test_knn_and_fast_probe_calls_give_the_commands_numbers(tmp_path, data):
    settings, train, val = data
    knn = run_knn(settings, train, val, k=5)
    assert knn.command == "knn" and knn.metrics["n_train"] == 24 and knn.metrics["n_val"] == 12
    assert knn.metrics == _cli_metrics(tmp_path, ["knn", "--train", train, "--val", val, "--k", "5"], settings)
    fast = run_fast_probe(settings, train, val, knn=True, k=5, l2_grid=[1e-4, 1e-2])
    cli = _cli_metrics(tmp_path, ["probe", "--fast", "--knn", "--k", "5", "--l2", "1e-4", "1e-2", "--train", train,
                                  "--val", val], settings)
    untimed = lambda metrics: {k: v for k, v in metrics.items() if k != "fit_seconds"}  # noqa: E731
    assert untimed(fast.metrics) == untimed(cli)
    assert fast.metrics["knn_top1"] == knn.metrics["top1"] and set(fast.extra["sweep"]) == {"0.0001", "0.01"}
    assert fast.summary().startswith("probe --fast: top1=")


def test_probe_finetune_and_ood_calls_write_what_the_commands_write(tmp_path, data):
    settings, train, val = data
    probe = run_linear_probe(settings, train, val, ProbeConfig(epochs=2, warmup_epochs=0, batch_size=16),
                             out=tmp_path / "probe")
    assert len(probe.extra["history"]) == 2 and 0 <= probe.metrics["top1"] <= 100
    from safetensors.torch import load_file

    head = ProbeHead(32, 4)
    head.load_state_dict(load_file(tmp_path / "probe" / "probe_head.safetensors"))  # strict: the whole head

    ft = run_finetune(settings, train, val, tmp_path / "clf", FinetuneConfig(epochs=1, batch_size=8))
    assert Classifier.from_pretrained(tmp_path / "clf").num_classes == 4 and len(ft.extra["history"]) == 1

    split = run_ood(settings, train, val, tmp_path / "ood", in_classes="0-1", out_classes=[2, 3])
    assert split.metrics["n_in"] + split.metrics["n_out"] == 12 and (tmp_path / "ood" / "ood_hist.png").is_file()
    assert 0 <= split.metrics["auroc_mahalanobis"] <= 100 and "in_probe_top1" in split.metrics
    classifier = dataclasses.replace(settings, checkpoint=str(tmp_path / "clf"))
    with pytest.raises(ValueError, match="pretrained encoder"):  # before any feature is computed
        run_ood(classifier, train, val, tmp_path / "ood2", in_classes="0-1")
    assert run_ood(classifier, train, val, tmp_path / "ood2").extra["classifier"] == "finetuned"


def test_embed_call_writes_the_commands_feature_file(tmp_path, data):
    settings, _, val = data
    result = run_embed(settings, val, tmp_path / "lib.npz")
    assert main(["embed", "--checkpoint", settings.checkpoint, "--num-workers", "0", "--quiet", "--batch-size", "8",
                 "--data", val, "--out", str(tmp_path / "cli.npz")]) == 0
    with np.load(tmp_path / "lib.npz") as a, np.load(tmp_path / "cli.npz") as b:
        assert np.array_equal(a["features"], b["features"]) and list(a["keys"]) == list(b["keys"])
    assert result.metrics == {"samples": 12, "dim": 32}
    with pytest.raises(ValueError, match="inputs must be"):
        run_embed(settings, val, tmp_path / "x.npz", inputs="audio")


def test_the_shared_settings_are_defined_once_and_every_option_comes_from_them():
    """Each field of EvalSettings and of the head recipes is one option, with the field's default and
    its comment as help; the parsed options rebuild the defaults exactly."""
    from m3ae.cli import _evalargs as E

    parser = build_parser()
    base = ["--checkpoint", "C", "--train", "a", "--val", "b"]
    probe = parser.parse_args(["probe", *base])
    finetune = parser.parse_args(["finetune", *base, "--out", "o"])
    # the commands run the thread policy by default; the library leaves the process's threads alone
    assert E.settings(probe) == E.settings(finetune) == EvalSettings(checkpoint="C", threads="auto")
    assert EvalSettings(checkpoint="C").threads is None
    assert E.from_args(ProbeConfig, probe, {"batch_size": "probe_batch_size"}) == ProbeConfig()
    assert E.from_args(FinetuneConfig, finetune, {"batch_size": "ft_batch_size"}) == FinetuneConfig()
    changed = parser.parse_args(["finetune", *base, "--out", "o", "--ft-batch-size", "8", "--crop-scale", "0.5", "1",
                                 "--clip-grad", "2", "--pool", "mean", "--square", "pad", "--threads", "3"])
    assert E.from_args(FinetuneConfig, changed, {"batch_size": "ft_batch_size"}) == FinetuneConfig(
        batch_size=8, crop_scale=(0.5, 1.0), clip_grad=2.0)
    assert E.settings(changed) == EvalSettings(checkpoint="C", pool="mean", square="pad", threads=3)
    helps = {a.dest: a.help for a in parser._subparsers._group_actions[0].choices["finetune"]._actions}
    for cls in (EvalSettings, FinetuneConfig):
        for f in dataclasses.fields(cls):
            assert helps[{"batch_size": "batch_size" if cls is EvalSettings else "ft_batch_size"}.get(f.name, f.name)]
    # Runtime is the one home of pool / device / workers / seed: the recipes do not repeat them
    assert not {f.name for f in dataclasses.fields(Runtime)} & {f.name for f in dataclasses.fields(FinetuneConfig)}


def test_bad_settings_are_clear_errors(tmp_path, capsys):
    with pytest.raises(TypeError, match="checkpoint"):  # the one setting without a default
        EvalSettings(pool="cls")
    with pytest.raises(ValueError, match="pool"):
        EvalSettings(checkpoint="x", pool="max")
    with pytest.raises(ValueError, match="square"):
        EvalSettings(checkpoint="x", square="stretch")
    assert main(["knn", "--checkpoint", str(tmp_path), "--train", "a", "--val", "b", "--pool", "max"]) == 2
    assert "pool must be cls or mean" in capsys.readouterr().err


def test_settings_threads_hold_for_the_call_only(data, monkeypatch):
    settings, train, val = data
    before, seen = torch.get_num_threads(), []
    import m3ae.eval.knn as knn

    real = knn.knn_accuracy
    monkeypatch.setattr(knn, "knn_accuracy", lambda *a, **k: seen.append(torch.get_num_threads()) or real(*a, **k))
    run_knn(dataclasses.replace(settings, threads=before + 1), train, val)
    assert seen == [before + 1] and torch.get_num_threads() == before


def _threads_seen(monkeypatch):
    """{phase: [torch threads]} while features are encoded and while probes / kNN fit on them."""
    import m3ae.eval.fast_probe as fast_probe_module
    import m3ae.eval.features as features
    import m3ae.eval.knn as knn

    seen: dict[str, list[int]] = {"encode": [], "fit": []}

    def spy(module, name, phase):
        real = getattr(module, name)
        monkeypatch.setattr(module, name, lambda *a, **k: seen[phase].append(torch.get_num_threads()) or real(*a, **k))

    spy(features, "_encode_batches", "encode")
    spy(fast_probe_module, "fast_probe", "fit")
    spy(fast_probe_module, "knn_accuracy", "fit")
    spy(knn, "knn_accuracy", "fit")
    return seen


def test_auto_threads_leave_the_workers_their_cores_only_while_workers_run(data, monkeypatch):
    import m3ae.threads

    settings, train, val = data
    monkeypatch.setattr(m3ae.threads, "usable_cores", lambda: 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    before = torch.get_num_threads()
    auto = dataclasses.replace(settings, threads="auto", num_workers=1)
    seen = _threads_seen(monkeypatch)
    run_fast_probe(auto, train, val, knn=True, l2_grid=[1e-3])
    # one worker: 2 threads while it decodes images beside the encoder, all 3 cores for the fits
    assert seen == {"encode": [2, 2], "fit": [3, 3]} and torch.get_num_threads() == before
    seen["encode"].clear(), seen["fit"].clear()
    run_knn(auto, train, val)
    assert seen == {"encode": [2, 2], "fit": [3]} and torch.get_num_threads() == before
    for changed, expected in [(dict(num_workers=0), [3, 3, 3, 3]),  # no workers: every core throughout
                              (dict(threads=1), [1, 1, 1, 1]),  # a count given: that count throughout
                              (dict(threads=None), [before] * 4)]:  # the library's default: untouched
        seen["encode"].clear(), seen["fit"].clear()
        run_fast_probe(dataclasses.replace(auto, **changed), train, val, knn=True, l2_grid=[1e-3])
        assert seen["encode"] + seen["fit"] == expected, changed
    monkeypatch.setenv("OMP_NUM_THREADS", "1")  # an explicit environment wins over auto in both phases
    seen["encode"].clear(), seen["fit"].clear()
    run_fast_probe(auto, train, val, knn=True, l2_grid=[1e-3])
    assert seen["encode"] + seen["fit"] == [1, 1, 1, 1] and torch.get_num_threads() == before


def test_auto_threads_try_every_core_while_features_are_encoded(tmp_path, monkeypatch):
    import m3ae.threads
    from m3ae.eval.features import extract_kept_features
    from m3ae.eval.labelled import labelled_dataset

    monkeypatch.setattr(m3ae.threads, "usable_cores", lambda: 3)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    write_shard(tmp_path / "s-00000.tar.gz", 24, seed=0)
    model = tiny_model()
    ds = labelled_dataset(str(tmp_path / "s-00000.tar.gz"), "val", model.config.image_size)
    settings = EvalSettings(checkpoint="unused", threads="auto", num_workers=1)
    choice = settings.extraction_threads()
    assert (choice.threads, choice.cores, choice.loader_workers) == (2, 3, 1)
    assert dataclasses.replace(settings, threads=2).extraction_threads() is None  # a count given: not tuned
    seen, encode = [], model.encode
    model.encode = lambda *a: seen.append(torch.get_num_threads()) or encode(*a)
    before = torch.get_num_threads()
    with m3ae.threads.torch_threads(None, 1):  # the caller runs under the choice (EvalSettings.threads_applied)
        feats, _, kept = extract_kept_features(model, ds, batch_size=2, num_workers=1, threads=choice)
    # 12 batches: 2 of start-up and 4 measured at 3 cores - 1 worker, 4 with every core, then the faster
    assert seen[:6] == [2] * 6 and seen[6:10] == [3] * 4 and len(set(seen[10:])) == 1, seen
    assert torch.get_num_threads() == before and len(kept) == 24
    seen.clear()
    plain, _, _ = extract_kept_features(model, ds, batch_size=2, num_workers=0)
    assert seen == [before] * 12 and torch.allclose(feats, plain, atol=1e-6)


def test_evaluations_keep_freed_memory_on_a_cpu_unless_told(data, monkeypatch):
    import m3ae.host_allocator as host_allocator

    settings, train, val = data
    seen, real = [], host_allocator.keep_freed_memory
    monkeypatch.setattr(host_allocator, "keep_freed_memory", lambda *a: seen.append(a) or real(*a))
    run_knn(settings, train, val)
    run_fast_probe(dataclasses.replace(settings, host_allocator="system"), train, val, l2_grid=[1e-3])
    assert seen == [("auto", "cpu"), ("system", "cpu")]
    with pytest.raises(ValueError, match="host_allocator must be one of auto, keep, system"):
        EvalSettings(checkpoint="C", host_allocator="jemalloc")


def test_threads_setting_takes_a_count_or_auto(capsys):
    for bad in (0, -1, "fast", True, 2.0):
        with pytest.raises(ValueError, match="threads"):
            EvalSettings(checkpoint="C", threads=bad)
    parser = build_parser()
    base = ["knn", "--checkpoint", "C", "--train", "a", "--val", "b"]
    assert parser.parse_args([*base, "--threads", "AUTO"]).threads == "auto"
    assert parser.parse_args([*base, "--threads", "3"]).threads == 3
    with pytest.raises(SystemExit):
        parser.parse_args([*base, "--threads", "0"])
    assert "argument --threads: must be >= 1" in capsys.readouterr().err


def test_knn_and_probes_number_a_val_set_missing_a_class_as_the_train_set(tmp_path):
    # val = the train images without the "cat" rows: 1-NN finds each image itself, so 100%, not the
    # 0% the per-set numbering gave (dog 1 -> 0, fish 2 -> 1).
    from PIL import Image

    tiny_model().save_pretrained(tmp_path / "ckpt")
    rng = np.random.default_rng(0)
    rows = []
    for i in range(30):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(tmp_path / f"{i}.png")
        rows.append(f"{i}.png,{('cat', 'dog', 'fish')[i % 3]}")
    (tmp_path / "tr.csv").write_text("image,label\n" + "\n".join(rows) + "\n")
    (tmp_path / "va.csv").write_text("image,label\n" + "\n".join(r for r in rows if not r.endswith("cat")) + "\n")
    settings = EvalSettings(checkpoint=str(tmp_path / "ckpt"), num_workers=0, batch_size=8, quiet=True)
    train, val = str(tmp_path / "tr.csv"), str(tmp_path / "va.csv")
    knn = run_knn(settings, train, val, k=1)
    assert knn.metrics["top1"] == 100.0 and knn.metrics["n_val"] == 20
    assert run_fast_probe(settings, train, val, l2_grid=[1e-6]).metrics["top1"] == 100.0
    _, val_set, classes = settings.train_val_sets(train, val, 16)
    assert classes == 3 and sorted(set(val_set.labels)) == [1, 2]


def test_a_finetuned_classifier_folder_carries_its_preprocessing(tmp_path, data):
    # Was: no preprocessor_config.json, so `m3ae ood --checkpoint CLF` read images with the defaults
    # (CC12M statistics, cropped) and called the fresh folder "an older checkpoint".
    import warnings

    from m3ae.preprocessing import Preprocessing

    settings, train, val = data
    settings = dataclasses.replace(settings, normalization="imagenet", square="pad", pad_value=0)
    run_finetune(settings, train, val, tmp_path / "clf", FinetuneConfig(epochs=1, batch_size=8))
    saved = Preprocessing.load(tmp_path / "clf")
    assert saved == settings.preprocessing(16) and saved.square == "pad" and saved.mean[0] == pytest.approx(0.485)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # "an older checkpoint" would be an error here
        run_ood(EvalSettings(checkpoint=str(tmp_path / "clf"), num_workers=0, batch_size=8, quiet=True),
                train, val, tmp_path / "ood")
