set -e
cd /work/main
M=".venv/bin/python -m m3ae"
D=/work/shared/data/cifar10
O=docs/results/cifar10-tools
mkdir -p $O
for T in random demo; do
  if [ $T = random ]; then C=/tmp/res/random; else C=runs/demo/checkpoints/step_00000600; fi
  /usr/bin/time -f "%e s embed train $T" $M embed --checkpoint $C --data "$D/train-0000{0..0}.tar.gz" --split train --out /tmp/res/${T}_train.safetensors --quiet
  /usr/bin/time -f "%e s embed val $T" $M embed --checkpoint $C --data $D/test-00000.tar.gz --limit 5000 --out /tmp/res/${T}_val.safetensors --quiet
  /usr/bin/time -f "%e s probe-fast $T" $M probe --fast --knn --checkpoint $C --train /tmp/res/${T}_train.safetensors --val /tmp/res/${T}_val.safetensors --quiet --result $O/probe_fast_${T}.json
  /usr/bin/time -f "%e s probe-fast-5fold $T" $M probe --fast --folds 5 --checkpoint $C --train /tmp/res/${T}_train.safetensors --val /tmp/res/${T}_val.safetensors --quiet --result $O/probe_fast_5fold_${T}.json
done
C=runs/demo/checkpoints/step_00000600
/usr/bin/time -f "%e s ood demo" $M ood --checkpoint $C --in-train "$D/train-0000{0..0}.tar.gz" --in-test $D/test-00000.tar.gz --limit-test 5000 --in-classes 0-4 --out-classes 5-9 --quiet --out /tmp/res/ood_demo --result $O/ood_demo.json
