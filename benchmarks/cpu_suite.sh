#!/usr/bin/env bash
# The CPU measurements of BENCHMARKS.md ("Busy machine", "bf16 on the CPU", "bf16 against fp32, in one
# process", "MAE mode vs HF ViTMAE", "Data pipeline"), one after another on an otherwise idle machine.
# Output: OUT/*.txt and *.json.
#   benchmarks/cpu_suite.sh OUT [FLICKR_DIR]
set -uo pipefail
OUT=${1:?OUT}; FLICKR=${2:-../shared/data/flickr8k-1k}
M3AE=${M3AE:-m3ae}; PY=${PY:-python}
mkdir -p "$OUT"
CFG="--preset tiny --batch 32 --steps 20 --warmup 5 model.depth=6 model.image_size=64 model.patch_size=8 model.text_length=32"
lscpu | grep -E "Model name|^CPU\(s\)" > "$OUT/machine.txt"
grep -o -w -E "avx2|avx512f|avx512_bf16|amx_bf16" /proc/cpuinfo | sort | uniq -c >> "$OUT/machine.txt"
# 1. Quiet vs one busy process: the thread policy and OpenMP spin limit (new defaults) against
#    libgomp's default spin (GOMP_SPINCOUNT=300000, what runs without m3ae's limit), and 1 thread.
for load in 0 1; do
  $M3AE bench train $CFG --no-reference --precision fp32 --background-load $load \
    --json "$OUT/threads-default-load$load.json" > "$OUT/threads-default-load$load.txt" 2>&1
  GOMP_SPINCOUNT=300000 $M3AE bench train $CFG --no-reference --precision fp32 --background-load $load \
    --json "$OUT/threads-gompdefault-load$load.json" > "$OUT/threads-gompdefault-load$load.txt" 2>&1
  $M3AE bench train $CFG --no-reference --precision fp32 --background-load $load --threads 1 \
    --json "$OUT/threads-1-load$load.json" > "$OUT/threads-1-load$load.txt" 2>&1
done
# 2. bf16 autocast and bf32 (oneDNN bf16-input matmuls, AMX only) vs fp32 on this CPU (precision
#    auto = bf16 where the CPU has native bf16),
#    alternated twice, for the CPU config and a wider model.
for rep in 1 2; do
  for prec in fp32 bf16 bf32; do
    $M3AE bench train $CFG --precision $prec --json "$OUT/prec-tiny-$prec-$rep.json" > "$OUT/prec-tiny-$prec-$rep.txt" 2>&1
    $M3AE bench train --preset base --batch 16 --steps 8 --warmup 2 --no-reference --precision $prec \
      model.depth=4 model.image_size=128 model.patch_size=16 model.text_length=32 \
      --json "$OUT/prec-base-$prec-$rep.json" > "$OUT/prec-base-$prec-$rep.txt" 2>&1
  done
done
# 2b. bf16 vs fp32 for the paper's whole base at 256 px, alternating in one process (the VM drifts
#     between separate runs), with the matmul / rest split.
$PY benchmarks/bf16_vs_fp32.py --rounds 8 --profile model.image_size=256 > "$OUT/bf16-vs-fp32-base256.txt" 2>&1
#     And the two GELU forms in bf16 at the base model's MLP shapes (m3ae.layers.gelu's choice).
$PY benchmarks/gelu_forms.py > "$OUT/gelu-forms.txt" 2>&1
# 3. MAE mode against HF ViTMAE (needs transformers).
$PY benchmarks/mae_vs_hf.py --steps 20 --warmup 5 --json "$OUT/mae_vs_hf.json" > "$OUT/mae_vs_hf.txt" 2>&1
# 4. Data pipeline vs a plain PIL baseline, 256 px.
$M3AE bench data "folder:$FLICKR/images-original" "folder:$FLICKR/images" --samples 600 --workers 2 \
  --json "$OUT/data.json" > "$OUT/data.txt" 2>&1
echo done
