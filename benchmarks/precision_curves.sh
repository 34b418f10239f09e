#!/usr/bin/env bash
# bf16 autocast vs fp32 on the CPU: loss curves of the demo and of a shortened fashion-44k run, two
# seeds each, so the bf16-fp32 gap can be compared with the seed-to-seed gap (issue 15).
# Resumable: finished runs are skipped, an interrupted one resumes from its checkpoint.
#   benchmarks/precision_curves.sh DATA_ROOT OUT      (e.g. ../shared/data runs/precision)
# One torch thread per run, so it can run beside other work; the losses do not depend on speed.
set -euo pipefail
DATA=${1:?DATA_ROOT}; OUT=${2:?OUT}
M3AE=${M3AE:-m3ae}
PYTHON=${PYTHON:-python}
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-1}
# Without AMX or AVX512-BF16 the bf16 runs take ~12x as long as fp32's (oneDNN's generic bf16 code).
if [ "${FORCE_BF16:-0}" != 1 ] && ! $PYTHON -c 'import sys; from m3ae.precision import cpu_has_native_bf16 as n; sys.exit(not n())'; then
  echo "this CPU has neither AMX nor AVX512-BF16: bf16 runs would be ~12x slower than fp32; FORCE_BF16=1 to run anyway" >&2
  exit 2
fi
for prec in fp32 bf16; do
  for seed in 0 1; do
    $M3AE pretrain --config demo --out "$OUT/demo-$prec-s$seed" --resume auto \
      precision=$prec seed=$seed progress=false
  done
done
for prec in fp32 bf16; do
  for seed in 0 1; do
    $M3AE pretrain --config fashion_m3ae --out "$OUT/fashion-$prec-s$seed" --resume auto \
      precision=$prec seed=$seed steps=300 ckpt_every=50 log_every=10 \
      "data.spec=$DATA/fashion-44k/train-0000{0..3}.tar.gz" data.tokenizer=studies/fashion_tokenizer.json
  done
done
for job in demo fashion; do
  $M3AE plot "$OUT"/$job-fp32-s0 "$OUT"/$job-fp32-s1 "$OUT"/$job-bf16-s0 "$OUT"/$job-bf16-s1 \
    --labels fp32-s0 fp32-s1 bf16-s0 bf16-s1 --smooth 0.6 --accuracy --out "$OUT/$job-precision.png"
done
python3 - "$OUT" <<'PY'
import json, sys, pathlib
out = pathlib.Path(sys.argv[1])
print("| run | final loss (mean of last 5 log rows) | text accuracy (same rows) | samples/s (median row) |")
print("|---|---|---|---|")
for job in ("demo", "fashion"):
    for prec in ("fp32", "bf16"):
        for seed in (0, 1):
            rows = [json.loads(l) for l in (out / f"{job}-{prec}-s{seed}" / "metrics.jsonl").read_text().splitlines()
                    if l.strip()]
            rows = [r for r in rows if "loss" in r]
            tail = rows[-5:]
            sps = sorted(r["samples_per_s"] for r in rows)[len(rows) // 2]
            acc = sum(r.get("text_accuracy", float("nan")) for r in tail) / len(tail)
            print(f"| {job} {prec} seed {seed} | {sum(r['loss'] for r in tail) / len(tail):.4f} | {acc:.4f} | {sps:.1f} |")
PY
