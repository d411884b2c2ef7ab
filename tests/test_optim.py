"""Optimizer: weight-decay mask and schedules."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import mt
from transformer_jax import models, optim, train


def _params():
  model = models.Transformer(models.TransformerConfig(
      vocab_size=20, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=1,
      num_decoder_layers=1))
  x = jnp.ones((1, 3), jnp.int32)
  return model.init(jax.random.PRNGKey(0), x, x)['params']


def test_weight_decay_touches_only_kernels():
  config = mt.get_config('tiny')
  config.weight_decay = 0.5
  config.warmup_steps = 0
  config.schedule = 'constant'
  params = _params()
  optimizer = optim.make_optimizer(config)
  zero_grads = jax.tree.map(jnp.zeros_like, params)
  updates, _ = optimizer.update(zero_grads, optimizer.init(params), params)
  new = optax.apply_updates(params, updates)
  flat_old = dict(jax.tree_util.tree_flatten_with_path(params)[0])
  flat_new = dict(jax.tree_util.tree_flatten_with_path(new)[0])
  decayed = {jax.tree_util.keystr(p) for p in flat_old
             if not np.array_equal(flat_old[p], flat_new[p])}
  names = {jax.tree_util.keystr(p) for p in flat_old}
  # With zero gradients only decoupled weight decay moves parameters.
  assert decayed == {n for n in names if n.endswith("['kernel']")}
  assert any('norm' in n and n.endswith("['scale']") for n in names - decayed)
  assert any(n.endswith("['embedding']") for n in names - decayed)
  assert any(n.endswith("['bias']") for n in names - decayed)
  for path in flat_old:
    if jax.tree_util.keystr(path) in decayed:
      np.testing.assert_allclose(flat_new[path], flat_old[path] * (1 - 0.5 * config.learning_rate),
                                 rtol=1e-6)


def test_schedules():
  # schedule(k) is the rate of update k + 1 (W = 100, N = 1099: t = (n - 100) / 1000).
  config = mt.get_config()
  config.learning_rate, config.warmup_steps, config.num_train_steps = 2.0, 100, 1099
  config.schedule = 'rsqrt'
  lr = optim.learning_rate_schedule(config)
  np.testing.assert_allclose([lr(0), lr(49), lr(99), lr(399)], [0.02, 1.0, 2.0, 1.0],
                             rtol=1e-5)
  config.schedule = 'cosine'
  lr = optim.learning_rate_schedule(config)
  np.testing.assert_allclose([lr(99), lr(599), lr(1099)], [2.0, 1.0, 0.0], atol=1e-5)
  assert lr(1098) > 0  # The last update, N = 1099.
  with pytest.raises(ValueError, match="config.schedule='step': use 'rsqrt'"):
    config.schedule = 'step'
    optim.learning_rate_schedule(config)


def _applied_rates(config) -> tuple[list[float], list[float]]:
  """The learning rate each of the `num_train_steps` updates of `train.train_step`
  applied, read off the parameter change of plain SGD (no momentum, no clipping, no
  weight decay) on the linear loss p * g with g = 1, and the 'learning_rate' it logged."""
  config.optimizer, config.momentum, config.weight_decay = 'sgd', 0.0, 0.0
  config.max_grad_norm = 0.0
  optimizer = optim.make_optimizer(config)
  zero = {'kernel': jnp.zeros((), jnp.float32)}
  state = train.TrainState(step=jnp.array(0, jnp.int32), params=zero,
                           opt_state=optimizer.init(zero))
  step = jax.jit(functools.partial(
      train.train_step, loss_fn=lambda p, b, _: (p['kernel'] * b['g'], {}),
      optimizer=optimizer, schedule=optim.learning_rate_schedule(config), seed=0))
  applied, logged = [], []
  for _ in range(config.num_train_steps):
    # From 0 each time (plain SGD keeps no per-parameter state): -p is the exact rate.
    state, metrics = step(state.replace(params=zero), {'g': jnp.ones((), jnp.float32)})
    applied.append(-float(state.params['kernel']))
    logged.append(float(metrics['learning_rate']))
  return applied, logged


@pytest.mark.parametrize('schedule, after_warmup', [
    # Updates 5..10 of W = 4, N = 10, lr = 1: decay(n), t = (n - 4) / 7.
    ('rsqrt', [np.sqrt(4 / n) for n in range(5, 11)]),
    ('cosine', [(1 + np.cos(np.pi * (n - 4) / 7)) / 2 for n in range(5, 11)]),
    ('linear', [(11 - n) / 7 for n in range(5, 11)]),  # The last: lr / (N + 1 - W).
    ('constant', [1.0] * 6),
])
def test_applied_learning_rates(schedule, after_warmup):
  config = mt.get_config('tiny')
  config.learning_rate, config.warmup_steps, config.num_train_steps = 1.0, 4, 10
  config.schedule = schedule
  applied, logged = _applied_rates(config)
  # Update 1 moves the parameters: warmup reaches lr * n / W at update n (from 1).
  np.testing.assert_allclose(applied[:4], [0.25, 0.5, 0.75, 1.0], rtol=1e-6)
  np.testing.assert_allclose(applied[4:], after_warmup, rtol=1e-5)  # float32 cos.
  assert applied[-1] > 0  # No update is wasted at rate 0.
  np.testing.assert_allclose(logged, applied, rtol=1e-6)  # The log tells what was applied.


@pytest.mark.parametrize('warmup_steps', [0, 1])
def test_applied_learning_rates_without_warmup(warmup_steps):
  config = mt.get_config('tiny')
  config.learning_rate, config.warmup_steps, config.num_train_steps = 1.0, warmup_steps, 4
  config.schedule = 'linear'
  applied, logged = _applied_rates(config)
  # The first update at lr, the last at lr / N.
  np.testing.assert_allclose(applied, [1.0, 0.75, 0.5, 0.25], rtol=1e-6)
  np.testing.assert_allclose(logged, applied, rtol=1e-6)
  config.schedule = 'rsqrt'
  applied, _ = _applied_rates(config)
  np.testing.assert_allclose(applied, [1.0, np.sqrt(1 / 2), np.sqrt(1 / 3), 0.5], rtol=1e-6)


def test_layer_lr_decay_scales_each_layer_by_its_depth():
  from configs import encoder  # pylint: disable=g-import-not-at-top
  config = encoder.get_config()
  config.warmup_steps, config.schedule, config.weight_decay = 0, 'constant', 0.1
  model = models.SequenceClassifier(models.TransformerConfig(
      vocab_size=20, d_model=8, num_heads=2, d_ff=16, num_encoder_layers=3,
      num_decoder_layers=0), num_labels=2)
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 3), jnp.int32))['params']
  grads = jax.tree.map(lambda x: jax.random.normal(jax.random.PRNGKey(1), x.shape), params)

  def updates(decay):
    config.layer_lr_decay = decay
    optimizer = optim.make_optimizer(config)
    return optimizer.update(grads, optimizer.init(params), params)[0]

  plain, decayed = updates(1.0), updates(0.5)
  expected = {'source_embedder': 0.5 ** 4, 'layers_0': 0.5 ** 3, 'layers_1': 0.5 ** 2,
              'layers_2': 0.5, 'final_norm': 1.0, 'head': 1.0}
  seen = set()
  for (path, u), d in zip(jax.tree_util.tree_flatten_with_path(plain)[0],
                          jax.tree.leaves(decayed)):
    names = [k.key for k in path]
    key = next(n for n in names if n in expected)
    seen.add(key)
    np.testing.assert_allclose(d, u * expected[key], rtol=1e-6, err_msg=str(names))
  assert seen == set(expected)  # Every depth was present, from embeddings to head.
  # A tree of only some modules (a PEFT tree) takes L from the deepest layer it holds.
  depths, num_layers = optim.layer_depths(
      {'peft': {'encoder': {'layers_0': {'a': 0}, 'layers_4': {'a': 0}}}, 'head': {'b': 0}})
  assert num_layers == 5
  assert depths == {'peft': {'encoder': {'layers_0': {'a': 1}, 'layers_4': {'a': 5}}},
                    'head': {'b': 6}}
  with pytest.raises(ValueError, match=r'layer_lr_decay=0: must be in \(0, 1\]'):
    optim.scale_by_layer_decay(0)
