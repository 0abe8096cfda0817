#!/usr/bin/env bash
# The real-data runs behind the README's Results. CI never runs it (CI has no GPU). It runs on a lent GPU through
# the workplace's device tool, in ONE call per issue (the machine is handed back 30 s after a call and keeps
# nothing), from the repository root, with the git-ignored folder .gpu/ carried:
#   .gpu/cifar10-jpeg.tar.xz .gpu/prepare_cifar10.py .gpu/cifar_test_nolabel.pkl .gpu/cifar_test_shift_nolabel.pkl
#   .gpu/wheels/*.whl (optional; the lent machine has no optuna: the sweep phase needs cp312 wheels of optuna,
#                      colorlog, sqlalchemy, alembic, Mako)
#   .gpu/runs/ (optional: checkpoints brought back by an earlier call, e.g. teachers for distill)
# Fill it here with:  bash .ci/gpu-results.sh carry
# Each phase is self-contained: it prepares the data from .gpu/ into $WORK (not carried), trains, evaluates,
# predicts, and leaves what is needed in $OUT (at most 8 files of 16 MiB come back: one log and one .tgz a phase).
# Phases chain in one call:  bash .ci/gpu-results.sh checkup && bash .ci/gpu-results.sh seeds 150 kit_fast 3 && ...
#   checkup                    versions, pytest -m gpu, the demo trained then resumed, one bench row (<= 5 minutes)
#   bench RECIPE...            kit bench at each recipe's batch (the README's bench table)
#   precision RECIPE           kit bench of one recipe captured in bf16 and in fp16 (loss scaling inside the graph)
#   train SECONDS RECIPE...    train the recipes side by side, each stopped after SECONDS at most
#   seeds SECONDS RECIPE N     N seeds of one recipe side by side (mean and spread)
#   distill SECONDS STUDENT    the student distilled from every finished CIFAR-10 run, and the same without teachers
#   sweep SECONDS              8 resnet_4643 variants with --jobs 4 (needs the wheels above)
#   finish                     submissions + probabilities for both unlabelled sets, blend chosen on half the labelled images
#   predict-speed              kit predict of 3 checkpoints x flip on 10,000 images, timed whole
# KIT_REHEARSAL=1 runs any phase on the CPU at 1/8 width on the digits demo data, a few updates, so that no
# device minute is lost to a typo (`bash .ci/gpu-results.sh rehearse` runs checkup that way).
set -uo pipefail
OUT=${OUT:-/tmp/kit-out}
WORK=${KIT_WORK:-/tmp/kit-work}
CARRY=.gpu
mkdir -p "$OUT" "$WORK/runs"
export PYTHONPATH="$PWD" PYTHONUNBUFFERED=1
kit() { python3 -m kit.cli "$@"; }
CIFAR10="preact_gelu resnet_4643 resnet_443 resnet_dropout kit_best kit_fast"
SETS=()
SUBS=submissions  # what finish writes: the repository's submissions, brought back in finish.tgz
if [ "${KIT_REHEARSAL:-0}" = 1 ]; then
  SETS=(--set model.args.width=0.125 --set train.epochs=1 --set train.batch_size=64 --set train.compile=none)
  SUBS="$WORK/submissions"  # a rehearsal never touches the real ones
fi

carry() {  # here, before the call: copy the shared data into the carried folder
  mkdir -p "$CARRY"
  cp ../shared/data/cifar10-jpeg.tar.xz ../shared/data/prepare_cifar10.py ../shared/data/cifar_test_*nolabel.pkl "$CARRY"/
  du -sh "$CARRY"
}

