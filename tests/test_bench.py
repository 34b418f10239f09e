"""The analytic FLOP formula against a measured count; the bench command end to end (tiny)."""
import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from m3ae import M3AE, M3AEConfig
from m3ae.data.collate import pad_texts
from m3ae.masking import make_masks
from m3ae.perf import StepShape, forward_flops, train_flops


def _count(model, full, train, **inputs):
    # The math SDPA path decomposes into counted matmuls (the fused CPU kernel is not counted).
    # Forward-only counts run without grad: the fused text head-and-loss computes its gradients
    # inside the forward pass whenever they will be needed.
    with sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter, torch.set_grad_enabled(train):
        out = model(**inputs, full_outputs=full)
        if train:
            out.loss.backward()
    return counter.get_total_flops()


def test_flop_formula_matches_flop_counter():
    cfg = M3AEConfig(image_size=16, patch_size=4, emb_dim=32, depth=2, num_heads=4, dec_emb_dim=16,
                     dec_depth=1, dec_num_heads=2, vocab_size=100, text_length=12, output_head_depth=1)
    model = M3AE(cfg)
    g = torch.Generator().manual_seed(0)
    b = 4
    image = torch.randn(b, 3, 16, 16)
    text, pad = pad_texts([torch.randint(0, 100, (n,), generator=g) for n in (3, 7, 10, 5)])
    masks = make_masks(b, num_patches=16, text_padding=pad, image_ratio=0.75, text_ratio=0.75, generator=g)
    inputs = dict(image=image, text=text, text_padding_mask=pad, masks=masks)
    hidden_real = int(masks.text_targets.numel())
    fast = StepShape(kept_patches=masks.image_keep, text_length=text.shape[1], kept_text=masks.text_keep,
                     image_rows=16 - masks.image_keep, text_rows=hidden_real / b,
                 decoder_rows=16 - masks.image_keep + text.shape[1] - masks.text_keep)
    full = StepShape(kept_patches=masks.image_keep, text_length=text.shape[1], kept_text=masks.text_keep,
                     image_rows=16, text_rows=text.shape[1])
    assert _count(model, False, False, **inputs) == round(b * forward_flops(cfg, fast))
    assert _count(model, True, False, **inputs) == round(b * forward_flops(cfg, full))
    # Training: backward = 2x forward except the input gradient of the first layer (image patches
    # need none), so the 3x convention overcounts by a hair.
    measured = _count(model, False, True, **inputs)
    assert abs(measured - b * train_flops(cfg, fast)) / measured < 0.03


@pytest.mark.parametrize("extra", [[], ["--reference-fused-adamw", "--static-shapes", "--image-dtype", "float32"],
                                   ["model.vocab_size=0", "--threads", "1"]])  # MAE mode (crashed before)
def test_bench_train_command(tmp_path, capsys, extra):
    import json

    from m3ae.cli import main

    out = tmp_path / "bench.json"
    options = [o for o in extra if "=" not in o]
    rc = main(["bench", "train", "--preset", "nano", "--batch", "4", "--steps", "2", "--warmup", "1",
               "--min-caption", "2", "--json", str(out), *options, "model.image_size=16", "model.patch_size=4",
               "model.text_length=12", "model.vocab_size=100", *[o for o in extra if "=" in o]])
    assert rc == 0
    text = capsys.readouterr().out
    for key in ("samples/s", "data wait", "GFLOP/sample", "MFU", "measured matmul peak", "peak memory",
                "speed-up"):
        assert key in text
    r = json.loads(out.read_text())
    assert r["samples_per_s"] > 0 and r["reference"]["samples_per_s"] > 0
    assert r["reference"]["flops_per_sample"] > r["flops_per_sample"]  # heads everywhere cost more
    assert r["mode"] == ("mae" if "model.vocab_size=0" in extra else "m3ae")
    assert r["params"] == M3AE(M3AEConfig(**r["config"])).num_parameters()
    assert r["image_dtype"] == ("float32" if "float32" in extra else "uint8")


