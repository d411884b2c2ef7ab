"""Parameter-efficient fine-tuning: each method's computation against the base model and
its merged form, cached decoding with the method on, and one training matrix over all
methods (the loss falls, only the trainable tree changes, the base stays bit-identical,
checkpoints hold the adapter alone and restore bit-identically, eval from the adapter's
workdir equals eval inside the training process)."""
import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import tiny_config
from tests.test_tasks import classification_config
from transformer_jax import checkpoints, config_schema, evaluation, init_from, models, peft
from transformer_jax import tokenizer, train
from transformer_jax.peft import core, token_rows

SETTINGS = {'peft_method': '', 'peft_modules_to_save': (), 'lora_rank': 4, 'lora_alpha': 6.0,
            'lora_dropout': 0.0,
            'lora_targets': ('embed', 'query', 'key', 'value', 'out', 'wi', 'wo'),
            'adapter_size': 8, 'prefix_length': 3, 'prefix_mlp_hidden': 0,
            'prompt_length': 4}
METHODS = ('lora', 'adapter', 'prefix', 'prompt', 'ia3')
IDENTITY_AT_INIT = ('lora', 'adapter', 'ia3')  # Prefix and prompt add positions.

CFG = models.TransformerConfig(vocab_size=40, d_model=16, num_heads=2, d_ff=32,
                               num_encoder_layers=2, num_decoder_layers=2, dropout_rate=0.0,
                               attention_dropout_rate=0.0)
INPUTS = jnp.array([[5, 6, 7, 8, 1, 0], [9, 10, 1, 0, 0, 0]], jnp.int32)  # EOS = 1
TARGETS = jnp.array([[11, 12, 13, 1, 0], [14, 1, 0, 0, 0]], jnp.int32)


def _adapter(model, init, name, rows=(), **settings):
  """A bound peft.Adapter of method `name` on `model` (whose params `init()` gives),
  with token-table `rows` trained in full."""
  adapter = peft.Adapter({**SETTINGS, 'peft_method': name, **settings})
  sites = core.discover_sites(init)
  adapter.method = peft.METHODS[name](adapter.settings, sites)
  adapter.rows, adapter.tables = list(rows), token_rows.tables(sites) if rows else []
  adapter.frozen = init()
  return adapter


def _random_like(tree, seed):
  """`tree` with every leaf replaced by N(0, 0.3) values: an adapter after training."""
  leaves, treedef = jax.tree.flatten(tree)
  keys = jax.random.split(jax.random.PRNGKey(seed), len(leaves))
  return jax.tree.unflatten(treedef, [x + 0.3 * jax.random.normal(k, x.shape)
                                      for x, k in zip(leaves, keys)])


@pytest.fixture(scope='module')
def transformer():
  model = models.Transformer(CFG)
  init = lambda: model.init(jax.random.PRNGKey(0), INPUTS, TARGETS)['params']
  return model, init


@pytest.mark.parametrize('name', METHODS)
def test_step_0_equals_the_base_model_where_the_method_starts_at_identity(transformer, name):
  model, init = transformer
  adapter = _adapter(model, init, name)
  trainable = adapter.init(jax.random.PRNGKey(1), adapter.frozen)
  base_logits = model.apply({'params': adapter.frozen}, INPUTS, TARGETS)
  logits = adapter.wrap(model).apply({'params': adapter.view(trainable)}, INPUTS, TARGETS)
  if name in IDENTITY_AT_INIT:
    np.testing.assert_array_equal(logits, base_logits)
  else:  # Extra attention positions: the output moves, and only through the method.
    assert float(jnp.max(jnp.abs(logits - base_logits))) > 1e-3
  # A changed method tree changes the output: the interceptor reads the traced tree.
  moved = {'peft': _random_like(trainable['peft'], 2), 'base': {}}
  moved_logits = adapter.wrap(model).apply({'params': adapter.view(moved)}, INPUTS, TARGETS)
  assert float(jnp.max(jnp.abs(moved_logits - logits))) > 1e-3


