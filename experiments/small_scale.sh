#!/usr/bin/env bash
# The small-scale reproduction of docs/results.md: every number there comes from these platform commands.
#
#   STANDIN=../shared/corpus OUT=/data/crate-small bash experiments/small_scale.sh [stage ...]
#
# Stages (default: all, in order): data train interpret compare ablation steer. Each stage is resumable:
# rerunning skips finished runs (training resumes from its checkpoints, interpretability from its results).
set -euo pipefail
cd "$(dirname "$0")/.."

STANDIN=${STANDIN:?set STANDIN to the offline Pile stand-in (Pile-format .jsonl.zst files)}
OUT=${OUT:?set OUT to a directory for data, checkpoints and results}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
TOKENS=${TOKENS:-2097152}          # training tokens per model (identical for every pair)
PRESETS=${PRESETS:-"crate-1l gpt-1l crate-2l gpt-2l crate-3l gpt-3l"}
SECOND_SEED_PRESETS=${SECOND_SEED_PRESETS:-"crate-2l gpt-2l"}
TRAIN=(data.train=$OUT/standin-train data.val=$OUT/standin-val train.storage_path=$OUT/runs train.max_tokens=$TOKENS)

stage_data() {
  python jobs/pretokenize.py "$STANDIN/train-*.jsonl.zst" "$OUT/standin-train" --local
  python jobs/pretokenize.py "$STANDIN/val.jsonl.zst" "$OUT/standin-val" --local
}

train_one() {  # preset seed; a finished run submitted again does nothing
  python jobs/pretrain.py --config small model.preset="$1" train.seed="$2" data.seed="$2" \
    train.run_name="small-$1-s$2" "${TRAIN[@]}"
}

stage_train() {
  for preset in $PRESETS; do train_one "$preset" 1337; done
  for preset in $SECOND_SEED_PRESETS; do train_one "$preset" 2024; done
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(data train interpret compare ablation steer)
for stage in "${stages[@]}"; do "stage_$stage"; done
