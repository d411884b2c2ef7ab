"""Using a trained model: the `eval` and `predict` (for translation also `translate`) modes.

Both set the run's task up from its workdir (tokenizer, model shape) and load a
checkpoint: the best by the task's metric (`best`, falling back to the latest when the
metric was never computed), the latest (`latest`), or the average of the parameters of
the last k checkpoints (`config.average_checkpoints` = k > 1; Vaswani et al. 2017,
section 6.1), accumulated in float32 (`average_params`). A run that kept an exponential
moving average of its parameters (`config.ema_decay` > 0) is used through its EMA, as its
own evaluations were (`train.TrainState.eval_params`; averaging averages the EMAs).
"""
from __future__ import annotations

import os
import shutil
import sys
from typing import Any, TextIO

from absl import logging
import jax
import jax.numpy as jnp

from transformer_jax import checkpoints
from transformer_jax import config_schema
from transformer_jax import multihost
from transformer_jax import optim
from transformer_jax import peft
from transformer_jax import sharding
from transformer_jax import tasks


LANGUAGE_FIELDS = ('source_lang', 'target_lang')


def _note_other_languages(config, workdir: str) -> None:
  """Says on stderr (and in the log) when `config` reads other languages than the run
  in `workdir` was trained on (its run_config.json): a translation model scored on another
  source language is allowed (zero-shot), but mostly a forgotten override."""
  started = config_schema.load_run_config(workdir) or {}
  differ = [f'config.{name}={config[name]!r}, the run trained with {started[name]!r}'
            for name in LANGUAGE_FIELDS
            if name in config and name in started and config[name] != started[name]]
  if differ and multihost.is_primary():
    message = (f"Note: {'; '.join(differ)} ({workdir}/{config_schema.RUN_CONFIG_FILE}); pass "
               "the training's value to evaluate the model as trained")
    logging.warning('%s', message)
    print(message, file=sys.stderr)


def load_task(config, workdir: str, checkpoint: str = 'best') -> tuple[tasks.Task, Any, str]:
  """The run's task (set up for eval/predict), the parameters of a checkpoint and a name
  for what was loaded ('step1200', 'best-step900', 'avg3-step1200').

  A PEFT run's workdir (it has adapter_config.json) gives `peft.Params`: the base of
  `config.init_from` (by default the one recorded in adapter_config.json), checked against
  the recorded fingerprint, and the adapter of the checkpoint.

  A checkpoint that holds an EMA of the parameters (`config.ema_decay` > 0 in training)
  gives the EMA (`train.TrainState.eval_params`), whatever `config.ema_decay` says now.

  Raises:
    FileNotFoundError: the workdir has no tokenizer or no checkpoint.
    config_schema.ConfigError: a model field differs from the trained model's.
    peft.AdapterError: the base or tokenizer differs from the adapter's.
  """
  from transformer_jax import train  # pylint: disable=g-import-not-at-top (cycle)
  _note_other_languages(config, workdir)
  mesh = sharding.config_mesh(config)
  adapter = peft.Adapter.from_workdir(workdir)
  if adapter is not None and not config.init_from:  # The base the adapter was trained on.
    config = config.copy_and_resolve_references()
    config.init_from = peft.load_config(workdir)['base']
  task = tasks.create(config, workdir, mesh)
  task.peft = adapter
  task.setup(training=False)
  if adapter is not None:
    adapter.bind(task)
  state = train.create_state(task, optim.make_optimizer(config), config.seed, mesh)
  view = lambda params: params
  if adapter is not None:
    adapter.check(workdir)
    view = adapter.view
  latest = checkpoints.make_manager(workdir, config.keep_checkpoints)
  best = checkpoints.make_manager(workdir, 1, subdir='best')

  def restore(manager, step: int) -> Any:  # The EMA when the checkpoint has one.
    has_ema = 'ema' in checkpoints.stored_fields(manager, step)
    if has_ema:  # Said on the console too: eval/predict output does not show it.
      message = f'{manager.directory}/{step} holds an EMA of the parameters: using it'
      logging.info('%s', message)
      if multihost.is_primary():
        print(message, file=sys.stderr)
    # Parameters (or their EMA) only: the optimizer state is not needed, and an optimizer
    # built from this config need not match the run's (max_grad_norm, layer_lr_decay).
    name = 'ema' if has_ema else 'params'
    return checkpoints.restore_fields(manager, {name: state.params}, step)[name]

  try:
    if config.average_checkpoints > 1:
      steps = latest.all_steps()[-config.average_checkpoints:]
      if not steps:
        raise FileNotFoundError(f'{latest.directory}: no checkpoints')
      averaged = average_params([restore(latest, s) for s in steps])
      if len(steps) < config.average_checkpoints:
        logging.warning('Averaging %d checkpoints, fewer than the %d asked for', len(steps),
                        config.average_checkpoints)
      return task, view(averaged), f'avg{len(steps)}-step{steps[-1]}'
    manager, prefix = latest, ''
    if checkpoint == 'best' and best.latest_step() is not None:
      manager, prefix = best, 'best-'
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'{latest.directory}: no checkpoints')
    return task, view(restore(manager, step)), f'{prefix}step{step}'
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
  if multihost.is_primary():
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