def test_sites_and_sizes_follow_the_papers(transformer):
  model, init = transformer
  sizes = {}
  for name in METHODS:
    adapter = _adapter(model, init, name, lora_targets=('query', 'value'))
    tree = adapter.init(jax.random.PRNGKey(1), adapter.frozen)
    sizes[name] = (len(adapter.method.sites), sum(x.size for x in jax.tree.leaves(tree)))
  d, h, k, f, r, m, p = 16, 2, 8, 32, 4, 8, 3
  attentions = 2 + 2 * 2  # Encoder self; decoder self and cross.
  assert sizes['lora'] == (2 * attentions, 2 * attentions * (d * r + r * h * k))
  assert sizes['adapter'] == (attentions + 4, (attentions + 4) * (d * m + m + m * d + d))
  assert sizes['prefix'] == (attentions, attentions * 2 * p * h * k)
  assert sizes['prompt'] == (1, 4 * d)
  assert sizes['ia3'] == (2 * attentions + 4, 2 * attentions * h * k + 4 * f)


@pytest.mark.parametrize('name, targets, rows', [
    ('lora', ('query', 'key', 'value', 'out', 'wi', 'wo'), ()), ('ia3', (), ()),
    ('lora', ('embed', 'query', 'wo'), ()), ('lora', ('embed', 'query'), (3, 7, 11)),
    ('ia3', (), (7, 39))])
def test_merged_parameters_compute_what_base_plus_adapter_computes(transformer, name, targets,
                                                                   rows):
  model, init = transformer
  # lora_alpha 6 != lora_rank 4: the scale counts. 'embed': the shared token table, read
  # by the encoder, the decoder and the output logits (attend); the token rows too.
  adapter = _adapter(model, init, name, rows, lora_targets=targets)
  trained = {'peft': _random_like(adapter.init(jax.random.PRNGKey(1), adapter.frozen)['peft'], 3),
             'base': {}}
  unmerged = adapter.wrap(model).apply({'params': adapter.view(trained)}, INPUTS, TARGETS)
  merged = model.apply({'params': adapter.merged(trained)}, INPUTS, TARGETS)
  np.testing.assert_allclose(merged, unmerged, atol=1e-5, rtol=0)
  assert float(jnp.max(jnp.abs(unmerged - model.apply({'params': adapter.frozen}, INPUTS,
                                                      TARGETS)))) > 1e-2


def test_lora_equals_a_float64_reference_on_a_multi_axis_projection():
  # 'out' maps [.., H, K] -> [.., D]: the LoRA branch flattens H*K.
  layer = models.MultiHeadAttention(CFG)
  x = jax.random.normal(jax.random.PRNGKey(0), (2, 5, 16))
  mask = jnp.ones((1, 1, 1, 5), bool)
  init = lambda: layer.init(jax.random.PRNGKey(1), x, x, mask, True)['params']
  adapter = _adapter(layer, init, 'lora', lora_targets=('out',))
  trained = {'peft': _random_like(adapter.init(jax.random.PRNGKey(2), adapter.frozen)['peft'], 4),
             'base': {}}
  got = adapter.wrap(layer).apply({'params': adapter.view(trained)}, x, x, mask, True)
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), adapter.frozen)
  lora = jax.tree.map(lambda a: np.asarray(a, np.float64), trained['peft']['out'])
  x64 = np.asarray(x, np.float64)
  q = np.einsum('btd,dhk->bthk', x64, p['query']['kernel']) + p['query']['bias']
  kk = np.einsum('btd,dhk->bthk', x64, p['key']['kernel'])
  v = np.einsum('btd,dhk->bthk', x64, p['value']['kernel']) + p['value']['bias']
  logits = np.einsum('bqhk,bthk->bhqt', q, kk) / np.sqrt(8)
  w = np.exp(logits - logits.max(-1, keepdims=True))
  w /= w.sum(-1, keepdims=True)
  context = np.einsum('bhqt,bthk->bqhk', w, v)  # [B, T, H, K]
  kernel = p['out']['kernel'] + 1.5 * (lora['lora_a'] @ lora['lora_b']).reshape(2, 8, 16)
  want = np.einsum('bqhk,hkd->bqd', context, kernel) + p['out']['bias']
  np.testing.assert_allclose(np.asarray(got, np.float64), want, atol=2e-5, rtol=0)


