"""The training loop, the same for every task (`transformer_jax.tasks`).

The loop knows nothing of languages, labels or BLEU: it runs a task's batches through a
jit-compiled train step (the task's loss, the optimizer), logs train metrics,
throughput and MFU (progress bar, TensorBoard, train.log), evaluates every
`eval_every_steps` with the task's `evaluate`, keeps the best checkpoint by the task's
`best_metric`, stops after `patience` evaluations without improvement, checkpoints with
Orbax, resumes exactly, stops cleanly on Ctrl-C, and finally scores `config.test_split`
with the best checkpoint.
"""
from __future__ import annotations

import functools
import json
import logging as py_logging
import os
import signal
import sys
import threading
import time
from typing import Any, Callable

from absl import logging
import flax
from flax.metrics import tensorboard
import jax
import numpy as np
import optax
import tqdm

from transformer_jax import checkpoints
from transformer_jax import config_schema
from transformer_jax import flops
from transformer_jax import hugepages
from transformer_jax import optim
from transformer_jax import sharding
from transformer_jax import tasks


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds. The dropout rng is derived from (seed, step), and
  the data position equals `step`, so (step, params, opt_state) restores a run exactly."""
  step: jax.Array
  params: Any
  opt_state: Any


LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]


def train_step(state: TrainState, batch: dict, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, schedule: Callable,
               seed: int) -> tuple[TrainState, dict]:
  """One optimizer update on a batch.

  Args:
    state: the current state.
    batch: {name: array [B, ...]}, whatever the task's loss reads.
    loss_fn: (params, batch, dropout_rng) -> (scalar loss, metrics): a task's `loss`.
    optimizer: the Optax transformation (`optim.make_optimizer`).
    schedule: its learning-rate schedule, logged.
    seed: the run's seed; the dropout rng of a step is fold_in(PRNGKey(seed), step).

  Returns:
    The new state and scalar metrics: the loss function's, plus 'loss', 'grad_norm'
    and 'learning_rate'.
  """
  dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
  (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
      state.params, batch, dropout_rng)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**metrics, 'loss': loss, 'grad_norm': optax.global_norm(grads),
             'learning_rate': schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


class _LogFile:
  """Sends INFO and above to {workdir}/train.log while the console shows only warnings,
  the progress bar and the eval lines; removed again on exit."""

  def __init__(self, workdir: str):
    self.handler = py_logging.FileHandler(os.path.join(workdir, 'train.log'))
    self.handler.setFormatter(py_logging.Formatter('%(asctime)s %(levelname)s %(message)s'))

  def __enter__(self):
    logging.get_absl_logger().addHandler(self.handler)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().setLevel(py_logging.WARNING)

  def __exit__(self, *exc):
    logging.get_absl_logger().removeHandler(self.handler)
    self.handler.close()


def create_state(task: tasks.Task, optimizer: optax.GradientTransformation, seed: int,
                 mesh, pretrained: bool = False) -> TrainState:
  """A freshly initialized state (the task's `init_params`, and with `pretrained` its
  `load_pretrained`) replicated over `mesh`."""
  replicated = sharding.replicated(mesh)
  params = jax.jit(task.init_params, out_shardings=replicated)(jax.random.PRNGKey(seed))
  if pretrained:
    params = jax.device_put(task.load_pretrained(params), replicated)
  return TrainState(step=jax.device_put(jax.numpy.array(0, jax.numpy.int32), replicated),
                    params=params,
                    opt_state=jax.jit(optimizer.init, out_shardings=replicated)(params))


class BestCheckpoint:
  """Keeps the checkpoint with the best `metric` (improving in direction `mode`, 'max' or
  'min') in {workdir}/best, with its value in best/score.json, and counts evaluations
  without improvement for early stopping."""

  def __init__(self, workdir: str, metric: str, mode: str = 'max'):
    self.manager = checkpoints.make_manager(workdir, keep=1, subdir='best')
    self.path = os.path.join(workdir, 'best', 'score.json')
    self.metric, self.mode = metric, mode
    self.step, self.value = -1, None
    if os.path.exists(self.path):
      with open(self.path) as f:
        saved = json.load(f)
      self.step, self.value = saved['step'], saved[saved.get('metric', 'bleu')]

  def better(self, value: float) -> bool:
    if self.value is None:
      return True
    return value > self.value if self.mode == 'max' else value < self.value

  def update(self, state: TrainState, value: float) -> bool:
    """Saves `state` if `value` beats the best so far; returns whether it did."""
    if not self.better(value):
      return False
    checkpoints.save(self.manager, state)
    self.manager.wait_until_finished()
    self.step, self.value = int(state.step), value
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump({'step': self.step, 'metric': self.metric, self.metric: value}, f)
    os.replace(tmp, self.path)
    return True

  def evaluations_since_best(self, step: int, every: int) -> int:
    return (step - self.step) // every if self.step >= 0 and every else 0


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Trains `config` (any task) in `workdir`, resuming from its latest checkpoint if there
  is one.

  Writes the task's files (tokenizer/, model_config.json, outputs), checkpoints/, best/
  (best by the task's metric), tensorboard/ and train.log. At the end, scores
  `config.test_split` with the best checkpoint. Returns the final train state.

  Raises:
    config_schema.ConfigError: a bad config field (before any work is done).
    multi30k.DataError: bad input data, naming the file and line.
  """
  config_schema.validate(config)
  os.makedirs(workdir, exist_ok=True)
  with _LogFile(workdir):
    return _train(config, workdir)


