"""End-to-end training: overfitting, exact resumption, sharded == unsharded."""
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest

from tests.conftest import REPO, head, tiny_config
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


MULTI_DEVICE_SCRIPT = textwrap.dedent('''
  import functools, os, sys
  sys.path.insert(0, {repo!r})
  import jax, jax.numpy as jnp, numpy as np
  from configs import mt
  from transformer_jax import losses, models, optim, sharding, train
  from transformer_jax.tasks import translation
  assert jax.device_count() == 8, jax.devices()
  config = mt.get_config('tiny')
  model = models.Transformer(models.TransformerConfig.from_config(config, 50))
  optimizer = optim.make_optimizer(config)
  rng = np.random.default_rng(0)
  batch = {{'inputs': rng.integers(1, 50, (16, 10)).astype(np.int32),
            'targets': rng.integers(1, 50, (16, 12)).astype(np.int32)}}
  batch['targets'][::3, 7:] = 0
  x = jnp.ones((1, 4), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), x, x)['params']
  state = train.TrainState(step=jnp.array(0), params=params, opt_state=optimizer.init(params))
  loss_fn = functools.partial(translation.seq2seq_loss, model=model,
                              loss_fn=losses.get_loss(config))
  step = functools.partial(train.train_step, loss_fn=loss_fn, optimizer=optimizer,
                           schedule=optim.learning_rate_schedule(config), seed=0)
  results = []
  for devices in (jax.devices()[:1], jax.devices()):
    mesh = sharding.make_mesh(devices)
    f = jax.jit(step, in_shardings=(sharding.replicated(mesh), sharding.batch_sharding(mesh)),
                out_shardings=(sharding.replicated(mesh), sharding.replicated(mesh)))
    s = jax.device_put(state, sharding.replicated(mesh))
    for _ in range(3):
      s, metrics = f(s, sharding.put_batch(batch, mesh))
    results.append((s, metrics))
    shard = sharding.put_batch(batch, mesh)['inputs'].addressable_shards[0].data
    print(len(devices), 'devices, batch shard shape', shard.shape)
  (a, ma), (b, mb) = results
  np.testing.assert_allclose(ma['loss'], mb['loss'], rtol=1e-5)
  for x, y in zip(jax.tree.leaves(a.params), jax.tree.leaves(b.params)):
    np.testing.assert_allclose(x, y, rtol=1e-4, atol=1e-5)
  print('SHARDED_EQUALS_UNSHARDED')
''')


def test_data_parallel_on_8_devices_equals_one_device():
  env = {**os.environ, 'XLA_FLAGS': '--xla_force_host_platform_device_count=8',
         'JAX_PLATFORMS': 'cpu'}
  proc = subprocess.run([sys.executable, '-c', MULTI_DEVICE_SCRIPT.format(repo=REPO)],
                        env=env, capture_output=True, text=True, timeout=300)
  assert 'SHARDED_EQUALS_UNSHARDED' in proc.stdout, proc.stdout + proc.stderr[-3000:]
  assert '8 devices, batch shard shape (2, 10)' in proc.stdout, proc.stdout
