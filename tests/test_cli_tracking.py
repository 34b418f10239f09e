"""A CLI that explains itself (--help with every setting, --print-config, --version, fast --help,
install commands for missing extras, a warmup warning) and the trackers (TensorBoard images and
hparams, Weights & Biases offline), and the library's log records on stderr during a command."""
import json
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest

from m3ae.cli import log_to_stderr, main
from m3ae.train.settings import settings

SRC = str(Path(__file__).resolve().parents[1] / "src")
TINY = ["model.image_size=32", "model.patch_size=8", "model.emb_dim=32", "model.depth=1", "model.num_heads=2",
        "model.dec_emb_dim=32", "model.dec_depth=1", "model.dec_num_heads=2", "data.num_workers=0",
        "batch_size=4", "log_every=1", "progress=false", "optim.warmup_steps=1", "data.demo_samples=16"]


def test_pretrain_help_lists_every_setting_with_type_default_and_meaning(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["pretrain", "--help"])
    assert exit_.value.code == 0
    out = " ".join(capsys.readouterr().out.split())  # the table wraps; compare words
    every = settings()
    assert len(every) > 70 and all(s.meaning for s in every)  # a new field needs its comment
    for s in every:
        assert s.key in out, s.key
    assert "model.depth int = 12 encoder blocks" in out
    assert "optim.lr float or null = null peak learning rate" in out
    assert "--print-config" in out


def test_every_setting_has_a_meaning_of_its_own():
    # a comment block shared by two fields printed the same two-sentence text for both
    # (data.max_member_bytes / max_shard_bytes), so --help did not say which limit was which
    seen: dict[str, str] = {}
    for s in settings():
        assert s.meaning not in seen, f"{s.key} and {seen[s.meaning]} share the meaning {s.meaning!r}"
        seen[s.meaning] = s.key


def test_print_config_resolves_preset_and_overrides_then_exits(tmp_path, capsys):
    assert main(["pretrain", "--config", "demo", "--print-config", "model.depth=3", "--steps", "7"]) == 0
    out = capsys.readouterr().out
    assert "depth: 3" in out and "steps: 7" in out and "emb_dim: 128" in out  # 128 from the demo preset
    assert not list(tmp_path.iterdir())
    assert main(["pretrain", "--config", "demo"]) == 2
    assert "--out is required" in capsys.readouterr().err


def test_warmup_not_shorter_than_the_run_warns(capsys):
    assert main(["pretrain", "--config", "demo", "--print-config", "steps=10", "optim.warmup_steps=10"]) == 0
    assert "warning: warmup (10 steps) is not shorter than the run (10 steps)" in capsys.readouterr().err
    assert main(["pretrain", "--config", "demo", "--print-config", "steps=100", "optim.warmup_steps=10"]) == 0
    assert "warning" not in capsys.readouterr().err


