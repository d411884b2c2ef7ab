"""End-to-end training: overfitting, exact resumption, gradient accumulation (the meshes:
test_sharding.py)."""
import os

import jax
import numpy as np
import pytest

from tests.conftest import head, tiny_config
from transformer_jax import checkpoints, train


@pytest.fixture(scope='module')
def tiny_text_dir(data_dir, tmp_path_factory) -> str:
  """A 'text' dataset whose train and val splits are the same 32 Multi30k pairs."""
  out = tmp_path_factory.mktemp('tiny32')
  for lang in ('de', 'en'):
    lines = '\n'.join(head(os.path.join(data_dir, f'train.{lang}.gz'), 32)) + '\n'
    for split in ('train', 'val'):
      (out / f'{split}.{lang}').write_text(lines, encoding='utf-8')
  return str(out)


def test_tiny_model_overfits_32_pairs(tiny_text_dir, tmp_path):
  config = tiny_config(tiny_text_dir, d_model=64, num_heads=4, d_ff=128,
                       num_encoder_layers=2, num_decoder_layers=2, vocab_size=200,
                       dropout_rate=0.0, attention_dropout_rate=0.0, label_smoothing=0.0,
                       weight_decay=0.0, learning_rate=3e-3, warmup_steps=20,
                       schedule='constant', num_train_steps=300, eval_every_steps=300,
                       checkpoint_every_steps=300, num_eval_batches=-1,
                       max_tokens_per_batch=1024)
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 300
  log = (tmp_path / 'train.log').read_text()
  # Packed batches have one shape: the train step compiled once, and said so.
  assert log.count('Compiling the train step for batch shape') == 1, log
  eval_line = next(line for line in log.splitlines() if 'step 300: train loss' in line)
  assert 'target tok/s' in eval_line and 'GFLOP/s, MFU' in eval_line, eval_line
  # The eval split is the training set: per-token loss near zero, accuracy 100%.
  result = _eval(config, state, tmp_path)
  assert result['loss'] < 0.05, result
  assert result['accuracy'] > 0.99, result


def _eval(config, state, workdir):
  # pylint: disable=g-import-not-at-top
  from transformer_jax import data, models, sharding, tokenizer
  from transformer_jax.tasks import translation  # pylint: disable=g-import-not-at-top
  import functools  # pylint: disable=g-import-not-at-top
  sp = tokenizer.load(os.path.join(workdir, 'tokenizer', 'spm.model'))
  src, tgt = data.tokenize_pairs(sp, *data.load_pairs(config, config.eval_split, str(workdir)),
                                 config)
  mesh = sharding.make_mesh()
  batcher = data.Batcher(config.max_source_length, config.max_tokens_per_batch,
                         config.length_bucket_step, mesh.size)
  model = models.Transformer(models.TransformerConfig.from_config(config, sp.vocab_size()))
  eval_fn = jax.jit(functools.partial(translation.eval_step, model=model))
  return translation.evaluate(eval_fn, state.params, batcher,
                              batcher.eval({'inputs': src, 'targets': tgt}), mesh, -1)