def test_lora_on_the_embedding_table_starts_at_identity_and_gives_each_token_a_row():
  model = models.Transformer(CFG)
  init = lambda: model.init(jax.random.PRNGKey(0), INPUTS, TARGETS)['params']
  adapter = _adapter(model, init, 'lora', lora_targets=('embed',))
  assert [s.name for s in adapter.method.sites] == ['source_embedder/embed']
  trainable = adapter.init(jax.random.PRNGKey(1), adapter.frozen)
  leaves = trainable['peft']['source_embedder']['embed']
  assert leaves['lora_a'].shape == (40, 4) and leaves['lora_b'].shape == (4, 16)
  base_logits = model.apply({'params': adapter.frozen}, INPUTS, TARGETS)
  logits = adapter.wrap(model).apply({'params': adapter.view(trainable)}, INPUTS, TARGETS)
  np.testing.assert_array_equal(logits, base_logits)  # A = 0.
  # Token t embeds to E[t] + (alpha / r) A[t] B (float64 reference), only where A[t] moved.
  a = np.zeros((40, 4), np.float32)
  a[7] = np.arange(1, 5)
  trained = {'peft': {'source_embedder': {'embed': {'lora_a': jnp.asarray(a),
                                                    'lora_b': leaves['lora_b']}}}, 'base': {}}
  embedder = lambda m, tokens: m.source_embedder.embed(tokens)
  tokens = jnp.array([[7, 8]])
  got = adapter.wrap(model).apply({'params': adapter.view(trained)}, tokens, method=embedder)
  table = np.asarray(adapter.frozen['source_embedder']['embed']['embedding'], np.float64)
  want = table[[7, 8]] + np.stack([1.5 * a[7].astype(np.float64)
                                   @ np.asarray(leaves['lora_b'], np.float64), np.zeros(16)])
  np.testing.assert_allclose(np.asarray(got, np.float64)[0], want, atol=1e-5, rtol=0)


def test_token_rows_start_at_the_base_and_move_only_their_rows_everywhere_the_table_is_read():
  model = models.Transformer(CFG)
  init = lambda: model.init(jax.random.PRNGKey(0), INPUTS, TARGETS)['params']
  adapter = _adapter(model, init, 'adapter', rows=(7, 12))
  assert [s.name for s in adapter.tables] == ['source_embedder/embed']
  trainable = adapter.init(jax.random.PRNGKey(1), adapter.frozen)
  assert trainable['peft']['source_embedder']['embed']['token_rows'].shape == (2, 16)
  assert 'encoder' in trainable['peft']  # The adapters' own tree beside it.
  base_logits = model.apply({'params': adapter.frozen}, INPUTS, TARGETS)
  np.testing.assert_array_equal(
      adapter.wrap(model).apply({'params': adapter.view(trainable)}, INPUTS, TARGETS),
      base_logits)  # delta = 0.
  # Against a float64 table whose rows 7 and 12 moved by delta: the lookup of tokens 7
  # and 8, and the tied output logits (`attend`) of two hidden vectors.
  delta = np.arange(32, dtype=np.float32).reshape(2, 16) / 10
  trained = jax.tree.map(lambda x: x, trainable)
  trained['peft']['source_embedder']['embed']['token_rows'] = jnp.asarray(delta)
  table = np.asarray(adapter.frozen['source_embedder']['embed']['embedding'], np.float64)
  moved = table.copy()
  moved[[7, 12]] += delta
  wrapped = adapter.wrap(model)
  lookup = wrapped.apply({'params': adapter.view(trained)}, jnp.array([[7, 8]]),
                         method=lambda m, t: m.source_embedder.embed(t))
  np.testing.assert_allclose(np.asarray(lookup, np.float64)[0], moved[[7, 8]], atol=1e-6)
  hidden = np.random.default_rng(0).normal(size=(2, 16)).astype(np.float32)
  logits = wrapped.apply({'params': adapter.view(trained)}, jnp.asarray(hidden),
                         method=lambda m, x: m.source_embedder.embed.attend(x))
  np.testing.assert_allclose(np.asarray(logits, np.float64), hidden.astype(np.float64) @ moved.T,
                             atol=1e-5)


