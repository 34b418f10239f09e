import json
import logging
import math
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from m3ae import M3AE
from m3ae.checkpoint import latest_checkpoint, list_checkpoints, load_train_state
from m3ae.cli import main
from m3ae.config import ConfigError
from m3ae.train.config import load_config
from m3ae.train.loop import pretrain

# A run small enough for seconds on 2 cores, on the built-in synthetic data.
TINY = ["model.image_size=32", "model.patch_size=8", "model.emb_dim=32", "model.depth=2", "model.num_heads=2",
        "model.dec_emb_dim=32", "model.dec_depth=1", "model.dec_num_heads=2", "data.num_workers=0",
        "batch_size=8", "log_every=1", "progress=false", "optim.warmup_steps=2", "data.demo_samples=64"]


def tiny_config(*extra):
    return load_config("demo", TINY + list(extra))


def losses(out_dir: Path) -> list[float]:
    rows = [json.loads(l) for l in (out_dir / "metrics.jsonl").read_text().splitlines()]
    return [x for r in rows for x in r["step_losses"]]


def params(directory: Path) -> dict[str, torch.Tensor]:
    return M3AE.from_pretrained(directory).state_dict()


def test_loss_goes_down(tmp_path):
    result = pretrain(tiny_config("steps=40", "optim.lr=3e-3"), tmp_path)
    curve = losses(tmp_path)
    assert len(curve) == 40
    assert sum(curve[-5:]) / 5 < 0.7 * sum(curve[:5]) / 5
    assert result.status == "finished" and result.checkpoint == latest_checkpoint(tmp_path)


def test_exact_resume_after_stop_at_step(tmp_path):
    steps = ["steps=10", "ckpt_every=100"]
    straight = pretrain(tiny_config(*steps), tmp_path / "straight")
    first = pretrain(tiny_config(*steps), tmp_path / "split", stop_at_step=5)
    assert first.status == "stopped" and first.step == 5
    resumed = pretrain(tiny_config(*steps), tmp_path / "split", resume="auto")
    assert resumed.step == 10
    assert losses(tmp_path / "straight") == pytest.approx(losses(tmp_path / "split"), abs=1e-6)
    a, b = params(straight.checkpoint), params(resumed.checkpoint)
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)
    sa, sb = load_train_state(straight.checkpoint), load_train_state(resumed.checkpoint)
    assert sa["step"] == sb["step"] == 10
    torch.testing.assert_close(sa["optimizer"]["state"][0]["exp_avg_sq"], sb["optimizer"]["state"][0]["exp_avg_sq"])


def test_exact_resume_with_workers_and_grad_accum(tmp_path):
    steps = ["steps=6", "grad_accum=2", "data.num_workers=2", "ckpt_every=100"]
    pretrain(tiny_config(*steps), tmp_path / "straight")
    pretrain(tiny_config(*steps), tmp_path / "split", stop_at_step=3)
    pretrain(tiny_config(*steps), tmp_path / "split", resume="auto")
    assert losses(tmp_path / "straight") == pytest.approx(losses(tmp_path / "split"), abs=1e-6)


def test_sigterm_checkpoints_and_resume_matches(tmp_path):
    run = tmp_path / "killed"
    args = ["pretrain", "--config", "demo", "--out", str(run), "--steps", "60", *TINY, "ckpt_every=1000"]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1] / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "m3ae", *args], stderr=subprocess.PIPE, text=True, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:  # wait for a few steps to be logged
        if (run / "metrics.jsonl").is_file() and len((run / "metrics.jsonl").read_text().splitlines()) >= 3:
            break
        time.sleep(0.05)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 0, err
    assert "received SIGTERM" in err and "--resume auto" in err
    stopped_at = int(latest_checkpoint(run).name.split("_")[1])
    assert 3 <= stopped_at < 60
    assert main(args + ["--resume", "auto"]) == 0
    pretrain(tiny_config("steps=60", "ckpt_every=1000"), tmp_path / "straight")
    assert losses(run) == pytest.approx(losses(tmp_path / "straight"), abs=1e-6)
    a, b = params(latest_checkpoint(run)), params(latest_checkpoint(tmp_path / "straight"))
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-5)


def test_keep_last_and_atomic_checkpoints(tmp_path):
    pretrain(tiny_config("steps=8", "ckpt_every=2", "keep_last=2"), tmp_path)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [6, 8]
    assert not [p for p in (tmp_path / "checkpoints").iterdir() if p.name.startswith(".")]
    state = load_train_state(latest_checkpoint(tmp_path))  # weights_only=True inside
    assert state["step"] == 8 and "rng" in state and state["data"]["next_micro_batch"] == 8