def test_bench_train_warns_of_a_precision_the_cpu_runs_slowly(tmp_path, capsys, monkeypatch):
    import json

    import m3ae.precision as precision
    from m3ae.cli import main

    # bf32 without AMX: the same warning path as bf16 without native bf16 (tests/test_precision.py
    # checks both texts), and fp32-fast on every CPU, so the test does not time generic bf16 kernels.
    monkeypatch.setattr(precision, "cpu_has_amx", lambda: False)
    out = tmp_path / "bench.json"
    for mode, warned in (("bf32", True), ("fp32", False)):
        assert main(["bench", "train", "--preset", "nano", "--batch", "2", "--steps", "1", "--warmup", "1",
                     "--no-reference", "--precision", mode, "--json", str(out), "model.image_size=16",
                     "model.patch_size=4", "model.text_length=8", "model.vocab_size=50"]) == 0
        printed, saved = capsys.readouterr().out, json.loads(out.read_text())
        if warned:
            assert "warning           precision bf32: this CPU has no AMX" in printed
            assert "use fp32 or bf16" in saved["precision_warning"]
        else:
            assert "warning" not in printed and "precision_warning" not in saved


def test_synthetic_uint8_batches_normalise_like_the_float_pipeline():
    """The bench's default images are what the trainer's loader ships: uint8 plus the data's pixel
    statistics, normalised where the batch lands (and the reference step's copies keep them)."""
    from m3ae.data.normalization import normalize_uint8
    from m3ae.train.bench import BenchOptions, reference_batch, synthetic_batches

    cfg = M3AEConfig(image_size=16, patch_size=4, emb_dim=32, depth=1, num_heads=4, dec_emb_dim=16,
                     dec_depth=1, dec_num_heads=2, vocab_size=100, text_length=12)
    opts = BenchOptions(cfg, batch=3, pool=1)
    (batch,) = synthetic_batches(cfg, opts)
    part = batch.parts[0]
    assert part.image.dtype == torch.uint8 and part.pixel_stats == "cc12m"
    assert torch.equal(part.model_inputs()["image"], normalize_uint8(part.image, "cc12m"))
    ref = reference_batch(batch, cfg, torch.Generator().manual_seed(0))
    assert ref.parts[0].pixel_stats == "cc12m"
    (floats,) = synthetic_batches(cfg, BenchOptions(cfg, batch=3, pool=1, image_dtype="float32"))
    assert floats.parts[0].image.dtype == torch.float32 and floats.parts[0].pixel_stats is None
    with pytest.raises(ValueError, match="image_dtype"):
        synthetic_batches(cfg, BenchOptions(cfg, batch=3, pool=1, image_dtype="fp16"))


def test_compile_graphs_counts_only_what_changed():
    from torch._dynamo.utils import counters

    from m3ae.train.bench import _dynamo_counters, compile_graphs

    before = _dynamo_counters()
    counters["stats"]["unique_graphs"] += 3
    counters["graph_break"]["a disabled function"] += 2
    counters["graph_break"]["data-dependent branch"] += 1
    try:
        got = compile_graphs(before)
    finally:
        counters["stats"]["unique_graphs"] -= 3
        counters["graph_break"]["a disabled function"] -= 2
        counters["graph_break"]["data-dependent branch"] -= 1
    assert got == {"compile_graphs": 3, "graph_breaks": 3,
                   "graph_break_reasons": ["a disabled function", "data-dependent branch"]}


def test_background_load_runs_busy_processes_only_inside_the_block():
    from m3ae.train.bench import background_load

    with background_load(2) as busy:
        assert len(busy) == 2 and all(p.poll() is None for p in busy)
    assert all(p.poll() is not None for p in busy)


def test_bench_head_command_fused_uses_less_memory(tmp_path, capsys):
    import json

    from m3ae.cli import main

    out = tmp_path / "head.json"
    rc = main(["bench", "head", "--rows", "1024", "--dim", "16", "--steps", "1", "--device", "cpu",
               "--precision", "fp32", "--json", str(out)])
    assert rc == 0
    text = capsys.readouterr().out
    assert "fused vs unfused" in text and "speed-up" in text and "memory" in text
    r = json.loads(out.read_text())
    assert set(r) == {"fused", "unfused"} and all(v["step_s"] > 0 for v in r.values())
    assert all("threads;" in v["device"] for v in r.values()), r  # the CPU model and flags, not "cpu"
    # The unfused pass holds (1024 x 30522) fp32 logits, their log-softmax and gradient (~125 MB each).
    assert r["unfused"]["extra_memory_bytes"] > 200e6 > r["fused"]["extra_memory_bytes"], r


def test_bench_head_rejects_bad_sizes(capsys):
    from m3ae.cli import main

    with pytest.raises(SystemExit) as exit_:
        main(["bench", "head", "--rows", "0"])
    assert exit_.value.code == 2
    assert "argument --rows: must be >= 1, got 0" in capsys.readouterr().err


