"""Training loop: jit-compiled train/eval steps, evaluation, logging and checkpoints."""
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
import jax.numpy as jnp
import numpy as np
import optax
import tqdm

from transformer_jax import checkpoints
from transformer_jax import config_schema
from transformer_jax import data
from transformer_jax import evaluation
from transformer_jax import flops
from transformer_jax import hugepages
from transformer_jax import losses
from transformer_jax import models
from transformer_jax import optim
from transformer_jax import scoring
from transformer_jax import sharding
from transformer_jax import tokenizer
from transformer_jax import translate
from transformer_jax.tokenizer import PAD_ID


@flax.struct.dataclass
class TrainState:
  """Everything a checkpoint holds. The dropout rng is derived from (seed, step), and
  the data position equals `step`, so (step, params, opt_state) restores a run exactly."""
  step: jax.Array
  params: Any
  opt_state: Any


def train_step(state: TrainState, batch: dict, *, model: models.Transformer,
               optimizer: optax.GradientTransformation, loss_fn: losses.LossFn,
               schedule: Callable, seed: int) -> tuple[TrainState, dict]:
  """One optimizer update on a batch {'inputs': int32 [B, S], 'targets': int32 [B, T]}
  (plus `data.PACKING_KEYS` for packed rows).

  Returns the new state and scalar metrics: the loss function's, plus 'loss',
  'grad_norm' and 'learning_rate'.
  """
  dropout_rng = jax.random.fold_in(jax.random.PRNGKey(seed), state.step)
  weights = (batch['targets'] != PAD_ID).astype(jnp.float32)
  packing = {k: batch[k] for k in data.PACKING_KEYS if k in batch}

  def objective(params):
    logits = model.apply({'params': params}, batch['inputs'], batch['targets'],
                         deterministic=False, rngs={'dropout': dropout_rng}, **packing)
    return loss_fn(logits, batch['targets'], weights)

  (loss, metrics), grads = jax.value_and_grad(objective, has_aux=True)(state.params)
  updates, opt_state = optimizer.update(grads, state.opt_state, state.params)
  params = optax.apply_updates(state.params, updates)
  metrics = {**metrics, 'loss': loss, 'grad_norm': optax.global_norm(grads),
             'learning_rate': schedule(state.step)}
  return state.replace(step=state.step + 1, params=params, opt_state=opt_state), metrics


def eval_step(params, batch: dict, *, model: models.Transformer) -> dict:
  """Sums over a batch's real target tokens: 'nll' (unsmoothed), 'correct', 'num_tokens'."""
  weights = (batch['targets'] != PAD_ID).astype(jnp.float32)
  logits = model.apply({'params': params}, batch['inputs'], batch['targets'])
  _, metrics = losses.cross_entropy(logits, batch['targets'], weights)
  n = metrics['num_tokens']
  return {'nll': metrics['nll'] * n, 'correct': metrics['accuracy'] * n, 'num_tokens': n}


def evaluate(eval_fn: Callable, params, batcher: data.Batcher, eval_ds, mesh,
             num_batches: int) -> dict:
  """Validation loss (per real token), perplexity and token accuracy over `eval_ds`."""
  sums = []
  for i, batch in enumerate(eval_ds.as_numpy_iterator()):
    if i == num_batches:
      break
    sums.append(eval_fn(params, sharding.put_batch(batcher.pad_rows(batch), mesh)))
  totals = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums))
  n = max(totals['num_tokens'], 1.0)
  return {'loss': totals['nll'] / n, 'perplexity': float(np.exp(totals['nll'] / n)),
          'accuracy': totals['correct'] / n}


def load_or_train_tokenizer(config, workdir: str, sentences: list[str]):
  """The SentencePiece model in {workdir}/tokenizer/spm.model, trained on `sentences`
  the first time and reused on restarts."""
  path = os.path.join(workdir, 'tokenizer', 'spm.model')
  if os.path.exists(path):
    logging.info('Reusing tokenizer %s', path)
    return tokenizer.load(path)
  rng = np.random.default_rng(config.seed)
  if len(sentences) > config.spm_max_sentences:
    sentences = [sentences[i] for i in
                 rng.choice(len(sentences), config.spm_max_sentences, replace=False)]
  return tokenizer.train(sentences, path, config.vocab_size, config.spm_model_type,
                         config.spm_character_coverage)


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


def create_state(config, vocab_size: int, mesh) -> tuple[models.Transformer,
                                                         optax.GradientTransformation,
                                                         TrainState]:
  """The model, its optimizer and a freshly initialized state replicated over `mesh`."""
  model = models.Transformer(models.TransformerConfig.from_config(config, vocab_size))
  optimizer = optim.make_optimizer(config)

  def init(rng):
    dummy = jnp.ones((1, 8), jnp.int32)
    params = model.init(rng, dummy, dummy)['params']
    return TrainState(step=jnp.array(0, jnp.int32), params=params,
                      opt_state=optimizer.init(params))

  state = jax.jit(init, out_shardings=sharding.replicated(mesh))(
      jax.random.PRNGKey(config.seed))
  return model, optimizer, state