def test_leftovers_of_a_killed_process_with_this_pid_do_not_trip_pruning_or_resaving(tmp_path):
    """Was: a checkpoint's temp folder and the folder a pruned one is renamed to before deletion were
    named by pid only. In a container the restarted trainer often gets the pid of the one killed;
    where that one's leftovers were still there (its deletion was cut off, or failed on a network
    disk), pruning raised 'Directory not empty' after the new checkpoint was written, and a re-save
    of a step raised too. Temp files of killed atomic writes beside and inside checkpoints are
    passed over by listing, pruning and resuming."""
    from m3ae.checkpoint import checkpoint_root, clean_stale, newest_intact, save_checkpoint

    torch.manual_seed(0)
    model = M3AE(tiny_config().model)
    root = checkpoint_root(tmp_path)
    root.mkdir(parents=True)
    pid = os.getpid()
    (root / f".old-step_00000001-{pid}").mkdir()  # a killed deletion of step 1, same pid
    (root / f".old-step_00000001-{pid}" / "model.safetensors").write_bytes(b"\0" * 64)
    (root / f".old-step_00000002-{pid}").write_text("a file of that name")
    (root / f".tmp-step_00000003-{pid}").write_text("a file of that name")
    (root / ".model.safetensors.0123456789ab.tmp").write_bytes(b"\0" * 64)  # a killed atomic write
    for step in (1, 2, 2, 3):  # step 2 saved twice: the second moves the first aside
        path = save_checkpoint(tmp_path, step, model, {"step": step}, f"steps: {step}\n", keep_last=2)
        (path / ".model.safetensors.0123456789ab.tmp").write_bytes(b"\0" * 64)
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 3]
    found = newest_intact(tmp_path, load_train_state)
    assert found is not None and found[0].name == "step_00000003" and found[1]["step"] == 3
    assert sorted(clean_stale(tmp_path)) == [f".old-step_00000001-{pid}", f".old-step_00000002-{pid}",
                                             f".tmp-step_00000003-{pid}"]
    assert sorted(p.name for p in root.iterdir()) == [".model.safetensors.0123456789ab.tmp", "step_00000002",
                                                      "step_00000003"]


def test_non_finite_steps_are_skipped_then_stop(tmp_path, monkeypatch):
    original = M3AE.forward

    def poisoned(self, *a, **k):
        out = original(self, *a, **k)
        out.loss = out.loss * float("nan")
        return out
    monkeypatch.setattr(M3AE, "forward", poisoned)
    with pytest.raises(FloatingPointError, match="3 non-finite steps in a row"):
        pretrain(tiny_config("steps=10", "max_nonfinite=3"), tmp_path)
    # Skipped steps still count (the schedule moved on); the intact weights are saved.
    assert latest_checkpoint(tmp_path).name == "step_00000002"


def test_stopping_for_bad_data_keeps_the_steps_done(tmp_path, monkeypatch):
    from m3ae.data.bad import DataQualityError
    from m3ae.data import loader

    real = loader.build_train_data

    def failing(*args, **kwargs):
        data = real(*args, **kwargs)
        inner = data.batches

        def batches():
            for i, batch in enumerate(inner):
                if i == 5:
                    raise DataQualityError("60 of 100 samples were unusable")
                yield batch
        data.batches = batches()
        return data
    monkeypatch.setattr("m3ae.train.loop.build_train_data", failing)
    with pytest.raises(DataQualityError):
        pretrain(tiny_config("steps=10", "ckpt_every=100"), tmp_path)
    assert latest_checkpoint(tmp_path).name == "step_00000005"


