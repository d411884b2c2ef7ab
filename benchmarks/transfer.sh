#!/usr/bin/env bash
# Pretraining transfer on Multi30k de→en (issue: pretrain, then fine-tune):
#   1. T5 span corruption of the configs/mt.py encoder-decoder on the monolingual captions
#      (configs/pretrain_span.py, PRETRAIN_STEPS steps);
#   2. fine-tuning on FRACTION of the training pairs from scratch and from step 1, with the
#      same budget (FINETUNE_STEPS steps, validation BLEU every BLEU_EVERY, the best
#      checkpoint scored on test_2016).
# Prints a table of wall times and test BLEU. Runs are kept in $RUNS (default runs/transfer);
# a killed script rerun with the same $RUNS resumes each run where it stopped.
#
#   PRETRAIN_STEPS=2500 FRACTION=0.1 FINETUNE_STEPS=600 bash benchmarks/transfer.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/transfer}
PRETRAIN_STEPS=${PRETRAIN_STEPS:-2500}
FRACTION=${FRACTION:-0.1}
FINETUNE_STEPS=${FINETUNE_STEPS:-600}
BLEU_EVERY=${BLEU_EVERY:-200}
export TF_CPP_MIN_LOG_LEVEL=3
mkdir -p "$RUNS"
DATA=$($PY -c 'from configs import encoder; print(encoder.shared_data("multi30k"))')

timed() {  # name, then the command: appends "name seconds" to $RUNS/times.txt
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$RUNS/$name.console.txt" 2>&1
  echo "$name $((SECONDS - start))" >> "$RUNS/times.txt"
}

timed pretrain $PY -m transformer_jax.main --config=configs/pretrain_span.py \
  --workdir="$RUNS/pretrain" --config.num_train_steps="$PRETRAIN_STEPS"
FINETUNE=(--config.data_dir="$DATA" --config.train_fraction="$FRACTION"
          --config.num_train_steps="$FINETUNE_STEPS" --config.bleu_every_steps="$BLEU_EVERY"
          --config.checkpoint_every_steps="$BLEU_EVERY")
timed scratch $PY -m transformer_jax.main --config=configs/multi30k_de_en.py \
  --workdir="$RUNS/scratch_$FRACTION" "${FINETUNE[@]}"
timed from_span $PY -m transformer_jax.main --config=configs/multi30k_de_en_from_span.py \
  --workdir="$RUNS/from_span_$FRACTION" --config.init_from="$RUNS/pretrain" "${FINETUNE[@]}"

echo "| run | wall time (s) | best validation BLEU | test_2016 BLEU | lowercased |"
echo "| --- | --- | --- | --- | --- |"
while read -r name seconds; do
  dir="$RUNS/$name"; [[ $name == pretrain ]] || dir="$RUNS/${name}_$FRACTION"
  $PY - "$name" "$seconds" "$dir" <<'PYEOF'
import json, os, re, sys
name, seconds, workdir = sys.argv[1:]
best = test = lower = '-'
score = os.path.join(workdir, 'best', 'score.json')
if os.path.exists(score):
  saved = json.load(open(score))
  best = f"{saved[saved['metric']]:.4f} ({saved['metric']}, step {saved['step']})"
log = open(os.path.join(workdir, 'train.log'), encoding='utf-8').read()
m = re.findall(r'test_2016\S*: BLEU ([\d.]+) .*lowercased BLEU ([\d.]+)', log)
if m:
  test, lower = m[-1]
print(f'| {name} | {seconds} | {best} | {test} | {lower} |')
PYEOF
done < "$RUNS/times.txt"
