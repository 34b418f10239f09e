"""The study machinery end to end on tiny data: arms x seeds, resume, every evaluation, the report."""
from __future__ import annotations

import io
import json
import logging
import shutil
import tarfile

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from m3ae.cli import main
from m3ae.config import ConfigError
from m3ae.study.evaluate import EvalSpec, derangement
from m3ae.study.runner import arm_config, run_dir, run_lock, run_study
from m3ae.train.config import to_yaml
from m3ae.study.spec import load_study, parse_study

KINDS = ["shirt", "shoes", "watch"]
COLOURS = ["red", "blue"]
RGB = {"red": (220, 30, 30), "blue": (30, 30, 220)}


def product(kind: int, colour: str, seed: int) -> bytes:
    """A 60x80 'studio photo': white background, a coloured shape per article type."""
    rng = np.random.default_rng(seed)
    a = np.full((80, 60, 3), 255, np.uint8)
    c = np.array(RGB[colour]) + rng.integers(-20, 20, 3)
    if kind == 0:
        a[15:65, 10:50] = c
    elif kind == 1:
        a[45:70, 5:55] = c
    else:
        a[25:55, 20:40] = c
    buf = io.BytesIO()
    Image.fromarray(a).save(buf, "JPEG", quality=90)
    return buf.getvalue()


