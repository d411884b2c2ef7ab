"""The experiments behind docs/performance.md: train-step time of one model shape under
XLA flags, huge pages for malloc, dtypes, PRNG implementations and dropout settings, each
in a fresh process.

  python benchmarks/cpu_experiments.py                 # every experiment, ~10 min
  python benchmarks/cpu_experiments.py --only=base,huge_pages  # some of them
  python benchmarks/cpu_experiments.py --step --dtype=bfloat16  # one measurement

Shape: issue 4's "small" model (3+3 layers, d_model 256, 8 heads, d_ff 512, vocab
8000) on batches of 128 pairs padded to 32 tokens, half of them real. Prints the median
step time over --steps steps after 3 warm-up steps, real target tokens/s, and the minor
page faults per step. GLIBC_TUNABLES is removed from every experiment's environment except
where it sets huge pages.
"""
from __future__ import annotations

import argparse
import functools
import os
import subprocess
import sys
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

HUGE_PAGES = 'GLIBC_TUNABLES=glibc.malloc.hugetlb=1'  # What transformer_jax.main sets.

# name -> (extra XLA_FLAGS or another VAR=VALUE environment setting, extra arguments of --step)
EXPERIMENTS = {
    'base': ('', []),
    'huge_pages': (HUGE_PAGES, []),
    'huge_pages_bf16': (HUGE_PAGES, ['--dtype=bfloat16']),
    'no_dropout': ('', ['--dropout=0']),
    'rbg_prng': ('', ['--prng=rbg']),
    'bf16': ('', ['--dtype=bfloat16']),
    'bf16_rbg': ('', ['--dtype=bfloat16', '--prng=rbg']),
    'onednn': ('--xla_cpu_use_onednn=true', []),
    'onednn_bf16': ('--xla_cpu_use_onednn=true', ['--dtype=bfloat16']),
    'onednn_custom_call_bf16': ('--xla_cpu_use_onednn=true '
                                '--xla_cpu_experimental_onednn_custom_call=true',
                                ['--dtype=bfloat16']),
    'no_xnnpack': ('--xla_cpu_use_xnnpack=false', []),
    'no_xnnpack_bf16': ('--xla_cpu_use_xnnpack=false', ['--dtype=bfloat16']),
    'fast_math': ('--xla_cpu_enable_fast_math=true', []),
    'vector_width_256': ('--xla_cpu_prefer_vector_width=256', []),
}


def step_benchmark(args) -> None:
  """Times the jitted train step in this process (flags come from the environment)."""
  sys.path.insert(0, REPO)
  import jax  # pylint: disable=g-import-not-at-top
  if args.prng != 'threefry':
    jax.config.update('jax_default_prng_impl', args.prng)
  import resource  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from configs import mt  # pylint: disable=g-import-not-at-top
  # pylint: disable=g-import-not-at-top
  from transformer_jax import losses, optim, sharding, train
  from transformer_jax.tasks import translation
  # pylint: enable=g-import-not-at-top

  config = mt.get_config()
  config.update(d_model=256, num_heads=8, d_ff=512, num_encoder_layers=3,
                num_decoder_layers=3, dtype=args.dtype, dropout_rate=args.dropout,
                attention_dropout_rate=args.dropout)
  mesh = sharding.make_mesh()
  model, optimizer, state = translation.create_model_and_state(config, 8000, mesh)
  loss_fn = functools.partial(translation.seq2seq_loss, model=model,
                              loss_fn=losses.get_loss(config))
  step = jax.jit(functools.partial(
      train.train_step, optimizer=optimizer, loss_fn=loss_fn,
      schedule=optim.learning_rate_schedule(config), seed=0), donate_argnums=0)
  rng = np.random.default_rng(0)
  lengths = rng.integers(2, 33, size=(2, 128))  # Mean ~17 of 32: about half real.
  batch = {k: np.where(np.arange(32) < n[:, None], rng.integers(4, 8000, (128, 32)), 0)
           .astype(np.int32) for k, n in zip(('inputs', 'targets'), lengths)}
  start = time.perf_counter()
  state, _ = step(state, batch)
  jax.block_until_ready(state)
  compile_s = time.perf_counter() - start
  for _ in range(2):
    state, _ = step(state, batch)
  jax.block_until_ready(state)
  times = []
  faults = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
  for _ in range(args.steps):
    start = time.perf_counter()
    state, metrics = step(state, batch)
    jax.block_until_ready(metrics)
    times.append(time.perf_counter() - start)
  faults = (resource.getrusage(resource.RUSAGE_SELF).ru_minflt - faults) // args.steps
  median = float(np.median(times))
  print(f'RESULT step_ms={1000 * median:.1f} tokens_per_s={lengths[1].sum() / median:.0f} '
        f'compile_s={compile_s:.1f} loss={float(metrics["loss"]):.3f} '
        f'page_faults_per_step={faults}')


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--step', action='store_true', help='Run one measurement here.')
  parser.add_argument('--dtype', default='float32')
  parser.add_argument('--dropout', type=float, default=0.1)
  parser.add_argument('--prng', default='threefry', choices=['threefry', 'rbg', 'unsafe_rbg'])
  parser.add_argument('--steps', type=int, default=20)
  parser.add_argument('--only', default='', help='Comma-separated experiment names.')
  args = parser.parse_args()
  if args.step:
    step_benchmark(args)
    return
  names = args.only.split(',') if args.only else list(EXPERIMENTS)
  print(f'{"experiment":<26} {"environment":<70} result')
  for name in names:
    flags, extra = EXPERIMENTS[name]
    env = {**os.environ, 'XLA_FLAGS': flags, 'TF_CPP_MIN_LOG_LEVEL': '3'}
    env.pop('GLIBC_TUNABLES', None)  # Huge pages only where the experiment says.
    if flags and not flags.startswith('--'):
      var, value = flags.split('=', 1)
      env.update({'XLA_FLAGS': '', var: value})
    proc = subprocess.run([sys.executable, __file__, '--step', f'--steps={args.steps}', *extra],
                          env=env, capture_output=True, text=True, check=False)
    lines = [l for l in proc.stdout.splitlines() if l.startswith('RESULT')]
    result = lines[-1][7:] if lines else 'FAILED: ' + proc.stderr.strip().splitlines()[-1]
    print(f'{name:<26} {flags:<70} {result}', flush=True)


if __name__ == '__main__':
  main()
