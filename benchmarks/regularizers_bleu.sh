#!/usr/bin/env bash
# BLEU with and without each generalization method on Multi30k de→en (issue: back-translation,
# noise, adversarial training, R-Drop, EMA): configs/multi30k_de_en.py (1,400 steps) as the
# baseline and once with each of METHODS, one run at a time, the same steps and seed; each
# run's best checkpoint is scored on test_2016 and on a copy of test_2016 whose sources have
# typos in 10% of the words (benchmarks/typos.py, seed 0). Prints a table: wall time, test
# BLEU, typo-test BLEU and each delta against the baseline. Runs are kept in $RUNS (default
# runs/regularizers_bleu); a killed script rerun with the same $RUNS resumes the unfinished
# run and skips the finished ones. A run costs 1 to 3 times the baseline's ~38 minutes
# (python benchmarks/regularizers.py gives each method's step-time factor).
#
#   METHODS="baseline fgm pgd freelb r_drop noise ema" SEED=0 bash benchmarks/regularizers_bleu.sh
#
# fgm_epsE is fgm with adversarial_epsilon=E (e.g. fgm_eps0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
RUNS=${RUNS:-runs/regularizers_bleu}
METHODS=${METHODS:-baseline fgm pgd freelb r_drop noise ema}
SEED=${SEED:-0}
export TF_CPP_MIN_LOG_LEVEL=3
mkdir -p "$RUNS/typos"
DATA=$($PY -c 'from configs import encoder; print(encoder.shared_data("multi30k"))')
[[ -f $RUNS/typos/test_typos.de.gz ]] || $PY benchmarks/typos.py \
  --input="$DATA/test_2016_flickr.de.gz" --output="$RUNS/typos/test_typos.de.gz" --seed=0
cp -f "$DATA/test_2016_flickr.en.gz" "$RUNS/typos/test_typos.en.gz"

args() {  # method -> its overrides
  case $1 in
    baseline) ;;
    fgm) echo --config.adversarial=fgm ;;
    fgm_eps*) echo --config.adversarial=fgm --config.adversarial_epsilon="${1#fgm_eps}" ;;
    pgd) echo --config.adversarial=pgd --config.adversarial_steps=3 ;;
    freelb) echo --config.adversarial=freelb --config.adversarial_steps=3 ;;
    r_drop) echo --config.r_drop_alpha=2.5 ;;
    noise) echo --config.word_dropout=0.1 --config.word_blank=0.1 ;;
    ema) echo --config.ema_decay=0.995 ;;
    *) echo "unknown method $1" >&2; exit 2 ;;
  esac
}
for method in $METHODS; do args "$method" > /dev/null; done  # A typo stops here.
for method in $METHODS; do
  name="${method}_seed$SEED"
  grep -q "^$name " "$RUNS/times.txt" 2>/dev/null && continue
  start=$SECONDS
  # shellcheck disable=SC2046
  $PY -m transformer_jax.main --config=configs/multi30k_de_en.py --config.data_dir="$DATA" \
    --config.seed="$SEED" $(args "$method") --workdir="$RUNS/$name" > "$RUNS/$name.console.txt" 2>&1 || {
      echo "$name failed: $(tail -n 1 "$RUNS/$name.console.txt")" >&2; exit 1; }
  $PY -m transformer_jax.main --config=configs/multi30k_de_en.py --workdir="$RUNS/$name" \
    --mode=eval --config.dataset_name=text --config.data_dir="$RUNS/typos" --split=test_typos \
    > "$RUNS/$name.typos.txt" 2>&1
  echo "$name $((SECONDS - start))" >> "$RUNS/times.txt"
done

$PY - "$RUNS" <<'PYEOF'
import os, re, sys
runs = sys.argv[1]
rows = [line.split() for line in open(os.path.join(runs, 'times.txt'))]
def bleu(path, pattern):
  found = re.findall(pattern, open(path, encoding='utf-8').read()) if os.path.exists(path) else []
  return float(found[-1]) if found else None
table = {}
for name, seconds in rows:
  test = bleu(os.path.join(runs, name, 'train.log'), r'test_2016\S*: BLEU ([\d.]+)')
  typos = bleu(os.path.join(runs, f'{name}.typos.txt'), r'\bbleu\s+([\d.]+)')
  table[name] = (int(seconds), test, typos)
print('| run | wall time | test_2016 BLEU | Δ | typo test BLEU | Δ | BLEU lost to typos |')
print('| --- | --- | --- | --- | --- | --- | --- |')
for name, (seconds, test, typos) in table.items():
  base = table.get(f"baseline_seed{name.rsplit('_seed', 1)[1]}")
  fmt = lambda v: '-' if v is None else f'{v:.2f}'
  delta = lambda v, b: '-' if v is None or b is None else f'{v - b:+.2f}'
  lost = '-' if test is None or typos is None else f'{test - typos:.2f}'
  print(f'| {name} | {seconds // 60} min {seconds % 60:02d} s | {fmt(test)} | '
        f'{delta(test, base and base[1])} | {fmt(typos)} | {delta(typos, base and base[2])} | {lost} |')
PYEOF