def test_token_rows_come_from_the_new_language_text_and_missing_files_are_named(tmp_path):
  import gzip  # pylint: disable=import-outside-toplevel
  new = tmp_path / 'new.gz'
  with gzip.open(new, 'wt', encoding='utf-8') as f:
    f.write('abc\nbd\n')
  (tmp_path / 'known.txt').write_text('a\nxyz\n')
  encode = lambda lines: [[ord(c) - ord('a') for c in line] for line in lines]
  # Pieces in the new text (a b c d: 0 1 2 3) and not in the known (a x y z: 0 23 24 25),
  # plus the explicit ids.
  assert token_rows.resolve((30, 2), [str(new)], [str(tmp_path / 'known.txt')],
                            encode) == [1, 2, 3, 30]
  # A special id (UNK) is never taken from the text, only when asked for by id.
  assert token_rows.resolve((), [str(new)], [str(tmp_path / 'known.txt')], encode,
                            special=(3,)) == [1, 2]
  with pytest.raises(FileNotFoundError, match=r'config.peft_token_rows_except: .*nope.txt'):
    token_rows.resolve((), [str(new)], [str(tmp_path / 'nope.txt')], encode)
  with pytest.raises(ValueError, match=r'config.peft_token_rows: ids \[40\] are outside'):
    token_rows.check([3, 40], token_rows.tables(core.discover_sites(
        lambda: models.Transformer(CFG).init(jax.random.PRNGKey(0), INPUTS, TARGETS))))


@pytest.mark.parametrize('name', ('adapter', 'prefix', 'prompt'))
def test_methods_that_add_computation_refuse_to_merge(transformer, name):
  model, init = transformer
  adapter = _adapter(model, init, name)
  with pytest.raises(peft.AdapterError, match='only lora and ia3 can be merged'):
    adapter.merged(adapter.init(jax.random.PRNGKey(1), adapter.frozen))


@pytest.mark.parametrize('name', METHODS + ('prefix_mlp',))
def test_cached_decoding_equals_the_full_pass_with_the_method(transformer, name):
  model, init = transformer
  if name == 'prefix_mlp':  # The reparameterization of Li & Liang, section 4.3.
    adapter = _adapter(model, init, 'prefix', prefix_mlp_hidden=8)
    assert sorted(adapter.init(jax.random.PRNGKey(1), adapter.frozen)['peft']) == ['prefix_mlp']
  else:
    adapter = _adapter(model, init, name)
  trained = {'peft': _random_like(adapter.init(jax.random.PRNGKey(1), adapter.frozen)['peft'], 5),
             'base': {}}
  wrapped, variables = adapter.wrap(model), {'params': adapter.view(trained)}
  full = wrapped.apply(variables, INPUTS, TARGETS)  # [B, T, V]
  cache = wrapped.apply(variables, INPUTS, TARGETS.shape[1], method=models.Transformer.init_cache)
  previous = jnp.full((2,), tokenizer.BOS_ID, jnp.int32)
  for t in range(TARGETS.shape[1]):
    logits, cache = wrapped.apply(variables, cache, previous, jnp.asarray(t),
                                  method=models.Transformer.decode_step)
    real = np.asarray(TARGETS[:, t] != 0)  # The full pass hides padded targets as keys.
    np.testing.assert_allclose(logits[real], full[real, t], atol=2e-5, rtol=0,
                               err_msg=f'position {t}')
    previous = TARGETS[:, t]


def test_prompt_tuning_keeps_padding_invariance_of_a_classifier():
  model = models.SequenceClassifier(CFG, num_labels=3, pooling='mean')
  tokens = jnp.array([[5, 6, 7, 1]], jnp.int32)
  init = lambda: model.init(jax.random.PRNGKey(0), tokens)['params']
  adapter = _adapter(model, init, 'prompt')
  trained = {'peft': adapter.init(jax.random.PRNGKey(1), adapter.frozen)['peft'], 'base': {}}
  apply = lambda x: adapter.wrap(model).apply({'params': adapter.view(trained)}, x)
  short = apply(tokens)
  padded = apply(jnp.array([[5, 6, 7, 1, 0, 0, 0]], jnp.int32))
  np.testing.assert_allclose(padded, short, atol=1e-5, rtol=0)
  assert float(jnp.max(jnp.abs(short - model.apply({'params': adapter.frozen}, tokens)))) > 1e-4