def test_batch_flops_of_a_mixed_batch_match_the_flop_counter():
    """Paired, image-only and text-only parts, counted part by part from host-side shapes."""
    from m3ae.data.collate import Collator
    from m3ae.perf import batch_train_flops

    cfg = M3AEConfig(image_size=16, patch_size=4, emb_dim=32, depth=2, num_heads=4, dec_emb_dim=16,
                     dec_depth=2, dec_num_heads=2, vocab_size=100, text_length=12)
    model = M3AE(cfg)
    g = torch.Generator().manual_seed(0)
    samples = []
    for i in range(9):
        s = {"key": str(i)}
        if i % 3 != 2:
            s["image"] = torch.randn(3, 16, 16, generator=g)
        if i % 3 != 1:
            s["text"] = torch.randint(1, 100, (int(torch.randint(2, 13, (1,), generator=g)),), generator=g).tolist()
        samples.append(s)
    batch = Collator(cfg, seed=1)(samples)
    assert len(batch.parts) == 3
    measured = sum(_count(model, False, True, **p.model_inputs()) for p in batch.parts)
    assert abs(measured - batch_train_flops(batch, cfg)) / measured < 0.03


def test_gpu_check_dry_run_on_cpu(tmp_path, capsys):
    """The GPU check's own plumbing, every stage a CPU can run, with nano sizes: one report."""
    import importlib.util
    import json
    from pathlib import Path

    from m3ae.cli import main

    tests = Path(__file__).parent / "test_cuda.py"
    assert main(["bench", "check", "--dry-run", "--out", str(tmp_path), "--tests", str(tests)]) == 0
    report = json.loads((tmp_path / "check.json").read_text())
    stages = report["stages"]
    assert set(stages) == {"cuda tests", "train nano", "train nano compile", "head", "ddp nccl 2 gpus", "data",
                           "cpu fp32", "cpu bf16", "cpu bf32", "cpu mae vs hf", "cpu op times"}
    for name in ("cuda tests", "train nano", "head", "data", "cpu fp32", "cpu bf16", "cpu bf32", "cpu op times"):
        assert stages[name]["status"] == "ok", (name, stages[name])
    assert stages["train nano"]["result"]["samples_per_s"] > 0
    assert {row["pipeline"] for row in stages["data"]["result"]["rows"]} == {"baseline", "m3ae", "m3ae u8", "u8 pil"}
    assert all(row["one_worker"] > 0 for row in stages["data"]["result"]["rows"])
    assert "threads;" in stages["data"]["result"]["machine"]  # the CPU model and its flags
    assert stages["ddp nccl 2 gpus"]["status"].startswith("skipped")
    md = (tmp_path / "check.md").read_text()
    assert "| train nano | ok |" in md and "samples/s" in md
    assert [stages[f"cpu {p}"]["result"]["precision"] for p in ("fp32", "bf16", "bf32")] == ["fp32", "bf16", "bf32"]
    assert "Host CPU, bf16 autocast vs fp32 step, nano (dry run):" in md
    assert "Host CPU, bf32 matmuls vs fp32 step, nano (dry run):" in md
    assert stages["train nano"]["result"]["image_dtype"] == "uint8"
    ops = stages["cpu op times"]["result"]
    assert set(ops["precisions"]) == {"bf16", "fp32"} and ops["threads"].startswith("2 ")
    assert all(p["matmul_ms"] > 0 and p["rest_ms"] > 0 and p["calls"] > 0 for p in ops["precisions"].values())
    assert set(ops["ratios"]) == {"matmul", "attention", "rest", "plain_step"}
    assert "| cpu op times | ok |" in md and "fp32 / bf16 at 2 threads: matmul" in md
    mae = stages["cpu mae vs hf"]  # runs where transformers is installed (the dev extra), else says why not
    if importlib.util.find_spec("transformers") is None:
        assert mae["status"].startswith("skipped") and "transformers" in mae["status"]
    else:
        assert mae["status"] == "ok", mae
        assert mae["result"]["ratios"]["ours (defaults) / hf (defaults)"] > 0


