#!/usr/bin/env bash
# The CIFAR-10 tool checks of RESULTS.md: bash docs/results/cifar10-tools/run.sh [CIFAR10_DIR]
# (from anywhere; needs `make demo` run first for runs/demo). Features go to /tmp/res.
set -e
cd "$(dirname "$0")/../../.."
M=".venv/bin/python -m m3ae"
D=${1:-../shared/data/cifar10}
O=docs/results/cifar10-tools
mkdir -p $O /tmp/res
.venv/bin/python -c "import torch; from m3ae import M3AE; from m3ae.train.config import load_config; \
torch.manual_seed(0); M3AE(load_config('demo').model).save_pretrained('/tmp/res/random')"
for T in random demo; do
  if [ $T = random ]; then C=/tmp/res/random; else C=runs/demo/checkpoints/step_00000600; fi
  /usr/bin/time -f "%e s embed train $T" $M embed --checkpoint $C --data "$D/train-0000{0..0}.tar.gz" --split train --out /tmp/res/${T}_train.safetensors --quiet
  /usr/bin/time -f "%e s embed val $T" $M embed --checkpoint $C --data $D/test-00000.tar.gz --limit 5000 --out /tmp/res/${T}_val.safetensors --quiet
  /usr/bin/time -f "%e s probe-fast $T" $M probe --fast --knn --checkpoint $C --train /tmp/res/${T}_train.safetensors --val /tmp/res/${T}_val.safetensors --quiet --result $O/probe_fast_${T}.json
  /usr/bin/time -f "%e s probe-fast-5fold $T" $M probe --fast --folds 5 --checkpoint $C --train /tmp/res/${T}_train.safetensors --val /tmp/res/${T}_val.safetensors --quiet --result $O/probe_fast_5fold_${T}.json
done
C=runs/demo/checkpoints/step_00000600
/usr/bin/time -f "%e s ood demo" $M ood --checkpoint $C --in-train "$D/train-0000{0..0}.tar.gz" --in-test $D/test-00000.tar.gz --limit-test 5000 --in-classes 0-4 --out-classes 5-9 --quiet --out /tmp/res/ood_demo --result $O/ood_demo.json
# The paper-protocol probe and fine-tuning, short smoke runs on 2,000 / 1,000 images (demo encoder).
for OPT in lars sgd; do
  /usr/bin/time -f "%e s probe $OPT" $M probe --checkpoint $C --train "$D/train-0000{0..0}.tar.gz" --val $D/test-00000.tar.gz \
    --limit-train 2000 --limit-val 1000 --epochs 10 --warmup-epochs 1 --probe-batch-size 256 --optimizer $OPT --quiet \
    --out /tmp/res/probe_$OPT --result $O/probe_${OPT}_demo.json
done
/usr/bin/time -f "%e s finetune demo" $M finetune --checkpoint $C --train "$D/train-0000{0..0}.tar.gz" --val $D/test-00000.tar.gz \
  --limit-train 2000 --limit-val 1000 --epochs 1 --warmup-epochs 0 --ft-batch-size 64 --quiet --out /tmp/res/ft_demo \
  --result $O/finetune_demo.json