class _StopOnInterrupt:
  """Ctrl-C (SIGINT) during training stops the loop between steps: the first one sets
  `requested` and the loop raises KeyboardInterrupt after the current step (and its eval or
  checkpoint) has finished, so no checkpoint write is cut in half; a second one raises at
  once. Installed when built, until `restore`; only in the main thread (signal handlers
  live there), elsewhere a no-op."""

  def __init__(self, bar: tqdm.tqdm):
    self.requested = False
    self._bar = bar
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)

  def restore(self) -> None:
    """Puts the previous SIGINT handler back."""
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self.requested:
      raise KeyboardInterrupt
    self.requested = True
    self._bar.write('Ctrl-C: stopping after this step and saving a checkpoint '
                    '(press Ctrl-C again to stop at once)')


class _Throughput:
  """Counts steps and a task's `batch_stats` (examples, real tokens, computed positions,
  model FLOPs) between logs; `summary` turns them into rates and MFU against
  `peak_flops` (FLOP/s of all devices)."""

  def __init__(self, peak_flops: float):
    self.peak_flops = peak_flops
    self.reset()

  def reset(self):
    self.steps = self.examples = self.tokens = self.positions = self.flops = 0
    self.start = time.perf_counter()

  def add(self, stats: dict):
    self.steps += 1
    self.examples += stats['examples']
    self.tokens += stats['tokens']
    self.positions += stats['positions']
    self.flops += stats['flops']

  def summary(self) -> dict:
    """Rates since `reset`; call after the counted steps have finished."""
    seconds = time.perf_counter() - self.start
    return {'steps_per_second': self.steps / seconds,
            'examples_per_second': self.examples / seconds,
            'tokens_per_second': self.tokens / seconds,  # Real (non-pad) tokens.
            'real_token_fraction': self.tokens / max(self.positions, 1),
            'flops_per_second': self.flops / seconds,
            'mfu': self.flops / seconds / self.peak_flops}


def _summarize(pending: list[dict], throughput: _Throughput) -> dict:
  """Means of the per-step train metrics since the last log, plus throughput and MFU."""
  # Steps run asynchronously: wait for the last one, or the clock reads dispatch time.
  jax.block_until_ready(pending[-1])
  rates = throughput.summary()
  summary = {k: float(np.mean(v)) for k, v in
             jax.tree.map(lambda *x: np.stack(x), *jax.device_get(pending)).items()}
  return {**summary, **rates}


def _eval_line(task: tasks.Task, step: int, train: dict, result: dict, improved: bool) -> str:
  return (f"step {step}: train loss {train['loss']:.4f} | {task.format_eval(result)}"
          f"{' (best)' if improved else ''} | "
          f"{train['examples_per_second']:.1f} examples/s, "
          f"{train['tokens_per_second']:.0f} {task.token_unit}/s, "
          f"{train['flops_per_second'] / 1e9:.1f} GFLOP/s, MFU {100 * train['mfu']:.1f}%")


def _log(bar: tqdm.tqdm, message: str) -> None:
  bar.write(message)
  logging.info(message)