def test_config_errors_name_the_field(small_text_dir):
  config = tiny_config(small_text_dir, peft_method='lora')
  with pytest.raises(config_schema.ConfigError, match=r'peft_method=.*needs config.init_from'):
    config_schema.validate(config)
  config = tiny_config(small_text_dir, peft_method='prompt', init_from='x', pack_examples=True)
  with pytest.raises(config_schema.ConfigError, match=r'pack_examples=False'):
    config_schema.validate(config)
  config = tiny_config(small_text_dir, peft_method='lora', init_from='x', lora_targets=('(',))
  with pytest.raises(config_schema.ConfigError, match=r'config.lora_targets'):
    config_schema.validate(config)
  config = tiny_config(small_text_dir, peft_method='loar')
  with pytest.raises(config_schema.ConfigError, match=r'config.peft_method'):
    config_schema.validate(config)
  config = tiny_config(small_text_dir, peft_token_rows=(4, 5))
  with pytest.raises(config_schema.ConfigError, match=r'config.peft_token_rows: token rows '
                     'train beside a PEFT method'):
    config_schema.validate(config)
  config = tiny_config(small_text_dir, peft_method='lora', init_from='x', peft_token_rows=(-1,))
  with pytest.raises(config_schema.ConfigError, match=r'config.peft_token_rows'):
    config_schema.validate(config)


# --- Training ---------------------------------------------------------------------------

@pytest.fixture(scope='module')
def base_run(small_text_dir, tmp_path_factory):
  """A tiny translation run to adapt: its workdir and its final parameters (flat)."""
  workdir = str(tmp_path_factory.mktemp('base'))
  config = tiny_config(small_text_dir, num_train_steps=4, eval_every_steps=4,
                       checkpoint_every_steps=2)  # Step 2 serves as a different base.
  state = train.train_and_evaluate(config, workdir)
  return workdir, init_from.flatten(jax.device_get(state.params))[0]


def _peft_config(text_dir, base_workdir, name, **overrides):
  settings = {'peft_method': name, 'init_from': base_workdir, 'num_train_steps': 20,
              'eval_every_steps': 20, 'checkpoint_every_steps': 10, 'log_every_steps': 1,
              'learning_rate': 0.3 if name == 'prompt' else 1e-2,  # Lester et al.: 0.3.
              'warmup_steps': 0, 'schedule': 'constant', 'dropout_rate': 0.0,
              'attention_dropout_rate': 0.0, 'pack_examples': False, 'adapter_size': 8,
              'prefix_length': 4, 'prompt_length': 4}
  return tiny_config(text_dir, **{**settings, **overrides})


def _train_losses(workdir):
  with open(os.path.join(workdir, 'train.log')) as f:
    return [float(line.split('loss ')[1].split(',')[0]) for line in f
            if 'train step ' in line and ': loss ' in line]