def test_version_and_a_help_that_does_not_import_torch():
    env = {**os.environ, "PYTHONPATH": SRC, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "m3ae", "--version"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.startswith("m3ae 0.1.0 (torch ")
    # torch takes seconds to import; `m3ae --help` and every command's parser must not need it
    code = ("import sys, m3ae.cli; m3ae.cli.build_parser().format_help(); "
            "print(sorted(m for m in ('torch', 'matplotlib', 'pyarrow') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and out.stdout.strip() == "[]", out.stderr
    out = subprocess.run([sys.executable, "-m", "m3ae", "--help"], capture_output=True, text=True, env=env)
    assert out.returncode == 0 and "pretrain" in out.stdout


@pytest.mark.parametrize("module, command, extra", [
    ("matplotlib", lambda d: ["plot", str(d / "metrics.jsonl"), "--out", str(d / "c.png")], "viz"),
    ("pyarrow", lambda d: ["data", "stats", str(d / "x.parquet")], "data"),
    ("h5py", lambda d: ["data", "stats", str(d / "x.h5")], "data"),
])
def test_missing_optional_dependency_gives_the_install_command(tmp_path, capsys, monkeypatch, module, command, extra):
    (tmp_path / "metrics.jsonl").write_text(json.dumps({"step": 1, "loss": 1.0}) + "\n")
    (tmp_path / "x.parquet").write_bytes(b"")
    (tmp_path / "x.h5").write_bytes(b"")
    for name in list(sys.modules):
        if name == module or name.startswith(module + "."):
            monkeypatch.setitem(sys.modules, name, None)
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now fails as if not installed
    assert main(command(tmp_path)) == 2
    err = capsys.readouterr().err
    assert f"pip install 'm3ae[{extra}]'" in err and "Traceback" not in err


def test_tensorboard_gets_reconstruction_images_and_hparams(tmp_path):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    assert main(["pretrain", "--config", "demo", "--out", str(tmp_path), *TINY, "steps=4", "viz_every=2",
                 "tensorboard=true"]) == 0
    ea = EventAccumulator(str(tmp_path / "tensorboard"), size_guidance={"images": 0})
    ea.Reload()
    tags = ea.Tags()
    assert "reconstruction" in tags["images"]
    images = ea.Images("reconstruction")
    assert [im.step for im in images] == [2, 4] and images[0].width > 32
    assert [s.step for s in ea.Scalars("loss")] == [1, 2, 3, 4]
    hparams = ea.PluginTagToContent("hparams")
    assert "_hparams_/session_start_info" in hparams
    assert b"model.depth" in hparams["_hparams_/session_start_info"]


def test_resuming_an_earlier_checkpoint_sets_later_ones_aside_and_tensorboard_logs_each_step_once(tmp_path):
    # Was: --resume auto later took up the abandoned step_6 again, and TensorBoard kept the first
    # attempt's steps 4-6 beside the resumed run's.
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from m3ae.checkpoint import list_checkpoints

    run = [*TINY, "tensorboard=true", "ckpt_every=3", "keep_last=0"]
    assert main(["pretrain", "--config", "demo", "--out", str(tmp_path), *run, "steps=8", "--stop-at-step", "6"]) == 0
    earlier = tmp_path / "checkpoints" / "step_00000003"
    assert main(["pretrain", "--config", "demo", "--out", str(tmp_path), "--resume", str(earlier), *run,
                 "steps=8"]) == 0
    assert [s for s, _ in list_checkpoints(tmp_path)] == [3, 6, 8]  # 6 written again by this timeline
    assert (tmp_path / "checkpoints-abandoned" / "step_00000006").is_dir()
    ea = EventAccumulator(str(tmp_path / "tensorboard"))
    ea.Reload()
    assert [s.step for s in ea.Scalars("loss")] == list(range(1, 9))


def test_settings_may_come_in_groups_between_options(tmp_path, capsys):
    assert main(["pretrain", "--config", "demo", "log_every=2", "--out", str(tmp_path), "batch_size=8",
                 "--print-config"]) == 0
    out = capsys.readouterr().out
    assert "log_every: 2" in out and "batch_size: 8" in out
    with pytest.raises(SystemExit):
        main(["pretrain", "--config", "demo", "--out", str(tmp_path), "--bogus", "3"])
    assert "unrecognized arguments: --bogus" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:  # the option's type refuses it, before the config is read
        main(["pretrain", "--config", "demo", "--out", str(tmp_path), "--stop-at-step", "0", *TINY])
    assert exit_.value.code == 2 and "argument --stop-at-step: must be >= 1" in capsys.readouterr().err


def test_wandb_offline_run_logs_rows_grids_and_settings_and_resumes_the_same_run(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    monkeypatch.chdir(tmp_path)
    args = ["pretrain", "--config", "demo", "--out", str(tmp_path / "run"), *TINY, "steps=4", "viz_every=2",
            "wandb=true", "wandb_mode=offline", "wandb_tags=tiny,test-tag", "wandb_project=m3ae-tests"]
    assert main(args + ["--stop-at-step", "2"]) == 0
    run_id = (tmp_path / "run" / "wandb_run_id").read_text()
    assert main(args + ["--resume", "auto"]) == 0
    assert (tmp_path / "run" / "wandb_run_id").read_text() == run_id
    runs = sorted((tmp_path / "run" / "wandb").glob("offline-run-*"))
    assert len(runs) == 2 and all(r.name.endswith(run_id) for r in runs)  # one W&B run, two parts
    images = list((tmp_path / "run" / "wandb").glob("offline-run-*/files/media/images/reconstruction_*.png"))
    assert len(images) == 2
    data = b"".join(r.joinpath(f"run-{run_id}.wandb").read_bytes() for r in runs)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    for key in (b"model.depth", b"test-tag", b"m3ae-tests", b"text_accuracy"):
        assert key in data, key
    assert json.dumps(rows[0]["loss"]).encode() in data  # the logged value itself


def test_wandb_missing_is_the_install_command(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "wandb", None)
    assert main(["pretrain", "--config", "demo", "--out", str(tmp_path), *TINY, "steps=1", "wandb=true"]) == 2
    assert "pip install 'm3ae[wandb]'" in capsys.readouterr().err


@__import__("dataclasses").dataclass
class _Documented:
    # crop range
    # (two lines)
    low: float = 0.2
    high: float = 1.0
    flip: bool = True  # its own meaning
    bare: int = 0

    # after a blank line
    other: int = 1


def test_field_meanings_come_from_trailing_comments_and_blocks_above():
    from m3ae.train.settings import field_comments

    assert field_comments(_Documented) == {"low": "crop range (two lines)", "high": "crop range (two lines)",
                                           "flip": "its own meaning", "other": "after a blank line"}


def test_library_log_records_are_plain_stderr_lines_during_a_command_only(capsys, caplog):
    logger = logging.getLogger("m3ae.train.somewhere")
    root = logging.getLogger("m3ae")
    level, handlers = root.level, list(root.handlers)
    with log_to_stderr():
        logger.info("resuming from %s at step %d", "ckpt", 7)
        logger.debug("not shown")
        logging.getLogger("elsewhere").warning("not ours")
    logger.warning("after the command")
    err = capsys.readouterr().err
    assert err == "resuming from ckpt at step 7\n"  # the message alone, as the prints were
    assert root.level == level and root.handlers == handlers  # nothing left configured
    assert "after the command" in caplog.text  # still a record for whoever configures logging


def test_config_errors_in_overrides_are_one_line_usage_errors(capsys):
    # A negative seed passed validation and stopped the run later with numpy's "expected non-negative
    # integer"; a value that is not YAML was a yaml.ParserError traceback (exit 1).
    assert main(["pretrain", "--config", "demo", "--print-config", "seed=-1"]) == 2
    assert "seed must be in 0..4294967295, got -1" in capsys.readouterr().err
    assert main(["pretrain", "--config", "demo", "--print-config", "model={depth: 1"]) == 2
    err = capsys.readouterr().err
    assert "override 'model={depth: 1': the value is not valid YAML" in err and "Traceback" not in err


@pytest.mark.parametrize("text, message", [
    # A lone word read as the setting "hello", a lone number an OSError (exit 1), an empty file all
    # defaults without a word, a scalar section "Merge error: int is not a subclass of M3AEConfig".
    ("hello\n", "c.yaml must hold a mapping of settings (key: value lines) at its top level, got the value 'hello'"),
    ("42\n", "got the value '42'"),
    ("", "c.yaml holds no settings (an empty file)"),
    ("# nothing yet\n", "c.yaml holds no settings"),
    ("model: 3\n", "c.yaml: model is a section of settings (model.KEY), not a value; got 3"),
    ("data:\n  spec: demo\nmodel: {hello: 1}\n", "c.yaml: model.hello: Key 'hello' not in 'M3AEConfig'"),
])
def test_config_file_problems_are_one_line_naming_the_file(tmp_path, capsys, text, message):
    (tmp_path / "c.yaml").write_text(text)
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.splitlines()) == 1 and "Traceback" not in err


def test_config_that_is_not_a_yaml_file_or_whose_base_is_wrong_says_so(tmp_path, capsys):
    (tmp_path / "c.txt").write_text("steps: 5\n")  # was "unknown run preset 'c.txt'"
    assert main(["pretrain", "--config", str(tmp_path / "c.txt"), "--print-config"]) == 2
    assert "c.txt is not a .yaml / .yml file: a run config is a YAML file" in capsys.readouterr().err
    assert main(["pretrain", "--config", str(tmp_path), "--print-config"]) == 2
    assert f"{tmp_path} is a folder" in capsys.readouterr().err
    (tmp_path / "base.yaml").write_text("optim: 0.1\n")
    (tmp_path / "c.yaml").write_text("base: base.yaml\nsteps: 5\n")  # the file at fault is the base
    assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--print-config"]) == 2
    assert "base.yaml: optim is a section of settings" in capsys.readouterr().err
    assert main(["pretrain", "--config", "demo", "--print-config", "model.depth=x"]) == 2
    assert "override 'model.depth=x': model.depth: Value 'x'" in capsys.readouterr().err


def test_an_option_and_a_setting_for_the_same_thing_are_refused(capsys):
    # The option used to win silently (and demo's --seed default 0 overrode seed=N).
    for args, message in (
            (["pretrain", "--config", "demo", "--print-config", "--steps", "3", "steps=5"],
             "--steps 3 and steps=5 both set steps; give one of them"),
            (["pretrain", "--print-config", "data.spec=demo", "--data", "demo"], "--data demo and data.spec=demo"),
            (["pretrain", "--print-config", "--batch-size", "8", "batch_size=8"], "--batch-size 8 and batch_size=8"),
            (["pretrain", "--print-config", "--fsdp", "distributed.fsdp=false"],
             "--fsdp and distributed.fsdp=false both set distributed.fsdp"),
            (["demo", "--out", "unused", "seed=4", "--seed", "3"], "--seed 3 and seed=4 both set seed")):
        assert main(args) == 2, args
        assert message in capsys.readouterr().err
    assert main(["pretrain", "--config", "demo", "--print-config", "--steps", "3", "seed=5"]) == 0
    out = capsys.readouterr().out
    assert "steps: 3" in out and "seed: 5" in out


def test_steps_are_bounded(capsys):
    assert main(["pretrain", "--config", "demo", "--print-config", f"steps={10**30}"]) == 2
    assert "steps must be positive and at most 99,999,999, got 1,000,000," in capsys.readouterr().err
    assert main(["pretrain", "--config", "demo", "--print-config", "--steps", "99999999"]) == 0


def test_batch_size_is_bounded(capsys):
    # Was: batch_size=10**9 passed every check and failed deep inside an allocation.
    assert main(["pretrain", "--config", "demo", "--print-config", f"batch_size={10**9}"]) == 2
    assert "batch_size must be positive and at most 1,048,576, got 1,000,000,000" in capsys.readouterr().err
    assert main(["pretrain", "--config", "demo", "--print-config", "batch_size=0"]) == 2
    assert "batch_size must be positive" in capsys.readouterr().err
    assert main(["pretrain", "--config", "demo", "--print-config", f"batch_size={2**20}"]) == 0


def test_stop_at_step_past_the_end_is_refused_before_any_work(tmp_path, capsys):
    # It was ignored: the run trained to its end instead of stopping with a resume command.
    assert main(["pretrain", "--config", "demo", "--out", str(tmp_path / "run"), *TINY, "steps=2",
                 "--stop-at-step", "3"]) == 2
    assert "stop_at_step (--stop-at-step) 3 is past the run's end (steps=2)" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()
