"""Prints the table of PEFT runs from their train.log files (benchmarks/peft_sst2.sh):

  python benchmarks/peft_table.py RUNS_DIR METHOD [METHOD ...]

Per run: steps, best validation accuracy (and BLEU for translation runs), trainable
parameters and their share of the model, optimizer-state bytes, peak resident memory,
median seconds per train step (from the logged steps/s), test_2016 BLEU of translation
runs and wall time (RUNS_DIR/times.txt).
"""
import os
import re
import statistics
import sys


def parse(log: str) -> dict:
  text = open(log, encoding='utf-8').read()
  row = {}
  if m := re.search(r'PEFT: \w+ on \d+ sites: ([\d,]+) trainable parameters \(([\d.]+)%', text):
    row['trainable'], row['share'] = m.group(1), f'{m.group(2)}%'
  elif m := re.search(r'Model: ([\d,]+) parameters', text):
    row['trainable'], row['share'] = m.group(1), '100%'
  if m := re.search(r'optimizer state ([\d,]+) bytes', text):
    row['optimizer state'] = f'{int(m.group(1).replace(",", "")) / 2**20:.1f} MiB'
  if m := re.search(r'Peak resident memory of the process: (\d+) MiB', text):
    row['peak RSS'] = f'{m.group(1)} MiB'
  rates = [float(r) for r in re.findall(r'train step \d+: loss [\d.]+, ([\d.]+) steps/s', text)]
  if rates:
    row['s/step'] = f'{statistics.median(1 / r for r in rates):.3f}'
  steps = re.findall(r'step (\d+): train loss', text)
  row['steps'] = steps[-1] if steps else '0'
  for metric in ('accuracy', 'F1', 'BLEU'):
    values = [float(v) for v in re.findall(rf'\| eval .*?\b{metric} ([\d.]+)', text)]
    if metric == 'BLEU':
      values = [float(v) for v in re.findall(r'validation BLEU ([\d.]+)', text)]
    if values:
      scale = 1 if metric == 'BLEU' else 100
      row[f'best val {metric}'] = f'{scale * max(values):.2f}'
  if m := re.findall(r'test_2016\S*: BLEU ([\d.]+) .*lowercased BLEU ([\d.]+)', text):
    row['test BLEU (lowercased)'] = f'{m[-1][0]} ({m[-1][1]})'
  return row


def main(runs: str, methods: list[str]) -> None:
  times = {}
  if os.path.exists(os.path.join(runs, 'times.txt')):
    for line in open(os.path.join(runs, 'times.txt')):
      name, seconds = line.split()
      times[name] = int(seconds)
  rows = {m: parse(os.path.join(runs, m, 'train.log')) for m in methods
          if os.path.exists(os.path.join(runs, m, 'train.log'))}
  for m, row in rows.items():
    if m in times:
      row['wall'] = f'{times[m] // 60}m{times[m] % 60:02d}s'
  columns = ['method'] + sorted({k for r in rows.values() for k in r},
                                key=['steps', 'best val accuracy', 'best val F1', 'best val BLEU',
                                     'test BLEU (lowercased)', 'trainable', 'share', 'optimizer state', 'peak RSS',
                                     's/step', 'wall'].index)
  print('| ' + ' | '.join(columns) + ' |')
  print('|' + '---|' * len(columns))
  for m, row in rows.items():
    print('| ' + ' | '.join([m] + [row.get(c, '') for c in columns[1:]]) + ' |')


if __name__ == '__main__':
  main(sys.argv[1], sys.argv[2:])