@pytest.mark.parametrize('name', METHODS + ('adapter+rows',))
def test_training_matrix(base_run, small_text_dir, tmp_path, name):
  base_workdir, base_params = base_run
  workdir = str(tmp_path / name)
  name, _, rows = name.partition('+')
  # +rows: the token rows of the pieces in train.de and not in val.de train in full too.
  text = lambda split: os.path.join(small_text_dir, f'{split}.de')
  config = _peft_config(small_text_dir, base_workdir, name, **(
      {'peft_token_rows_from': (text('train'),), 'peft_token_rows_except': (text('val'),)}
      if rows else {}))
  seen = {}
  original_create_state = train.create_state

  def recording_create_state(task, *args, **kwargs):
    state = original_create_state(task, *args, **kwargs)
    seen['task'], seen['start'] = task, jax.device_get(state.params)
    return state

  train.create_state = recording_create_state
  try:
    state = train.train_and_evaluate(config, workdir)
  finally:
    train.create_state = original_create_state
  adapter = seen['task'].peft

  # The loss on a fixed training batch falls.
  batch = next(seen['task'].train_batches(seed=0, skip=0))
  loss = lambda trainable: float(seen['task'].loss(adapter.view(trainable), batch,
                                                   jax.random.PRNGKey(0))[0])
  assert loss(state.params) < loss(seen['start']) - 0.02, (loss(state.params),
                                                           loss(seen['start']))
  assert len(_train_losses(workdir)) == 20
  # The base is the source run's, bit for bit, after 20 steps; the trainable tree moved.
  frozen = init_from.flatten(jax.device_get(adapter.frozen))[0]
  assert sorted(frozen) == sorted(base_params)
  for key, value in base_params.items():
    np.testing.assert_array_equal(frozen[key], value, err_msg=key)
  final = jax.device_get(state.params)
  assert jax.tree.structure(final) == jax.tree.structure(seen['start'])
  moved = [not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(final),
                                                     jax.tree.leaves(seen['start']))]
  assert all(moved), 'every trainable leaf should move'

  # The checkpoint is the adapter alone and restores bit-identically.
  manager = checkpoints.make_manager(workdir, 2)
  restored = checkpoints.restore(manager, state, 20)
  manager.close()
  assert jax.tree.structure(restored.params) == jax.tree.structure(final)
  for a, b in zip(jax.tree.leaves(restored.params), jax.tree.leaves(final)):
    np.testing.assert_array_equal(a, b)
  if name == 'lora':  # Resumed from step 10 (base reloaded), it ends where it ended.
    shutil.rmtree(os.path.join(workdir, 'checkpoints', '20'))
    resumed = train.train_and_evaluate(config, workdir)
    for a, b in zip(jax.tree.leaves(jax.device_get(resumed.params)), jax.tree.leaves(final)):
      np.testing.assert_array_equal(a, b)
  with open(os.path.join(workdir, peft.CONFIG_FILE)) as f:
    record = json.load(f)
  assert record['settings']['peft_method'] == name and record['base'] == base_workdir
  assert record['base_fingerprint'] == peft.fingerprint(adapter.frozen)
  if rows:  # Recorded, and the pieces of the one file that the other lacks.
    pieces = lambda split: {i for ids in seen['task'].sp.encode(
        open(text(split), encoding='utf-8').read().splitlines()) for i in ids}
    want = sorted(pieces('train') - pieces('val') - {tokenizer.UNK_ID})
    assert len(want) > 10 and record['settings'][peft.ROW_IDS] == want
    assert final['peft']['source_embedder']['embed']['token_rows'].shape == (len(want), 32)

  # Eval from the adapter's workdir (the base reloaded from the record) equals eval
  # inside the training process.
  task, params, name = evaluation.load_task(_peft_config(small_text_dir, '', ''), workdir,
                                            'latest')
  assert name == 'step20' and isinstance(params, peft.Params)
  logits = lambda t, p: np.asarray(t.model.apply({'params': p}, batch['inputs'],
                                                 batch['targets']))
  np.testing.assert_array_equal(logits(task, params),
                                logits(seen['task'], adapter.view(state.params)))


@pytest.fixture(scope='module')
def lora_run(base_run, small_text_dir, tmp_path_factory):
  """6 LoRA steps (alpha 12 != rank 4) on the base run: its workdir and config."""
  workdir = str(tmp_path_factory.mktemp('lora'))
  config = _peft_config(small_text_dir, base_run[0], 'lora', num_train_steps=6,
                        eval_every_steps=6, checkpoint_every_steps=6, lora_alpha=12.0,
                        lora_targets=('embed', 'query', 'value', 'wi', 'wo'))
  train.train_and_evaluate(config, workdir)
  return workdir, config


def test_evaluating_with_other_languages_than_the_training_says_so(lora_run, small_text_dir,
                                                                  capsys):
  workdir, _ = lora_run
  evaluation.load_task(_peft_config(small_text_dir, '', '', source_lang='en', target_lang='de'),
                       workdir)
  err = capsys.readouterr().err
  assert ("config.source_lang='en', the run trained with 'de'; config.target_lang='de', the run "
          "trained with 'en'") in err
  evaluation.load_task(_peft_config(small_text_dir, '', ''), workdir)
  assert 'Note:' not in capsys.readouterr().err


