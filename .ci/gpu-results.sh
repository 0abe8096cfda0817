#!/usr/bin/env bash
# The real-data runs behind the README's Results. Not run by CI (CI has no GPU): it runs on a lent H100
# through the workplace's device tool, from the repository root, with data/ carried:
#   data/cifar10-jpeg.tar.xz, data/prepare_cifar10.py, data/cifar_test_nolabel.pkl, data/cifar_test_shift_nolabel.pkl
#   data/wheels/*.whl (optional: timm/optuna/onnx wheels if the machine lacks them)
# Usage: bash .ci/gpu-results.sh PHASE ...; logs go to $OUT. Each phase fits one 10-minute command.
#   smoke                      demo recipe with the captured step, resume, and the bench at batch 128 and 512
#   bench RECIPE...            kit bench at each recipe's batch (the README's bench table)
#   train SECONDS RECIPE...    train (or resume) the recipes at once, each stopped after SECONDS at most
#   seeds SECONDS RECIPE N     N seeds of one recipe at once (kit_best / kit_fast: mean and spread)
#   distill SECONDS STUDENT    the student recipe distilled from every finished CIFAR-10 run, and without teachers
#   sweep SECONDS              8 resnet_4643 variants with --jobs 4
#   finish                     submissions for both unlabelled sets, selection on half the labelled test images
#   predict-speed              kit predict of 3 checkpoints x flip on 10,000 images, timed whole
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT/logs"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
kit() { python3 -m kit.cli "$@"; }
CIFAR10="preact_gelu resnet_4643 resnet_443 resnet_dropout kit_best kit_fast"

setup() {
  ls data/wheels/*.whl >/dev/null 2>&1 && pip install -q --no-deps --no-index data/wheels/*.whl 2>&1 | tail -1
  [ -d data/cifar-10-batches-py ] || python3 data/prepare_cifar10.py data >/dev/null
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
}

finished_runs() { for r in $CIFAR10; do ls -d runs/$r-* 2>/dev/null | head -1; done; }

case "${1:-}" in
  smoke)
    setup
    kit data demo runs/demo-data
    kit train recipes/demo.yaml --data-root runs/demo-data --out runs/smoke --set train.epochs=2 \
      && kit train --resume runs/smoke/demo-* --set train.epochs=3
    for bs in 128 512; do kit bench recipes/resnet_4643.yaml --batch-size $bs --steps 200 --warmup 20 --data-root data; done
    ;;
  bench)
    setup; shift
    for r in "$@"; do kit bench recipes/$r.yaml --steps 200 --warmup 20 --data-root data; done
    ;;
  train)
    setup; seconds=$2; shift 2
    for r in "$@"; do
      run=$(ls -d runs/$r-* 2>/dev/null | head -1)
      if [ -n "$run" ]; then timeout "$seconds" python3 -m kit.cli train --resume "$run" >> "$OUT/logs/train_$r.log" 2>&1 &
      else timeout "$seconds" python3 -m kit.cli train recipes/$r.yaml --data-root data >> "$OUT/logs/train_$r.log" 2>&1 &
      fi
    done
    wait; tail -n 2 "$OUT"/logs/train_*.log
    ;;
  seeds)
    setup; seconds=$2; r=$3; n=$4
    for s in $(seq 0 $((n - 1))); do
      run=$(ls -d runs/seeds/$r-s$s-* 2>/dev/null | head -1)
      if [ -n "$run" ]; then timeout "$seconds" python3 -m kit.cli train --resume "$run" >> "$OUT/logs/seed_$r$s.log" 2>&1 &
      else timeout "$seconds" python3 -m kit.cli train recipes/$r.yaml --data-root data --out runs/seeds --set train.seed=$s \
             --set name=$r-s$s >> "$OUT/logs/seed_$r$s.log" 2>&1 &
      fi
    done
    wait; tail -n 1 "$OUT"/logs/seed_$r*.log
    ;;
  distill)
    setup; seconds=$2; student=$3
    teachers=$(for run in $(finished_runs); do echo --teacher "$run"; done)
    timeout "$seconds" python3 -m kit.cli distill recipes/$student.yaml $teachers --data-root data --out runs/distill \
      >> "$OUT/logs/distill.log" 2>&1 &
    timeout "$seconds" python3 -m kit.cli train recipes/$student.yaml --data-root data --out runs/plain >> "$OUT/logs/plain.log" 2>&1 &
    wait; tail -n 2 "$OUT"/logs/distill.log "$OUT"/logs/plain.log
    ;;
  sweep)
    setup
    timeout "$2" python3 -m kit.cli sweep recipes/resnet_4643.yaml --data-root data --jobs 4 --set train.epochs=30 \
      --grid optim.lr=5e-4,1e-3,2e-3,4e-3 --grid augment.cutout_size=0,8 > "$OUT/logs/sweep.log" 2>&1
    cp sweeps/resnet_4643/results.md "$OUT/" 2>/dev/null; tail -n 14 "$OUT/logs/sweep.log"
    ;;
  finish)
    setup
    runs=$(finished_runs)
    mkdir -p submissions/shift
    for run in $runs; do
      name=$(basename "$run"); name=${name%%-2*}
      kit predict "$run" --test data/cifar_test_nolabel.pkl --out submissions/$name.csv
      kit predict "$run" --test data/cifar_test_shift_nolabel.pkl --out submissions/shift/$name.csv
    done
    kit evaluate $runs --split test --select --select-on 0.5 --select-out runs/selection.json --csv runs/evaluate.csv
    kit predict $runs --test data/cifar_test_nolabel.pkl --blend runs/selection.json --out submissions/ensemble.csv
    kit predict $runs --test data/cifar_test_shift_nolabel.pkl --blend runs/selection.json --out submissions/shift/ensemble.csv
    for f in submissions/*.csv; do kit check-submission "$f" --test data/cifar_test_nolabel.pkl; done
    for f in submissions/shift/*.csv; do kit check-submission "$f" --test data/cifar_test_shift_nolabel.pkl; done
    tar czf "$OUT/results.tgz" submissions runs/selection.json runs/evaluate.csv runs/*/metrics.csv runs/*/recipe.yaml \
      runs/*/curves.png "$OUT"/logs
    ;;
  predict-speed)
    setup
    python3 - <<'EOF'
import pickle, numpy as np
a, b = (pickle.load(open(f"data/{n}.pkl", "rb")) for n in ("cifar_test_nolabel", "cifar_test_shift_nolabel"))
pickle.dump({b"data": np.concatenate([a[b"data"], b[b"data"]]), b"ids": np.arange(10000)}, open("data/test10k.pkl", "wb"))
EOF
    runs=$(finished_runs | head -3)
    /usr/bin/time -f "whole command: %e s" python3 -m kit.cli predict $runs --test data/test10k.pkl --tta flip --out runs/speed.csv
    ;;
  *) echo "usage: $0 smoke | bench RECIPE... | train SECONDS RECIPE... | seeds SECONDS RECIPE N | distill SECONDS STUDENT | sweep SECONDS | finish | predict-speed" >&2; exit 2 ;;
esac