setup() {
  ls "$CARRY"/wheels/*.whl >/dev/null 2>&1 && pip install -q --no-deps --no-index --target /tmp/site "$CARRY"/wheels/*.whl \
    && export PYTHONPATH="$PWD:/tmp/site"
  DATA="$WORK/data"
  if [ "${KIT_REHEARSAL:-0}" = 1 ]; then
    [ -d "$DATA/cifar-10-batches-py" ] || kit data demo "$DATA" >/dev/null
    TEST="$WORK/test.pkl"; SHIFT="$WORK/test.pkl"
    [ -f "$TEST" ] || python3 - "$DATA" "$TEST" <<'EOF'
import pickle, sys, numpy as np
batch = pickle.load(open(f"{sys.argv[1]}/cifar-10-batches-py/test_batch", "rb"), encoding="bytes")
data = np.asarray(batch[b"data"]).reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
pickle.dump({b"data": data, b"ids": np.arange(len(data))}, open(sys.argv[2], "wb"))
EOF
  else
    [ -d "$DATA/cifar-10-batches-py" ] || { mkdir -p "$DATA" && cp "$CARRY"/cifar10-jpeg.tar.xz "$DATA"/ \
      && python3 "$CARRY"/prepare_cifar10.py "$DATA" >/dev/null; }
    TEST="$CARRY/cifar_test_nolabel.pkl"; SHIFT="$CARRY/cifar_test_shift_nolabel.pkl"
  fi
  python3 -c "import torch, timm; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'timm', timm.__version__,
      torch.cuda.get_device_name() if torch.cuda.is_available() else 'no CUDA device')"
}

pack() {  # one archive per phase, of what exists among the given paths
  local name=$1; shift
  tar czf "$OUT/$name.tgz" --ignore-failed-read "$@" 2>/dev/null
  ls -la "$OUT/$name.tgz"
}

finished_runs() { for r in $CIFAR10; do ls -d "$WORK"/runs/$r-* "$CARRY"/runs/$r-* 2>/dev/null | head -1; done; }

phase=${1:-}
[ $# -gt 0 ] && shift
case "$phase" in
  carry) carry ;;
  rehearse) KIT_REHEARSAL=1 bash "$0" checkup ;;
  checkup)
    setup > "$OUT/checkup.log" 2>&1; cat "$OUT/checkup.log"
    kit doctor recipes/kit_fast.yaml 2>&1 | tee -a "$OUT/checkup.log"
    python3 -m pytest -q -m gpu tests/gpu 2>&1 | tee -a "$OUT/checkup.log"
    kit train recipes/demo.yaml --data-root "$DATA" --runs "$WORK/runs/checkup" --set train.epochs=2 2>&1 | tee -a "$OUT/checkup.log"
    kit train --resume "$(ls -d "$WORK"/runs/checkup/demo-* | head -1)" --set train.epochs=3 2>&1 | tee -a "$OUT/checkup.log"
    kit bench recipes/resnet_4643.yaml --batch-size 128 --updates 100 --untimed 20 "${SETS[@]}" 2>&1 | tee -a "$OUT/checkup.log"
    pack checkup "$WORK"/runs/checkup
    ;;
  bench)
    setup > "$OUT/bench.log" 2>&1
    for r in "$@"; do kit bench recipes/$r.yaml --updates 200 --untimed 20 --data-root "$DATA" "${SETS[@]}" 2>&1 | tee -a "$OUT/bench.log"; done
    ;;
  precision)
    setup > "$OUT/precision.log" 2>&1
    for p in bf16 fp16; do kit bench recipes/$1.yaml --precision $p --updates 200 --untimed 20 --data-root "$DATA" "${SETS[@]}" \
      2>&1 | tee -a "$OUT/precision.log"; done
    ;;
  train)
    setup > "$OUT/train.log" 2>&1; seconds=$1; shift
    for r in "$@"; do
      timeout "$seconds" python3 -m kit.cli train recipes/$r.yaml --data-root "$DATA" --runs "$WORK/runs" "${SETS[@]}" \
        > "$WORK/train_$r.log" 2>&1 &
    done
    wait; tail -n 3 "$WORK"/train_*.log | tee -a "$OUT/train.log"
    pack train "$WORK"/train_*.log "$WORK"/runs/*/metrics.csv "$WORK"/runs/*/recipe.yaml "$WORK"/runs/*/curves.png
    ;;
  seeds)
    setup > "$OUT/seeds.log" 2>&1; seconds=$1; r=$2; n=$3
    for s in $(seq 0 $((n - 1))); do
      timeout "$seconds" python3 -m kit.cli train recipes/$r.yaml --data-root "$DATA" --runs "$WORK/runs/seeds" \
        --set train.seed=$s --set name=$r-s$s "${SETS[@]}" > "$WORK/seed_$r$s.log" 2>&1 &
    done
    wait; tail -n 2 "$WORK"/seed_$r*.log | tee -a "$OUT/seeds.log"
    kit evaluate "$WORK"/runs/seeds/$r-s* --held-out test --csv "$WORK/seeds_$r.csv" 2>&1 | tee -a "$OUT/seeds.log"
    pack seeds "$WORK"/seed_$r*.log "$WORK/seeds_$r.csv" "$WORK"/runs/seeds/*/metrics.csv "$WORK"/runs/seeds/*/recipe.yaml
    ;;
  distill)
    setup > "$OUT/distill.log" 2>&1; seconds=$1; student=$2
    teachers=$(for run in $(finished_runs); do echo --teacher "$run"; done)
    timeout "$seconds" python3 -m kit.cli distill recipes/$student.yaml $teachers --data-root "$DATA" --runs "$WORK/runs/distill" \
      "${SETS[@]}" > "$WORK/distill.log" 2>&1 &
    timeout "$seconds" python3 -m kit.cli train recipes/$student.yaml --data-root "$DATA" --runs "$WORK/runs/plain" \
      "${SETS[@]}" > "$WORK/plain.log" 2>&1 &
    wait; tail -n 2 "$WORK"/distill.log "$WORK"/plain.log | tee -a "$OUT/distill.log"
    pack distill "$WORK"/distill.log "$WORK"/plain.log "$WORK"/runs/distill/*/metrics.csv "$WORK"/runs/plain/*/metrics.csv
    ;;
  sweep)
    setup > "$OUT/sweep.log" 2>&1
    timeout "$1" python3 -m kit.cli sweep recipes/resnet_4643.yaml --data-root "$DATA" --jobs 4 --set train.epochs=30 \
      --grid optim.lr=5e-4,1e-3,2e-3,4e-3 --grid augment.cutout_size=0,8 "${SETS[@]}" >> "$OUT/sweep.log" 2>&1
    pack sweep sweeps/resnet_4643/results.md sweeps/resnet_4643/results.csv
    ;;
  finish)
    setup > "$OUT/finish.log" 2>&1
    runs=$(finished_runs)
    mkdir -p "$SUBS/shift"
    for run in $runs; do
      name=$(basename "$run"); name=${name%%-2*}
      kit predict "$run" --test "$TEST" --out "$SUBS/$name.csv" >> "$OUT/finish.log" 2>&1
      kit predict "$run" --test "$SHIFT" --out "$SUBS/shift/$name.csv" >> "$OUT/finish.log" 2>&1
    done
    # the probability files come back too: kit blend re-weighs them on a CPU later, without the checkpoints
    kit evaluate $runs --held-out test --select --select-on 0.5 --select-out "$WORK/selection.json" --csv "$WORK/evaluate.csv" \
      --probs-out "$SUBS/labelled-test.probs.npz" 2>&1 | tee -a "$OUT/finish.log"
    kit predict $runs --test "$TEST" --blend "$WORK/selection.json" --out "$SUBS/ensemble.csv" >> "$OUT/finish.log" 2>&1
    kit predict $runs --test "$SHIFT" --blend "$WORK/selection.json" --out "$SUBS/shift/ensemble.csv" >> "$OUT/finish.log" 2>&1
    for f in "$SUBS"/*.csv; do kit check-submission "$f" --test "$TEST"; done 2>&1 | tee -a "$OUT/finish.log"
    for f in "$SUBS"/shift/*.csv; do kit check-submission "$f" --test "$SHIFT"; done 2>&1 | tee -a "$OUT/finish.log"
    pack finish "$SUBS" "$WORK/selection.json" "$WORK/evaluate.csv"
    ;;
  predict-speed)
    setup > "$OUT/predict-speed.log" 2>&1
    python3 - "$TEST" "$SHIFT" "$WORK/test10k.pkl" <<'EOF'
import pickle, sys, numpy as np
a, b = (pickle.load(open(p, "rb")) for p in sys.argv[1:3])
pickle.dump({b"data": np.concatenate([a[b"data"], b[b"data"]]), b"ids": np.arange(len(a[b"ids"]) + len(b[b"ids"]))},
            open(sys.argv[3], "wb"))
EOF
    runs=$(finished_runs | head -3)
    /usr/bin/time -f "whole command: %e s" python3 -m kit.cli predict $runs --test "$WORK/test10k.pkl" --tta flip \
      --out "$WORK/speed.csv" 2>&1 | tee -a "$OUT/predict-speed.log"
    ;;
  *) echo "usage: $0 carry | rehearse | checkup | bench RECIPE... | precision RECIPE | train SECONDS RECIPE... | seeds SECONDS RECIPE N |" \
          "distill SECONDS STUDENT | sweep SECONDS | finish | predict-speed" >&2; exit 2 ;;
esac