def test_resume_refuses_other_model_shape(tmp_path):
    pretrain(tiny_config("steps=2"), tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        pretrain(tiny_config("steps=4", "model.depth=3"), tmp_path, resume="auto")


def test_a_fresh_run_refuses_a_folder_with_an_earlier_runs_checkpoints(tmp_path):
    # Without --resume it would prune by step number among the earlier run's checkpoints (deleting its
    # own last one) and start metrics.jsonl over.
    pretrain(tiny_config("steps=4", "ckpt_every=2"), tmp_path)
    log = (tmp_path / "metrics.jsonl").read_text()
    with pytest.raises(ValueError, match="holds checkpoints of an earlier run .newest step_00000004.*--resume auto"):
        pretrain(tiny_config("steps=2", "seed=1"), tmp_path)
    assert (tmp_path / "metrics.jsonl").read_text() == log
    assert [p.name for _, p in list_checkpoints(tmp_path)] == ["step_00000002", "step_00000004"]


def test_a_refused_resume_from_an_earlier_checkpoint_moves_nothing(tmp_path):
    pretrain(tiny_config("steps=6", "ckpt_every=2", "keep_last=0"), tmp_path)
    with pytest.raises(ValueError, match="another configuration"):
        pretrain(tiny_config("steps=6", "model.depth=3"), tmp_path,
                 resume=str(tmp_path / "checkpoints" / "step_00000002"))
    assert [s for s, _ in list_checkpoints(tmp_path)] == [2, 4, 6]
    assert not (tmp_path / "checkpoints-abandoned").exists()


def test_resume_refuses_another_architecture_given_by_path(tmp_path):
    """Named checkpoint folder: the refusal names the differing field, before anything is loaded."""
    pretrain(tiny_config("steps=2"), tmp_path)
    with pytest.raises(ValueError, match="another configuration.*'depth': \\(2, 3\\)"):
        pretrain(tiny_config("steps=4", "model.depth=3"), tmp_path / "other",
                 resume=str(tmp_path / "checkpoints" / "step_00000002"))
    with pytest.raises(FileNotFoundError, match="checkpoint to resume from not found"):
        pretrain(tiny_config("steps=4"), tmp_path / "other", resume=str(tmp_path / "nope"))


def test_resume_loads_into_the_run_model_without_building_another(tmp_path, monkeypatch):
    """The checkpoint's weights go into the one model the run builds (no second M3AE: on a large
    model that is a whole copy's memory and init time)."""
    pretrain(tiny_config("steps=4"), tmp_path, stop_at_step=2)
    saved = params(tmp_path / "checkpoints" / "step_00000002")
    built, seen = [], []
    init = M3AE.__init__

    def counting_init(self, *args, **kwargs):
        built.append(self)
        init(self, *args, **kwargs)

    def hook(model):  # called once setup has restored the checkpoint, before any step
        seen.append({k: v.clone() for k, v in model.state_dict().items()})
        return model
    monkeypatch.setattr(M3AE, "__init__", counting_init)
    result = pretrain(tiny_config("steps=4"), tmp_path, resume="auto", model_hook=hook)
    assert result.step == 4 and len(built) == 1
    assert seen[0].keys() == saved.keys() and all(torch.equal(seen[0][k], saved[k]) for k in saved)


def test_unreadable_checkpoints_leave_the_model_as_built(tmp_path, caplog):
    """Every checkpoint unreadable (here the train state): a fresh start, exactly as a straight run;
    nothing from the half-read checkpoint reached the model."""
    caplog.set_level(logging.INFO, logger="m3ae")  # the library logs; no CLI handler here
    pretrain(tiny_config("steps=2", "ckpt_every=100"), tmp_path / "straight")
    pretrain(tiny_config("steps=2", "ckpt_every=100"), tmp_path / "run", stop_at_step=1)
    (tmp_path / "run" / "checkpoints" / "step_00000001" / "train_state.pt").write_bytes(b"not a pickle")
    result = pretrain(tiny_config("steps=2", "ckpt_every=100"), tmp_path / "run", resume="auto")
    assert "step_00000001 is unreadable" in caplog.text and result.step == 2
    assert losses(tmp_path / "run") == losses(tmp_path / "straight")


@pytest.mark.parametrize("override, message", [
    ("model.image_size=30", "not divisible"),
    ("model.image_mask_ratio=1.0", "image_mask_ratio"),
    ("model.preset=gigantic", "unknown model preset"),
    ("model.nope=1", "nope"),
    ("steps=0", "steps must be positive"),
    ("peak_tflops=0", "peak_tflops must be positive"),
    ("threads=0", "threads must be at least 1"),
    ("model.depth=six", "model.depth: Value 'six'"),  # wrong types name the setting
    ("optim.lr=abc", "optim.lr: Value 'abc'"),
    ("compile=maybe", "compile: Value 'maybe'"),
])
def test_bad_run_configuration(override, message):
    with pytest.raises(ConfigError, match=message):
        tiny_config(override)


def test_cli_reports_config_errors_without_traceback(tmp_path, capsys):
    assert main(["pretrain", "--config", "nope", "--out", str(tmp_path)]) == 2
    assert "unknown run preset" in capsys.readouterr().err
    for text, message in (("model: [1, 2\n", "is not valid YAML"), ("- a\n- b\n", "must hold a mapping"),
                          ("model:\n  depth: three\n", "model.depth: Value 'three'")):
        (tmp_path / "c.yaml").write_text(text)
        assert main(["pretrain", "--config", str(tmp_path / "c.yaml"), "--out", str(tmp_path / "o")]) == 2
        err = capsys.readouterr().err
        assert message in err and "Traceback" not in err, err


def test_demo_end_to_end(tmp_path, capsys):
    out = tmp_path / "demo"
    assert main(["demo", "--out", str(out), "--steps", "12", "--samples", "2", *TINY]) == 0
    printed = capsys.readouterr().out
    assert "loss at start" in printed
    for name in ("loss.png", "reconstruction.png", "metrics.jsonl", "tokenizer.json"):
        assert (out / name).stat().st_size > 0
    assert latest_checkpoint(out) is not None
    # Running it again on a finished run resumes, trains nothing and redraws.
    assert main(["demo", "--out", str(out), "--steps", "12", "--samples", "2", *TINY]) == 0
    assert "loss at start" in capsys.readouterr().out


def test_mixed_paired_and_unpaired_text_logs_every_loss(tmp_path):
    from data_files import write_manifest, write_text, write_tokenizer

    spec = f"paired={write_manifest(tmp_path, n=16)},text=text:{write_text(tmp_path, n=40)}@0.5"
    config = tiny_config("steps=4", f"data.spec={spec}", f"data.tokenizer={write_tokenizer(tmp_path)}",
                         "model.vocab_size=256")
    result = pretrain(config, tmp_path / "run")
    for row in result.history:
        assert {"image_loss", "text_loss", "loss"} <= set(row)
        assert all(map(math.isfinite, (row["image_loss"], row["text_loss"], row["loss"])))


def test_bf16_autocast_path_runs(tmp_path, caplog):
    # The CUDA default; on CPU it exercises the same autocast code path (fp32 master weights).
    from m3ae.precision import cpu_has_native_bf16

    caplog.set_level(logging.INFO, logger="m3ae")
    result = pretrain(tiny_config("steps=3", "precision=bf16"), tmp_path)
    assert ("neither AMX nor AVX512-BF16" in caplog.text) == (not cpu_has_native_bf16())
    assert all(math.isfinite(x) for r in result.history for x in r["step_losses"])
    assert next(iter(M3AE.from_pretrained(result.checkpoint).parameters())).dtype == torch.float32


def test_bf32_precision_trains_fp32_weights_near_fp32_and_restores_the_setting(tmp_path, caplog):
    """bf32 (oneDNN's bf16-input matmuls; plain fp32 on CPUs without AMX) keeps every tensor fp32,
    follows the fp32 run within bf16 rounding, and leaves torch's matmul setting as it found it."""
    from m3ae.precision import _fp32_matmul_precision, cpu_has_amx

    before = _fp32_matmul_precision()
    caplog.set_level(logging.INFO, logger="m3ae")
    bf32 = pretrain(tiny_config("steps=3", "precision=bf32"), tmp_path / "bf32")
    assert _fp32_matmul_precision() == before
    assert "fp32, bf16-input matmuls" in caplog.text
    assert ("this CPU has no AMX" in caplog.text) == (not cpu_has_amx())
    pretrain(tiny_config("steps=3", "precision=fp32"), tmp_path / "fp32")
    got, want = losses(tmp_path / "bf32"), losses(tmp_path / "fp32")
    assert len(got) == len(want) == 3 and got == pytest.approx(want, rel=2e-2)
    assert next(iter(M3AE.from_pretrained(bf32.checkpoint).parameters())).dtype == torch.float32


def test_precision_setting_is_checked():
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32, bf16, bf32"):
        tiny_config("precision=fp16")


def test_resume_can_switch_on_activation_checkpointing(tmp_path, caplog):
    """A run that ran out of memory resumes with grad_checkpointing on (a runtime switch, not
    architecture: not in config.json), and ends exactly as a straight run."""
    caplog.set_level(logging.INFO, logger="m3ae")  # the library logs; no CLI handler here
    pretrain(tiny_config("steps=4", "ckpt_every=100"), tmp_path / "straight")
    pretrain(tiny_config("steps=4"), tmp_path / "split", stop_at_step=2)
    config = json.loads((tmp_path / "split" / "checkpoints" / "step_00000002" / "config.json").read_text())
    assert "grad_checkpointing" not in config and "attention" not in config
    result = pretrain(tiny_config("steps=4", "model.grad_checkpointing=true"), tmp_path / "split", resume="auto")
    assert "model.grad_checkpointing: False -> True" in caplog.text
    assert result.step == 4
    assert losses(tmp_path / "straight") == pytest.approx(losses(tmp_path / "split"), abs=1e-6)
    a = M3AE.from_pretrained(tmp_path / "straight" / "checkpoints" / "step_00000004").state_dict()
    b = M3AE.from_pretrained(tmp_path / "split" / "checkpoints" / "step_00000004").state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_resume_accepts_changed_runtime_switches(tmp_path, caplog):
    """attention kernel, threads and activation checkpointing change how the model runs, not what it
    computes: resumed without --allow-changes, listed, and the run continues from the checkpoint
    (the attention kernel's other rounding said: not bit for bit)."""
    caplog.set_level(logging.INFO, logger="m3ae")  # the library logs; no CLI handler here
    pretrain(tiny_config("steps=4", "ckpt_every=100"), tmp_path / "straight")
    pretrain(tiny_config("steps=4"), tmp_path / "split", stop_at_step=2)
    switches = ("model.attention=explicit", "model.grad_checkpointing=true", "threads=1", "host_allocator=system")
    result = pretrain(tiny_config("steps=4", *switches), tmp_path / "split", resume="auto")
    err = caplog.text
    assert "model.attention: 'sdpa' -> 'explicit'" in err and "threads: None -> 1" in err
    assert "host_allocator: 'auto' -> 'system'" in err
    assert "'explicit' (not exact: changes the float rounding)" in err
    assert "(not exact)" not in err and result.step == 4
    # bf16 autocast: the explicit softmax(QK^T) rounds differently from the fused kernel
    assert losses(tmp_path / "split") == pytest.approx(losses(tmp_path / "straight"), rel=1e-3)


def test_resume_that_turns_static_shapes_on_says_the_text_masks_change(tmp_path, caplog):
    """Static shapes (set, or implied by compile) draw the text masks over text_length: allowed at a
    resume, but the run masks other tokens than an uninterrupted one, and says so."""
    caplog.set_level(logging.INFO, logger="m3ae")  # the library logs; no CLI handler here
    pretrain(tiny_config("steps=4", "ckpt_every=100"), tmp_path / "straight")
    pretrain(tiny_config("steps=4"), tmp_path / "split", stop_at_step=2)
    result = pretrain(tiny_config("steps=4", "static_shapes=true"), tmp_path / "split", resume="auto")
    assert result.step == 4
    assert ("static_shapes: None -> True (not exact: the text masks are now drawn over text_length, so other "
            "tokens are masked than in an uninterrupted run)") in caplog.text
    straight, split = losses(tmp_path / "straight"), losses(tmp_path / "split")
    assert split[:2] == straight[:2] and split[2:] != pytest.approx(straight[2:], abs=1e-6)


def test_resume_with_another_thread_count_is_said_not_exact(tmp_path, caplog):
    """CPU kernels split their sums by thread, so another torch thread count gives other bits (seen:
    threads 1 -> 2 at a resume changed the final weights). The count as resolved is compared: unset,
    it follows the cores and loader workers, so the setting alone would not show the change."""
    caplog.set_level(logging.INFO, logger="m3ae")  # the library logs; no CLI handler here
    pretrain(tiny_config("steps=3", "threads=1", "device=cpu"), tmp_path / "run", stop_at_step=1)
    pretrain(tiny_config("steps=3", "threads=1", "device=cpu"), tmp_path / "run", resume="auto", stop_at_step=2)
    assert "torch threads" not in caplog.text  # the same count: nothing to say
    pretrain(tiny_config("steps=3", "threads=2", "device=cpu"), tmp_path / "run", resume="auto")
    assert "torch threads 1 -> 2 (not exact: changes the float rounding; set threads=1" in caplog.text


def test_bad_data_counts_continue_across_a_resume(tmp_path):
    """Was: the counts started again from zero at a resume, so metrics.jsonl's bad_samples (and the
    max_bad_fraction check) differed from an uninterrupted run's."""
    from data_files import write_manifest, write_tokenizer

    manifest = write_manifest(tmp_path, n=16)
    for i in (1, 6, 11):  # missing images: skipped, counted
        (tmp_path / "images" / f"img{i:03d}.jpg").unlink()
    data = [f"data.spec={manifest}", f"data.tokenizer={write_tokenizer(tmp_path)}", "model.vocab_size=300",
            "steps=4", "ckpt_every=100", "data.max_bad_fraction=0.5"]
    pretrain(tiny_config(*data), tmp_path / "straight")
    pretrain(tiny_config(*data), tmp_path / "split", stop_at_step=2)
    pretrain(tiny_config(*data), tmp_path / "split", resume="auto")

    def bad(run):
        return [json.loads(line).get("bad_samples") for line in (tmp_path / run / "metrics.jsonl").open()]
    assert bad("straight")[-1] > bad("straight")[1]  # more bad samples after the stop
    assert bad("split") == bad("straight")


def test_resume_of_a_stream_with_other_workers_is_said_not_exact(tmp_path, caplog):
    """data.num_workers changes nothing for indexed sources, but a stream's position is kept per
    (process, worker) share: resumed with another number of shares it is not exact, and says so."""
    from data_files import write_img2dataset_tar, write_tokenizer
    from m3ae.train.config import check_resume_changes, to_yaml

    caplog.set_level(logging.INFO, logger="m3ae")  # the library logs; no CLI handler here
    shard = write_img2dataset_tar(str(tmp_path / "s.tar"), n=8)
    data = [f"data.spec={shard}", f"data.tokenizer={write_tokenizer(tmp_path)}", "model.vocab_size=300", "steps=3"]
    pretrain(tiny_config(*data), tmp_path / "run", stop_at_step=2)
    result = pretrain(tiny_config(*data, "data.num_workers=2"), tmp_path / "run", resume="auto")
    assert "data.num_workers: 0 -> 2 (not exact: a stream's position is kept per process x worker share, " \
           "1 saved, 2 now" in caplog.text and result.step == 3  # said, not refused
    # Indexed sources (no saved stream position), or a layout that stays 1 share: nothing to say.
    saved = to_yaml(tiny_config())
    for parts, workers in ((None, 2), (1, 1)):
        lines = check_resume_changes(saved, tiny_config(f"data.num_workers={workers}"), False, "x", stream_parts=parts)
        assert lines == [f"data.num_workers: 0 -> {workers}"]


def test_runtime_switches_change_a_built_model():
    from m3ae import M3AEConfig

    model = M3AE(M3AEConfig.from_preset("nano", image_size=16, patch_size=4, vocab_size=20, text_length=8))
    model.set_grad_checkpointing(True).set_attention("explicit")
    assert model.encoder.grad_checkpointing and model.decoder.blocks[0].attn.explicit
    assert "attention" not in model.config.to_dict()
    with pytest.raises(ValueError, match="attention must be"):
        model.set_attention("flash")


def test_threads_setting_is_applied_logged_and_restored(tmp_path, caplog):
    caplog.set_level(logging.INFO, logger="m3ae")  # the library logs; no CLI handler here
    before = torch.get_num_threads()
    seen = []
    pretrain(tiny_config("steps=2", "log_every=1", f"threads={before + 1}"), tmp_path,
             on_log=lambda row: seen.append(torch.get_num_threads()))
    assert seen == [before + 1, before + 1] and torch.get_num_threads() == before
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["threads"] for r in rows] == [before + 1] * 2
    assert "loader_cores" not in rows[0]  # no loader workers: the batches are made in the step's process
    if sys.platform.startswith("linux"):  # the process's resident memory, in GiB, in every row
        assert all(0.05 < r["host_rss_gib"] < 64 for r in rows)
    assert f"threads {before + 1} (threads setting)" in caplog.text