def test_resumed_run_matches_uninterrupted_run(small_text_dir, tmp_path):
  overrides = dict(num_train_steps=12, checkpoint_every_steps=5, eval_every_steps=6,
                   log_every_steps=3, dropout_rate=0.1)
  full = train.train_and_evaluate(tiny_config(small_text_dir, **overrides),
                                  str(tmp_path / 'full'))
  # Stop after 7 steps (checkpoints at 5 and at the end, 7), then resume to 12.
  train.train_and_evaluate(tiny_config(small_text_dir, **{**overrides, 'num_train_steps': 7}),
                           str(tmp_path / 'resumed'))
  assert sorted(os.listdir(tmp_path / 'resumed' / 'checkpoints')) == ['5', '7']
  resumed = train.train_and_evaluate(tiny_config(small_text_dir, **overrides),
                                     str(tmp_path / 'resumed'))
  assert int(resumed.step) == int(full.step) == 12
  for a, b in zip(jax.tree.leaves((full.params, full.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # The check has teeth: the 5 steps after the checkpoint of step 7 changed every tensor.
  manager = checkpoints.make_manager(str(tmp_path / 'resumed'), 2)
  at_7 = checkpoints.restore(manager, resumed, 7)
  manager.close()
  assert all(not np.array_equal(a, b) for a, b in
             zip(jax.tree.leaves(at_7.params), jax.tree.leaves(full.params)))


# --- Gradient accumulation (train_step's grad_accum_steps) ------------------------------
# pylint: disable=g-import-not-at-top


def _uneven_translation_batch():
  """8 rows whose real target lengths differ (two rows all padding), so that the strided
  micro-batches of k = 4 (rows {0, 4}, {1, 5}, {2, 6}, {3, 7}) hold 24, 7, 16 and 0 real
  target tokens: a plain mean of their gradients would not be the batch's gradient."""
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(3, 50, (8, 10)).astype(np.int32),
           'targets': rng.integers(3, 50, (8, 12)).astype(np.int32)}
  for row, (source_length, target_length) in enumerate(
      [(10, 12), (4, 3), (7, 7), (1, 0), (9, 12), (2, 4), (10, 9), (3, 0)]):
    batch['inputs'][row, source_length:] = 0
    batch['targets'][row, target_length:] = 0
  return batch


def _translation_step(optimizer_name: str, dropout_rate: float):
  """(step function taking grad_accum_steps, fresh state, schedule) of configs/mt.py:tiny
  with a 50-token vocabulary, label smoothing and global-norm clipping on."""
  import functools
  import jax.numpy as jnp
  from configs import mt
  from transformer_jax import losses, models, optim
  from transformer_jax.tasks import translation
  config = mt.get_config('tiny')
  config.dropout_rate = config.attention_dropout_rate = dropout_rate
  config.optimizer = optimizer_name
  model = models.Transformer(models.TransformerConfig.from_config(config, 50))
  optimizer = optim.make_optimizer(config)
  schedule = optim.learning_rate_schedule(config)
  x = jnp.ones((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x, x)['params']
  state = train.TrainState(step=jnp.array(0, jnp.int32), params=params,
                           opt_state=optimizer.init(params))
  loss_fn = functools.partial(translation.seq2seq_loss, model=model,
                              loss_fn=losses.get_loss(config))
  step = lambda k: jax.jit(functools.partial(train.train_step, loss_fn=loss_fn,
                                             optimizer=optimizer, schedule=schedule, seed=0,
                                             grad_accum_steps=k))
  return step, state, schedule, loss_fn


def _assert_trees_close(a, b, rtol, atol):
  leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for x, y in zip(leaves_a, leaves_b):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol, atol=atol)


def test_grad_accumulation_equals_one_step_on_the_whole_batch():
  # Dropout off: micro-batches draw other dropout masks than the whole batch would. SGD
  # with momentum: its trace holds the (clipped) gradient itself, compared leaf by leaf.
  step, state, schedule, _ = _translation_step('sgd', dropout_rate=0.0)
  batch = _uneven_translation_batch()
  whole, accumulated = state, state
  for n in (1, 2):  # Two updates: the second one's learning rate is schedule(1).
    whole, whole_metrics = step(1)(whole, batch)
    accumulated, metrics = step(4)(accumulated, batch)
    assert int(accumulated.step) == int(whole.step) == n  # One update, not 4.
    assert sorted(metrics) == sorted(whole_metrics)
    np.testing.assert_allclose(metrics['learning_rate'], schedule(n - 1), rtol=1e-7)
    assert float(metrics['num_tokens']) == float(whole_metrics['num_tokens']) == 47
    for name in ('loss', 'nll', 'accuracy', 'grad_norm'):
      np.testing.assert_allclose(metrics[name], whole_metrics[name], rtol=1e-5, err_msg=name)
    _assert_trees_close(accumulated.opt_state, whole.opt_state, rtol=1e-4, atol=1e-7)
    _assert_trees_close(accumulated.params, whole.params, rtol=1e-5, atol=1e-7)


def test_grad_accumulation_micro_batch_i_gets_rows_i_mod_k_and_its_own_dropout_rng():
  import jax.numpy as jnp
  import optax
  step, state, _, loss_fn = _translation_step('sgd', dropout_rate=0.3)
  batch = _uneven_translation_batch()
  state = state.replace(step=jnp.array(3, jnp.int32))
  _, metrics = step(4)(state, batch)
  # By hand: micro-batch i = rows i::4 with rng fold_in(fold_in(PRNGKey(0), 3), i), its
  # gradient weighted by its real target tokens.
  micro_step = jax.jit(jax.value_and_grad(loss_fn, has_aux=True))
  grads, tokens, losses_ = [], [], []
  for i in range(4):
    rng = jax.random.fold_in(jax.random.fold_in(jax.random.PRNGKey(0), 3), i)
    (loss, micro_metrics), grad = micro_step(
        state.params, {name: x[i::4] for name, x in batch.items()}, rng)
    grads.append(grad)
    tokens.append(float(micro_metrics['num_tokens']))
    losses_.append(float(loss))
  assert tokens == [24, 7, 16, 0]
  total = jax.tree.map(lambda *g: sum(n * x for n, x in zip(tokens, g)) / sum(tokens), *grads)
  np.testing.assert_allclose(metrics['loss'], np.dot(tokens, losses_) / sum(tokens), rtol=1e-5)
  # The weighting has teeth: a plain mean of the micro-batch losses is another number.
  assert abs(np.mean(losses_) - float(metrics['loss'])) > 0.1
  grad_norm = float(optax.global_norm(total))
  np.testing.assert_allclose(metrics['grad_norm'], grad_norm, rtol=1e-5)
  # Dropout is on and the rng matters: micro-batch 0 with the step's rng (k = 1's) differs.
  step_rng = jax.random.fold_in(jax.random.PRNGKey(0), 3)
  (loss, _), _ = micro_step(state.params, {name: x[0::4] for name, x in batch.items()},
                            step_rng)
  assert abs(float(loss) - losses_[0]) > 1e-4


def test_grad_accumulation_needs_rows_divisible_by_k():
  import jax.numpy as jnp
  state = train.TrainState(step=jnp.array(0), params={'w': jnp.ones(3)}, opt_state=())
  batch = {'inputs': np.ones((6, 5), np.int32)}
  loss_fn = lambda params, batch, rng: (jnp.sum(params['w']) * jnp.mean(batch['inputs']), {})
  kwargs = dict(loss_fn=loss_fn, optimizer=None, schedule=lambda step: 0.1, seed=0)
  with pytest.raises(ValueError, match=r'grad_accum_steps=4 does not divide the batch of '
                                       r'B=6 rows'):
    train.train_step(state, batch, grad_accum_steps=4, **kwargs)
  with pytest.raises(ValueError, match=r'grad_accum_steps=0: must be an int >= 1'):
    train.train_step(state, batch, grad_accum_steps=0, **kwargs)
  with pytest.raises(ValueError, match=r'one leading size B'):
    train.train_step(state, {**batch, 'labels': np.ones(4, np.int32)}, grad_accum_steps=2,
                     **kwargs)


def _mean_over_rows(logits, targets, weights):
  """A user's loss without a weight-sum metric: a plain mean over the B rows."""
  import jax.numpy as jnp
  del weights
  loss = jnp.mean(jnp.square(logits[..., 0] - targets))
  return loss, {'rows_loss': loss}


@pytest.mark.parametrize('loss_name', ['cross_entropy', 'mse', 'custom'])
def test_grad_accumulation_of_a_classifier_with_example_weights_and_frozen_params(loss_name):
  """Classification averages over weight > 0 examples ('num_tokens' counts examples),
  regression's mse gives 'num_examples', a custom loss neither; trained as a PEFT run is,
  with a frozen part of the parameters (train_step's `frozen`)."""
  import functools
  import jax.numpy as jnp
  import optax
  from transformer_jax import losses, models
  num_labels = 3 if loss_name == 'cross_entropy' else 1
  cfg = models.TransformerConfig(vocab_size=37, d_model=32, num_heads=4, d_ff=64,
                                 num_encoder_layers=2, num_decoder_layers=1,
                                 dropout_rate=0.0, attention_dropout_rate=0.0)
  model = models.SequenceClassifier(cfg, num_labels, pooling='mean')
  rng = np.random.default_rng(1)
  inputs = rng.integers(3, 37, (8, 6)).astype(np.int32)
  for row, length in enumerate([6, 2, 5, 3, 1, 6, 4, 2]):
    inputs[row, length:] = 0
  # Weight-0 rows (padding rows of a batch): micro-batches {0, 4} {1, 5} {2, 6} {3, 7}
  # hold 2, 2, 0 and 1 real examples.
  batch = {'inputs': inputs, 'weights': np.array([1, 1, 0, 1, 1, 1, 0, 0], np.float32),
           'labels': (rng.integers(0, 3, 8) if num_labels > 1 else
                      rng.normal(size=8)).astype(np.int32 if num_labels > 1 else np.float32)}
  loss = {'cross_entropy': losses.cross_entropy, 'mse': losses.mse,
          'custom': _mean_over_rows}[loss_name]

  def loss_fn(params, batch, dropout_rng):
    merged = {**params.base, **params.trainable}
    logits = model.apply({'params': merged}, batch['inputs'], deterministic=False,
                         rngs={'dropout': dropout_rng})
    return loss(logits, batch['labels'], batch['weights'])

  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 6), jnp.int32))['params']
  frozen = {'source_embedder': params['source_embedder']}
  trainable = {'encoder': params['encoder'], 'head': params['head']}
  optimizer = optax.sgd(0.1, momentum=0.9)  # Its trace holds the gradient.
  state = train.TrainState(step=jnp.array(0, jnp.int32), params=trainable,
                           opt_state=optimizer.init(trainable))
  results = []
  for k in (1, 4):
    step = jax.jit(functools.partial(train.train_step, loss_fn=loss_fn, optimizer=optimizer,
                                     schedule=lambda step: 0.1, seed=0, grad_accum_steps=k))
    results.append(step(state, batch, frozen))
  (whole, whole_metrics), (accumulated, metrics) = results
  assert int(accumulated.step) == int(whole.step) == 1
  assert sorted(metrics) == sorted(whole_metrics)
  for name, value in whole_metrics.items():
    np.testing.assert_allclose(metrics[name], value, rtol=1e-5, err_msg=name)
  _assert_trees_close(accumulated.opt_state, whole.opt_state, rtol=1e-4, atol=1e-7)
  _assert_trees_close(accumulated.params, whole.params, rtol=1e-5, atol=1e-7)