def test_a_different_base_is_refused_in_one_line(base_run, lora_run, small_text_dir):
  base_workdir, _ = base_run
  workdir, _ = lora_run
  other = os.path.join(base_workdir, 'checkpoints', '2')
  with pytest.raises(peft.AdapterError) as error:
    evaluation.load_task(_peft_config(small_text_dir, other, ''), workdir)
  message = str(error.value)
  assert '\n' not in message and base_workdir in message and 'fingerprint' in message


def test_merge_writes_a_plain_run_that_computes_like_the_adapter(lora_run, small_text_dir,
                                                                 tmp_path):
  workdir, config = lora_run
  merged_dir = str(tmp_path / 'merged')
  evaluation.run_merge(config, workdir, merged_dir)
  assert not os.path.exists(os.path.join(merged_dir, peft.CONFIG_FILE))
  task, params, _ = evaluation.load_task(_peft_config(small_text_dir, '', ''), workdir)
  plain_task, merged, _ = evaluation.load_task(tiny_config(small_text_dir), merged_dir)
  assert not isinstance(merged, peft.Params) and plain_task.peft is None
  batch = next(_training_task(config, workdir).train_batches(seed=0, skip=0))
  logits = lambda t, p: np.asarray(t.model.apply({'params': p}, batch['inputs'],
                                                 batch['targets']))
  with_adapter = logits(task, params)
  np.testing.assert_allclose(logits(plain_task, merged), with_adapter, atol=1e-5, rtol=0)
  assert np.max(np.abs(logits(plain_task, params.base) - with_adapter)) > 1e-3
  with pytest.raises(FileExistsError):
    evaluation.run_merge(config, workdir, merged_dir)


def _training_task(config, workdir):
  """A translation task of `config` set up for training in a scratch copy of `workdir`."""
  from transformer_jax import sharding, tasks  # pylint: disable=g-import-not-at-top
  task = tasks.create(config, workdir, sharding.make_mesh())
  task.setup(training=True)
  return task


def test_classification_adapter_trains_the_new_head_in_full(source_run, sst2_dir, tmp_path):
  config = classification_config(sst2_dir, num_train_steps=5, eval_every_steps=5,
                                 init_from=source_run[0], peft_method='lora')
  state = train.train_and_evaluate(config, str(tmp_path / 'lora'))
  assert sorted(state.params) == ['base', 'peft']
  assert sorted(state.params['base']) == ['head']
  log = (tmp_path / 'lora' / 'train.log').read_text()
  assert 'PEFT: lora on ' in log and 'trained in full: head/bias, head/kernel' in log


def test_init_from_an_adapter_run_says_to_merge_it_first(lora_run):
  workdir, _ = lora_run
  with pytest.raises(init_from.InitError, match=r'parameter-efficient run.*--mode=merge'):
    init_from.source_run_dir(workdir)


def test_init_from_is_recorded_and_compared_as_an_absolute_path(tmp_path, monkeypatch,
                                                                small_text_dir):
  monkeypatch.chdir(tmp_path)
  config = tiny_config(small_text_dir, init_from='runs/base')
  config_schema.save_run_config(config, str(tmp_path))
  started = config_schema.load_run_config(str(tmp_path))
  assert started['init_from'] == str(tmp_path / 'runs' / 'base')
  same = tiny_config(small_text_dir, init_from=str(tmp_path / 'runs' / 'base') + '/')
  assert config_schema.check_run_config(same, started, str(tmp_path)) == []
  assert config_schema.absolute_init_from('hf:bert') == f'hf:{tmp_path}/bert'
  assert config_schema.absolute_init_from('') == ''


def test_the_init_from_report_goes_to_stderr_not_to_predictions(capsys):
  report = init_from.Report(source='x', loaded=('a',), initialized=(), kept=(), unused=(),
                            mismatched=())
  report.log()
  out, err = capsys.readouterr()
  assert out == '' and 'init_from x: 1 loaded' in err
