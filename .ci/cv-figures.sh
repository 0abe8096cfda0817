#!/usr/bin/env bash
# The README's cross-validation figures (issue 38), on the embedded digits demo, on this machine's CPU:
#   one run of recipes/demo.yaml on all 1,197 training digits (its last epoch) against the 5-fold CV of the same recipe
#   at the same 8 epochs (each fold's best epoch chosen on its own fold), both scored on the 300 labelled test digits
#   that no choice saw; the CV's mean and std against each fold model's test accuracy; the same CV with
#   pseudo-labels from the first CV's fold models on the 300 unlabelled digits; and the stacked, blended and averaged
#   out-of-fold scores of three CVs. Usage: bash .ci/cv-figures.sh [WORKDIR] (default: a temporary folder).
set -euo pipefail
cd "$(dirname "$0")/.."
work=${1:-$(mktemp -d)}
kit="python -m kit.cli"
recipe=recipes/demo.yaml
$kit data demo "$work/data" > /dev/null
test="$work/data/cifar_test_nolabel.pkl"
answers="$work/data/test_labels.csv"

score() {  # accuracy of a submission CSV on the unlabelled digits' answers (the demo's own, never read by kit)
  python - "$1" "$answers" <<'EOF'
import sys, pandas as pd
ours, truth = pd.read_csv(sys.argv[1]), pd.read_csv(sys.argv[2])
joined = truth.merge(ours, on="ID", suffixes=("_true", ""))
print(f"{(joined.Labels == joined.Labels_true).mean():.2%} of {len(joined)}")
EOF
}

echo "== one run on every training image (data.validation: none, the last epoch), scored on the labelled test digits"
$kit train $recipe --data-root "$work/data" --set data.validation=none --runs "$work/one" --device cpu | tail -1
$kit evaluate "$work"/one/demo-* --held-out test --tta none --device cpu | tail -2

echo "== 5-fold cross-validation of the same recipe (train.seed 0)"
$kit train $recipe --data-root "$work/data" --folds 5 --runs "$work/cv0" --device cpu | sed -n '/^cross-validation/,$p'
cv0=$(ls -d "$work"/cv0/demo-cv-*)

echo "== the same CV with train.seed 1 (a second member for the blend and the stack)"
$kit train $recipe --data-root "$work/data" --folds 5 --set train.seed=1 --runs "$work/cv1" --device cpu | sed -n '/^cross-validation/,$p'
cv1=$(ls -d "$work"/cv1/demo-cv-*)

echo "== the one run and the fold ensembles on the unlabelled digits, scored on their answers"
$kit predict "$work"/one/demo-* --test "$test" --tta none --out "$work/one.csv" --device cpu > /dev/null
echo "one run: $(score "$work/one.csv")"
$kit predict "$cv0" --test "$test" --tta none --out "$work/cv0.csv" --device cpu > /dev/null
$kit predict "$cv1" --test "$test" --tta none --out "$work/cv1.csv" --device cpu > /dev/null
echo "cv seed 0: $(score "$work/cv0.csv"); cv seed 1: $(score "$work/cv1.csv")"

echo "== pseudo-labels: the seed-0 CV again, each fold adding the unlabelled digits its own fold model labels at >= 0.9"
$kit train $recipe --data-root "$work/data" --folds 5 --pseudo "$work/cv0.probs.npz" --runs "$work/pseudo" --device cpu \
  | grep -E '^pseudo-labels|^cross-validation|^ *(fold|mean|std|out-of-fold|ensemble|[0-4]) ' 
cvp=$(ls -d "$work"/pseudo/demo-cv-*)
$kit predict "$cvp" --test "$test" --tta none --out "$work/pseudo.csv" --device cpu > /dev/null
echo "pseudo-labelled CV on the unlabelled digits: $(score "$work/pseudo.csv")"

echo "== stacked, blended and averaged on the three CVs' out-of-fold probabilities"
$kit blend --labelled "$cv0/oof.probs.npz" --labelled "$cv1/oof.probs.npz" --labelled "$cvp/oof.probs.npz" \
  --unlabelled "$work/cv0.probs.npz" --unlabelled "$work/cv1.probs.npz" --unlabelled "$work/pseudo.probs.npz" \
  --stacker logistic --out "$work/stacked.csv"
echo "stacked submission on the unlabelled digits: $(score "$work/stacked.csv")"
$kit blend --labelled "$cv0/oof.probs.npz" --labelled "$cv1/oof.probs.npz" --labelled "$cvp/oof.probs.npz" \
  --unlabelled "$work/cv0.probs.npz" --unlabelled "$work/cv1.probs.npz" --unlabelled "$work/pseudo.probs.npz" \
  --select-on 1 --out "$work/blended.csv" | tail -2
echo "blended submission on the unlabelled digits: $(score "$work/blended.csv")"