@pytest.mark.parametrize("pays", [True, False])
def test_auto_threads_settle_beside_the_loader_and_resume_bit_for_bit(tmp_path, monkeypatch, caplog, pays):
    """Auto threads with loader workers start at cores - workers, measure the workers over steps
    11-30, try the idle core over steps 31-50 and keep the faster count; a checkpoint after that
    keeps it, so a resume continues bit for bit. The decisions (timing) are stubbed here;
    test_threads tests them."""
    import m3ae.load_watch
    import m3ae.threads

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(m3ae.threads, "usable_cores", lambda: 2)
    readings = []

    def idle_core(cores, workers, loader_cores):
        readings.append((cores, workers, loader_cores))
        return 2  # a light loader's outcome, whatever this machine's timing

    monkeypatch.setattr(m3ae.threads, "threads_beside_loader", idle_core)
    monkeypatch.setattr(m3ae.threads, "trial_pays", lambda base, trial: pays)
    monkeypatch.setattr(m3ae.load_watch, "_affinity", lambda: None)  # no load watch after the tuner
    caplog.set_level(logging.INFO, logger="m3ae")
    before = torch.get_num_threads()
    run = ["steps=56", "data.num_workers=1", "ckpt_every=53", "device=cpu"]
    straight = pretrain(tiny_config(*run), tmp_path / "straight")
    assert torch.get_num_threads() == before
    rows = [json.loads(l) for l in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    settled = 2 if pays else 1
    assert [r["threads"] for r in rows] == [1] * 30 + [2] * 20 + [settled] * 6  # a row says its steps' count
    assert all(r["loader_cores"] > 0 for r in rows)
    assert len(readings) == 1 and readings[0][:2] == (2, 1) and readings[0][2] > 0
    assert "over steps 11-30 (" in caplog.text and "trying 2 over steps 31-50 (auto threads)" in caplog.text
    assert "at 2 threads over steps 31-50" in caplog.text
    assert f"{settled} torch thread{'s' if pays else ''} from here (auto threads)" in caplog.text
    state = load_train_state(latest_checkpoint(tmp_path / "straight"))
    assert (state["threads"], state["threads_settled"]) == (settled, True)

    pretrain(tiny_config(*run), tmp_path / "split", stop_at_step=53)
    caplog.clear()
    resumed = pretrain(tiny_config(*run), tmp_path / "split", resume="auto")
    assert len(readings) == 2  # the resumed run did not measure again
    assert f"threads {settled} (auto: 2 usable cores, as settled before the resume)" in caplog.text
    assert "torch threads" not in caplog.text  # no change to warn of
    assert losses(tmp_path / "split") == losses(tmp_path / "straight")
    a, b = params(straight.checkpoint), params(resumed.checkpoint)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_auto_threads_follow_a_load_that_comes_mid_run(tmp_path, monkeypatch, caplog):
    """After its first steps a CPU run with auto threads watches its cores (m3ae.load_watch): other
    processes using one of the two cores make it try one thread, kept when it pays. The machine's
    /proc/stat and the trial's outcome are simulated here; test_load_watch tests the decisions."""
    import m3ae.load_watch as lw
    import m3ae.threads
    from m3ae.load_watch import CpuTimes, own_cpu_seconds

    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(m3ae.threads, "usable_cores", lambda: 2)
    monkeypatch.setattr(lw, "_affinity", lambda: frozenset({0, 1}))
    monkeypatch.setattr(lw, "cgroup_cpu_quota", lambda: None)
    start = time.perf_counter()
    # Another process busy on one whole core from the start; none of the two idle.
    monkeypatch.setattr(lw, "read_cpu_times",
                        lambda cpus: CpuTimes(0.0, own_cpu_seconds() + time.perf_counter() - start))
    monkeypatch.setattr(lw, "WINDOW_S", 0.0)  # windows of MIN_STEPS (5) steps
    monkeypatch.setattr(lw, "trial_pays", lambda base, trial: True)
    caplog.set_level(logging.INFO, logger="m3ae")
    before = torch.get_num_threads()
    pretrain(tiny_config("steps=30", "ckpt_every=25", "device=cpu"), tmp_path)
    assert torch.get_num_threads() == before
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    # The watch opens its first window after step 11, tries 1 thread after step 16, keeps it after 21.
    assert [r["threads"] for r in rows] == [2] * 16 + [1] * 14
    seen = re.search(r"step 16: (\d\.\d\d) cores used by other processes", caplog.text)
    assert seen and float(seen[1]) == pytest.approx(1.0, abs=0.2)  # os.times counts in 10 ms ticks
    assert "trying 1 for a window (auto threads)" in caplog.text
    assert "step 21: " in caplog.text and "keeping 1 (auto threads)" in caplog.text
    assert load_train_state(latest_checkpoint(tmp_path))["threads"] == 1


def test_a_settled_thread_count_is_kept_only_where_it_fits():
    """A checkpoint's settled count is kept on resume only within this run's range (cores - workers
    .. cores): another machine's count, or a damaged state, is tuned again; GPU and multi-process
    runs never tune."""
    from m3ae.threads import choose_threads
    from m3ae.train.loop import _loader_threads
    from m3ae.train.resume import Resumed

    choice = choose_threads(None, 1, environ={}, cores=2)

    def resumed(threads):
        return Resumed(Path("ckpt"), 40, 0, {}, None, None, threads, "fp32", threads_settled=True)

    before = torch.get_num_threads()
    try:
        kept, tuner = _loader_threads(choice, resumed(2), torch.device("cpu"), 1)
        assert (kept.threads, tuner, torch.get_num_threads()) == (2, None, 2)
        for bad in (64, 0, None):
            again, tuner = _loader_threads(choice, resumed(bad), torch.device("cpu"), 1)
            assert again is choice and tuner is not None and (tuner.first, tuner.base) == (50, 1)
        assert _loader_threads(choice, None, torch.device("cuda"), 1) == (choice, None)
        assert _loader_threads(choice, None, torch.device("cpu"), 2) == (choice, None)
        assert _loader_threads(choose_threads(1, 1, environ={}, cores=2), None, torch.device("cpu"), 1)[1] is None
    finally:
        torch.set_num_threads(before)


def test_host_allocator_choice_is_logged(tmp_path, caplog):
    from m3ae.host_allocator import _glibc, choose

    caplog.set_level(logging.INFO, logger="m3ae")
    pretrain(tiny_config("steps=1", "device=cpu"), tmp_path / "auto")
    assert f"host allocator: {choose('auto', 'cpu', libc=_glibc())}" in caplog.text
    pretrain(tiny_config("steps=1", "device=cpu", "host_allocator=system"), tmp_path / "system")
    assert "host allocator: unchanged (host_allocator=system)" in caplog.text


def test_grown_kept_memory_is_trimmed_at_a_log_row(tmp_path, caplog, monkeypatch):
    """The trainer checks kept memory at each log row: past the first row's size + 10 %, it trims."""
    from m3ae import host_allocator
    from m3ae.train import loop as loop_module

    caplog.set_level(logging.INFO, logger="m3ae")
    sizes = iter([2**30, 2**30, 3 * 2**30, 2**30])  # first row, second row, third row (then after the trim)
    monkeypatch.setattr(host_allocator, "_glibc", lambda: None)  # no real mallopt / malloc_trim here
    trims = []
    monkeypatch.setattr(loop_module, "KeptMemoryLimit", lambda choice: host_allocator.KeptMemoryLimit(
        host_allocator.AllocatorChoice(True, "test"), rss=lambda: next(sizes), trim=lambda: trims.append(1)))
    pretrain(tiny_config("steps=3", "log_every=1"), tmp_path)
    assert trims == [1]
    assert "step 3: resident memory grew to 3.00 GiB" in caplog.text and "(1.00 GiB now)" in caplog.text


def test_stream_positions_of_every_rank_are_merged_into_the_checkpoint(monkeypatch):
    from m3ae.train import loop

    def share(n):
        return {"n": n, "sources": [[n, 2]]}
    per_rank = [{"next_micro_batch": 4, "stream": {"parts": 4, "workers": {"0": share(1), "1": share(2)}}},
                {"next_micro_batch": 4, "stream": {"parts": 4, "workers": {"2": share(3), "3": share(4)}}}]
    monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
    monkeypatch.setattr(torch.distributed, "all_gather_object", lambda out, obj: out.__setitem__(slice(None), per_rank))
    merged = loop._gather_data_state(per_rank[0], world_size=2)
    assert merged["stream"] == {"parts": 4, "workers": {"0": share(1), "1": share(2), "2": share(3), "3": share(4)}}
    assert loop._gather_data_state(per_rank[0], world_size=1) is per_rank[0]


def test_tensorboard_logging(tmp_path):
    pytest.importorskip("tensorboard")
    pretrain(tiny_config("steps=2", "tensorboard=true"), tmp_path)
    assert list((tmp_path / "tensorboard").glob("events.out.tfevents.*"))


def test_log_rows_carry_model_flops_and_mfu(tmp_path):
    """Achieved TFLOP/s from the analytic count of the batches run; MFU against the given peak."""
    from m3ae.data.loader import build_train_data
    from m3ae.perf import batch_train_flops

    config = tiny_config("steps=4", "log_every=2", "peak_tflops=0.5")
    pretrain(config, tmp_path)
    rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4]
    # The same batches the run saw (the loader is deterministic), counted here.
    data = build_train_data(config.data, config.model, seed=config.seed, micro_batch=config.batch_size)
    batches = [b for b, _ in zip(data.batches, range(4))]
    for r, window in zip(rows, (batches[:2], batches[2:])):
        assert r["model_tflops"] > 0 and r["mfu"] == pytest.approx(r["model_tflops"] / 0.5)
        # FLOP/s over samples/s = FLOPs per sample of exactly these batches
        expected = sum(batch_train_flops(b, config.model) for b in window) / sum(b.size for b in window)
        assert r["model_tflops"] * 1e12 / r["samples_per_s"] == pytest.approx(expected, rel=1e-3)


