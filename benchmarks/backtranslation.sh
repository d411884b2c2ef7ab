#!/usr/bin/env bash
# Back-translation on Multi30k (Sennrich et al. 2016; Edunov et al. 2018; Caswell et al. 2019):
#   1. reverse: the opposite direction trained on the real pairs (REVERSE_STEPS steps);
#   2. generate: the reverse model translates the first MONO_LINES monolingual captions of
#      the forward model's TARGET language (../shared/data/multi30k/mono/train.{1..5}.*.gz,
#      145,000 lines) into synthetic sources (DECODING: sample = top-k sampling, Edunov et
#      al.'s best, or beam), written to $RUNS/synthetic.tsv;
#   3. baseline: the forward direction on the real pairs only (FINAL_STEPS steps; BASELINE=0
#      skips it), and final: the same with the synthetic pairs mixed in (RATIO = their
#      share of the training pairs, TAG=1: tagged back-translation).
# The forward runs score the best checkpoint (validation BLEU) on test_2016. Prints a table
# of wall times and test BLEU. Runs are kept in $RUNS (default runs/backtranslation_$DIRECTION);
# every stage is resumable, so a killed script rerun with the same $RUNS continues where it
# stopped (a finished stage is quick to rerun).
#
#   DIRECTION=de_en MONO_LINES=145000 DECODING=sample bash benchmarks/backtranslation.sh
#   # A smoke run in minutes: a small model, few lines and steps, BLEU on a few batches.
#   MONO_LINES=300 REVERSE_STEPS=40 FINAL_STEPS=40 BLEU_EVERY=40 \
#     EXTRA="--config.d_model=32 --config.d_ff=64 --config.num_heads=2 \
#     --config.num_encoder_layers=1 --config.num_decoder_layers=1 --config.vocab_size=1000 \
#     --config.spm_byte_fallback=False --config.eval_every_steps=20 --config.num_eval_batches=2" \
#     bash benchmarks/backtranslation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
DIRECTION=${DIRECTION:-de_en}
RUNS=${RUNS:-runs/backtranslation_$DIRECTION}
MONO_LINES=${MONO_LINES:-145000}
REVERSE_STEPS=${REVERSE_STEPS:-2100}
FINAL_STEPS=${FINAL_STEPS:-2800}
BLEU_EVERY=${BLEU_EVERY:-700}
DECODING=${DECODING:-sample}      # sample (top-k) or beam
TOP_K=${TOP_K:-10}
TEMPERATURE=${TEMPERATURE:-1.0}
RATIO=${RATIO:-0.5}               # Share of synthetic pairs; 0 = every pair once.
TAG=${TAG:-1}
BASELINE=${BASELINE:-1}
read -r -a EXTRA_ARGS <<< "${EXTRA:-}"  # More --config overrides for every stage.
export TF_CPP_MIN_LOG_LEVEL=3
case $DIRECTION in
  de_en) FORWARD=configs/multi30k_de_en.py REVERSE=configs/multi30k_en_de.py TGT=en ;;
  en_de) FORWARD=configs/multi30k_en_de.py REVERSE=configs/multi30k_de_en.py TGT=de ;;
  *) echo "DIRECTION=$DIRECTION: use de_en or en_de" >&2; exit 1 ;;
esac
mkdir -p "$RUNS/times"
DATA=$($PY -c 'from configs import encoder; print(encoder.shared_data("multi30k"))')

timed() {  # name, then the command: its console in $RUNS/name.console.txt, seconds in times/
  local name=$1; shift
  local start=$SECONDS
  "$@" > "$RUNS/$name.console.txt" 2>&1
  echo "$((SECONDS - start))" > "$RUNS/times/$name"
}

# The monolingual target-side text: the first MONO_LINES lines of train.1..5 (written once).
MONO=$RUNS/mono.$TGT
if [[ ! -f $MONO ]]; then
  for i in 1 2 3 4 5; do zcat "$DATA/mono/train.$i.$TGT.gz"; done | head -n "$MONO_LINES" \
    > "$MONO.tmp" || true  # head closes the pipe early.
  mv "$MONO.tmp" "$MONO"
fi

COMMON=(--config.data_dir="$DATA" --config.bleu_every_steps="$BLEU_EVERY"
        --config.checkpoint_every_steps="$BLEU_EVERY" "${EXTRA_ARGS[@]}")
timed reverse $PY -m transformer_jax.main --config="$REVERSE" --workdir="$RUNS/reverse" \
  --config.num_train_steps="$REVERSE_STEPS" "${COMMON[@]}"
GEN=(--config.decoding="$DECODING")
[[ $DECODING == sample ]] && GEN+=(--config.top_k="$TOP_K" --config.temperature="$TEMPERATURE")
timed generate $PY -m transformer_jax.main --config="$REVERSE" --workdir="$RUNS/reverse" \
  --mode=backtranslate --input="$MONO" --output="$RUNS/synthetic.tsv" "${GEN[@]}" \
  "${COMMON[@]}"
if [[ $BASELINE == 1 ]]; then
  timed baseline $PY -m transformer_jax.main --config="$FORWARD" --workdir="$RUNS/baseline" \
    --config.num_train_steps="$FINAL_STEPS" "${COMMON[@]}"
fi
TAGGED=$([[ $TAG == 1 ]] && echo True || echo False)
timed final $PY -m transformer_jax.main --config="$FORWARD" --workdir="$RUNS/final" \
  --config.num_train_steps="$FINAL_STEPS" --config.synthetic_pairs="$RUNS/synthetic.tsv" \
  --config.synthetic_ratio="$RATIO" --config.synthetic_tag="$TAGGED" "${COMMON[@]}"

echo "DIRECTION=$DIRECTION MONO_LINES=$MONO_LINES DECODING=$DECODING (top_k $TOP_K," \
     "temperature $TEMPERATURE) RATIO=$RATIO TAG=$TAG"
echo "| stage | wall time (s) | result | test_2016 BLEU | lowercased |"
echo "| --- | --- | --- | --- | --- |"
for name in reverse generate baseline final; do
  [[ -f $RUNS/times/$name ]] || continue
  $PY - "$name" "$(cat "$RUNS/times/$name")" "$RUNS" <<'PYEOF'
import json, os, re, sys
name, seconds, runs = sys.argv[1:]
result = test = lower = '-'
if name == 'generate':
  console = open(os.path.join(runs, 'generate.console.txt'), encoding='utf-8').read()
  m = re.findall(r'wrote \S+: (\d+) pairs \((\d+) new in [\d.]+ s, ([\d.]+) sentences/s\)',
                 console)
  done = re.findall(r'complete, (\d+) pairs', console)
  if m:
    result = f'{m[-1][0]} pairs, {m[-1][2]} sentences/s'
  elif done:
    result = f'{done[-1]} pairs (already complete)'
else:
  workdir = os.path.join(runs, name)
  score = os.path.join(workdir, 'best', 'score.json')
  if os.path.exists(score):
    saved = json.load(open(score))
    result = f"best val BLEU {saved[saved['metric']]:.2f} (step {saved['step']})"
  log = open(os.path.join(workdir, 'train.log'), encoding='utf-8').read()
  m = re.findall(r'test_2016\S*: BLEU ([\d.]+) .*lowercased BLEU ([\d.]+)', log)
  if m:
    test, lower = m[-1]
  pairs = re.findall(r'= (\d+) training pairs, ([\d.]+)% synthetic', log)
  if pairs:
    result += f'; {pairs[-1][0]} training pairs, {pairs[-1][1]}% synthetic'
print(f'| {name} | {seconds} | {result} | {test} | {lower} |')
PYEOF
done
