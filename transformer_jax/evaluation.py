"""Using a trained model: the `eval` and `predict` (for translation also `translate`) modes.

Both set the run's task up from its workdir (tokenizer, model shape) and load a
checkpoint: the best by the task's metric (`best`, falling back to the latest when the
metric was never computed), the latest (`latest`), or the average of the parameters of
the last k checkpoints (`config.average_checkpoints` = k > 1; Vaswani et al. 2017,
section 6.1), accumulated in float32 (`average_params`).
"""
from __future__ import annotations

import sys
from typing import Any, TextIO

from absl import logging
import jax
import jax.numpy as jnp

from transformer_jax import checkpoints
from transformer_jax import optim
from transformer_jax import sharding
from transformer_jax import tasks


def load_task(config, workdir: str, checkpoint: str = 'best') -> tuple[tasks.Task, Any, str]:
  """The run's task (set up for eval/predict), the parameters of a checkpoint and a name
  for what was loaded ('step1200', 'best-step900', 'avg3-step1200').

  Raises:
    FileNotFoundError: the workdir has no tokenizer or no checkpoint.
    config_schema.ConfigError: a model field differs from the trained model's.
  """
  from transformer_jax import train  # pylint: disable=g-import-not-at-top (cycle)
  mesh = sharding.make_mesh()
  task = tasks.create(config, workdir, mesh)
  task.setup(training=False)
  state = train.create_state(task, optim.make_optimizer(config), config.seed, mesh)
  latest = checkpoints.make_manager(workdir, config.keep_checkpoints)
  best = checkpoints.make_manager(workdir, 1, subdir='best')
  try:
    if config.average_checkpoints > 1:
      steps = latest.all_steps()[-config.average_checkpoints:]
      if not steps:
        raise FileNotFoundError(f'{latest.directory}: no checkpoints')
      averaged = average_params([checkpoints.restore(latest, state, s).params
                                 for s in steps])
      if len(steps) < config.average_checkpoints:
        logging.warning('Averaging %d checkpoints, fewer than the %d asked for', len(steps),
                        config.average_checkpoints)
      return task, averaged, f'avg{len(steps)}-step{steps[-1]}'
    manager, prefix = latest, ''
    if checkpoint == 'best' and best.latest_step() is not None:
      manager, prefix = best, 'best-'
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'{latest.directory}: no checkpoints')
    return task, checkpoints.restore(manager, state, step).params, f'{prefix}step{step}'
  finally:
    latest.close()
    best.close()


def average_params(trees: list[Any]) -> Any:
  """The elementwise mean of k parameter pytrees of one structure (the last k
  checkpoints; Vaswani et al. 2017, section 6.1), accumulated in float32 whatever the
  leaves' dtype: a bfloat16 sum of k values near 1.0 rounds to multiples of 2**-7 and
  more, losing the differences being averaged.

  Args:
    trees: k >= 1 pytrees with the same structure and shapes.

  Returns:
    Their mean: each floating leaf float32 (or float64 if the leaves are), the sum
    (x_1 + ... + x_k) / k in that dtype; other leaves are taken from the last tree.

  Raises:
    ValueError: `trees` is empty.
  """
  if not trees:
    raise ValueError('average_params: no parameter trees to average')

  def mean(*leaves):
    if not jnp.issubdtype(leaves[-1].dtype, jnp.floating):
      return leaves[-1]
    dtype = jnp.promote_types(leaves[-1].dtype, optim.MASTER_DTYPE)
    total = jnp.asarray(leaves[0], dtype)
    for leaf in leaves[1:]:
      total = total + jnp.asarray(leaf, dtype)
    return total / len(leaves)

  return jax.tree.map(mean, *trees)


def run_eval(config, workdir: str, split: str, checkpoint: str = 'best') -> dict:
  """Scores a checkpoint on `split` with the task's `test` and prints its report."""
  task, params, name = load_task(config, workdir, checkpoint)
  result, report = task.test(params, split, name)
  print(report)
  return result


def run_predict(config, workdir: str, source: TextIO = sys.stdin,
                target: TextIO = sys.stdout, checkpoint: str = 'best') -> int:
  """Writes the task's prediction for every line of `source` into `target`, one line out
  per line in, same order. Returns the number of lines."""
  task, params, _ = load_task(config, workdir, checkpoint)
  lines = [line.rstrip('\n') for line in source]
  for output in task.predict(params, lines):
    target.write(output + '\n')
  target.flush()
  return len(lines)
