"""The training loop, the same for every task (`transformer_jax.tasks`).

The loop knows nothing of languages, labels or BLEU: it runs a task's batches through a
jit-compiled train step (the task's loss, the optimizer), logs train metrics,
throughput and MFU (progress bar, TensorBoard, train.log), evaluates every
`eval_every_steps` with the task's `evaluate`, keeps the best checkpoint by the task's
`best_metric`, stops after `patience` evaluations without improvement, checkpoints with
Orbax (every cadence fires at its own multiples: `cadence`), resumes exactly (refusing a
config that would change the model or the data order: `config_schema.check_run_config`),
stops cleanly on Ctrl-C, and finally scores `config.test_split` with the best checkpoint.
The progress bar counts finished steps: at most MAX_STEPS_IN_FLIGHT are dispatched ahead.
"""
from __future__ import annotations

import collections
import contextlib
import functools
import json
import logging as py_logging
import os
import resource
import signal
import sys
import threading
import time
from typing import Any, Callable

from absl import logging
import flax
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from transformer_jax import checkpoints
from transformer_jax import config_schema
from transformer_jax import flops
from transformer_jax import hugepages
from transformer_jax import models
from transformer_jax import multihost
from transformer_jax import optim
from transformer_jax import peft
from transformer_jax import regularizers
from transformer_jax import sharding
from transformer_jax import tasks
from transformer_jax import tracking


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds. The dropout rng is derived from (seed, step), and
  the data position equals `step`, so (step, params, opt_state, ema) restores a run exactly.
  `ema` is the moving average of `params` (`config.ema_decay` > 0,
  `regularizers.ema_update`), else None, which checkpoints do not store
  (`checkpoints.save`): a run without it writes and reads what it did before the field."""
  step: jax.Array
  params: Any
  opt_state: Any
  ema: Any = None

  @property
  def eval_params(self) -> Any:
    """What evaluation, the best checkpoint's test, eval, predict and export use: the EMA
    when the run keeps one, else the parameters."""
    return self.params if self.ema is None else self.ema


LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]
"""(params, batch {name: [B, ...]}, dropout_rng) -> (float32 scalar loss, metrics of float
scalars): a task's `loss`, traced inside the jitted train step.

What gradient accumulation (`train_step`'s grad_accum_steps > 1) relies on: the loss is a
weighted mean over the batch, sum(l * w) / sum(w), and its metrics give the weight sum
sum(w) of the batch under the first of LOSS_WEIGHT_KEYS that they have ('num_tokens' of
`losses.cross_entropy`, 'num_examples' of `losses.mse`), a value that does not depend on
the parameters. Micro-batch i then counts with the share n_i / sum_j n_j of that weight
in the update, as it does in the whole batch's mean. A loss whose metrics have none of
those keys counts every micro-batch equally, which is exact for a plain mean over the B
rows. Metrics named 'num_*' are counts and are summed over micro-batches; the other
metrics are combined with the loss's shares, so means over the same weights (e.g. 'nll',
'accuracy') come out as the whole batch's."""

# Metric names a loss may give its weight sum sum(w) under, in order of precedence.
LOSS_WEIGHT_KEYS = ('num_tokens', 'num_examples')