class BestCheckpoint:
  """Keeps the checkpoint with the best validation BLEU in {workdir}/best, with its score
  in best/score.json, and counts evaluations without improvement for early stopping."""

  def __init__(self, workdir: str):
    self.manager = checkpoints.make_manager(workdir, keep=1, subdir='best')
    self.path = os.path.join(workdir, 'best', 'score.json')
    self.step, self.bleu = -1, -1.0
    if os.path.exists(self.path):
      with open(self.path) as f:
        saved = json.load(f)
      self.step, self.bleu = saved['step'], saved['bleu']

  def update(self, state: TrainState, bleu: float) -> bool:
    """Saves `state` if `bleu` beats the best so far; returns whether it did."""
    if bleu <= self.bleu:
      return False
    checkpoints.save(self.manager, state)
    self.manager.wait_until_finished()
    self.step, self.bleu = int(state.step), bleu
    tmp = self.path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump({'step': self.step, 'bleu': bleu}, f)
    os.replace(tmp, self.path)
    return True

  def evaluations_since_best(self, step: int, every: int) -> int:
    return (step - self.step) // every if self.step >= 0 else 0


def train_and_evaluate(config, workdir: str) -> TrainState:
  """Trains `config` in `workdir`, resuming from its latest checkpoint if there is one.

  Writes {workdir}/tokenizer/spm.model, checkpoints/, best/ (best validation BLEU),
  translations/, tensorboard/ and train.log. At the end, scores `config.test_split` with
  the best checkpoint. Returns the final train state.

  Raises:
    config_schema.ConfigError: a bad config field (before any work is done).
    multi30k.DataError: bad input data, naming the file and line.
  """
  config_schema.validate(config)
  loss_fn = losses.get_loss(config)
  os.makedirs(workdir, exist_ok=True)
  with _LogFile(workdir):
    return _train(config, workdir, loss_fn)


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
  """Counts steps, real target tokens, computed target positions and model FLOPs
  (`flops`) between logs; `summary` turns them into rates and MFU against `peak_flops`
  (FLOP/s of all devices)."""

  def __init__(self, model_config: models.TransformerConfig, peak_flops: float):
    self.model_config, self.peak_flops = model_config, peak_flops
    self.reset()

  def reset(self):
    self.steps = self.tokens = self.positions = self.flops = 0
    self.start = time.perf_counter()

  def add(self, batch: dict):
    (rows, source_length), target_length = batch['inputs'].shape, batch['targets'].shape[1]
    self.steps += 1
    self.tokens += int(np.count_nonzero(batch['targets']))
    self.positions += rows * target_length
    self.flops += flops.train_flops(self.model_config, rows, source_length, target_length)

  def summary(self) -> dict:
    """Rates since `reset`; call after the counted steps have finished."""
    seconds = time.perf_counter() - self.start
    return {'steps_per_second': self.steps / seconds,
            'target_tokens_per_second': self.tokens / seconds,  # Real (non-pad) tokens.
            'real_target_fraction': self.tokens / max(self.positions, 1),
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


def _eval_line(step: int, train: dict, result: dict, split: str, improved: bool) -> str:
  line = (f"step {step}: train loss {train['loss']:.4f} | eval loss {result['loss']:.4f} "
          f"ppl {result['perplexity']:.2f} acc {result['accuracy']:.4f} | "
          f"{train['target_tokens_per_second']:.0f} target tok/s, "
          f"{train['flops_per_second'] / 1e9:.1f} GFLOP/s, MFU {100 * train['mfu']:.1f}%")
  if 'bleu' in result:
    line += f" | {split} BLEU {result['bleu']:.2f}{' (best)' if improved else ''}"
  return line


def _log(bar: tqdm.tqdm, message: str) -> None:
  bar.write(message)
  logging.info(message)


def _train(config, workdir: str, loss_fn: losses.LossFn) -> TrainState:
  mesh = sharding.make_mesh()
  logging.info('Devices: %s; malloc huge pages: %s', mesh.devices,
               'on' if hugepages.active() else 'off')

  # Data and tokenizer.
  train_src, train_tgt = data.load_pairs(config, config.train_split, workdir)
  eval_text = data.load_pairs(config, config.eval_split, workdir)
  test_text = data.load_pairs(config, config.test_split, workdir) if config.test_split else None
  sp = load_or_train_tokenizer(config, workdir, train_src + train_tgt)
  train_src, train_tgt = data.tokenize_pairs(sp, train_src, train_tgt, config)
  eval_src, eval_tgt = data.tokenize_pairs(sp, *eval_text, config)
  batcher = data.Batcher(max(config.max_source_length, config.max_target_length),
                         config.max_tokens_per_batch, config.length_bucket_step, mesh.size,
                         pack=config.pack_examples)
  if config.pack_examples:
    logging.info('Packed train batches: %d rows x %d tokens', batcher.packed_rows,
                 batcher.max_length)
  logging.info('Buckets (length: rows): %s', dict(zip(batcher.lengths, batcher.batch_sizes)))

  # Model, optimizer, state.
  model, optimizer, state = create_state(config, sp.vocab_size(), mesh)
  num_params = sum(x.size for x in jax.tree.leaves(state.params))
  logging.info('Model: %s parameters, vocab %d', f'{num_params:,}', sp.vocab_size())
  peak = flops.peak_flops_per_device(mesh.devices.flat[0], config.dtype,
                                     config.peak_flops_per_device) * mesh.size
  logging.info('Peak for MFU: %.1f GFLOP/s (%d x %s)', peak / 1e9, mesh.size,
               mesh.devices.flat[0].device_kind)
  throughput = _Throughput(model.config, peak)
  manager = checkpoints.make_manager(workdir, config.keep_checkpoints)
  state = checkpoints.restore_latest(manager, state)
  start_step = int(state.step)
  best = BestCheckpoint(workdir)
  config_schema.save_model_config(config, sp.vocab_size(), workdir)

  replicated, batch_sharding = sharding.replicated(mesh), sharding.batch_sharding(mesh)
  p_train_step = jax.jit(
      functools.partial(train_step, model=model, optimizer=optimizer, loss_fn=loss_fn,
                        schedule=optim.learning_rate_schedule(config), seed=config.seed),
      in_shardings=(replicated, batch_sharding), out_shardings=(replicated, replicated),
      donate_argnums=0)
  p_eval_step = jax.jit(functools.partial(eval_step, model=model),
                        in_shardings=(replicated, batch_sharding), out_shardings=replicated)

  train_iter = batcher.train(train_src, train_tgt, config.seed, config.shuffle_buffer_size,
                             skip=start_step).as_numpy_iterator()
  eval_ds = batcher.eval(eval_src, eval_tgt)
  translator = translate.Translator(model, state.params, sp, config, mesh)  # Compiles once.
  writer = tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard'))
  bar = tqdm.tqdm(total=config.num_train_steps, initial=start_step, unit='step',
                  dynamic_ncols=True, desc='train')
  pending, shapes = [], set()
  throughput.reset()
  interrupt = _StopOnInterrupt(bar)
  try:
    for step in range(start_step + 1, config.num_train_steps + 1):
      batch = next(train_iter)
      throughput.add(batch)
      last = step == config.num_train_steps
      do_eval = step % config.eval_every_steps == 0 or last
      do_bleu = config.bleu_every_steps and (step % config.bleu_every_steps == 0 or last)
      do_log = step % config.log_every_steps == 0 or do_eval
      shape = (batch['inputs'].shape, batch['targets'].shape)
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
                        tok_s=f"{train_summary['target_tokens_per_second']:.0f}")
        pending = []

      if do_eval:
        result = evaluate(p_eval_step, state.params, batcher, eval_ds, mesh,
                          config.num_eval_batches)
        improved = False
        if do_bleu:
          translator.params = state.params
          result['bleu'] = evaluation.score_split(translator, *eval_text, workdir,
                                                  f'{config.eval_split}-step{step}')['bleu']
          improved = best.update(state, result['bleu'])
        for name, value in result.items():
          writer.scalar(f'eval/{name}', value, step)
        writer.flush()
        _log(bar, _eval_line(step, train_summary, result, config.eval_split, improved))

      stop_early = bool(config.bleu_every_steps and config.patience and
                        best.evaluations_since_best(step, config.bleu_every_steps)
                        >= config.patience)
      if step % config.checkpoint_every_steps == 0 or last or stop_early:
        checkpoints.save(manager, state)
      if stop_early:
        _log(bar, f'Early stopping at step {step}: no BLEU improvement in {config.patience} '
                  f'evaluations (best {best.bleu:.2f} at step {best.step})')
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

  if test_text:
    params = state.params
    if best.step >= 0:
      params = checkpoints.restore_latest(best.manager, state).params
    translator.params = params
    result = evaluation.score_split(
        translator, *test_text, workdir,
        f'{config.test_split}-' + (f'best-step{best.step}' if best.step >= 0
                                    else f'step{int(state.step)}'))
    report = (f'{config.test_split} ({"best" if best.step >= 0 else "last"} checkpoint):\n'
              + scoring.report(result))
    print(report)
    logging.info(report)
  best.manager.close()
  return state