def run_merge(config, workdir: str, output: str, checkpoint: str = 'best') -> str:
  """Folds the adapter of a LoRA or IA3 run (`workdir`) into its base and writes a plain
  run folder `output` (tokenizer/, model_config.json, checkpoints/STEP with the merged
  parameters and a fresh optimizer state): `--mode=eval/predict --workdir=output`, or
  `init_from=output`, use it like any trained model, without the adapter.

  Returns:
    The checkpoint folder written.

  Raises:
    peft.AdapterError: `workdir` is not a PEFT run, its method cannot be merged, or its
      base differs from the recorded one.
    FileExistsError: `output` already holds checkpoints.
  """
  from transformer_jax import train  # pylint: disable=g-import-not-at-top (cycle)
  record = peft.load_config(workdir)
  if record is None:
    raise peft.AdapterError(f'--workdir={workdir}: no {peft.CONFIG_FILE}; not a PEFT run')
  method = peft.METHODS[record['settings']['peft_method']]
  if not method.MERGEABLE:
    raise peft.AdapterError(f'{workdir} is a {method.name} run: only lora and ia3 can be '
                            'merged into the base parameters')
  if os.path.isdir(os.path.join(output, 'checkpoints')) and os.listdir(
      os.path.join(output, 'checkpoints')):
    raise FileExistsError(f'--output={output}: already holds checkpoints')
  task, params, name = load_task(config, workdir, checkpoint)
  merged = task.peft.merged(params.trainable)
  manager = checkpoints.make_manager(output, 1)
  try:
    # Process 0 copies the files; every process saves its part of the checkpoint.
    entries = ('tokenizer', 'model_config.json') if multihost.is_primary() else ()
    for entry in entries:
      source = os.path.join(workdir, entry)
      if os.path.isdir(source):
        shutil.copytree(source, os.path.join(output, entry), dirs_exist_ok=True)
      elif os.path.exists(source):
        shutil.copy(source, os.path.join(output, entry))
    step = int(name.rsplit('step', 1)[1])
    optimizer = optim.make_optimizer(config)
    state = train.TrainState(step=jnp.asarray(step, jnp.int32), params=merged,
                             opt_state=optimizer.init(merged))
    checkpoints.save(manager, state)
    manager.wait_until_finished()
  finally:
    manager.close()
  path = os.path.join(output, 'checkpoints', str(step))
  if multihost.is_primary():
    rows = (f' and {len(task.peft.rows):,} token rows trained in full' if task.peft.rows
            else '')
    print(f'merged {task.peft.method.name}{rows} ({name} of {workdir}) into its base: {path}')
  return path
