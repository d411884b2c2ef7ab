"""Optimizer: weight-decay mask and schedules."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import mt
from transformer_jax import models, optim


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
  config = mt.get_config()
  config.learning_rate, config.warmup_steps, config.num_train_steps = 2.0, 100, 1100
  config.schedule = 'rsqrt'
  lr = optim.learning_rate_schedule(config)
  np.testing.assert_allclose([lr(0), lr(50), lr(100), lr(400)], [0.0, 1.0, 2.0, 1.0], rtol=1e-5)
  config.schedule = 'cosine'
  lr = optim.learning_rate_schedule(config)
  np.testing.assert_allclose([lr(100), lr(600), lr(1100)], [2.0, 1.0, 0.0], atol=1e-5)