def train_step(state: TrainState, batch: dict, frozen: Any = None, *, loss_fn: LossFn,
               optimizer: optax.GradientTransformation, schedule: Callable,
               seed: int, grad_accum_steps: int = 1,
               ema_decay: float = 0.0) -> tuple[TrainState, dict]:
  """One optimizer update on a batch, its gradient computed whole or in micro-batches.

  With grad_accum_steps = k > 1 the batch is split into k micro-batches of B / k rows
  (micro-batch i: rows i, i + k, i + 2k, ..., so that with rows sharded over devices each
  device gives every micro-batch its share), run one after the other by `jax.lax.scan`,
  their gradients summed into one float32 buffer of the trainable tree's shape, weighted
  by their share of the loss's weight (`LossFn`), and one optimizer update is applied:
  the update equals the one on the whole batch (to float32 rounding, and with dropout
  off, as the micro-batches draw other dropout masks), with the activation memory of
  B / k rows. `state.step`, and so the learning-rate schedule, counts updates.

  Args:
    state: the current state.
    batch: {name: array [B, ...]}, whatever the task's loss reads.
    frozen: None, or (a PEFT run) the frozen base parameters: the loss then gets
      `peft.Params(frozen, state.params)` and only `state.params`, the trainable tree, is
      differentiated and updated.
    loss_fn: (params, batch, dropout_rng) -> (scalar loss, metrics): a task's `loss`
      (see `LossFn` for what accumulation needs of it).
    optimizer: the Optax transformation (`optim.make_optimizer`).
    schedule: its learning-rate schedule, logged.
    seed: the run's seed; the dropout rng of a step is fold_in(PRNGKey(seed), step), and
      with k > 1 that of its micro-batch i is fold_in(fold_in(PRNGKey(seed), step), i).
    grad_accum_steps: k >= 1, micro-batches per update (`config.grad_accum_steps`);
      1 computes the gradient of the whole batch at once.
    ema_decay: d in [0, 1) (`config.ema_decay`): > 0 updates `state.ema`, the moving
      average of the updated parameters (`regularizers.ema_update`); 0 leaves it as it is.

  Returns:
    The new state and scalar metrics: the loss function's, plus 'loss', 'grad_norm'
    and 'learning_rate', the rate this update applied: `schedule(state.step)`, which
    is Optax's `schedule(count)` as the optimizer's count equals the state's step.
    With k > 1 they are the whole batch's: 'loss' and the loss function's metrics
    combined as `LossFn` says, 'grad_norm' the norm of the accumulated gradient.

  Raises:
    ValueError: (when traced) a floating parameter narrower than float32: small
      updates round away in bfloat16 and adam_eps underflows in float16
      (`optim.MASTER_DTYPE`; `create_state` makes float32 master weights); k < 1, batch
      arrays without one common leading size B, or B not divisible by k; ema_decay > 0
      with a state without an EMA.
  """
  low = optim.low_precision_leaves(state.params)
  if low:
    raise ValueError(f'train_step needs float32 (master) parameters, got {low[0]}'
                     f'{f" and {len(low) - 1} more" if len(low) > 1 else ""}: build the '
                     'state with create_state (the model computes in config.dtype)')
  dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
  objective = loss_fn if frozen is None else (
      lambda trainable, *args: loss_fn(peft.Params(frozen, trainable), *args))
  if ema_decay and state.ema is None:
    raise ValueError(f'train_step: ema_decay={ema_decay} needs a state with an EMA '
                     '(create_state with config.ema_decay > 0)')
  if grad_accum_steps != 1:
    new, metrics = _accumulated_step(state, batch, objective, dropout_rng, grad_accum_steps,
                                     optimizer=optimizer, schedule=schedule)
  else:
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, batch, dropout_rng)
    updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = {**metrics, 'loss': loss, 'grad_norm': optax.global_norm(grads),
               'learning_rate': schedule(state.step)}
    new = state.replace(step=state.step + 1, params=params, opt_state=opt_state)
  if ema_decay:
    new = new.replace(ema=regularizers.ema_update(state.ema, new.params, ema_decay, new.step))
  return new, metrics


def _loss_weight(metrics: dict) -> jax.Array:
  """float32 scalar: the weight sum a loss's metrics give under LOSS_WEIGHT_KEYS, else 1."""
  for key in LOSS_WEIGHT_KEYS:
    if key in metrics:
      return jnp.asarray(metrics[key], jnp.float32)
  return jnp.ones((), jnp.float32)