def _train(config, workdir: str) -> TrainState:
  mesh = sharding.make_mesh()
  logging.info('Devices: %s; malloc huge pages: %s', mesh.devices,
               'on' if hugepages.active() else 'off')
  task = tasks.create(config, workdir, mesh)
  task.setup(training=True)

  optimizer = optim.make_optimizer(config)
  manager = checkpoints.make_manager(workdir, config.keep_checkpoints)
  state = create_state(task, optimizer, config.seed, mesh,
                       pretrained=manager.latest_step() is None)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s parameters; %s', f'{num_params:,}', task.describe())
  peak = flops.peak_flops_per_device(mesh.devices.flat[0], config.dtype,
                                     config.peak_flops_per_device) * mesh.size
  logging.info('Peak for MFU: %.1f GFLOP/s (%d x %s)', peak / 1e9, mesh.size,
               mesh.devices.flat[0].device_kind)
  throughput = _Throughput(peak)
  state = checkpoints.restore_latest(manager, state)
  start_step = int(state.step)
  best = BestCheckpoint(workdir, task.best_metric, task.best_mode)

  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  p_train_step = jax.jit(
      functools.partial(train_step, loss_fn=task.loss, optimizer=optimizer,
                        schedule=optim.learning_rate_schedule(config), seed=config.seed),
      in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
      donate_argnums=0)

  train_iter = task.train_batches(config.seed, skip=start_step)
  writer = tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard'))
  bar = tqdm.tqdm(total=config.num_train_steps, initial=start_step, unit='step',
                  dynamic_ncols=True, desc='train')
  pending, shapes = [], set()
  throughput.reset()
  interrupt = _StopOnInterrupt(bar)
  try:
    for step in range(start_step + 1, config.num_train_steps + 1):
      batch = next(train_iter)
      throughput.add(task.batch_stats(batch))
      last = step == config.num_train_steps
      do_eval = step % config.eval_every_steps == 0 or last
      do_log = step % config.log_every_steps == 0 or do_eval
      shape = tuple(sorted((k, v.shape) for k, v in batch.items()))
      compiles = shape not in shapes  # jit compiles once per batch shape.
      if compiles:
        shapes.add(shape)
        logging.info('Compiling the train step for batch shape %s (%d so far)', shape,
                     len(shapes))
      state, metrics = p_train_step(state, sharding.put_batch(batch, mesh))
      pending.append(metrics)
      bar.update(1)
      if compiles and not do_log:  # Compile time is not training time.
        jax.block_until_ready(metrics)
        throughput.reset()

      if do_log:
        train_summary = _summarize(pending, throughput)
        for name, value in train_summary.items():
          writer.scalar(f'train/{name}', value, step)
        bar.set_postfix(loss=f"{train_summary['loss']:.3f}",
                        tok_s=f"{train_summary['tokens_per_second']:.0f}")
        pending = []

      if do_eval:
        result, report = task.evaluate(state.params, step, last)
        improved = task.best_metric in result and best.update(state, result[task.best_metric])
        for name, value in result.items():
          writer.scalar(f'eval/{name}', value, step)
        writer.flush()
        _log(bar, _eval_line(task, step, train_summary, result, improved))
        if report:
          _log(bar, report)

      stop_early = bool(config.patience and task.best_metric and
                        best.evaluations_since_best(step, task.metric_every_steps)
                        >= config.patience)
      if step % config.checkpoint_every_steps == 0 or last or stop_early:
        checkpoints.save(manager, state)
      if stop_early:
        _log(bar, f'Early stopping at step {step}: no {task.best_metric} improvement in '
                  f'{config.patience} evaluations (best {best.value:.4f} at step {best.step})')
        break
      if do_log:
        throughput.reset()  # Eval and checkpoint time is not training time.
      if interrupt.requested:
        raise KeyboardInterrupt
  except KeyboardInterrupt:
    # `state` is the result of the last completed step: save it, so a rerun loses nothing.
    try:
      if int(state.step) not in manager.all_steps():
        checkpoints.save(manager, state)
      manager.wait_until_finished()  # A save may still be running in the background.
      _log(bar, f'Interrupted: saved a checkpoint at step {int(state.step)}')
    except RuntimeError as e:  # Interrupted between a step's dispatch and its result.
      logging.warning('Interrupted; could not save the current step (%s)', e)
    except KeyboardInterrupt:  # A second Ctrl-C while the checkpoint was being written.
      _log(bar, f'Interrupted again: the checkpoint of step {int(state.step)} may be '
                'incomplete; the latest complete one is restored on rerun')
      for handler in py_logging.getLogger().handlers:
        handler.flush()
      sys.stdout.flush()
      sys.stderr.flush()
      os._exit(130)  # Waiting for the writer threads again could hang.
    raise
  finally:
    interrupt.restore()
    bar.close()
    writer.close()
    manager.wait_until_finished()
    manager.close()

  if config.test_split:
    params, name = state.params, f'step{int(state.step)}'
    if best.step >= 0:
      params, name = checkpoints.restore_latest(best.manager, state).params, f'best-step{best.step}'
    _, report = task.test(params, config.test_split, name)
    print(report)
    logging.info(report)
  best.manager.close()
  return state
