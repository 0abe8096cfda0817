#!/usr/bin/env bash
# The real-data runs behind the README's Results table. Not run by CI (CI has no GPU): it runs on the
# lent H100 through the workplace's device tool, from the repository root, with data/ carried:
#   data/cifar10-jpeg.tar.xz, data/prepare_cifar10.py, data/cifar_test_nolabel.pkl (from ../shared/data)
#   data/wheels/timm-*.whl (the timm this project was tested with)
# Usage: bash .ci/gpu-results.sh PHASE   (PHASE: smoke | bench RECIPE... | train SECONDS | finish); logs go to $OUT.
# `train SECONDS` trains (or resumes) the four CIFAR-10 recipes at once, each stopped after SECONDS at most:
# every step is host-bound (kernel launches), so four processes share one H100 well; an unfinished run
# resumes from its last.pt on the next call.
set -uo pipefail
OUT=${OUT:-/tmp/out}
mkdir -p "$OUT"
export PYTHONPATH="$PWD"
kit() { python3 -m kit.cli "$@"; }

setup() {
  python3 -c "import timm" 2>/dev/null && [ "$(python3 -c 'import timm; print(timm.__version__)')" = 1.0.31 ] \
    || pip install -q --no-deps --no-index data/wheels/timm-*.whl 2>&1 | tail -1
  [ -d data/cifar-10-batches-py ] || python3 data/prepare_cifar10.py data >/dev/null
  python3 -c "import torch, timm; print('torch', torch.__version__, 'timm', timm.__version__, torch.cuda.get_device_name())"
}

case "${1:-}" in
  smoke)
    setup
    kit data demo runs/demo-data
    kit train recipes/demo.yaml --data-root runs/demo-data --out runs/smoke --set train.epochs=2 \
      --set train.compile=reduce-overhead && kit train --resume runs/smoke/demo-* --set train.epochs=3
    for bs in 128 512; do
      kit bench recipes/resnet_4643.yaml --batch-size $bs --steps 200 --warmup 20 --data-root data
    done
    ;;
  bench)
    setup
    shift
    for r in "$@"; do kit bench recipes/$r.yaml --steps 200 --warmup 20 --data-root data; done
    ;;
  train)
    setup
    mkdir -p "$OUT/logs"
    for r in preact_gelu resnet_4643 resnet_443 resnet_dropout; do
      run=$(ls -d runs/$r-* 2>/dev/null | head -1)
      if [ -n "$run" ]; then
        timeout "$2" python3 -m kit.cli train --resume "$run" >> "$OUT/logs/train_$r.log" 2>&1 &
      else
        timeout "$2" python3 -m kit.cli train recipes/$r.yaml --data-root data >> "$OUT/logs/train_$r.log" 2>&1 &
      fi
    done
    wait
    tail -n 2 "$OUT"/logs/train_*.log
    ;;
  finish)
    setup
    runs=$(for r in preact_gelu resnet_4643 resnet_443 resnet_dropout; do ls -d runs/$r-* | head -1; done)
    mkdir -p submissions
    for run in $runs; do
      name=$(basename "$run"); name=${name%%-2*}
      kit predict "$run" --test data/cifar_test_nolabel.pkl --tta flip --out submissions/$name.csv
      kit check-submission submissions/$name.csv --test data/cifar_test_nolabel.pkl
    done
    kit evaluate $runs --split test --tta flip --select --select-out runs/selection.json --csv runs/evaluate.csv
    kit predict $runs --test data/cifar_test_nolabel.pkl --tta flip --weights runs/selection.json --out submissions/ensemble.csv
    kit check-submission submissions/ensemble.csv --test data/cifar_test_nolabel.pkl
    tar czf "$OUT/results.tgz" submissions/*.csv submissions/*.npz runs/selection.json runs/evaluate.csv runs/*/metrics.csv \
      runs/*/recipe.yaml runs/*/curves.png "$OUT"/logs
    ;;
  *) echo "usage: $0 smoke | bench RECIPE... | train RECIPE... | finish" >&2; exit 2 ;;
esac