def _accumulated_step(state: TrainState, batch: dict, objective: LossFn,
                      dropout_rng: jax.Array, k: int, *, optimizer: optax.GradientTransformation,
                      schedule: Callable) -> tuple[TrainState, dict]:
  """`train_step` with grad_accum_steps = k > 1 (see there): the k micro-batches' gradients
  of `objective` (on the trainable tree) accumulated by `jax.lax.scan` into one float32
  buffer, then one update.

  Raises:
    ValueError: k not an int >= 1, batch arrays without one common leading size B, or
      B % k != 0.
  """
  if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
    raise ValueError(f'grad_accum_steps={k!r}: must be an int >= 1')
  shapes = {jax.tree_util.keystr(path): np.shape(x)
            for path, x in jax.tree_util.tree_leaves_with_path(batch)}
  sizes = {shape[0] if shape else None for shape in shapes.values()}
  if len(sizes) != 1 or None in sizes:
    raise ValueError(f'grad_accum_steps={k}: the batch arrays need one leading size B '
                     f'(rows) to split, got shapes {shapes}')
  rows = sizes.pop()
  if rows % k:
    raise ValueError(f'grad_accum_steps={k} does not divide the batch of B={rows} rows: '
                     f'B must be a multiple of k (micro-batches of B / k rows)')
  # [B, ...] -> [k, B / k, ...], micro-batch i = rows i, i + k, i + 2k, ...
  micro_batches = jax.tree.map(
      lambda x: jnp.swapaxes(jnp.reshape(x, (rows // k, k) + x.shape[1:]), 0, 1), batch)

  def accumulate(total, xs):
    micro_batch, i = xs
    (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(
        state.params, micro_batch, jax.random.fold_in(dropout_rng, i))
    weight = _loss_weight(metrics)  # sum(w) of the micro-batch: its loss's denominator.
    total = jax.tree.map(lambda t, g: t + weight * g.astype(jnp.float32), total, grads)
    return total, (loss, metrics, weight)

  zeros = jax.tree.map(lambda p: jnp.zeros(jnp.shape(p), jnp.float32), state.params)
  total, (loss, metrics, weights) = jax.lax.scan(accumulate, zeros,
                                                 (micro_batches, jnp.arange(k)))  # [k] each
  # The whole batch's weighted mean: sum_i n_i mean_i / sum_i n_i, and 0 (as the losses
  # give) when every weight is 0.
  weight_sum = jnp.sum(weights)
  denominator = jnp.where(weight_sum > 0, weight_sum, 1.0)
  grads = jax.tree.map(lambda t: t / denominator, total)
  shares = weights / denominator

  def combine(name, values):  # [k, ...] -> [...]
    if name.startswith('num_'):
      return jnp.sum(values, axis=0)
    return jnp.sum(jnp.reshape(shares, (k,) + (1,) * (values.ndim - 1)) * values, axis=0)

  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**{name: combine(name, v) for name, v in metrics.items()},
             'loss': combine('loss', loss), 'grad_norm': optax.global_norm(grads),
             'learning_rate': schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


class _LogFile:
  """Sends INFO and above to {workdir}/train.log while the console shows only warnings,
  the progress bar and the eval lines; removed again on exit. In a multi-process run
  only process 0 writes train.log (the others' consoles still show warnings)."""

  def __init__(self, workdir: str):
    self.handler = None
    if multihost.is_primary():
      self.handler = py_logging.FileHandler(os.path.join(workdir, 'train.log'))
      self.handler.setFormatter(py_logging.Formatter('%(asctime)s %(levelname)s %(message)s'))

  def __enter__(self):
    if self.handler is not None:
      logging.get_absl_logger().addHandler(self.handler)
    logging.set_verbosity(logging.INFO)
    logging.get_absl_handler().setLevel(py_logging.WARNING)

  def __exit__(self, *exc):
    if self.handler is not None:
      logging.get_absl_logger().removeHandler(self.handler)
      self.handler.close()


def create_state(task: tasks.Task, optimizer: optax.GradientTransformation, seed: int,
                 mesh, pretrained: bool = False) -> TrainState:
  """A freshly initialized state (the task's `init_params`, and with `pretrained` its
  `load_pretrained`) laid out on `mesh` as `task.rules` say (`sharding.logical_shardings`
  of the parameters' logical axis names; the optimizer moments like their parameters;
  scalars replicated). Each array is created in place, already sharded: no device ever
  holds a whole parameter the rules split.

  The parameters are float32 master weights whatever `config.param_dtype` is
  (`optim.to_master`): the model initializes them in param_dtype, and they are cast to
  float32 before pretrained values are loaded (so those load without rounding), the
  optimizer state is initialized from them (float32 moments), and checkpoints of the
  state store float32. Restoring a checkpoint into this state casts what it stored, and
  reshards it onto this mesh.

  A PEFT task (`task.peft`, a bound `peft.Adapter`) always loads its base
  (`load_pretrained`) and keeps it in `task.peft.frozen`; the state's parameters are then
  the adapter's trainable tree (initialized with fold_in(PRNGKey(seed), 1)): its copies of
  base parameters (`peft_modules_to_save`) sharded like them, the method's own small
  parameters replicated.

  With `task.config.ema_decay` > 0 the state's `ema` starts as a copy of its parameters
  (the trainable tree of a PEFT run), sharded like them.
  """
  rng = jax.random.PRNGKey(seed)
  with models.axis_names():
    boxed = jax.eval_shape(task.init_params, rng)
  param_shardings = sharding.logical_shardings(boxed, mesh, task.rules)
  params = jax.jit(lambda rng: optim.to_master(task.init_params(rng)),
                   out_shardings=param_shardings)(rng)
  adapter = task.peft
  if pretrained or adapter is not None:
    params = jax.device_put(optim.to_master(task.load_pretrained(params)), param_shardings)
  if adapter is not None:
    adapter.frozen = params
    rng = jax.random.fold_in(rng, 1)
    by_name = traverse_util.flatten_dict(flax.core.unfreeze(param_shardings), sep='/')
    abstract = jax.eval_shape(adapter.init, rng, params)
    param_shardings = {
        'peft': jax.tree.map(lambda _: sharding.replicated(mesh), abstract['peft']),
        'base': traverse_util.unflatten_dict(
            {name: by_name[name] for name in traverse_util.flatten_dict(
                abstract['base'], sep='/')}, sep='/')}
    params = jax.jit(adapter.init, out_shardings=param_shardings)(rng, params)
  opt_shardings = sharding.like_params(jax.eval_shape(optimizer.init, params), params,
                                       param_shardings, mesh)
  replicated = sharding.replicated(mesh)
  ema = None
  if task.config.get('ema_decay', 0.0) > 0:
    ema = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings_of(params))(
        params)
  return TrainState(step=jax.device_put(jnp.array(0, jnp.int32), replicated),
                    params=params,
                    opt_state=jax.jit(optimizer.init, out_shardings=opt_shardings)(params),
                    ema=ema)


def shardings_of(tree: Any) -> Any:
  """The NamedSharding of every array of `tree` (a state from `create_state`)."""
  return jax.tree.map(lambda x: x.sharding, tree)


def jit_train_step(config, loss_fn: LossFn, optimizer: optax.GradientTransformation, mesh,
                   state: TrainState, frozen: Any = None):
  """`train_step` for `config` (schedule, seed, grad_accum_steps), jitted as the trainer
  runs it: traced under `mesh` and `config.logical_axis_rules` (`sharding.jit`), the state
  (donated) and `frozen` kept in the shardings they have, the batch split over data x fsdp,
  the metrics replicated. Call it as `step(state, batch, frozen)`; `.lower(...)` too."""
  state_shardings = shardings_of(state)
  return sharding.jit(
      functools.partial(train_step, loss_fn=loss_fn, optimizer=optimizer,
                        schedule=optim.learning_rate_schedule(config), seed=config.seed,
                        grad_accum_steps=config.get('grad_accum_steps', 1),
                        ema_decay=config.get('ema_decay', 0.0)),
      mesh, sharding.config_rules(config),
      in_shardings=(state_shardings, sharding.batch_sharding(mesh), shardings_of(frozen)),
      out_shardings=(state_shardings, sharding.replicated(mesh)), donate_argnums=0)


class BestCheckpoint:
  """Keeps the checkpoint with the best `metric` (improving in direction `mode`, 'max' or
  'min') in {workdir}/best, with its value in best/score.json, and counts evaluations
  without improvement for early stopping. Every process of a multi-process run saves the
  checkpoint (collectively) and keeps the score; process 0 writes score.json."""

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
    if multihost.is_primary():
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

  Writes the task's files (tokenizer/, model_config.json, outputs), run_config.json (the
  config of the first start), checkpoints/, best/ (best by the task's metric),
  tensorboard/ and train.log (and pending_eval.json while an evaluation that a Ctrl-C cut
  short is owed: a rerun makes it before its first step), and with `config.wandb_project` a W&B run (wandb/,
  wandb_run_id.txt: `tracking`). On resume, says so on the console (step and checkpoint
  folder) with the config fields changed since the first start. At the end, scores
  `config.test_split` with the best checkpoint. Returns the final train state.

  Several processes (`config.coordinator_address`, ... or the launcher's environment:
  `multihost.initialize`, which this calls first) each run this with the same config and
  workdir (a folder they all see): every process computes every step on its rows of the
  batch and writes its part of each checkpoint; only process 0 writes the other files,
  logs and shows the progress bar (`multihost`).

  Raises:
    config_schema.ConfigError: a bad config field (before any work is done), or on
      resume fields changed that would change the model, optimizer or data order
      (`config_schema.check_run_config`).
    multi30k.DataError: bad input data, naming the file and line.
  """
  config_schema.validate(config)
  multihost.initialize(config)
  tracking.check(config)  # A missing wandb package stops the run before it writes a file.
  os.makedirs(workdir, exist_ok=True)
  with _LogFile(workdir), contextlib.ExitStack() as on_exit:
    return _train(config, workdir, on_exit)


# Train steps that may be in flight at once (JAX dispatches them asynchronously): the loop
# waits for step n - 2 to finish before dispatching step n. Two keep the device busy while
# the host prepares the next batch; more only let the progress bar and a Ctrl-C run ahead
# of the computation.
MAX_STEPS_IN_FLIGHT = 2


def cadence(step: int, config, metric_every_steps: int) -> set[str]:
  """What the loop does after train step `step` (counted from 1; the state then holds
  `step` updates), from the config's cadence fields. Every cadence fires at each multiple
  of its period, whatever the other periods are.

  Args:
    step: the step just dispatched, in 1..config.num_train_steps.
    config: the run config (eval_every_steps, log_every_steps, checkpoint_every_steps,
      num_train_steps).
    metric_every_steps: the task's `metric_every_steps`: the period of the evaluations
      that compute its `best_metric` (translation: `bleu_every_steps`); 0 = never.

  Returns:
    A subset of:
      'metric': an evaluation with the task's `best_metric` (the best checkpoint, patience):
        every `metric_every_steps`, and at the last step unless that is 0. (The task's
        `evaluate` computes it at these steps: translation's BLEU at step % bleu_every_steps
        == 0 or the last step.)
      'eval': the task's `evaluate` (validation metrics, the eval line): every
        `eval_every_steps`, at every 'metric' step, and at the last step.
      'log': train metrics to TensorBoard, the bar and train.log: every `log_every_steps`
        and at every 'eval' step (its line shows them).
      'checkpoint': every `checkpoint_every_steps`, and at the last step.
      'last': step == num_train_steps.
  """
  last = step == config.num_train_steps
  events = {'last'} if last else set()
  if metric_every_steps and (step % metric_every_steps == 0 or last):
    events.add('metric')
  if step % config.eval_every_steps == 0 or last or 'metric' in events:
    events.add('eval')
  if step % config.log_every_steps == 0 or 'eval' in events:
    events.add('log')
  if step % config.checkpoint_every_steps == 0 or last:
    events.add('checkpoint')
  return events


def _wait_ready(tree) -> None:
  """Blocks until every array of `tree` is computed.

  Polls (`jax.Array.is_ready`, sleeping up to 20 ms) instead of `jax.block_until_ready`,
  which waits in C++: a Ctrl-C's Python handler only runs when the main thread runs Python
  again, so during a blocking wait a second Ctrl-C could not quit at once.
  """
  delay = 1e-4
  for leaf in jax.tree.leaves(tree):
    while isinstance(leaf, jax.Array) and not leaf.is_ready():
      time.sleep(delay)
      delay = min(2 * delay, 0.02)


class _InFlight:
  """The train steps dispatched whose results are not yet known to be computed, oldest
  first: (step, metrics).

  `wait(keep)` waits until only the newest `keep` remain and calls `on_done(step)` for
  each step found computed, in order: the loop counts (progress bar, steps/s) finished
  steps, not dispatched ones, and bounds the steps in flight by waiting before each
  dispatch.
  """

  def __init__(self, on_done: Callable[[int], None]):
    self.steps = collections.deque()
    self._on_done = on_done

  def add(self, step: int, metrics: dict) -> None:
    self.steps.append((step, metrics))

  def wait(self, keep: int = 0) -> None:
    while len(self.steps) > keep:
      step, metrics = self.steps[0]
      _wait_ready(metrics)
      self.steps.popleft()
      self._on_done(step)


def _complete_checkpoints(directory: str) -> list[int]:
  """The steps of the complete checkpoints in `directory`, ascending. Orbax writes a
  checkpoint to a temporary folder (STEP.orbax-checkpoint-tmp-...) and renames it to STEP
  when complete, so a folder named by a number is complete."""
  if not os.path.isdir(directory):
    return []
  return sorted(int(name) for name in os.listdir(directory)
                if name.isdigit() and os.path.isdir(os.path.join(directory, name)))


def _rerun(directory: str) -> str:
  """What a rerun restores now: 'a rerun resumes from step S, the latest complete
  checkpoint (DIR/S)', or that it starts from scratch."""
  steps = _complete_checkpoints(directory)
  if not steps:
    return 'a rerun starts from scratch (no complete checkpoint)'
  return (f'a rerun resumes from step {steps[-1]}, the latest complete checkpoint '
          f'({os.path.join(directory, str(steps[-1]))})')


PENDING_EVAL_FILE = 'pending_eval.json'


def _pending_eval(workdir: str) -> int | None:
  """The step whose evaluation a Ctrl-C abandoned ({workdir}/pending_eval.json), or None."""
  path = os.path.join(workdir, PENDING_EVAL_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)['step']


def _set_pending_eval(workdir: str, step: int | None) -> None:
  """Records (process 0) that the evaluation of `step` is owed; None: it was done."""
  if not multihost.is_primary():
    return
  path = os.path.join(workdir, PENDING_EVAL_FILE)
  if step is None:
    if os.path.exists(path):
      os.remove(path)
    return
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump({'step': step}, f)
  os.replace(path + '.tmp', path)


def _flush_logs() -> None:
  for handler in (*logging.get_absl_logger().handlers, *py_logging.getLogger().handlers):
    handler.flush()
  sys.stdout.flush()
  sys.stderr.flush()


class _StopOnInterrupt:
  """Ctrl-C (SIGINT) during training.

  The first Ctrl-C stops training without cutting a checkpoint write in half: the loop
  dispatches no further step (`requested`), or, if it comes during an evaluation
  (`abandonable`), the evaluation is abandoned at once (KeyboardInterrupt). The loop then
  saves the last dispatched step (`step`): at most MAX_STEPS_IN_FLIGHT steps to finish,
  then a save. A second Ctrl-C quits at once (os._exit(130)), saying from which complete
  checkpoint a rerun resumes. Every message names the steps exactly.

  Installed when built, until `restore`; only in the main thread (signal handlers live
  there), elsewhere a no-op.

  Attributes:
    requested: a first Ctrl-C came.
    step: the last dispatched step: the one an interrupted run saves.
    abandonable: the loop is in an evaluation, which a first Ctrl-C cuts short.
    abandoned: a first Ctrl-C cut the evaluation of `step` short.
    saving: the interrupted run is saving `step`.
  """

  def __init__(self, bar: tqdm.tqdm, checkpoint_dir: str, step: int):
    self.requested = self.abandonable = self.saving = self.abandoned = False
    self.step = step
    self._bar = bar
    self._dir = checkpoint_dir
    self._previous = None
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGINT, self._handle)

  def restore(self) -> None:
    """Puts the previous SIGINT handler back."""
    if self._previous is not None:
      signal.signal(signal.SIGINT, self._previous)
      self._previous = None

  def _handle(self, signum, frame) -> None:
    del signum, frame
    if self.requested:
      self._quit()
    self.requested = True
    again = 'a second Ctrl-C quits at once, without saving it'
    if self.abandonable:
      _log(self._bar, f'Ctrl-C: abandoning the evaluation of step {self.step}; saving step '
                      f'{self.step} ({again}); a rerun evaluates it first')
      self.abandoned = True
      raise KeyboardInterrupt
    _log(self._bar, f'Ctrl-C: no further step; saving step {self.step} when it is '
                    f'computed ({again})')

  def _quit(self) -> None:
    """The second Ctrl-C: says what a rerun restores, and exits at once."""
    steps = _complete_checkpoints(self._dir)
    if steps and steps[-1] == self.step:
      message = (f'Interrupted again after saving step {self.step}: a rerun resumes from it '
                 f'({os.path.join(self._dir, str(self.step))})')
    else:
      message = (f'Interrupted again {"while" if self.saving else "before"} saving step '
                 f'{self.step}: {_rerun(self._dir)}')
    _log(self._bar, message)
    _flush_logs()
    os._exit(130)  # Waiting for the computation or the writer threads would take long.


class _ConsoleAboveBar(py_logging.Handler):
  """While the progress bar is open, console log records (absl's handler, WARNING and
  above) are written above the bar with `tqdm.write`, each on its own line, instead of onto
  the end of the bar's line. Installed when built, until `restore`."""

  def __init__(self):
    self.root, self.console = py_logging.getLogger(), logging.get_absl_handler()
    super().__init__(self.console.level)
    self.installed = self.console in self.root.handlers
    if self.installed:
      self.root.removeHandler(self.console)
      self.root.addHandler(self)

  def emit(self, record):
    try:
      tqdm.tqdm.write(self.console.format(record), file=sys.stderr)
    except Exception:  # pylint: disable=broad-except
      self.handleError(record)

  def restore(self) -> None:
    if self.installed:
      self.root.removeHandler(self)
      self.root.addHandler(self.console)
      self.installed = False


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
  """Means of the per-step train metrics since the last log, plus throughput and MFU.
  The steps of `pending` must have finished (`_InFlight.wait(0)`): the clock would
  otherwise read dispatch time."""
  _wait_ready(pending[-1])
  rates = throughput.summary()
  summary = {k: float(np.mean(v)) for k, v in
             jax.tree.map(lambda *x: np.stack(x), *jax.device_get(pending)).items()}
  return {**summary, **rates}


def _eval_line(task: tasks.Task, step: int, train: dict, result: dict, improved: bool) -> str:
  """The console line of an evaluation; `train` is {} for one made before any step."""
  if not train:  # The evaluation of a resumed run's first step (a Ctrl-C abandoned it).
    return f"step {step}: {task.format_eval(result)}{' (best)' if improved else ''}"
  # fgm and pgd train on clean + adversarial loss: the clean part compares with eval loss.
  clean = f" (clean {train['clean_loss']:.4f})" if 'clean_loss' in train else ''
  return (f"step {step}: train loss {train['loss']:.4f}{clean} | {task.format_eval(result)}"
          f"{' (best)' if improved else ''} | "
          f"{train['examples_per_second']:.1f} examples/s, "
          f"{train['tokens_per_second']:.0f} {task.token_unit}/s, "
          f"{train['flops_per_second'] / 1e9:.1f} GFLOP/s, MFU {100 * train['mfu']:.1f}%")


def _log(bar: tqdm.tqdm, message: str) -> None:
  """`message` above the progress bar and in train.log (process 0 only: the others' bars
  are disabled, and they have no train.log)."""
  if not bar.disable:
    bar.write(message)
  logging.info(message)


def _check_run_config(config, workdir: str, resuming: bool) -> list[tuple[str, Any, Any]]:
  """At the first start records the config in {workdir}/run_config.json; on resume
  compares the config with it (`config_schema.check_run_config`).

  Returns:
    The changed fields that are free to change on resume: (name, old, new).

  Raises:
    config_schema.ConfigError: fields changed that would change the model, optimizer or
      data order of the resumed run.
  """
  started = config_schema.load_run_config(workdir)
  if resuming and started is not None:
    return config_schema.check_run_config(config, started, workdir)
  if resuming:  # A workdir of a version that did not record the config.
    logging.info('%s has checkpoints but no %s: recording this config', workdir,
                 config_schema.RUN_CONFIG_FILE)
  config_schema.save_run_config(config, workdir)
  return []


def _train_line(step: int, train: dict) -> str:
  return (f"train step {step}: loss {train['loss']:.4f}, {train['steps_per_second']:.2f} "
          f"steps/s, {train['tokens_per_second']:.0f} tok/s")


def _train(config, workdir: str, on_exit: contextlib.ExitStack) -> TrainState:
  mesh = sharding.config_mesh(config)
  logging.info('Mesh %s: %d %s devices in %d process%s; malloc huge pages: %s',
               dict(mesh.shape), mesh.size, mesh.devices.flat[0].platform, jax.process_count(),
               'es' if jax.process_count() > 1 else '', 'on' if hugepages.active() else 'off')
  manager = checkpoints.make_manager(workdir, config.keep_checkpoints)
  resuming = manager.latest_step() is not None
  config_changes = _check_run_config(config, workdir, resuming)
  # TensorBoard and W&B (config.wandb_project); closed when train_and_evaluate returns.
  writer = on_exit.enter_context(tracking.create_writer(config, workdir))
  task = tasks.create(config, workdir, mesh)
  task.peft = adapter = peft.Adapter.from_config(config)
  task.setup(training=True)
  if adapter is not None:
    adapter.bind(task)

  _check_grad_accum(config, task, mesh)
  optimizer = optim.make_optimizer(config)
  state = create_state(task, optimizer, config.seed, mesh,
                       pretrained=manager.latest_step() is None)
  model_params = state.params if adapter is None else adapter.frozen
  num_params = sum(x.size for x in jax.tree.leaves(model_params))
  logging.info('Model: %s parameters; %s', f'{num_params:,}', task.describe())
  view = lambda params: params  # What the task's functions take.
  stats = task.batch_stats
  if adapter is not None:
    adapter.record(workdir, config.init_from)
    view = adapter.view
    stats = lambda batch: peft.batch_stats(task.batch_stats(batch))
    message = f'PEFT: {adapter.describe(state.params)}'
    logging.info('%s', message)
    logging.info('PEFT sites: %s', ', '.join(site.name for site in adapter.method.sites))
    if multihost.is_primary():
      print(message, file=sys.stderr)
  peak = flops.peak_flops_per_device(mesh.devices.flat[0], config.dtype,
                                     config.peak_flops_per_device) * mesh.size
  frozen = adapter.frozen if adapter is not None else None
  per_device = max(sharding.device_bytes((state, frozen)).values())
  logging.info('Memory: parameters %s, optimizer state %s%s; of this train state the most '
               'loaded device holds %s', _bytes(state.params), _bytes(state.opt_state),
               f', frozen base {_bytes(frozen)}' if frozen is not None else '',
               _mib(per_device))
  logging.info('Peak for MFU: %.1f GFLOP/s (%d x %s)', peak / 1e9, mesh.size,
               mesh.devices.flat[0].device_kind)
  throughput = _Throughput(peak)
  state = checkpoints.restore_latest(manager, state)
  start_step = int(state.step)
  best = BestCheckpoint(workdir, task.best_metric, task.best_mode)

  regularizers.log(config)  # Adversarial training, R-Drop, EMA: regularizers.py.
  p_train_step = jit_train_step(config, regularizers.wrap(config, task.loss), optimizer,
                                mesh, state, frozen)

  train_iter = task.train_batches(config.seed, skip=start_step)
  primary = multihost.is_primary()  # Process 0 logs, writes TensorBoard, shows the bar.
  bar = tqdm.tqdm(total=config.num_train_steps, initial=start_step, unit='step',
                  dynamic_ncols=True, desc='train', disable=not primary)
  console = _ConsoleAboveBar()
  checkpoint_dir = str(manager.directory)
  if resuming:
    _log(bar, f'Resuming from step {start_step}: restored '
              f'{os.path.join(checkpoint_dir, str(start_step))}')
  if config_changes:
    _log(bar, 'Config changed since the run started (allowed on resume): ' + ', '.join(
        f'{name} {old!r} -> {new!r}' for name, old, new in config_changes))
  pending, shapes, train_summary = [], set(), {}
  in_flight = _InFlight(lambda _: bar.update(1))  # The bar counts finished steps.
  throughput.reset()
  interrupt = _StopOnInterrupt(bar, checkpoint_dir, start_step)

  def evaluate(step: int, events: set[str]) -> None:
    """The task's evaluation of `state` (step `step`): the best checkpoint, the eval line."""
    interrupt.abandonable = True  # A first Ctrl-C abandons the evaluation.
    bar.set_description('eval')  # The bar shows that an evaluation is running.
    try:
      result, report = task.evaluate(view(state.eval_params), step, 'last' in events)
    finally:
      interrupt.abandonable = False
      bar.set_description('train')
    improved = task.best_metric in result and best.update(state, result[task.best_metric])
    for name, value in result.items():
      writer.scalar(f'eval/{name}', value, step)
    writer.flush()
    _log(bar, _eval_line(task, step, train_summary, result, improved))
    if report:
      _log(bar, report)

  try:
    if _pending_eval(workdir) == start_step:  # Its evaluation was cut short by a Ctrl-C.
      _log(bar, f'Evaluating step {start_step}, whose evaluation the interruption abandoned')
      evaluate(start_step, cadence(start_step, config, task.metric_every_steps))
      _set_pending_eval(workdir, None)
    for step in range(start_step + 1, config.num_train_steps + 1):
      events = cadence(step, config, task.metric_every_steps)
      batch = next(train_iter)
      throughput.add(stats(batch))
      shape = tuple(sorted((k, v.shape) for k, v in batch.items()))
      compiles = shape not in shapes  # jit compiles once per batch shape.
      if compiles:
        shapes.add(shape)
        logging.info('Compiling the train step for batch shape %s (%d so far)', shape,
                     len(shapes))
      in_flight.wait(MAX_STEPS_IN_FLIGHT - 1)  # Step n - 2 has finished.
      if interrupt.requested:
        raise KeyboardInterrupt
      interrupt.step = step  # From here on the state is step's.
      state, metrics = p_train_step(state, sharding.put_batch(batch, mesh), frozen)
      in_flight.add(step, metrics)
      pending.append(metrics)
      if compiles and 'log' not in events:  # Compile time is not training time.
        in_flight.wait()
        throughput.reset()

      if 'log' in events:
        in_flight.wait()
        train_summary = _summarize(pending, throughput)
        for name, value in train_summary.items():
          writer.scalar(f'train/{name}', value, step)
        bar.set_postfix(loss=f"{train_summary['loss']:.3f}",
                        tok_s=f"{train_summary['tokens_per_second']:.0f}")
        logging.info('%s', _train_line(step, train_summary))
        pending = []

      if 'eval' in events:
        evaluate(step, events)

      stop_early = bool('metric' in events and config.patience and task.best_metric and
                        best.evaluations_since_best(step, task.metric_every_steps)
                        >= config.patience)
      if 'checkpoint' in events or stop_early:
        checkpoints.save(manager, state)
      if stop_early:
        _log(bar, f'Early stopping at step {step}: no {task.best_metric} improvement in '
                  f'{config.patience} evaluations (best {best.value:.4f} at step {best.step})')
        break
      if 'log' in events:
        throughput.reset()  # Eval and checkpoint time is not training time.
    in_flight.wait()
    if interrupt.requested:  # Ctrl-C during the last step: its checkpoint is being saved.
      raise KeyboardInterrupt
  except KeyboardInterrupt:
    # `state` is the result of step `interrupt.step` (no step was dispatched after it):
    # save it, so a rerun loses nothing.
    interrupt.saving = True  # A second Ctrl-C now says the save was cut short.
    step = interrupt.step
    _wait_ready(state)
    if step not in manager.all_steps():
      checkpoints.save(manager, state)
    while manager.is_saving_in_progress():  # Polling: a second Ctrl-C quits at once.
      time.sleep(0.02)
    manager.wait_until_finished()
    if interrupt.abandoned:  # A rerun evaluates `step` before its first step.
      _set_pending_eval(workdir, step)
    if step > bar.n:  # Dispatched steps that finished while the state was awaited.
      bar.update(step - bar.n)
    _log(bar, f'Interrupted: saved a checkpoint at step {step} in '
              f'{os.path.join(checkpoint_dir, str(step))}; a rerun resumes from it')
    raise
  finally:
    interrupt.restore()
    console.restore()
    bar.close()
    writer.flush()
    manager.wait_until_finished()
    manager.close()

  if config.test_split:
    params, name = state.eval_params, f'step{int(state.step)}'
    if best.step >= 0:
      params = checkpoints.restore_latest(best.manager, state).eval_params
      name = f'best-step{best.step}'
    result, report = task.test(view(params), config.test_split, name)
    if primary:
      print(report)
    logging.info(report)
    writer.report({f'test/{k}': v for k, v in result.items()}, report)
  if best.step >= 0:
    writer.report({'best/step': best.step, f'best/{best.metric}': best.value}, files=[best.path])
  best.manager.close()
  logging.info('Peak resident memory of the process: %.0f MiB',
               resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024)
  return state


def _check_grad_accum(config, task: tasks.Task, mesh) -> None:
  """Logs the micro-batches of an update; the train batches' rows must split into
  `grad_accum_steps` micro-batches, each spread evenly over the data x fsdp shards.

  Raises:
    config_schema.ConfigError: naming grad_accum_steps and the batch sizes that do not split.
  """
  k = config.grad_accum_steps
  if k == 1:
    return
  batcher = getattr(task, 'batcher', None)  # data.Batcher of the built-in tasks.
  unit = k * sharding.batch_shards(mesh)
  if batcher is not None:
    sizes = [batcher.packed_rows] if batcher.pack else list(batcher.batch_sizes)
    bad = sorted({size for size in sizes if size % unit})
    if bad:
      raise config_schema.ConfigError(
          f'config.grad_accum_steps={k}: train batches of {bad} rows do not split into {k} '
          f'micro-batches of a multiple of {sharding.batch_shards(mesh)} rows (the data x fsdp '
          f'shards); choose max_tokens_per_batch so that every batch has a multiple of {unit} '
          'rows, or another grad_accum_steps')
  logging.info('Gradient accumulation: %d micro-batches per update (rows i, i+%d, ... of each '
               'batch), one gradient buffer', k, k)


def _mib(size: int) -> str:
  """'12,345,678 bytes (11.8 MiB)'."""
  return f'{size:,} bytes ({size / 2**20:.1f} MiB)'


def _bytes(tree) -> str:
  """`_mib` of the arrays of `tree`."""
  return _mib(sum(x.nbytes for x in jax.tree.leaves(tree) if hasattr(x, "nbytes")))