def test_presets_inherit_with_base(tmp_path):
    from m3ae.config import ConfigError
    from m3ae.train.config import load_config

    (tmp_path / "a.yaml").write_text("model: {emb_dim: 64, depth: 2, num_heads: 2}\nsteps: 7\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\nmodel: {depth: 3}\n")
    c = load_config(str(tmp_path / "b.yaml"), ["steps=9"])
    assert (c.model.emb_dim, c.model.depth, c.steps) == (64, 3, 9)
    (tmp_path / "c.yaml").write_text("base: d.yaml\n")
    (tmp_path / "d.yaml").write_text("base: c.yaml\n")
    with pytest.raises(ConfigError, match="cycle"):
        load_config(str(tmp_path / "c.yaml"))
    # The shipped MAE baseline is the M3AE recipe without text, nothing else.
    m3ae, mae = load_config("fashion_m3ae"), load_config("fashion_mae")
    assert mae.model.vocab_size == 0 and not mae.model.use_type_embedding
    mae.model.vocab_size, mae.model.use_type_embedding = m3ae.model.vocab_size, True
    assert mae == m3ae


def test_resuming_a_finished_run_exits_cleanly(tmp_path, capsys):
    argv = ["pretrain", "--config", "demo", "--out", str(tmp_path), "--steps", "3", *TINY]
    assert main(argv) == 0
    before = params(latest_checkpoint(tmp_path))
    written = (latest_checkpoint(tmp_path) / "train_state.pt").stat().st_mtime_ns
    assert main(argv + ["--resume", "auto"]) == 0  # a re-queued job that already finished
    assert (latest_checkpoint(tmp_path) / "train_state.pt").stat().st_mtime_ns == written  # not rewritten
    assert "already finished (3 steps)" in capsys.readouterr().out
    after = params(latest_checkpoint(tmp_path))
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_result_history_keeps_the_newest_rows_only(tmp_path, monkeypatch):
    # One row per log interval, kept for the whole run, grew without end on long runs.
    import m3ae.train.loop as loop

    monkeypatch.setattr(loop, "HISTORY_ROWS", 3)
    result = pretrain(tiny_config("steps=7", "log_every=1"), tmp_path)
    assert [r["step"] for r in result.history] == [5, 6, 7]
    assert result.history_dropped == 4
    assert len(losses(tmp_path)) == 7  # metrics.jsonl still has every step


