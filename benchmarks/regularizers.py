"""The cost of the regularizers (transformer_jax/regularizers.py) in train-step time.

  python benchmarks/regularizers.py [--shape base|tiny] [--steps N] [--rows R] [--length L]
                                    [--only baseline,fgm,...]

For each regularizer, the train step of configs/mt.py (`--shape base`, the default: d_model
256, 3 + 3 layers, vocabulary 8000; `tiny`: configs/mt.py:tiny) built as the trainer builds
it (`translation.create_model_and_state`, `regularizers.wrap` around the translation loss,
`train.jit_train_step` on a data-parallel mesh of every device), run on one fixed batch of
`--rows` x `--length` random tokens (source and target lengths drawn from 1..length, the
rest padding; seed 0): lowering and compiling are timed apart, then 2 warm-up steps, then
`--steps` steps, each synchronized (the loss read on the host). Printed as a markdown table:
the median step time, its ratio to the baseline's, the compile time, and the XLA temporary
buffer size of the compiled step (its activation memory).

Rows: baseline (no regularizer), fgm, pgd (K = 3), freelb (K = 3), r_drop (alpha 1: the
batch runs twice), ema (decay 0.999). The adversarial rows use epsilon 1, step size 0.3.
"""
from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from configs import mt
from transformer_jax import losses
from transformer_jax import regularizers
from transformer_jax import sharding
from transformer_jax import train
from transformer_jax.tasks import translation

VARIANTS = {
    'baseline': {},
    'fgm': {'adversarial': 'fgm'},
    'pgd': {'adversarial': 'pgd', 'adversarial_steps': 3},
    'freelb': {'adversarial': 'freelb', 'adversarial_steps': 3},
    'r_drop': {'r_drop_alpha': 1.0},
    'ema': {'ema_decay': 0.999},
}


def make_batch(rows: int, length: int, vocab: int) -> dict:
  """Random source and target rows of `length` tokens, real lengths 1..length (EOS = 2
  last), padded with 0."""
  rng = np.random.default_rng(0)
  batch = {}
  for side in ('inputs', 'targets'):
    ids = rng.integers(4, vocab, (rows, length)).astype(np.int32)
    lengths = rng.integers(1, length + 1, rows)
    ids[np.arange(rows), lengths - 1] = 2
    ids[np.arange(length)[None, :] >= lengths[:, None]] = 0
    batch[side] = ids
  return batch


def measure(name: str, overrides: dict, args, mesh) -> dict:
  config = mt.get_config('tiny' if args.shape == 'tiny' else '')
  config.update(warmup_steps=0, schedule='constant', **overrides)
  vocab = config.vocab_size
  model, optimizer, state = translation.create_model_and_state(config, vocab, mesh)
  loss_fn = regularizers.wrap(config, functools.partial(
      translation.seq2seq_loss, model=model, loss_fn=losses.get_loss(config)))
  step = train.jit_train_step(config, loss_fn, optimizer, mesh, state)
  batch = sharding.put_batch(make_batch(args.rows, args.length, vocab), mesh)
  start = time.perf_counter()
  step = step.lower(state, batch, None).compile()
  compile_s = time.perf_counter() - start
  temp = step.memory_analysis().temp_size_in_bytes
  for _ in range(2):
    state, metrics = step(state, batch, None)
  float(metrics['loss'])
  times = []
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, batch, None)
    loss = float(metrics['loss'])
    times.append(time.perf_counter() - start)
  print(f'{name}: {1e3 * statistics.median(times):.1f} ms, loss {loss:.4f}', file=sys.stderr)
  return {'ms': 1e3 * statistics.median(times), 'compile_s': compile_s, 'temp': temp}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--shape', default='base', choices=['base', 'tiny'])
  parser.add_argument('--steps', type=int, default=20, help='timed steps per row')
  parser.add_argument('--rows', type=int, default=32)
  parser.add_argument('--length', type=int, default=64)
  parser.add_argument('--only', default=','.join(VARIANTS),
                      help='comma-separated rows (baseline is always measured)')
  args = parser.parse_args()
  names = ['baseline'] + [n for n in args.only.split(',') if n and n != 'baseline']
  unknown = [n for n in names if n not in VARIANTS]
  if unknown:
    parser.error(f'unknown rows {unknown}; choose from {list(VARIANTS)}')
  mesh = sharding.make_mesh()
  results = {name: measure(name, VARIANTS[name], args, mesh) for name in names}
  base = results['baseline']['ms']
  device = jax.devices()[0]
  print(f'\nconfigs/mt.py{":tiny" if args.shape == "tiny" else ""}, batch {args.rows} x '
        f'{args.length} tokens per side, {mesh.size} x {device.device_kind} '
        f'({device.platform}), jax {jax.__version__}; median of {args.steps} steps\n')
  print('| regularizer | step (ms) | vs baseline | compile (s) | XLA temp (MiB) |')
  print('|---|---:|---:|---:|---:|')
  for name, r in results.items():
    label = {'pgd': 'pgd (K=3)', 'freelb': 'freelb (K=3)'}.get(name, name)
    print(f"| {label} | {r['ms']:.1f} | {r['ms'] / base:.2f}x | {r['compile_s']:.1f} | "
          f"{r['temp'] / 2**20:.1f} |")


if __name__ == '__main__':
  main()