def write_shard(path, n, start):
    with tarfile.open(path, "w:gz") as tar:
        for i in range(start, start + n):
            kind, colour = i % 3, COLOURS[(i // 3) % 2]
            title = f"brand men {colour} {KINDS[kind]}"
            members = {"jpg": product(kind, colour, i), "txt": title.encode(), "cls": str(kind).encode(),
                       "json": json.dumps({"base_colour": colour.title(), "article_type": KINDS[kind]}).encode()}
            for ext, data in members.items():
                info = tarfile.TarInfo(f"p{i:05d}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    return path


RECIPE = """
model: {image_size: 16, patch_size: 8, emb_dim: 32, depth: 1, num_heads: 2, dec_emb_dim: 16, dec_depth: 1,
        dec_num_heads: 2, vocab_size: 64, text_length: 8, norm_pix_loss: true}
data: {square: pad, num_workers: 0}
optim: {lr: 1.0e-3, warmup_steps: 1}
steps: 4
batch_size: 8
log_every: 1
ckpt_every: 2
keep_last: 2
progress: false
"""


@pytest.fixture
def study_file(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    write_shard(data / "train-00000.tar.gz", 36, 0)
    write_shard(data / "test-00000.tar.gz", 18, 100)
    (tmp_path / "tiny.yaml").write_text(RECIPE)
    (tmp_path / "tiny_mae.yaml").write_text("base: tiny.yaml\nmodel: {vocab_size: 0, use_type_embedding: false}\n")
    (tmp_path / "study.yaml").write_text("""
name: tiny
base: tiny.yaml
overrides: [data.spec=$DATA/train-00000.tar.gz]
tokenizer: {train_from: $DATA/train-00000.tar.gz, vocab_size: 64, min_frequency: 1}
arms:
  - {name: random, train: false}
  - {name: mae, base: tiny_mae.yaml}
  - {name: m3ae, seeds: [0, 1]}
evals:
  batch_size: 16
  l2_grid: [1.0e-3, 1.0e-2]
  probes:
    - {name: type, train: $DATA/train-00000.tar.gz, test: $DATA/test-00000.tar.gz, square: pad, min_count: 2}
    - {name: colour, train: $DATA/train-00000.tar.gz, test: $DATA/test-00000.tar.gz, label: "json:base_colour",
       square: pad}
  masked_words: {data: $DATA/test-00000.tar.gz, square: pad, ratio: 0.5}
""")
    return tmp_path


def weights(out, arm, seed):
    done = json.loads((run_dir(out, arm, seed) / "done.json").read_text())
    return load_file(str(out / done["checkpoint"] / "model.safetensors"))


def test_study_runs_every_arm_evaluation_and_report(study_file):
    out = study_file / "out"
    code = main(["study", str(study_file / "study.yaml"), "--out", str(out), "--data-root",
                 str(study_file / "data"), "--pictures", "m3ae/seed1"])
    assert code == 0
    results = json.loads((out / "results.json").read_text())
    assert [(r["arm"], r["seed"], r["status"]) for r in results["runs"]] == [
        ("random", 0, "evaluated"), ("mae", 0, "evaluated"), ("m3ae", 0, "evaluated"), ("m3ae", 1, "evaluated")]
    m3ae = results["arms"]["m3ae"]["metrics"]
    for key in ("type/cls/probe_top1", "type/mean/knn_top1", "colour/cls/probe_top1", "words/true_image",
                "words/mismatched_image", "words/no_image"):
        assert m3ae[key]["n"] == 2 and 0.0 <= m3ae[key]["mean"] <= 100.0
    assert "words/true_image" not in results["arms"]["mae"]["metrics"]  # no text: no masked words
    ev = json.loads((run_dir(out, load_study(study_file / "study.yaml", "x").arms[2], 0) / "eval.json").read_text())
    assert ev["probes"]["type"]["classes"] == 3 and ev["probes"]["colour"]["classes"] == 2
    assert ev["masked_words"]["captions"] == 18
    md = (out / "results.md").read_text()
    assert "| m3ae | 2 |" in md and "mismatched image" in md
    for name in ("evals_cls.png", "evals_mean.png", "masked_words.png", "loss_curves.png",
                 "reconstruct_m3ae.png", "reconstruct_conditioned_m3ae.png", "tsne_type.png",
                 "attention_m3ae_watch.png", "attention_m3ae_red.png"):
        assert (out / name).stat().st_size > 1000, name
    # The seeds differ, the trained runs moved away from their init.
    assert not torch.equal(weights(out, parse_arm(study_file, "m3ae"), 0)["cls_token"],
                           weights(out, parse_arm(study_file, "m3ae"), 1)["cls_token"])

    # What precision=auto resolved to is recorded per trained run (an untrained init has none).
    from m3ae.precision import resolve_precision

    resolved = resolve_precision("auto", torch.device("cpu"))
    assert {(r["arm"], r.get("precision")) for r in results["runs"]} == {
        ("random", None), ("mae", resolved), ("m3ae", resolved)}
    assert f"| m3ae | 1 | evaluated | {resolved} |" in md and "different precisions" not in md
    # Probes record whether their solver converged (the tiny study's 100 iterations may or may not).
    assert isinstance(ev["probes"]["type"]["cls"]["probe_converged"], bool)
    assert 1 <= ev["probes"]["type"]["cls"]["probe_iterations"] <= 100

    # Run again: nothing is retrained or re-evaluated.
    stamps = {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*.json")}
    assert main(["study", str(study_file / "study.yaml"), "--out", str(out), "--data-root",
                 str(study_file / "data")]) == 0
    assert stamps == {p: p.stat().st_mtime_ns for p in out.glob("runs/*/*/*.json")}

    # A run trained in another precision (auto on another machine) is flagged in the report.
    done = run_dir(out, parse_arm(study_file, "mae"), 0) / "done.json"
    other = "fp32" if resolved == "bf16" else "bf16"
    done.write_text(json.dumps({**json.loads(done.read_text()), "precision": other}))
    assert main(["study", str(study_file / "study.yaml"), "--out", str(out), "--data-root", str(study_file / "data"),
                 "--report-only"]) == 0
    assert f"Runs trained in different precisions ({', '.join(sorted({resolved, other}))})" in (
        out / "results.md").read_text()


def parse_arm(study_file, name):
    study = load_study(study_file / "study.yaml", str(study_file / "data"))
    return next(a for a in study.arms if a.name == name)


def test_interrupted_arm_resumes_to_the_same_result(study_file, caplog):
    caplog.set_level(logging.INFO, logger="m3ae")  # the library logs; no CLI handler here
    from m3ae.train.loop import pretrain

    study = load_study(study_file / "study.yaml", str(study_file / "data"))
    straight, broken = study_file / "a", study_file / "b"
    run_study(study, straight, only=["m3ae"])
    # Stop the first m3ae run half way (as a kill after a checkpoint would), then run the study.
    arm = study.arms[2]
    (broken / "tokenizer.json").parent.mkdir(parents=True)
    (broken / "tokenizer.json").write_bytes((straight / "tokenizer.json").read_bytes())
    config = arm_config(study, arm, 0, str(broken / "tokenizer.json"))
    config.progress = False
    assert pretrain(config, run_dir(broken, arm, 0), stop_at_step=2).status == "stopped"
    run_study(study, broken, only=["m3ae"])
    assert "resuming from" in caplog.text
    for seed in (0, 1):
        a, b = weights(straight, arm, seed), weights(broken, arm, seed)
        assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        ea = json.loads((run_dir(straight, arm, seed) / "eval.json").read_text())
        eb = json.loads((run_dir(broken, arm, seed) / "eval.json").read_text())
        assert ea["probes"]["type"]["cls"]["probe_top1"] == eb["probes"]["type"]["cls"]["probe_top1"]
        assert ea["masked_words"] == {**eb["masked_words"], "seconds": ea["masked_words"]["seconds"]}


def test_a_run_held_by_another_process_is_skipped(study_file):
    study = load_study(study_file / "study.yaml", str(study_file / "data"))
    out = study_file / "out"
    with run_lock(run_dir(out, study.arms[0], 0)) as mine:
        assert mine
        status = run_study(study, out, only=["random"])
    assert status == {"random/seed0": "busy"}
    assert run_study(study, out, only=["random"]) == {"random/seed0": "done"}


def test_a_changed_recipe_is_refused_in_an_existing_folder(study_file):
    study = load_study(study_file / "study.yaml", str(study_file / "data"))
    out = study_file / "out"
    run_study(study, out, only=["random"])
    study.arms[0].overrides = ["model.depth=2"]
    with pytest.raises(ValueError, match=r"different recipe or study file \(model.depth: 1 -> 2"):
        run_study(study, out, only=["random"])
    # The report does not credit the finished run to the changed arm: its evaluation is stale.
    from m3ae.study.report import collect

    assert [r["status"] for r in collect(study, out)["runs"] if r["arm"] == "random"] == ["stale"]
    study.arms[0].overrides = []
    assert [r["status"] for r in collect(study, out)["runs"] if r["arm"] == "random"] == ["evaluated"]
    study.evals = {**study.evals, "knn_k": 3}  # other evaluation settings: stale too, until re-evaluated
    assert [r["status"] for r in collect(study, out)["runs"] if r["arm"] == "random"] == ["stale"]
    study.evals = load_study(study_file / "study.yaml", str(study_file / "data")).evals
    study.arms[0].train = True  # was left at its random init: refused, not reported as trained
    with pytest.raises(ValueError, match="left at its random init, but the study now says train: True"):
        run_study(study, out, only=["random"])


def test_a_study_file_extends_another_with_only_what_it_changes(tmp_path):
    (tmp_path / "study.yaml").write_text(
        "name: s\nbase: tiny.yaml\nseeds: [0, 1]\ntokenizer: {path: tok.json}\n"
        "arms: [{name: a}, {name: b, overrides: [model.depth=2]}]\n"
        "evals: {pools: [cls, mean], batch_size: 64, l2_grid: [1.0e-4, 1.0e-3]}\n")
    (tmp_path / "steady.yaml").write_text(
        "extends: study.yaml\nname: s-steady\nevals: {precondition: true, l2_grid: [1.0e-3]}\n")
    (tmp_path / "again.yaml").write_text("extends: steady.yaml\nseeds: [2]\n")
    base, steady, again = (load_study(tmp_path / f"{n}.yaml") for n in ("study", "steady", "again"))
    assert steady.name == "s-steady" and steady.arms == base.arms and steady.seeds == [0, 1]
    assert steady.tokenizer == base.tokenizer and steady.path == tmp_path / "steady.yaml"
    # mappings merge key by key, lists are replaced whole
    assert steady.evals == {"pools": ["cls", "mean"], "batch_size": 64, "precondition": True, "l2_grid": [1e-3]}
    assert again.name == "s-steady" and again.evals == steady.evals and again.seeds == [2]
    for text, message in (("extends: missing.yaml\n", r"study file not found: .*missing.yaml \(extended by"),
                          ("extends: ../study.yaml\n", "extends must name a study file in the same folder"),
                          ("extends: [study.yaml]\n", "extends must name a study file"),
                          ("extends: loop.yaml\n", "extends itself")):
        (tmp_path / "loop.yaml").write_text(text)
        with pytest.raises(ConfigError, match=message):
            load_study(tmp_path / "loop.yaml")


def test_bad_study_files_are_clear_errors(study_file):
    base = {"name": "x", "base": "tiny.yaml", "arms": [{"name": "a"}]}
    with pytest.raises(ConfigError, match="unknown study keys"):
        parse_study({**base, "armz": []})
    with pytest.raises(ConfigError, match="unique"):
        parse_study({**base, "arms": [{"name": "a"}, {"name": "a"}]})
    with pytest.raises(ConfigError, match="folder"):
        parse_study({**base, "arms": [{"name": "../up"}]})
    with pytest.raises(ConfigError, match="--data-root"):
        parse_study({**base, "overrides": ["data.spec=$DATA/x.tar"]})
    with pytest.raises(ConfigError, match="seeds"):
        parse_study({**base, "arms": [{"name": "a", "overrides": ["seed=3"]}]})
    for arm, message in (({"name": "a", "train": "false"}, "train must be true or false"),
                         ({"name": "a", "seeds": 1}, "seeds must be a list of seeds"),
                         ({"name": "a", "seeds": [0, 0]}, "lists a seed twice"),
                         ({"name": "a", "overrides": "model.depth=2"}, "overrides must be a list"),
                         ({"name": ["a"]}, "name must be a non-empty string")):
        with pytest.raises(ConfigError, match=message):
            parse_study({**base, "arms": [arm]})
    (study_file / "typed.yaml").write_text("name: t\nbase: tiny.yaml\nseeds: [a]\narms: [{name: a}]\n")
    with pytest.raises(ConfigError, match="typed.yaml: seeds must be a list"):
        load_study(study_file / "typed.yaml")
    with pytest.raises(ConfigError, match="label"):
        EvalSpec.from_dict({"probes": [{"name": "p", "train": "a", "test": "b", "label": "colour"}]})
    with pytest.raises(ConfigError, match="unknown keys"):
        EvalSpec.from_dict({"probez": []})
    # A probe's limits follow the commands' rule (>= 1 or null): 0 silently read every image and -5
    # all but five (a slice of a random permutation).
    for where, limit in (("train_limit", -5), ("test_limit", 0)):
        with pytest.raises(ConfigError, match=rf"evals: probe 'p': {where}: limit must be >= 1"):
            EvalSpec.from_dict({"probes": [{"name": "p", "train": "a", "test": "b", where: limit}]})
    with pytest.raises(ConfigError, match="evals: masked_words: limit: limit must be >= 1"):
        EvalSpec.from_dict({"masked_words": {"data": "d", "limit": 0}})
    # The feature batch: 0 failed inside range(), 10**9 deep in an allocation.
    for batch in (0, 10**9, 2.5):
        with pytest.raises(ConfigError, match=rf"evals.batch_size must be an integer in 1..1048576, got {batch}"):
            EvalSpec.from_dict({"batch_size": batch})
    for folds in (0, 101, 2.0, "5"):
        with pytest.raises(ConfigError, match=rf"evals.l2_folds must be an integer in 1..100, got {folds!r}"):
            EvalSpec.from_dict({"l2_folds": folds})
    assert EvalSpec.from_dict({"l2_folds": 5}).l2_folds == 5
    for flag in ("yes", 1, None):  # YAML's `yes` arrives as True; a string or number is a mistake
        with pytest.raises(ConfigError, match=rf"evals.precondition must be true or false, got {flag!r}"):
            EvalSpec.from_dict({"precondition": flag})
    assert EvalSpec.from_dict({"probes": [{"name": "p", "train": "a", "test": "b", "train_limit": 1,
                                           "test_limit": None}]}).probes[0].train_limit == 1
    # A typo in any arm fails before anything runs.
    (study_file / "bad.yaml").write_text(
        "name: b\nbase: tiny.yaml\narms: [{name: a}, {name: b, overrides: [model.depht=2]}]\n")
    code = main(["study", str(study_file / "bad.yaml"), "--out", str(study_file / "o")])
    assert code == 2 and not (study_file / "o" / "runs").exists()
    # A file that is not YAML at all: one line naming it, the config-error exit code.
    (study_file / "torn.yaml").write_text("name: t\narms: [\n")
    with pytest.raises(ConfigError, match="torn.yaml is not valid YAML"):
        load_study(study_file / "torn.yaml")
    assert main(["study", str(study_file / "torn.yaml"), "--out", str(study_file / "o")]) == 2


def test_derangement_moves_every_item():
    g = torch.Generator().manual_seed(0)
    for n in (2, 3, 7, 64):
        perm = derangement(n, g)
        assert sorted(perm.tolist()) == list(range(n)) and not (perm == torch.arange(n)).any()


def test_report_of_a_study_not_started_lists_every_run_pending(study_file):
    out = study_file / "never"
    assert main(["study", str(study_file / "study.yaml"), "--out", str(out), "--data-root",
                 str(study_file / "data"), "--report-only"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert [r["status"] for r in results["runs"]] == ["pending"] * 4
    assert "| m3ae | 1 | pending |" in (out / "results.md").read_text()


def test_a_shipped_tokenizer_is_copied_into_the_study(study_file):
    from data_files import write_tokenizer

    shipped = write_tokenizer(study_file)
    text = (study_file / "study.yaml").read_text().replace(
        "tokenizer: {train_from: $DATA/train-00000.tar.gz, vocab_size: 64, min_frequency: 1}",
        "tokenizer: {path: tok.json}")
    (study_file / "shipped.yaml").write_text(text)
    study = load_study(study_file / "shipped.yaml", str(study_file / "data"))
    with pytest.raises(ValueError, match="vocab_size 64"):  # 200 tokens for a 64-token model
        run_study(study, study_file / "small", only=["random"])
    study.overrides.append("model.vocab_size=200")
    out = study_file / "out"
    run_study(study, out, only=["random"])
    assert (out / "tokenizer.json").read_bytes() == open(shipped, "rb").read()
    study.tokenizer.path = "missing.json"
    with pytest.raises(FileNotFoundError, match="missing.json"):
        run_study(study, study_file / "other", only=["random"])
    with pytest.raises(FileNotFoundError, match="missing.json"):  # also where a copy exists (was: ignored)
        run_study(study, out, only=["random"])
    from m3ae.data.tokenizer import train_wordpiece

    train_wordpiece(["a different vocabulary"] * 5, vocab_size=40, min_frequency=1).save(str(study_file / "b.json"))
    study.tokenizer.path = "b.json"
    with pytest.raises(ValueError, match="is not the vocabulary .* this folder's runs used"):
        run_study(study, out, only=["random"])


def test_jobs_split_the_runs_between_processes(study_file):
    out = study_file / "out"
    assert main(["study", str(study_file / "study.yaml"), "--out", str(out), "--data-root",
                 str(study_file / "data"), "--jobs", "2", "--arms", "random,m3ae"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {(r["arm"], r["seed"]): r["status"] for r in results["runs"]} == {
        ("random", 0): "evaluated", ("mae", 0): "pending", ("m3ae", 0): "evaluated", ("m3ae", 1): "evaluated"}


def test_a_jobs_study_whose_workers_fail_exits_non_zero(study_file, capsys):
    # Was: "a worker process failed", then exit 0 (a scheduler reads success). The training data is
    # read only by the workers' runs, so a missing shard fails there.
    text = (study_file / "study.yaml").read_text().replace(
        "  - {name: m3ae, seeds: [0, 1]}", "  - {name: m3ae, seeds: [0, 1], overrides: [data.spec=$DATA/gone.tar]}")
    (study_file / "gone.yaml").write_text(text)
    assert main(["study", str(study_file / "gone.yaml"), "--out", str(study_file / "out"), "--data-root",
                 str(study_file / "data"), "--jobs", "2", "--arms", "m3ae"]) == 1
    assert "a worker process failed (exit codes [2, 2])" in capsys.readouterr().err
    assert (study_file / "out" / "tokenizer.json").is_file()  # trained once, by the parent


def test_seeds_pick_runs_and_a_typo_is_refused_before_any_worker(study_file, capsys):
    out = study_file / "out"
    assert main(["study", str(study_file / "study.yaml"), "--out", str(out), "--data-root",
                 str(study_file / "data"), "--jobs", "2", "--arms", "random,m3ae", "--seeds", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {(r["arm"], r["seed"]): r["status"] for r in results["runs"]} == {
        ("random", 0): "pending", ("mae", 0): "pending", ("m3ae", 0): "pending", ("m3ae", 1): "evaluated"}
    for bad, said in ((["--arms", "m3e"], "unknown arms ['m3e']"),
                      (["--arms", "random", "--seeds", "1"], "no run of the arms random has seed 1; their seeds: [0]"),
                      (["--seeds", "7,8"], "no run of the study has seed 7 or 8; their seeds: [0, 1]")):
        assert main(["study", str(study_file / "study.yaml"), "--out", str(study_file / "other"), "--data-root",
                     str(study_file / "data"), "--jobs", "2", *bad]) == 2
        assert said in capsys.readouterr().err
        assert not (study_file / "other" / "tokenizer.json").exists()  # refused before the vocabulary
    with pytest.raises(SystemExit):
        main(["study", str(study_file / "study.yaml"), "--out", str(out), "--seeds", "one"])


def test_sigterm_to_a_jobs_study_stops_every_worker_after_a_checkpoint(study_file):
    import os
    import signal
    import subprocess
    import sys
    import time

    text = (study_file / "study.yaml").read_text().replace(
        "  - {name: m3ae, seeds: [0, 1]}", "  - {name: m3ae, seeds: [0, 1], overrides: [steps=3000, ckpt_every=50]}")
    (study_file / "long.yaml").write_text(text)
    out = study_file / "out"
    cmd = [sys.executable, "-m", "m3ae", "study", str(study_file / "long.yaml"), "--out", str(out),
           "--data-root", str(study_file / "data"), "--arms", "m3ae", "--jobs", "2"]
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, env={**os.environ, "PYTHONPATH": "src"})
    deadline = time.time() + 600  # generous: a busy 2-core machine starts two workers slowly
    while not list(out.glob("runs/m3ae/seed*/checkpoints/step_*")) and time.time() < deadline:
        time.sleep(0.2)
    assert list(out.glob("runs/m3ae/seed*/checkpoints/step_*")), "no checkpoint within 10 minutes"
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130 and "run the same command again" in err
    steps = [json.loads(p.read_text().splitlines()[-1])["step"] for p in out.glob("runs/m3ae/seed*/metrics.jsonl")]
    assert steps and max(steps) < 3000  # stopped part way, with checkpoints written
    results = json.loads((out / "results.json").read_text())
    assert all(r["status"] == "pending" for r in results["runs"] if r["arm"] == "m3ae")


def test_bad_images_and_a_truncated_shard_are_counted_not_fatal(study_file, caplog):
    data = study_file / "data"
    good = (data / "test-00000.tar.gz").read_bytes()
    with tarfile.open(data / "test-00000.tar.gz", "w:gz") as tar:  # one corrupt photo among good ones
        with tarfile.open(fileobj=io.BytesIO(good), mode="r:gz") as src:
            for member in src:
                payload = src.extractfile(member).read()
                if member.name == "p00100.jpg":
                    payload = b"not a jpeg"
                info = tarfile.TarInfo(member.name)
                info.size = len(payload)
                tar.addfile(info, io.BytesIO(payload))
    whole = (data / "train-00000.tar.gz").read_bytes()
    (data / "train-00000.tar.gz").write_bytes(whole[: len(whole) * 2 // 3])  # truncated
    study = load_study(study_file / "study.yaml", str(data))
    run_study(study, study_file / "out", only=["random"])
    err = "\n".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "skipped" in err and "truncated_tar" in err and "p00100" in err
    ev = json.loads((run_dir(study_file / "out", study.arms[0], 0) / "eval.json").read_text())
    assert ev["probes"]["type"]["skipped_images"] >= 1 and ev["masked_words"]["skipped"] == 1
    assert ev["masked_words"]["captions"] == 17


def test_a_moved_study_folder_resumes(study_file, caplog, monkeypatch):
    # Was: run_config.yaml held the tokenizer's path as --out spelled it, so a moved folder (or
    # another spelling of --out) was refused as "made by a different recipe".
    caplog.set_level(logging.INFO, logger="m3ae")
    from m3ae.study.report import collect
    from m3ae.study.fingerprint import form1_fingerprint
    from m3ae.train.loop import pretrain

    study = load_study(study_file / "study.yaml", str(study_file / "data"))
    run_study(study, study_file / "first", only=["random"])
    (study_file / "first").rename(study_file / "moved")
    monkeypatch.chdir(study_file)  # and spelled relative, from another directory
    evaluated = run_dir(study_file / "moved", study.arms[0], 0) / "eval.json"
    stamp = evaluated.stat().st_mtime_ns
    run_study(study, "moved", only=["random"])
    assert evaluated.stat().st_mtime_ns == stamp  # not re-evaluated either
    # A pretraining stopped half way (as a kill after a checkpoint would) resumes after a move.
    arm = study.arms[2]
    config = arm_config(study, arm, 0, str(study_file / "moved" / "tokenizer.json"))
    assert pretrain(config, run_dir(study_file / "moved", arm, 0), stop_at_step=2,
                    root=study_file / "moved").status == "stopped"  # as run_study runs it
    assert "tokenizer: $ROOT/tokenizer.json" in (run_dir(study_file / "moved", arm, 0) / "run_config.yaml").read_text()
    (study_file / "moved").rename(study_file / "again")
    run_study(study, study_file / "again", only=["m3ae"])
    assert "resuming from" in caplog.text
    assert [r["status"] for r in collect(study, study_file / "again")["runs"]] == [
        "evaluated", "pending", "evaluated", "evaluated"]
    # A folder made before (absolute paths in run_config.yaml and in the evaluation's fingerprint)
    # still resumes where it is, without being re-evaluated.
    evaluated = run_dir(study_file / "again", study.arms[0], 0) / "eval.json"
    random = evaluated.parent
    old_config = arm_config(study, study.arms[0], 0, str(study_file / "again" / "tokenizer.json"))
    (random / "run_config.yaml").write_text(to_yaml(old_config))
    spec = EvalSpec.from_dict(study.evals)
    result = json.loads(evaluated.read_text())
    result["fingerprint"] = form1_fingerprint(spec, to_yaml(old_config), result["checkpoint"])
    evaluated.write_text(json.dumps(result))
    stamp = evaluated.stat().st_mtime_ns
    run_study(study, study_file / "again", only=["random"])
    assert evaluated.stat().st_mtime_ns == stamp
    assert collect(study, study_file / "again")["runs"][0]["status"] == "evaluated"


def test_a_setting_added_since_at_its_default_keeps_evaluations_current(study_file):
    # Was: the fingerprint hashed every field of the run config and of the evals settings, so each
    # setting a release added (at its default, which does what the code did before) made every
    # evaluation of every study folder stale, redone after an upgrade (hours at scale).
    import copy
    import dataclasses

    from m3ae.data.config import DataConfig
    from m3ae.study.fingerprint import eval_fingerprint, form1_fingerprint
    from m3ae.study.report import collect

    study = load_study(study_file / "study.yaml", str(study_file / "data"))
    out, arm = study_file / "out", study.arms[0]
    run_study(study, out, only=["random"])
    spec, config = EvalSpec.from_dict(study.evals), arm_config(study, arm, 0, str(out / "tokenizer.json"))
    evaluated = run_dir(out, arm, 0) / "eval.json"
    result = json.loads(evaluated.read_text())
    checkpoint = result["checkpoint"]
    assert result["fingerprint"] == eval_fingerprint(spec, config, checkpoint, out)  # the form written now

    @dataclasses.dataclass
    class NewerData(DataConfig):  # a release that added a data setting
        newer: int = 3

    @dataclasses.dataclass
    class NewerSpec(EvalSpec):  # and an evals setting
        newer: float = 0.5

    grown = copy.deepcopy(config)
    grown.data = NewerData(**dataclasses.asdict(config.data))
    grown_spec = NewerSpec(**{f.name: getattr(spec, f.name) for f in dataclasses.fields(spec)})
    assert eval_fingerprint(grown_spec, grown, checkpoint, out) == result["fingerprint"]
    grown.data.newer = 4  # set to another value: it may change the result
    assert eval_fingerprint(spec, grown, checkpoint, out) != result["fingerprint"]
    grown_spec.newer = 0.25
    assert eval_fingerprint(grown_spec, config, checkpoint, out) != result["fingerprint"]

    def status():
        return [r["status"] for r in collect(study, out)["runs"] if r["arm"] == "random"]

    # An evaluation by an older release: its run_config.yaml, and the fingerprint over it, lack the
    # settings added since; it stays current, in the report and for the runner.
    saved = run_dir(out, arm, 0) / "run_config.yaml"
    recorded = saved.read_text()
    lines = [line for line in recorded.splitlines(keepends=True)
             if line.split(":")[0].strip() not in ("max_member_bytes", "max_shard_bytes", "threads", "host_allocator")
             and not line.startswith("wandb")]
    assert len(recorded.splitlines()) - len(lines) == 9
    saved.write_text("".join(lines))
    evaluated.write_text(json.dumps({**result, "fingerprint": form1_fingerprint(spec, "".join(lines), checkpoint)}))
    stamp = evaluated.stat().st_mtime_ns
    assert status() == ["evaluated"]
    run_study(study, out, only=["random"])
    assert evaluated.stat().st_mtime_ns == stamp
    # The release before this one: today's settings, files in the folder as $ROOT/... or absolute.
    saved.write_text(recorded)
    for old in (to_yaml(config, out), to_yaml(config)):
        evaluated.write_text(json.dumps({**result, "fingerprint": form1_fingerprint(spec, old, checkpoint)}))
        assert status() == ["evaluated"]
    # A default changed since: the run was made with the old value, which its run_config.yaml
    # records; the fingerprint, which leaves defaults out, cannot tell, the recorded settings do.
    evaluated.write_text(json.dumps(result))
    assert status() == ["evaluated"]
    saved.write_text(recorded.replace("pad_value: 255", "pad_value: 254"))
    assert status() == ["stale"]
    with pytest.raises(ValueError, match=r"different recipe or study file \(data.pad_value: 254 -> 255"):
        run_study(study, out, only=["random"])


def test_the_same_data_spelled_another_way_is_no_change(study_file, monkeypatch):
    # Was: --data-root ../data and --data-root /abs/data (the same files) were different settings: a
    # study's finished runs were refused as made by another recipe and their evaluations were stale.
    from m3ae.study.fingerprint import eval_fingerprint
    from m3ae.study.report import collect
    from m3ae.train.config import TrainConfig, check_resume_changes

    absolute = load_study(study_file / "study.yaml", str(study_file / "data"))
    out, arm = study_file / "out", absolute.arms[0]
    run_study(absolute, out, only=["random"])
    evaluated = run_dir(out, arm, 0) / "eval.json"
    stamp = evaluated.stat().st_mtime_ns
    (study_file / "elsewhere").mkdir()
    monkeypatch.chdir(study_file / "elsewhere")
    relative = load_study(study_file / "study.yaml", "../data/")
    assert relative.overrides != absolute.overrides
    run_study(relative, out, only=["random"])
    assert evaluated.stat().st_mtime_ns == stamp  # neither refused nor evaluated again
    assert collect(relative, out)["runs"][0]["status"] == "evaluated"
    checkpoint = json.loads(evaluated.read_text())["checkpoint"]
    fingerprints = {eval_fingerprint(EvalSpec.from_dict(s.evals), arm_config(s, arm, 0, str(out / "tokenizer.json")),
                                     checkpoint, out) for s in (absolute, relative)}
    assert len(fingerprints) == 1
    # Other files are a change.
    (study_file / "copy").symlink_to(study_file / "data")  # a link to the same files is not
    assert collect(load_study(study_file / "study.yaml", "../copy"), out)["runs"][0]["status"] == "evaluated"
    (study_file / "other").mkdir()
    for name in ("train-00000.tar.gz", "test-00000.tar.gz"):
        (study_file / "other" / name).write_bytes((study_file / "data" / name).read_bytes())
    other = load_study(study_file / "study.yaml", str(study_file / "other"))
    assert collect(other, out)["runs"][0]["status"] == "stale"
    with pytest.raises(ValueError, match=r"different recipe or study file \(data.spec: "):
        run_study(other, out, only=["random"])
    # An interrupted pretraining resumes with the data root spelled another way, not with other files.
    recorded, config = TrainConfig(), TrainConfig()
    recorded.data.spec = f"{study_file}/data/train-{{00000..00000}}.tar.gz#shuffle=0@2"
    config.data.spec = "../data/train-{00000..00000}.tar.gz#shuffle=0@2"
    assert check_resume_changes(to_yaml(recorded), config, False, "ckpt") == []
    config.data.spec = "../other/train-{00000..00000}.tar.gz#shuffle=0@2"
    with pytest.raises(ConfigError, match="data.spec"):
        check_resume_changes(to_yaml(recorded), config, False, "ckpt")


def test_data_paths_are_compared_by_their_folder_where_it_exists(tmp_path, monkeypatch):
    from m3ae.data.spec import same_files_path, same_files_spec

    monkeypatch.chdir(tmp_path)
    (tmp_path / "data" / "sub").mkdir(parents=True)
    (tmp_path / "data" / "a.tar").write_text("")
    (tmp_path / "link").symlink_to(tmp_path / "data")
    real = str(tmp_path.resolve() / "data")
    for given, same in (("data/a.tar", f"{real}/a.tar"), ("./link/a.tar", f"{real}/a.tar"),
                        ("data/shard-{0..3}.tar", f"{real}/shard-{{0..3}}.tar"),
                        ("link/sub/../*.tar", f"{real}/*.tar"),  # the folder part, up to the first brace or glob
                        ("data/{a,b}/x.tar", f"{real}/{{a,b}}/x.tar"),
                        ("x-{0..3}.tar", f"{tmp_path.resolve()}/x-{{0..3}}.tar"),  # the working directory's
                        ("data/missing.tar", f"{real}/missing.tar"),  # the folder exists: that file there
                        ("nowhere/x-{0..3}.tar", "nowhere/x-{0..3}.tar"),  # no such folder: as written
                        ("demo", "demo"), ("bert-base-uncased", "bert-base-uncased"),  # names
                        ("https://host/data/x-{0..3}.tar", "https://host/data/x-{0..3}.tar"), ("", "")):
        assert same_files_path(given) == same, given
    assert same_files_spec("paired=link/shard-{0..3}.tar@0.7,text=text:data/a\\,b.txt#caption@0.3") == (
        f"paired={real}/shard-{{0..3}}.tar@0.7,text=text:{real}/a\\,b.txt#caption@0.3")
    for kept in ("demo", "synthetic:data#samples=8", "hf:data#split=train", "wds:https://host/x.tar@2"):
        assert same_files_spec(kept) == kept


def test_a_study_run_resumes_with_plain_pretrain(study_file):
    # Was: its run_config.yaml names the tokenizer as $ROOT/tokenizer.json, so `m3ae pretrain --resume`
    # of a study's run was refused as a changed tokenizer, and the file given as --config named none.
    from m3ae.train.config import load_config
    from m3ae.train.loop import pretrain

    study = load_study(study_file / "study.yaml", str(study_file / "data"))
    arm, out = study.arms[2], study_file / "out"
    config = arm_config(study, arm, 0, str(out / "tokenizer.json"))
    (out / "tokenizer.json").parent.mkdir(parents=True)
    run_study(study, out, only=["random"])  # trains the study's tokenizer
    folder = run_dir(out, arm, 0)
    assert pretrain(config, folder, stop_at_step=2, root=out).status == "stopped"
    with pytest.raises(ConfigError, match=r"data.tokenizer: '\$ROOT/tokenizer.json' names a file by its place in "
                                          r"the study folder.*give data.tokenizer=STUDY_FOLDER/tokenizer.json"):
        load_config(str(folder / "run_config.yaml"), [])
    # The same file, named by its path: the run goes on where it stopped, nothing refused.
    assert pretrain(config, folder, resume="auto").status == "finished"
    # Another tokenizer file is still a change.
    other = study_file / "other" / "tokenizer.json"
    other.parent.mkdir()
    other.write_bytes((out / "tokenizer.json").read_bytes())
    with pytest.raises(ConfigError, match="data.tokenizer"):
        pretrain(arm_config(study, arm, 0, str(other)), run_dir(out, study.arms[2], 0), resume="auto")


def test_study_paths_are_recorded_relative_to_the_folder_only_inside_it(tmp_path, monkeypatch):
    from m3ae.train.config import TrainConfig, from_yaml, relative_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "study").mkdir()
    (tmp_path / "study" / "tok.json").write_text("{}")
    (tmp_path / "outside.json").write_text("{}")
    for given, recorded in (("study/tok.json", "$ROOT/tok.json"), ("outside.json", str(tmp_path / "outside.json")),
                            ("bert-base-uncased", "bert-base-uncased")):  # a hub name is no file
        config = TrainConfig()
        config.data.tokenizer = given
        assert relative_paths(config, "study").data.tokenizer == recorded
        assert from_yaml(to_yaml(config, tmp_path / "study"), "elsewhere").data.tokenizer == (
            "elsewhere/tok.json" if recorded.startswith("$ROOT") else recorded)


def test_missing_evaluation_data_fails_before_any_pretraining(study_file, capsys):
    # Was: found when the first run was evaluated, after its pretraining (hours, on a real study).
    text = (study_file / "study.yaml").read_text()
    data = study_file / "data"
    for old, new, key, missing, jobs in (
            ("masked_words: {data: $DATA/test-00000", "masked_words: {data: $DATA/gone-00000",
             "evals.masked_words.data", data / "gone-00000.tar.gz", []),
            ("train: $DATA/train-00000.tar.gz, test", "train: '$DATA/train-0000{0..1}.tar.gz', test",
             "evals.probes[0].train", data / "train-00001.tar.gz", ["--jobs", "2"]),
            ("square: pad, min_count: 2}", "square: pad, min_count: 2, classes_file: $DATA/names.txt}",
             "evals.probes[0].classes_file", data / "names.txt", [])):
        assert old in text
        (study_file / "bad.yaml").write_text(text.replace(old, new))
        out = study_file / "out"
        code = main(["study", str(study_file / "bad.yaml"), "--out", str(out), "--data-root", str(data), *jobs])
        err = capsys.readouterr().err
        assert code == 2 and f"bad.yaml: {key}: " in err and str(missing) in err, err
        assert not (out / "runs").exists() and not (out / "tokenizer.json").exists()  # nothing trained


def test_report_only_checks_the_study_file_as_a_run_does(study_file, capsys):
    # Was: --report-only never built the arms' configs, so a typo'd override was accepted silently.
    text = (study_file / "study.yaml").read_text()
    for old, new, message in (("{name: m3ae, seeds: [0, 1]}", "{name: m3ae, seeds: [0, 1], overrides: [model.depht=2]}",
                               "depht"),
                              ("  batch_size: 16", "  batch_sise: 16", "evals: unknown keys ['batch_sise']")):
        (study_file / "bad.yaml").write_text(text.replace(old, new))
        out = study_file / "out"
        code = main(["study", str(study_file / "bad.yaml"), "--out", str(out), "--data-root",
                     str(study_file / "data"), "--report-only"])
        err = capsys.readouterr().err
        assert code == 2 and "bad.yaml: " in err and message in err, err
        assert not (out / "results.json").exists()
    # It reads no evaluation data: a report is written where the data are not (another machine).
    assert main(["study", str(study_file / "study.yaml"), "--out", str(study_file / "out"), "--data-root",
                 str(study_file / "elsewhere"), "--report-only"]) == 0


def test_pictures_arguments_are_checked_before_any_training(study_file, capsys):
    # Was: checked when the pictures were drawn, after every run had been pretrained.
    text = (study_file / "study.yaml").read_text()
    (study_file / "no_words.yaml").write_text(text.replace("  masked_words:", "  #"))
    for study, which, message in (("study.yaml", "m3e", "no arm 'm3e'"),
                                  ("study.yaml", "m3ae/seed7", "arm 'm3ae' has seeds [0, 1]"),
                                  ("study.yaml", "m3ae/7", "no arm 'm3ae/7'"),
                                  ("study.yaml", "m3ae/seedx", "give ARM or ARM/seedS"),
                                  ("study.yaml", "mae", "arm 'mae' has no text"),
                                  ("study.yaml", "m3ae", "not trained yet, and this command does not train it"),
                                  ("no_words.yaml", "m3ae", "no evals.masked_words")):
        out = study_file / "out"
        code = main(["study", str(study_file / study), "--out", str(out), "--data-root", str(study_file / "data"),
                     "--arms", "random", "--pictures", which])
        err = capsys.readouterr().err
        assert code == 2 and message in err, (which, err)
        assert not (out / "runs").exists() and not (out / "tokenizer.json").exists()  # nothing trained


def _runs(results):
    return [(r["arm"], r["seed"], r["status"], r.get("metrics"), r.get("final")) for r in results["runs"]]


def test_saved_records_rewrite_the_report_without_weights_and_merge(study_file, capsys):
    out, records, other = study_file / "out", study_file / "records", study_file / "other"
    study, data = str(study_file / "study.yaml"), str(study_file / "data")
    assert main(["study", study, "--out", str(out), "--data-root", data, "--arms", "random,mae",
                 "--save-records", str(records)]) == 0
    assert not [p for p in records.rglob("*") if p.suffix == ".safetensors" or p.name == "checkpoints"]
    assert sorted(p.name for p in (records / "runs/mae/seed0").iterdir()) == [
        "done.json", "eval.json", "metrics.jsonl", "run_config.yaml"]
    first = json.loads((out / "results.json").read_text())
    assert _runs(json.loads((records / "results.json").read_text())) == _runs(first)
    mae = next(r for r in first["runs"] if r["arm"] == "mae")
    assert mae["final"]["image_loss"] > 0  # done.json keeps the final losses too
    assert json.loads((records / "runs/mae/seed0/done.json").read_text())["final"] == mae["final"]

    # The weights gone, the records alone rewrite the same report; without the training log the
    # final losses come from done.json.
    shutil.rmtree(out)
    (records / "runs/mae/seed0/metrics.jsonl").unlink()
    assert main(["study", study, "--out", str(records), "--data-root", data, "--report-only"]) == 0
    assert _runs(json.loads((records / "results.json").read_text())) == _runs(first)

    # Runs made in another folder (another session, another machine) add to the records.
    other.mkdir()
    shutil.copyfile(records / "tokenizer.json", other / "tokenizer.json")
    assert main(["study", study, "--out", str(other), "--data-root", data, "--arms", "m3ae", "--seeds", "1",
                 "--save-records", str(records)]) == 0
    merged = json.loads((records / "results.json").read_text())
    assert [(r["arm"], r["seed"], r["status"]) for r in merged["runs"]] == [
        ("random", 0, "evaluated"), ("mae", 0, "evaluated"), ("m3ae", 0, "pending"), ("m3ae", 1, "evaluated")]
    assert "saved the records of 1 runs" in capsys.readouterr().out
    # Another evaluation of the same run saved beside it stays; a run redone since takes it away.
    extra = records / "runs/m3ae/seed1/eval_steady.json"
    extra.write_text("{}")
    save = ["study", study, "--out", str(other), "--data-root", data, "--report-only", "--save-records", str(records)]
    assert main(save) == 0 and extra.is_file()
    done = other / "runs/m3ae/seed1/done.json"
    done.write_text(json.dumps({**json.loads(done.read_text()), "train_seconds": 1.0}))
    assert main(save) == 0 and not extra.is_file()
    assert json.loads((records / "runs/m3ae/seed1/done.json").read_text())["train_seconds"] == 1.0

    # Records of another vocabulary, and the study folder as its own records folder, are refused.
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "[PAD]": 1, "shirt": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(records / "tokenizer.json"))
    assert main(["study", study, "--out", str(other), "--data-root", data, "--report-only",
                 "--save-records", str(records)]) == 2
    assert "another vocabulary" in capsys.readouterr().err
    assert main(["study", study, "--out", str(other), "--data-root", data, "--report-only",
                 "--save-records", str(other)]) == 2
    assert "is the study folder itself" in capsys.readouterr().err