def test_resume_where_auto_precision_resolves_otherwise_is_said_not_exact(tmp_path, caplog, monkeypatch):
    """`precision: auto` resolves per device, so the same run_config resumed on another machine can
    switch fp32 <-> bf16 with no setting changed: the checkpoint records the resolved mode and a
    resume that resolves differently says so (here the device's answer is stood in for)."""
    import m3ae.train.loop as loop_module

    caplog.set_level(logging.INFO, logger="m3ae")
    monkeypatch.setattr(loop_module, "resolve_precision", lambda precision, device: "fp32")
    pretrain(tiny_config("steps=3", "device=cpu"), tmp_path / "run", stop_at_step=1)
    pretrain(tiny_config("steps=3", "device=cpu"), tmp_path / "run", resume="auto", stop_at_step=2)
    assert "changed since the checkpoint: precision" not in caplog.text  # same mode: nothing to say
    monkeypatch.setattr(loop_module, "resolve_precision", lambda precision, device: "bf16")
    result = pretrain(tiny_config("steps=3", "device=cpu"), tmp_path / "run", resume="auto")
    assert ("changed since the checkpoint: precision fp32 -> bf16 (precision=auto resolves per device; not "
            "exact: the step's arithmetic changes; set precision=fp32 to continue as it began)") in caplog.text
    assert result.step == 3
