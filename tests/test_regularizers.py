"""Regularizers (transformer_jax/regularizers.py): FGM, PGD and FreeLB against references
written here with their own interceptor and jax.grad, R-Drop's KL against float64 numpy,
the EMA against the numpy recursion and optax.ema; then in training: a packed translation
run resumed exactly with all of them on and evaluated with its EMA, a classification run,
and 8 fake devices equal to 1."""
import functools
import re
import textwrap

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mt
from tests.conftest import REPO, tiny_config
from tests.test_sharding import run_8_devices
from tests.test_tasks import classification_config
from tests.test_train import _eval
from transformer_jax import (checkpoints, config_schema, evaluation, init_from, losses,
                             models, optim, peft, regularizers, train)
from transformer_jax.tasks import translation

VOCAB, D = 50, 32  # configs/mt.py:tiny has d_model 32.
EPS = 0.5


def _setup(dropout=0.1, packed=False, **overrides):
  """configs/mt.py:tiny with a 50-token vocabulary: (config, params, a batch of 4 rows with
  padding (rows 1 and 3 short; with `packed`, two pairs per row), the translation loss)."""
  config = mt.get_config('tiny')
  config.dropout_rate = config.attention_dropout_rate = dropout
  config.update(overrides)
  model = models.Transformer(models.TransformerConfig.from_config(config, VOCAB))
  x = jnp.ones((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x, x)['params']
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(3, VOCAB, (4, 10)).astype(np.int32),
           'targets': rng.integers(3, VOCAB, (4, 12)).astype(np.int32)}
  for row, source_length, target_length in ((1, 5, 7), (3, 2, 3)):
    batch['inputs'][row, source_length:] = 0
    batch['targets'][row, target_length:] = 0
  if packed:  # Pairs of 5 + 5 source and 6 + 6 target tokens in each row (row 3: one pair).
    for side, half in (('inputs', 5), ('targets', 6)):
      segment = np.repeat([[1] * half + [2] * half], 4, axis=0)
      segment[batch[side] == 0] = 0
      batch[f'{side}_segmentation'] = segment.astype(np.int32)
      batch[f'{side}_position'] = np.where(
          segment > 0, np.tile(np.arange(2 * half) % half, (4, 1)), 0).astype(np.int32)
  loss_fn = functools.partial(translation.seq2seq_loss, model=model,
                              loss_fn=losses.get_loss(config))
  return config, params, batch, loss_fn


