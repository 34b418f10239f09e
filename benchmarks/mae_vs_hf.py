"""MAE mode (vocab_size 0) against Hugging Face ViTMAE, same shapes, steps interleaved in one process.

    python benchmarks/mae_vs_hf.py [--size cpu|base] [--steps 20] [--warmup 5] [--batch 32] [--threads N] [--bf32]
        [--hf-gelu same|default] [--profile]

Needs `transformers` (pip install transformers -c constraints.txt). Runs, each a full training step
(forward, backward, grad-norm clip 1.0, AdamW step) on the same synthetic images:
  ours            : m3ae's fast step with its defaults (fused AdamW, precision auto)
  ours fp32       : the same in fp32
  ours reference  : what HF ViTMAE / FAIR MAE compute, in our code: decoder and pixel head over every
                    slot, explicit attention, fp32, torch's default AdamW
  hf defaults     : ViTMAEForPreTraining with its defaults (SDPA attention, exact GELU), fp32,
                    torch.optim.AdamW()
  hf fused        : the same with fused AdamW and, by default (--hf-gelu same), our fp32 tanh GELU
  hf fused bf16   : the same under bf16 autocast with the exact GELU, as ours computes it on bf16
                    activations (when ours auto-picks bf16)
  with --bf32, ours bf32 / hf fused bf32: both in fp32 with oneDNN's bf16-input matmuls (AMX CPUs)
  with --compile, the same-optimizer runs of both libraries again under torch.compile (ours
                    compiled, ours fp32 compiled, hf fused compiled, hf fused bf16 compiled)
Same architecture: with --size cpu (default), encoder 192 x 6 blocks / 3 heads, decoder 128 x 2 / 4
heads, 64 px, patch 8 (the CPU benchmark config of BENCHMARKS.md); with --size base, MAE's ViT-B/16
at 224 px with its 512 x 8 / 16-head decoder. Mask ratio 0.75. The same-optimizer runs compare equal
work; the defaults run compares what each library does out of the box.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import sys
from dataclasses import replace

import torch


# The same architecture on both sides (MLP 4x wide, mask ratio 0.75, no text).
SIZES = {
    "cpu": dict(image=64, patch=8, width=192, depth=6, heads=3, dec_width=128, dec_depth=2, dec_heads=4, batch=32),
    "base": dict(image=224, patch=16, width=768, depth=12, heads=12, dec_width=512, dec_depth=8, dec_heads=16,
                 batch=16),
}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--size", choices=sorted(SIZES), default="cpu",
                   help="cpu: the CPU benchmark config (default); base: MAE's ViT-B/16 at 224 px with its "
                        "512 x 8 decoder")
    p.add_argument("--batch", type=int, default=None, help="default: 32 for cpu, 16 for base")
    p.add_argument("--threads", type=int, default=None)
    p.add_argument("--json", default=None)
    p.add_argument("--bf32", action="store_true", help="also time both in bf32 (m3ae.precision.Bf32Matmuls)")
    p.add_argument("--compile", action="store_true",
                   help="also time both libraries' same-optimizer steps under torch.compile")
    p.add_argument("--hf-gelu", choices=("same", "default"), default="same",
                   help="the GELU of HF's fp32 same-optimizer runs: same (tanh, as ours) or default (HF's exact "
                        "GELU, cheaper on CPU); 'hf defaults' always runs HF's default and the bf16 run the "
                        "exact GELU, as ours does on bf16")
    p.add_argument("--host-allocator", choices=("auto", "keep", "system"), default="auto",
                   help="m3ae.host_allocator for the whole process, so for HF too (auto: keep on CPU, as our "
                        "trainer does)")
    p.add_argument("--profile", action="store_true",
                   help="then profile 5 steps of each (torch.profiler): time per step outside and inside "
                        "matmul / attention operators, and the top operators")
    args = p.parse_args()

    from m3ae import M3AE, M3AEConfig
    from m3ae.host_allocator import keep_freed_memory
    from m3ae.perf import device_name
    from m3ae.precision import Bf32Matmuls, uses_bf16
    from m3ae.threads import choose_threads
    from m3ae.train.bench import BenchOptions, _Step, _time_steps, reference_batch, synthetic_batches
    from transformers import ViTMAEConfig, ViTMAEForPreTraining
    import transformers

    threads = choose_threads(args.threads)
    torch.set_num_threads(threads.threads)
    device = torch.device("cpu")
    size = SIZES[args.size]
    batch = args.batch or size["batch"]
    cfg = M3AEConfig(image_size=size["image"], patch_size=size["patch"], emb_dim=size["width"], depth=size["depth"],
                     num_heads=size["heads"], dec_emb_dim=size["dec_width"], dec_depth=size["dec_depth"],
                     dec_num_heads=size["dec_heads"], vocab_size=0)
    opts = BenchOptions(cfg, batch=batch, steps=args.steps, warmup=args.warmup)
    batches = synthetic_batches(cfg, opts)
    auto_bf16 = uses_bf16("auto", device)

    torch.manual_seed(0)
    ours = M3AE(cfg)
    ours32 = M3AE(cfg)
    ours32.load_state_dict(ours.state_dict())
    ref_cfg = replace(cfg, masking="reference", attention="explicit")
    ref = M3AE(ref_cfg)
    ref.load_state_dict(ours.state_dict())
    g = torch.Generator().manual_seed(1)
    ref_batches = [reference_batch(b, ref_cfg, g) for b in batches]

    hf_cfg = dict(image_size=size["image"], patch_size=size["patch"], hidden_size=size["width"],
                          num_hidden_layers=size["depth"], num_attention_heads=size["heads"],
                          intermediate_size=4 * size["width"], decoder_hidden_size=size["dec_width"],
                          decoder_num_hidden_layers=size["dec_depth"], decoder_num_attention_heads=size["dec_heads"],
                          decoder_intermediate_size=4 * size["dec_width"], mask_ratio=0.75,
                          layer_norm_eps=1e-6, qkv_bias=True)
    # Our blocks use the tanh GELU (the authors' JAX code: flax's default) in fp32 and the exact one
    # on bf16 activations (m3ae.layers.gelu); ViTMAE defaults to the exact one, which torch computes
    # 2-3x faster on CPU. "hf defaults" keeps HF's default; the same-optimizer runs take what ours
    # computes in their precision (--hf-gelu same), so both sides do the same work.
    same_act = "gelu_pytorch_tanh" if args.hf_gelu == "same" else "gelu"

    class HFStep:
        def __init__(self, fused: bool, bf16: bool, bf32: bool = False, act: str = "gelu", compile: bool = False):
            torch.manual_seed(0)
            model = ViTMAEForPreTraining(ViTMAEConfig(**hf_cfg, hidden_act=act)).train()
            self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05,
                                               fused=True if fused else None)
            self.model = torch.compile(model) if compile else model
            self.bf16 = bf16
            self.matmuls = Bf32Matmuls() if bf32 else contextlib.nullcontext()

        def __call__(self, batch):
            with self.matmuls:
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.bf16):
                    loss = self.model(pixel_values=batch.parts[0].normalized_image()).loss
                loss.backward()
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
            self.optimizer.step()
            self.optimizer.zero_grad(set_to_none=True)
            return loss.detach()

    runs = {
        "ours": (_Step(ours, device, "bf16" if auto_bf16 else "fp32", False, False), batches),
        "ours fp32": (_Step(ours32, device, "fp32", False, False), batches),
        "ours reference": (_Step(ref, device, "fp32", True, False, fused_adamw=False), ref_batches),
        "hf defaults": (HFStep(fused=False, bf16=False), batches),
        "hf fused": (HFStep(fused=True, bf16=False, act=same_act), batches),
    }
    if auto_bf16:
        runs["hf fused bf16"] = (HFStep(fused=True, bf16=True, act="gelu"), batches)  # ours: erf on bf16
    if args.bf32:
        ours_bf32 = M3AE(cfg)
        ours_bf32.load_state_dict(ours.state_dict())
        runs["ours bf32"] = (_Step(ours_bf32, device, "bf32", False, False), batches)
        runs["hf fused bf32"] = (HFStep(fused=True, bf16=False, bf32=True, act=same_act), batches)
    if args.compile:
        for name, source in (("ours compiled", ours), ("ours fp32 compiled", ours32)):
            twin = M3AE(cfg)
            twin.load_state_dict(source.state_dict())
            precision = "fp32" if "fp32" in name or not auto_bf16 else "bf16"
            runs[name] = (_Step(twin, device, precision, False, True), batches)
        runs["hf fused compiled"] = (HFStep(fused=True, bf16=False, act=same_act, compile=True), batches)
        if auto_bf16:
            runs["hf fused bf16 compiled"] = (HFStep(fused=True, bf16=True, act="gelu", compile=True), batches)
    hf_attention = runs["hf defaults"][0].model.config._attn_implementation
    with keep_freed_memory(args.host_allocator, device.type) as allocator:
        print(f"device {device_name(device)}, threads {threads}, transformers {transformers.__version__} "
              f"(ViTMAE attention: {hf_attention}; GELU: defaults and bf16 exact, same-optimizer fp32 runs "
              f"{same_act}), "
              f"host allocator: {allocator} (every run), size {args.size}, "
              f"batch {batch}, {args.warmup} warm-up + {args.steps} timed steps each, interleaved", file=sys.stderr)
        timed = _time_steps(runs, opts, device)
        if args.profile:
            from profile_step import profile_interleaved  # this folder's profiler

            profile_interleaved(runs)
    sps = {name: batch / t["step_s"] for name, t in timed.items()}
    for name, t in timed.items():
        lo, hi = t["step_s_range"]
        print(f"{name:22s} {sps[name]:7.1f} samples/s  step {t['step_s'] * 1e3:6.1f} ms "
              f"(p10-p90 {lo * 1e3:.0f}-{hi * 1e3:.0f} ms)")
    ratios = {"ours (defaults) / hf (defaults)": sps["ours"] / sps["hf defaults"],
              "ours fp32 / hf fused fp32 (same optimizer and precision)": sps["ours fp32"] / sps["hf fused"],
              "ours / ours reference": sps["ours"] / sps["ours reference"]}
    if auto_bf16:
        ratios["ours bf16 / hf fused bf16 (same optimizer and precision)"] = sps["ours"] / sps["hf fused bf16"]
    if args.compile:
        ratios["ours fp32 / hf fused fp32, both compiled"] = sps["ours fp32 compiled"] / sps["hf fused compiled"]
        ratios["ours compiled / hf (defaults)"] = sps["ours compiled"] / sps["hf defaults"]
        if auto_bf16:
            ratios["ours bf16 / hf fused bf16, both compiled"] = sps["ours compiled"] / sps["hf fused bf16 compiled"]
    if args.bf32:
        ratios["ours bf32 / hf fused bf32 (same optimizer and precision)"] = sps["ours bf32"] / sps["hf fused bf32"]
        ratios["ours bf32 / hf (defaults)"] = sps["ours bf32"] / sps["hf defaults"]
    for k, v in ratios.items():
        print(f"{k:58s} {v:.2f}x")
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"device": device_name(device), "threads": str(threads), "hf_attention": hf_attention,
                       "size": args.size, "batch": batch, "hf_same_optimizer_gelu": same_act,
                       "transformers": transformers.__version__, "samples_per_s": sps, "ratios": ratios}, f,
                      indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
