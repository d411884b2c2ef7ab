"""Mixed precision: float32 master weights and optimizer state whatever param_dtype is,
and checkpoint averaging in float32."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import mt
from transformer_jax import checkpoints, evaluation, optim, sharding, tasks, train

# bfloat16 keeps 8 significant bits: 1 + 2**-7 is representable, 1 + 2**-10 is not.
BF16_STEP = 2.0 ** -7


class ScalarTask(tasks.Task):
  """One scalar parameter, {'dense': {'kernel': 1.0}} in `config.param_dtype` (as Flax
  layers create theirs), and the linear loss kernel * batch['g']: its gradient is g."""

  def setup(self, training: bool) -> None:
    del training

  def init_params(self, rng):
    del rng
    return {'dense': {'kernel': jnp.ones((), jnp.dtype(self.config.param_dtype))}}

  def load_pretrained(self, params):
    # Like init_from.assign: loaded values take the dtype of the state's parameters.
    return jax.tree.map(lambda x: np.asarray(1 + 2.0 ** -10).astype(x.dtype), params)

  def loss(self, params, batch, dropout_rng):
    del dropout_rng
    return params['dense']['kernel'] * batch['g'], {}


def _config(param_dtype: str, **overrides):
  config = mt.get_config('tiny')
  config.task = f'{__name__}:ScalarTask'
  config.param_dtype = param_dtype
  config.learning_rate, config.warmup_steps, config.schedule = 1e-4, 0, 'constant'
  config.weight_decay = 0.0
  for name, value in overrides.items():
    config[name] = value
  return config


def _state_and_step(config, workdir, pretrained=False):
  mesh = sharding.make_mesh()
  task = tasks.create(config, str(workdir), mesh)
  task.setup(training=True)
  optimizer = optim.make_optimizer(config)
  state = train.create_state(task, optimizer, config.seed, mesh, pretrained=pretrained)
  step = jax.jit(functools.partial(
      train.train_step, loss_fn=task.loss, optimizer=optimizer,
      schedule=optim.learning_rate_schedule(config), seed=config.seed))
  return state, step


def _train(config, workdir, gradient: float, steps: int):
  state, step = _state_and_step(config, workdir)
  for _ in range(steps):
    state, _ = step(state, {'g': np.float32(gradient)})
  return state


@pytest.mark.parametrize('param_dtype', ['bfloat16', 'float16'])
def test_low_precision_params_train_like_float32(param_dtype, tmp_path):
  # 100 AdamW steps of lr 1e-4 on gradient 1 take the kernel from 1.0 to 0.99. In
  # bfloat16 each -1e-4 would round back to 1.0; float32 master weights keep them.
  state = _train(_config(param_dtype), tmp_path / param_dtype, gradient=1.0, steps=100)
  kernel = state.params['dense']['kernel']
  np.testing.assert_allclose(kernel, 0.99, rtol=1e-5)  # 100 float32 roundings.
  assert kernel.dtype == jnp.float32
  reference = _train(_config('float32'), tmp_path / 'float32', gradient=1.0, steps=100)
  np.testing.assert_array_equal(kernel, reference.params['dense']['kernel'])
  # The optimizer's moments are float32 too, and so is what a checkpoint stores.
  moments = [x for x in jax.tree.leaves(state.opt_state)
             if jnp.issubdtype(x.dtype, jnp.floating)]
  assert moments and all(x.dtype == jnp.float32 for x in moments)
  manager = checkpoints.make_manager(str(tmp_path / 'run'), keep=1)
  checkpoints.save(manager, state)
  manager.wait_until_finished()
  stored = manager.item_metadata(100).tree
  manager.close()
  assert stored['params']['dense']['kernel'].dtype == np.float32
  assert stored['opt_state'][1][0]['mu']['dense']['kernel'].dtype == np.float32


def test_float16_params_with_tiny_eps_and_zero_gradient_stay_finite(tmp_path):
  # adam_eps = 1e-9 is 0 in float16 (smallest subnormal 6e-8): a zero gradient would give
  # 0 / (0 + 0) = NaN. In float32 the update is 0.
  config = _config('float16', adam_eps=1e-9)
  state = _train(config, tmp_path, gradient=0.0, steps=3)
  np.testing.assert_array_equal(state.params['dense']['kernel'], np.float32(1.0))
  assert all(np.all(np.isfinite(x)) for x in jax.tree.leaves(state.opt_state))


def test_pretrained_values_load_into_float32_without_rounding(tmp_path):
  state, _ = _state_and_step(_config('bfloat16'), tmp_path, pretrained=True)
  kernel = state.params['dense']['kernel']
  assert kernel.dtype == jnp.float32 and float(kernel) == 1 + 2.0 ** -10


def test_train_step_refuses_low_precision_params():
  config = _config('bfloat16')
  optimizer = optim.make_optimizer(config)
  params = {'dense': {'kernel': jnp.ones((), jnp.bfloat16)}}
  state = train.TrainState(step=jnp.array(0, jnp.int32), params=params,
                           opt_state=optimizer.init(params))
  step = functools.partial(
      train.train_step, loss_fn=lambda p, b, _: (p['dense']['kernel'], {}),
      optimizer=optimizer, schedule=optim.learning_rate_schedule(config), seed=0)
  with pytest.raises(ValueError, match=r"float32 \(master\) parameters, got "
                                       r"\['dense'\]\['kernel'\]: bfloat16: build the state "
                                       'with create_state'):
    step(state, {})


def test_average_params_accumulates_in_float32():
  # In bfloat16, 1 + (1 + 2**-7) rounds to 2 and 2 + (1 + 2**-7) to 3: the mean would be 1.
  values = [1.0, 1 + BF16_STEP, 1 + BF16_STEP]
  trees = [{'kernel': jnp.full((2,), v, jnp.bfloat16), 'count': jnp.array(i, jnp.int32)}
           for i, v in enumerate(values)]
  averaged = evaluation.average_params(trees)
  assert averaged['kernel'].dtype == jnp.float32
  np.testing.assert_array_equal(averaged['kernel'], np.float32(sum(values)) / np.float32(3))
  assert int(averaged['count']) == 2  # Non-floating leaves: the last tree's.
  with pytest.raises(ValueError, match='no parameter trees'):
    evaluation.average_params([])


def test_averaging_three_bfloat16_checkpoints(tmp_path):
  # Three checkpoints stored in bfloat16 (by a run from before float32 master weights),
  # averaged by --mode=eval with average_checkpoints=3.
  config = _config('bfloat16', average_checkpoints=3, keep_checkpoints=3)
  optimizer = optim.make_optimizer(config)
  manager = checkpoints.make_manager(str(tmp_path), keep=3)
  values = [1.0, 1 + BF16_STEP, 1 + BF16_STEP]
  for step, value in enumerate(values, start=1):
    params = {'dense': {'kernel': jnp.array(value, jnp.bfloat16)}}
    checkpoints.save(manager, train.TrainState(step=jnp.array(step, jnp.int32), params=params,
                                               opt_state=optimizer.init(params)))
  manager.wait_until_finished()
  manager.close()
  _, params, name = evaluation.load_task(config, str(tmp_path))
  assert name == 'avg3-step3'
  kernel = params['dense']['kernel']
  np.testing.assert_array_equal(kernel, np.float32(sum(values)) / np.float32(3))
  assert kernel.dtype == jnp.float32