def _reference_loss(loss_fn, params, batch, rng, deltas):
  """loss_fn with deltas[i] added to the output of the i-th call of the token table (the
  nn.Embed named 'embed') at the real tokens: written here apart from
  `regularizers.perturbed`."""
  calls = []

  def add(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if (context.method_name == '__call__' and type(context.module).__name__ == 'Embed'
        and context.module.name == 'embed'):
      out = out + deltas[len(calls)] * (args[0] != 0)[..., None]
      calls.append(1)
    return out

  with nn.intercept_methods(add):
    return loss_fn(params, batch, rng)[0]


def _zeros(batch):
  """One zero perturbation per embedding call: the encoder's [4, 10, D], the decoder's."""
  return [jnp.zeros(batch['inputs'].shape + (D,)), jnp.zeros(batch['targets'].shape + (D,))]


def _row_norms(x) -> np.ndarray:
  return np.linalg.norm(np.asarray(x, np.float64).reshape(len(x), -1), axis=1)


def _unit_rows(g) -> np.ndarray:
  """g / ||g|| per row, in float64."""
  g = np.asarray(g, np.float64)
  norm = _row_norms(g)[:, None, None]
  return np.where(norm > 0, g / np.where(norm > 0, norm, 1), 0)


def _project(delta, eps) -> np.ndarray:
  return delta * np.minimum(1, eps / np.maximum(_row_norms(delta), 1e-30))[:, None, None]


def _assert_trees_close(a, b, rtol, atol):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def _recorded_perturbations(loss_fn):
  """(a loss that records the output of every `models.Embedder` call at run time, the
  record): the perturbation of pass t is (its output - the clean output) / sqrt(D), as the
  Embedder scales the token lookup by sqrt(D) and adds the (unperturbed) positions."""
  seen = []

  def recorded(params, batch, rng):
    def record(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      if isinstance(context.module, models.Embedder) and context.method_name == '__call__':
        jax.debug.callback(lambda x: seen.append(np.asarray(x, np.float64)), out)
      return out

    with nn.intercept_methods(record):
      return loss_fn(params, batch, rng)

  return recorded, seen


def _passes(seen, clean_outputs) -> list[list[np.ndarray]]:
  """The recorded Embedder outputs as perturbations, [pass][call], calls told apart by shape."""
  by_call = [[x for x in seen if x.shape == clean.shape] for clean in clean_outputs]
  assert len({len(c) for c in by_call}) == 1, [len(c) for c in by_call]
  return [[(outputs[t] - clean) / np.sqrt(D) for outputs, clean in zip(by_call, clean_outputs)]
          for t in range(len(by_call[0]))]


def _clean_outputs(loss_fn, params, batch, rng):
  recorded, seen = _recorded_perturbations(loss_fn)
  jax.block_until_ready(recorded(params, batch, rng))
  return seen


# --- FGM, PGD, FreeLB ---------------------------------------------------------------------

def test_fgm_equals_a_brute_force_reference():
  _, params, batch, loss_fn = _setup(dropout=0.1)
  rng = jax.random.PRNGKey(3)
  ref = lambda p, deltas: _reference_loss(loss_fn, p, batch, rng, deltas)
  zeros = _zeros(batch)
  g = jax.grad(ref, argnums=1)(params, zeros)
  r = [EPS * _unit_rows(x) for x in g]
  for x in r:  # epsilon per row, nothing on padding.
    np.testing.assert_allclose(_row_norms(x), EPS, rtol=1e-6)
  assert not np.any(r[0][batch['inputs'] == 0]) and np.any(r[0][batch['inputs'] != 0])
  r = [jnp.asarray(x, jnp.float32) for x in r]
  expected = ref(params, zeros) + ref(params, r)
  expected_grads = jax.tree.map(jnp.add, jax.grad(ref)(params, zeros), jax.grad(ref)(params, r))

  fgm = regularizers.adversarial_loss(loss_fn, 'fgm', EPS)
  (value, metrics), grads = jax.value_and_grad(fgm, has_aux=True)(params, batch, rng)
  np.testing.assert_allclose(value, expected, rtol=1e-5)
  np.testing.assert_allclose(metrics['clean_loss'], ref(params, zeros), rtol=1e-6)
  np.testing.assert_allclose(metrics['adversarial_loss'], ref(params, r), rtol=1e-5)
  assert metrics['adversarial_loss'] > metrics['clean_loss'] + 0.1, metrics  # r matters.
  assert metrics['num_tokens'] == np.count_nonzero(batch['targets'])
  _assert_trees_close(grads, expected_grads, rtol=1e-4, atol=1e-6)
  # PGD with one step of size epsilon is FGM.
  pgd = regularizers.adversarial_loss(loss_fn, 'pgd', EPS, steps=1, step_size=EPS)
  (value_1, _), grads_1 = jax.value_and_grad(pgd, has_aux=True)(params, batch, rng)
  np.testing.assert_allclose(value_1, value, rtol=1e-6)
  _assert_trees_close(grads_1, grads, rtol=1e-5, atol=1e-7)


def test_pgd_steps_stay_in_the_epsilon_ball_and_follow_the_reference_ascent():
  _, params, batch, loss_fn = _setup(dropout=0.1, packed=True)
  rng, alpha, k = jax.random.PRNGKey(4), 0.3, 3
  ref = lambda p, deltas: _reference_loss(loss_fn, p, batch, rng, deltas)
  clean = _clean_outputs(loss_fn, params, batch, rng)
  recorded, seen = _recorded_perturbations(loss_fn)
  pgd = regularizers.adversarial_loss(recorded, 'pgd', EPS, steps=k, step_size=alpha)
  (value, metrics), grads = jax.value_and_grad(pgd, has_aux=True)(params, batch, rng)
  deltas = _passes(seen, clean)
  assert len(deltas) == k + 1  # delta_0 = 0 (the clean pass), delta_1, ..., delta_K.
  for t, pass_deltas in enumerate(deltas):
    for delta, tokens in zip(pass_deltas, (batch['inputs'], None)):
      assert np.all(_row_norms(delta) <= EPS * (1 + 1e-5)), (t, _row_norms(delta))
      if tokens is not None:
        assert np.all(np.abs(delta[tokens == 0]) < 1e-6)
    if t:  # delta_t = Proj(delta_{t-1} + alpha g / ||g||), g the reference's gradient.
      g = jax.grad(ref, argnums=1)(params, [jnp.asarray(d, jnp.float32) for d in deltas[t - 1]])
      for got, before, grad in zip(pass_deltas, deltas[t - 1], g):
        np.testing.assert_allclose(got, _project(before + alpha * _unit_rows(grad), EPS),
                                   atol=2e-6)
  # 3 steps of 0.3 reach the surface of the ball of 0.5.
  np.testing.assert_allclose(_row_norms(deltas[-1][0]), EPS, rtol=1e-5)
  final = [jnp.asarray(d, jnp.float32) for d in deltas[-1]]
  np.testing.assert_allclose(value, ref(params, _zeros(batch)) + ref(params, final), rtol=1e-5)
  expected_grads = jax.tree.map(jnp.add, jax.grad(ref)(params, _zeros(batch)),
                                jax.grad(ref)(params, final))
  _assert_trees_close(grads, expected_grads, rtol=1e-3, atol=1e-5)
  assert set(metrics) >= {'clean_loss', 'adversarial_loss', 'nll', 'num_tokens'}


def test_freelb_gradient_is_the_average_of_the_k_gradients():
  _, params, batch, loss_fn = _setup(dropout=0.1)
  rng, alpha, k = jax.random.PRNGKey(5), 0.2, 3
  ref = lambda p, deltas: _reference_loss(loss_fn, p, batch, rng, deltas)
  clean = _clean_outputs(loss_fn, params, batch, rng)
  recorded, seen = _recorded_perturbations(loss_fn)
  freelb = regularizers.adversarial_loss(recorded, 'freelb', EPS, steps=k, step_size=alpha)
  (value, metrics), grads = jax.value_and_grad(freelb, has_aux=True)(params, batch, rng)
  deltas = _passes(seen, clean)
  assert len(deltas) == k  # delta_0 (random), delta_1, delta_2: no clean pass.
  # delta_0: uniform in [-1, 1] * eps / sqrt(real tokens x D) per row, 0 on padding.
  real = (batch['inputs'] != 0).sum(axis=1)[:, None, None]
  init = deltas[0][0]
  assert np.all(np.abs(init) <= EPS / np.sqrt(real * D) * (1 + 1e-4))
  assert np.all(np.abs(init[batch['inputs'] == 0]) < 1e-6)
  assert np.max(np.abs(init) * np.sqrt(real * D) / EPS) > 0.9  # It spans the interval.
  for t in range(1, k):
    g = jax.grad(ref, argnums=1)(params, [jnp.asarray(d, jnp.float32) for d in deltas[t - 1]])
    for got, before, grad in zip(deltas[t], deltas[t - 1], g):
      np.testing.assert_allclose(got, _project(before + alpha * _unit_rows(grad), EPS),
                                 atol=2e-6)
  points = [[jnp.asarray(d, jnp.float32) for d in pass_deltas] for pass_deltas in deltas]
  np.testing.assert_allclose(value, np.mean([ref(params, p) for p in points]), rtol=1e-5)
  average = jax.tree.map(lambda *g: sum(g) / k, *[jax.grad(ref)(params, p) for p in points])
  _assert_trees_close(grads, average, rtol=1e-3, atol=1e-5)
  np.testing.assert_allclose(metrics['adversarial_loss'], value, rtol=1e-6)


def test_adversarial_loss_refuses_bad_settings_and_models_without_an_embedder():
  with pytest.raises(ValueError, match='must be one of'):
    regularizers.adversarial_loss(lambda *a: None, 'fgsm', 1.0)
  with pytest.raises(ValueError, match='steps=0'):
    regularizers.adversarial_loss(lambda *a: None, 'pgd', 1.0, steps=0)
  no_embedder = lambda params, batch, rng: (jnp.sum(params['w'] * batch['x']), {})
  with pytest.raises(ValueError, match='calls no token embedding'):
    regularizers.adversarial_loss(no_embedder, 'fgm', 1.0)({'w': jnp.ones(2)},
                                                           {'x': jnp.ones(2)}, None)


# --- R-Drop -------------------------------------------------------------------------------

def _symmetric_kl_float64(a, b, w) -> float:
  a, b, w = (np.asarray(x, np.float64) for x in (a, b, w))
  log_a = a - np.log(np.sum(np.exp(a - a.max(-1, keepdims=True)), -1, keepdims=True)) - a.max(
      -1, keepdims=True)
  log_b = b - np.log(np.sum(np.exp(b - b.max(-1, keepdims=True)), -1, keepdims=True)) - b.max(
      -1, keepdims=True)
  kl_ab = np.sum(np.exp(log_a) * (log_a - log_b), -1)
  kl_ba = np.sum(np.exp(log_b) * (log_b - log_a), -1)
  return float(np.sum(w * 0.5 * (kl_ab + kl_ba)) / np.sum(w))


def test_symmetric_kl_equals_float64_numpy_and_ignores_padding():
  rng = np.random.default_rng(0)
  a, b = rng.normal(0, 3, (2, 2, 5, 11)).astype(np.float32)
  w = (rng.random((2, 5)) < 0.7).astype(np.float32)
  got = float(regularizers.symmetric_kl(a, b, w))
  np.testing.assert_allclose(got, _symmetric_kl_float64(a, b, w), rtol=1e-5)
  assert got > 0.1
  # Padding positions (weight 0) count for nothing, whatever their logits.
  a2, b2 = a.copy(), b.copy()
  a2[w == 0] = rng.normal(0, 30, a2[w == 0].shape)
  b2[w == 0] = np.inf
  assert float(regularizers.symmetric_kl(a2, b2, w)) == got
  assert float(regularizers.symmetric_kl(a, a, w)) == 0.0
  # Regression (one output): the weighted mean of half the squared difference.
  np.testing.assert_allclose(regularizers.symmetric_kl(a[..., :1], b[..., :1], w),
                             np.sum(w * 0.5 * (a[..., 0] - b[..., 0]) ** 2) / np.sum(w),
                             rtol=1e-6)


def _r_drop(dropout, packed=False):
  """(params, batch, the translation loss with R-Drop's LossFn, it wrapped by
  `regularizers.wrap`) of configs/mt.py:tiny with r_drop_alpha = 2."""
  config, params, batch, task_loss = _setup(dropout=dropout, packed=packed, r_drop_alpha=2.0)
  return params, batch, task_loss, regularizers.wrap(config, task_loss)


@pytest.mark.parametrize('packed', [False, True])
def test_r_drop_without_dropout_adds_nothing_and_with_dropout_a_positive_kl(packed):
  params, batch, task_loss, r_drop = _r_drop(0.0, packed)
  rng = jax.random.PRNGKey(0)
  plain, plain_metrics = task_loss(params, batch, rng)  # Outside R-Drop: the loss itself.
  assert 'r_drop_kl' not in plain_metrics
  value, metrics = r_drop(params, batch, rng)
  assert float(metrics['r_drop_kl']) == 0.0
  np.testing.assert_allclose(value, plain, rtol=1e-6)
  assert metrics['num_tokens'] == plain_metrics['num_tokens'] == np.count_nonzero(
      batch['targets'])

  params, batch, task_loss, r_drop = _r_drop(0.1, packed)
  value, metrics = r_drop(params, batch, rng)
  kl = float(metrics['r_drop_kl'])
  assert kl > 1e-3, metrics
  # The loss is the mean of the two copies' losses (the task's loss of the doubled batch,
  # with the same dropout rng) plus alpha * KL.
  doubled = jax.tree.map(lambda x: jnp.repeat(x, 2, axis=0), batch)
  np.testing.assert_allclose(float(value) - 2.0 * kl, task_loss(params, doubled, rng)[0],
                             rtol=1e-5)
  assert metrics['num_tokens'] == np.count_nonzero(batch['targets'])


def test_r_drop_kl_excludes_padding_positions():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(4, 6, 9)).astype(np.float32)  # Pairs (0, 1), (2, 3).
  targets = rng.integers(0, 9, (4, 6)).astype(np.int32)
  weights = np.ones((4, 6), np.float32)
  weights[2:, 4:] = 0
  fn = regularizers.r_drop_loss_fn(losses.cross_entropy, alpha=1.0)

  def kl(logits):
    pairs = regularizers._Pairs()  # pylint: disable=protected-access
    token = regularizers._PAIRED.set(pairs)  # pylint: disable=protected-access
    try:
      return float(fn(logits, targets, weights)[1]['r_drop_kl'])
    finally:
      regularizers._PAIRED.reset(token)  # pylint: disable=protected-access

  changed = logits.copy()
  changed[2:, 4:] = rng.normal(0, 50, changed[2:, 4:].shape)
  assert kl(changed) == kl(logits) > 0
  np.testing.assert_allclose(kl(logits), _symmetric_kl_float64(logits[0::2], logits[1::2],
                                                               weights[0::2]), rtol=1e-5)


def test_r_drop_refuses_a_task_loss_that_does_not_use_get_loss():
  _, params, batch, loss_fn = _setup()  # Its LossFn is get_loss without r_drop_alpha.
  with pytest.raises(ValueError, match='never called the loss function of losses.get_loss'):
    regularizers.r_drop_loss(loss_fn)(params, batch, jax.random.PRNGKey(0))


# --- EMA ----------------------------------------------------------------------------------

def test_ema_after_n_steps_equals_the_debiased_recursion_and_optax_ema():
  config, params, batch, loss_fn = _setup(dropout=0.1)
  decay, n = 0.9, 5
  optimizer = optim.make_optimizer(config)
  state = train.TrainState(step=jnp.array(0, jnp.int32), params=params,
                           opt_state=optimizer.init(params), ema=params)
  step = jax.jit(functools.partial(train.train_step, loss_fn=loss_fn, optimizer=optimizer,
                                   schedule=optim.learning_rate_schedule(config), seed=0,
                                   ema_decay=decay))
  mu = jax.tree.map(lambda p: np.zeros(p.shape, np.float64), params)
  optax_ema = optax.ema(decay, debias=True)
  optax_state = optax_ema.init(params)
  for t in range(1, n + 1):
    state, _ = step(state, batch)
    current = jax.device_get(state.params)
    mu = jax.tree.map(lambda m, p: decay * m + (1 - decay) * np.asarray(p, np.float64), mu,
                      current)
    expected = jax.tree.map(lambda m: m / (1 - decay ** t), mu)
    _assert_trees_close(state.ema, expected, rtol=2e-5, atol=1e-7)
    optax_average, optax_state = optax_ema.update(current, optax_state)
    _assert_trees_close(state.ema, optax_average, rtol=2e-5, atol=1e-7)
  assert int(state.step) == n
  assert state.eval_params is state.ema
  assert any(not np.allclose(a, b, atol=1e-5) for a, b in
             zip(jax.tree.leaves(state.ema), jax.tree.leaves(state.params)))
  with pytest.raises(ValueError, match='needs a state with an EMA'):
    step(state.replace(ema=None), batch)


def test_checkpoints_store_the_ema_only_when_there_is_one(tmp_path):
  params = {'w': jnp.arange(3.0)}
  opt = optax.adam(1.0).init(params)
  manager = checkpoints.make_manager(str(tmp_path), 3)
  checkpoints.save(manager, train.TrainState(jnp.array(1), params, opt))
  checkpoints.save(manager, train.TrainState(jnp.array(2), params, opt, ema={'w': params['w'] + 1}))
  manager.wait_until_finished()
  assert checkpoints.stored_fields(manager, 1) == {'step', 'params', 'opt_state'}
  assert checkpoints.stored_fields(manager, 2) == {'step', 'params', 'opt_state', 'ema'}
  plain = checkpoints.restore(manager, train.TrainState(jnp.array(0), params, opt), 1)
  assert plain.ema is None and int(plain.step) == 1
  with_ema = checkpoints.restore(manager, train.TrainState(jnp.array(0), params, opt, params), 2)
  np.testing.assert_array_equal(with_ema.eval_params['w'], [1, 2, 3])
  manager.close()


# --- In training --------------------------------------------------------------------------

def test_config_errors_name_the_regularizer_field_in_one_line():
  for field, value, message in (
      ('adversarial', 'fgsm', "must be one of ('', 'fgm', 'pgd', 'freelb')"),
      ('adversarial_epsilon', 0.0, 'must be > 0'), ('adversarial_steps', 0, 'must be > 0'),
      ('adversarial_step_size', -1.0, 'must be > 0'), ('r_drop_alpha', -0.5, 'must be >= 0'),
      ('ema_decay', 1.0, 'must be in [0, 1)')):
    config = mt.get_config('tiny')
    config[field] = value
    with pytest.raises(config_schema.ConfigError) as error:
      config_schema.validate(config)
    assert str(error.value) == f'config.{field}={value!r}: {message}'


def test_resumed_packed_run_with_regularizers_equals_the_uninterrupted_one_and_evaluates_its_ema(
    small_text_dir, tmp_path):
  overrides = dict(num_train_steps=8, checkpoint_every_steps=4, eval_every_steps=4,
                   log_every_steps=2, num_eval_batches=-1, dropout_rate=0.1,
                   adversarial='fgm', r_drop_alpha=1.0, ema_decay=0.9)
  full = train.train_and_evaluate(tiny_config(small_text_dir, **overrides),
                                  str(tmp_path / 'full'))
  train.train_and_evaluate(tiny_config(small_text_dir, **{**overrides, 'num_train_steps': 4}),
                           str(tmp_path / 'resumed'))
  config = tiny_config(small_text_dir, **overrides)
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  assert int(resumed.step) == int(full.step) == 8
  for a, b in zip(jax.tree.leaves((full.params, full.opt_state, full.ema)),
                  jax.tree.leaves((resumed.params, resumed.opt_state, resumed.ema))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  log = (tmp_path / 'full' / 'train.log').read_text()
  assert ('Regularizers: fgm (epsilon 0.1); R-Drop (alpha 1); EMA of the parameters (decay '
          '0.9, debiased): evaluation, the best checkpoint, the test and eval/predict/export '
          'use the EMA') in log
  assert log.count('Compiling the train step for batch shape') == 1  # Packed: one shape.
  train_losses = [float(x) for x in re.findall(r'train step \d+: loss (\S+),', log)]
  assert len(train_losses) == 4 and all(np.isfinite(train_losses)), train_losses
  # The eval line of step 8 scored the EMA, not the parameters.
  eval_line = next(line for line in log.splitlines() if 'step 8: train loss' in line)
  logged = float(eval_line.split('eval loss ')[1].split()[0])
  with_ema = _eval(config, full.replace(params=full.ema), tmp_path / 'full')['loss']
  with_params = _eval(config, full, tmp_path / 'full')['loss']
  assert round(with_ema, 4) == logged != round(with_params, 4), (logged, with_ema, with_params)
  # --mode=eval/predict/export load the EMA (evaluation.load_task).
  _, params, name = evaluation.load_task(config, str(tmp_path / 'full'), 'latest')
  assert name == 'step8'
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full.ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # A run fine-tuned from it (config.init_from) starts from the EMA too.
  loaded = init_from.restore_params(str(tmp_path / 'full' / 'checkpoints' / '8'))
  flat_ema = init_from.flatten(jax.device_get(full.ema))[0]
  assert sorted(loaded) == sorted(flat_ema)
  for name_, value in loaded.items():
    np.testing.assert_array_equal(value, np.asarray(flat_ema[name_]))


def test_lora_classification_trains_with_fgm_and_evaluates_the_best_ema(source_run, sst2_dir,
                                                                        tmp_path):
  # A LoRA run on the classification task: the perturbation goes through the adapter's
  # model, the EMA covers the trainable tree (the adapter and the new head).
  config = classification_config(sst2_dir, num_train_steps=6, eval_every_steps=3,
                                 checkpoint_every_steps=3, log_every_steps=3,
                                 init_from=source_run[0], peft_method='lora',
                                 adversarial='fgm', ema_decay=0.9)
  state = train.train_and_evaluate(config, str(tmp_path))
  log = (tmp_path / 'train.log').read_text()
  assert 'Regularizers: fgm (epsilon 0.1); EMA of the parameters' in log
  losses_ = [float(x) for x in re.findall(r'train step \d+: loss (\S+),', log)]
  assert len(losses_) == 2 and all(np.isfinite(losses_)), losses_
  assert jax.tree.structure(state.ema) == jax.tree.structure(state.params)
  assert sorted(state.ema) == ['base', 'peft']
  _, params, name = evaluation.load_task(config, str(tmp_path))  # The best checkpoint.
  best = checkpoints.make_manager(str(tmp_path), 1, subdir='best')
  step = best.latest_step()
  assert name == f'best-step{step}'
  saved = checkpoints.restore(best, state, step)
  best.close()
  assert isinstance(params, peft.Params)
  for a, b in zip(jax.tree.leaves(params.trainable), jax.tree.leaves(saved.ema)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(saved.ema),
                                                      jax.tree.leaves(saved.params)))


MESH_SCRIPT = textwrap.dedent('''
  import functools, json, sys
  sys.path.insert(0, {repo!r})
  import jax, numpy as np
  from configs import mt
  from tests.test_regularizers import _setup
  from transformer_jax import losses, regularizers, sharding, train
  from transformer_jax.tasks import translation
  assert jax.device_count() == 8, jax.devices()
  out = {{}}
  _, _, packed, _ = _setup(packed=True)
  batch = {{k: np.concatenate([v] * 4) for k, v in packed.items()}}  # 16 packed rows.

  def run(mesh, overrides):
    config = mt.get_config('tiny')
    config.update(learning_rate=1e-3, warmup_steps=2, **overrides)
    model, optimizer, state = translation.create_model_and_state(config, 50, mesh)
    loss_fn = regularizers.wrap(config, functools.partial(
        translation.seq2seq_loss, model=model, loss_fn=losses.get_loss(config)))
    step = train.jit_train_step(config, loss_fn, optimizer, mesh, state)
    losses_ = []
    for _ in range(3):
      state, metrics = step(state, sharding.put_batch(batch, mesh), None)
      losses_.append(float(metrics['loss']))
    return losses_, jax.device_get((state.params, state.ema))

  for name, overrides in {variants!r}:
    one_losses, one = run(sharding.make_mesh((1, 1, 1), jax.devices()[:1]), overrides)
    many_losses, many = run(sharding.make_mesh((2, 2, 2)), overrides)
    out[name] = {{'losses': [one_losses, many_losses], 'diff': max(
        float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
        for a, b in zip(jax.tree.leaves(one), jax.tree.leaves(many)))}}
  print('RESULT', json.dumps(out))
''')

# Two variants (each compiled on both meshes) cover every regularizer: PGD's ascent steps
# are FreeLB's.
MESH_VARIANTS = (
    ('fgm_ema_accum', dict(adversarial='fgm', ema_decay=0.9, grad_accum_steps=2)),
    ('freelb_r_drop', dict(adversarial='freelb', adversarial_steps=2, r_drop_alpha=1.0)),
)


def test_regularizers_on_8_devices_equal_one_device():
  result = run_8_devices(MESH_SCRIPT.format(repo=REPO, variants=MESH_VARIANTS))
  for name, _ in MESH_VARIANTS:
    one, many = result[name]['losses']
    np.testing.assert_allclose(many, one, rtol=1e-5)
    assert result[name]['diff'] < 1e-4, (name, result[name])
