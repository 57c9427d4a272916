#!/usr/bin/env bash
# One pass of the whole procedure on the synthetic demo data (make demo):
# train -> evaluate -> rank -> try a threshold with zeros -> prune -> retrain -> evaluate,
# then two stages of compress.py (a step toward the target, prune, retrain, judged on validation).
set -euo pipefail
PY=${1:-.venv/bin/python}
RUN=runs/demo
THRESHOLD=${THRESHOLD:-0.3}
rm -rf $RUN; mkdir -p $RUN  # a fresh run each time
miou() { grep -o 'mIoU: [0-9.]*' "$1" | tail -1 | cut -d' ' -f2; }

echo "== 1. train the small AdapNet++ on the synthetic shapes"
$PY train.py -c config/train.config
echo "== 2. evaluate"
$PY evaluate.py -c config/test.config | tee $RUN/eval_before.txt
echo "== 3. Taylor-oracle ranks (on the training records)"
$PY get_oracle_rank.py -c config/oracle_rank.config
echo "== 3b. judge the criteria: validation mIoU after removing 5/10/20 % of every layer"
$PY get_oracle_rank.py -c config/oracle_rank.config --compare
echo "== 4. try threshold $THRESHOLD with zeros (same shapes), evaluate"
$PY prun_model.py --decide_threshold true
$PY prun_model.py --threshold $THRESHOLD --try_zeros true \
    --new_checkpoint_save $RUN/zeros/model.ckpt
$PY evaluate.py -c config/test.config --checkpoint $RUN/zeros/model.ckpt | tee $RUN/eval_zeros.txt
echo "== 5. prune for real"
rm -rf $RUN/pruned
$PY prun_model.py --threshold $THRESHOLD --try_zeros false | tee $RUN/prune_report.txt
MASK=None
[ -f $RUN/pruned/mask.npy ] && MASK=$RUN/pruned/mask.npy
PRUNED="--model_def $RUN/pruned/model_def.json --mask $MASK"
$PY evaluate.py -c config/test.config --checkpoint $RUN/pruned/model.ckpt $PRUNED | tee $RUN/eval_pruned.txt
echo "== 6. retrain the pruned model"
$PY train.py -c config/train.config --intialize $RUN/pruned/model.ckpt \
    --checkpoint $RUN/retrain/model.ckpt --max_iteration 600 --learning_rate 0.001 $PRUNED
echo "== 7. evaluate the retrained pruned model"
$PY evaluate.py -c config/test.config --checkpoint $RUN/retrain $PRUNED | tee $RUN/eval_after.txt
echo "== 8. the same in one command: two stages of step -> prune -> retrain -> validate -> evaluate"
$PY compress.py -c config/compress.config --stages 2 --retrain_iterations 200

params() { $PY -c "import sys; from models.model_def import load_model_def; from netcompress.pruning_math.costs import total_parameters; print(total_parameters(load_model_def(sys.argv[1]), 6))" "$1"; }
echo
echo "== summary (threshold $THRESHOLD, criterion taylor_out, max normalisation)"
printf '%-34s %12s %8s\n' model parameters mIoU
printf '%-34s %12s %8s\n' "trained" "$(params models/small.json)" "$(miou $RUN/eval_before.txt)"
printf '%-34s %12s %8s\n' "zeroed (try_zeros)" "$(params models/small.json)" "$(miou $RUN/eval_zeros.txt)"
printf '%-34s %12s %8s\n' "pruned, before retraining" "$(params $RUN/pruned/model_def.json)" "$(miou $RUN/eval_pruned.txt)"
printf '%-34s %12s %8s\n' "pruned and retrained" "$(params $RUN/pruned/model_def.json)" "$(miou $RUN/eval_after.txt)"