def test_gpu_check_mae_vs_hf_stage_runs_the_benchmark_or_says_why_not(tmp_path):
    import importlib.util

    from m3ae.cli.bench_check import plan, summary

    (stage,) = [s for s in plan(tmp_path, True, 0, 2, tmp_path) if s.name == "cpu mae vs hf"]
    assert stage.argv[1].endswith("benchmarks/mae_vs_hf.py") and "--bf32" in stage.argv
    assert (stage.skip is None) == (importlib.util.find_spec("transformers") is not None)
    result = {"ratios": {"ours (defaults) / hf (defaults)": 1.5, "ours fp32 / hf fused fp32": 1.125}}
    assert summary(stage.name, {"result": result}) == ("ours (defaults) / hf (defaults) 1.50x; "
                                                      "ours fp32 / hf fused fp32 1.12x")


def test_gpu_check_data_summary_names_its_columns():
    from m3ae.cli.bench_check import summary

    # the dry run's one worker read "(1 workers)", and the in-process rate "(1 worker)"
    rows = [{"pipeline": "m3ae", "one_worker": 300.0, "workers": 1, "many_workers": 200.0}]
    assert summary("data", {"result": {"rows": rows}}) == "m3ae 300/s (in-process), 200/s (1 worker)"
    rows[0]["workers"] = 16
    assert summary("data", {"result": {"rows": rows}}).endswith("200/s (16 workers)")


def test_gpu_check_refuses_a_cpu_without_dry_run(tmp_path, capsys):
    import torch

    from m3ae.cli import main

    if torch.cuda.is_available():
        pytest.skip("a GPU is here")
    assert main(["bench", "check", "--out", str(tmp_path)]) == 2
    assert "--dry-run" in capsys.readouterr().err


def test_bench_times_the_trainers_own_step(tmp_path, monkeypatch):
    """`m3ae bench train` and `m3ae pretrain` run one step function (m3ae.train.step.TrainStep)."""
    from m3ae.cli import main
    from m3ae.train import step as step_module
    from m3ae.train.config import load_config
    from m3ae.train.loop import pretrain

    calls = []
    real = step_module.TrainStep.backward
    monkeypatch.setattr(step_module.TrainStep, "backward", lambda self, mb: calls.append(1) or real(self, mb))
    assert main(["bench", "train", "--preset", "nano", "--batch", "4", "--steps", "2", "--warmup", "1",
                 "--no-reference", "model.image_size=16", "model.patch_size=4", "model.text_length=8",
                 "model.vocab_size=50"]) == 0
    assert len(calls) == 3  # 1 warm-up + 2 timed
    pretrain(load_config(None, ["model.preset=nano", "model.image_size=16", "model.patch_size=4",
                                "model.text_length=8", "model.vocab_size=50", "data.spec=demo", "steps=2",
                                "batch_size=4", "progress=false"]), tmp_path)
    assert len(calls) == 5


def test_bench_train_reads_model_settings_with_the_run_config_parser(capsys):
    """`bench train` spells the model as `pretrain` does; the old flags stay one release as aliases."""
    from m3ae.cli import build_parser
    from m3ae.cli.bench_train import deprecated_overrides
    from m3ae.train.bench import bench_model_config
    from m3ae.train.config import load_config

    new = bench_model_config("tiny", ["model.depth=6", "model.image_size=64", "model.grad_checkpointing=true"])
    assert new == load_config(None, ["model.preset=tiny", "model.depth=6", "model.image_size=64"]).model
    assert new.depth == 6 and new.image_size == 64 and new.emb_dim == 192 and new.grad_checkpointing
    args = build_parser().parse_args(["bench", "train", "--preset", "tiny", "--depth", "6", "--image-size", "64",
                                      "--mask-ratio", "0.5", "--grad-checkpointing"])
    old = bench_model_config(args.preset, deprecated_overrides(args))
    assert old.image_mask_ratio == old.text_mask_ratio == 0.5
    assert old == bench_model_config("tiny", ["model.depth=6", "model.image_size=64", "model.image_mask_ratio=0.5",
                                              "model.text_mask_ratio=0.5", "model.grad_checkpointing=true"])
    assert old.grad_checkpointing  # a runtime switch: not compared by ==, so checked on its own
    err = capsys.readouterr().err
    assert "--depth is deprecated" in err and "model.depth=6" in err and "model.text_mask_ratio=0.5" in err
    with pytest.raises(ValueError, match="model.KEY=VALUE settings only"):
        bench_model_config("tiny", ["steps=3"])
    with pytest.raises(ValueError, match="depth"):  # a misspelt key names the near ones
        bench_model_config("tiny", ["model.dept=3"])
