"""Pretraining on monolingual text: the file formats and the mixing, same seed = same
batches, exact resume, the masked-LM loss on the selected positions only, the reserved
symbols, and pretraining -> fine-tuning through the command line."""
import gzip
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests.conftest import REPO
from configs import encoder as encoder_config, pretrain_mlm_de, pretrain_span
from transformer_jax import config_schema, losses, monolingual, multi30k, sharding, tasks
from transformer_jax import tokenizer, train
from transformer_jax.tasks import masked_lm


def test_read_sentences_plain_gzip_and_conll(tmp_path):
  (tmp_path / 'a.txt').write_text('Ein Hund.\n\n  Zwei Katzen.  \n', encoding='utf-8')
  with gzip.open(tmp_path / 'b.txt.gz', 'wt', encoding='utf-8') as f:
    f.write('Drei Mäuse.\n')
  (tmp_path / 'c.conll').write_text(
      '-DOCSTART-\tO\n# comment\nAngela\tB-PER\nMerkel\tI-PER\n\n\nParis\tB-LOC\n.\tO\n',
      encoding='utf-8')
  assert monolingual.read_sentences(str(tmp_path / 'a.txt')) == ['Ein Hund.', 'Zwei Katzen.']
  assert monolingual.read_sentences(str(tmp_path / 'b.txt.gz')) == ['Drei Mäuse.']
  assert monolingual.read_sentences(str(tmp_path / 'c.conll')) == ['Angela Merkel', 'Paris .']
  corpus = monolingual.read_corpus([str(tmp_path / '*.txt*'), str(tmp_path / 'c.conll')],
                                   'train_files')
  assert corpus == [['Ein Hund.', 'Zwei Katzen.', 'Drei Mäuse.'], ['Angela Merkel', 'Paris .']]
  (tmp_path / 'empty.txt').write_text('\n\n', encoding='utf-8')
  with pytest.raises(multi30k.DataError, match='empty.txt: no sentence'):
    monolingual.read_sentences(str(tmp_path / 'empty.txt'))
  (tmp_path / 'bad.txt').write_bytes(b'ok\n\xff\xfe\n')
  with pytest.raises(multi30k.DataError, match=r'bad.txt:2: invalid UTF-8'):
    monolingual.read_sentences(str(tmp_path / 'bad.txt'))
  with pytest.raises(config_schema.ConfigError, match=r"config.train_files: '.*nothing\*' "
                     'matches no file'):
    monolingual.read_corpus([str(tmp_path / 'nothing*')], 'train_files')


def test_example_order_mixes_by_weight_walks_epochs_and_is_deterministic():
  sizes = (100, 1000)
  p = monolingual.mixing_probabilities(sizes, (1, 1))
  order = [x for _, x in zip(range(20_000), monolingual.example_order(sizes, p, seed=3))]
  from_small = [i for s, i in order if s == 0]
  # Binomial(20000, 0.5): 4 standard deviations are 283.
  assert abs(len(from_small) - 10_000) < 283
  # Each epoch of a source is a permutation of it, and the next epoch another one.
  for epoch in range(5):
    assert sorted(from_small[100 * epoch:100 * (epoch + 1)]) == list(range(100))
  assert from_small[:100] != from_small[100:200]
  again = [x for _, x in zip(range(20_000), monolingual.example_order(sizes, p, seed=3))]
  other = [x for _, x in zip(range(20_000), monolingual.example_order(sizes, p, seed=4))]
  assert order == again and order != other
  np.testing.assert_allclose(monolingual.mixing_probabilities(sizes, ()), [1 / 11, 10 / 11])
  with pytest.raises(config_schema.ConfigError, match='config.train_weights has 1 weights'):
    monolingual.mixing_probabilities(sizes, (1,))


@pytest.fixture(scope='module')
def mono_dir(tmp_path_factory):
  """de.txt, en.txt: the first 2,000 German and English monolingual captions; val.txt:
  the first 200 German validation captions."""
  out = tmp_path_factory.mktemp('mono')
  shared = encoder_config.shared_data('multi30k')
  for name, path, n in (('de.txt', 'mono/train.1.de.gz', 2000),
                        ('en.txt', 'mono/train.1.en.gz', 2000), ('val.txt', 'val.de.gz', 200)):
    with gzip.open(os.path.join(shared, path), 'rt', encoding='utf-8') as f:
      (out / name).write_text(''.join(next(f) for _ in range(n)), encoding='utf-8')
  return out


def tiny(config_module, mono_dir, **overrides):
  """`config_module`'s tiny config on the files of `mono_dir`, with overrides."""
  config = config_module.get_config('tiny')
  config.train_files = tuple(str(mono_dir / f) for f in ('de.txt', 'en.txt'))
  config.eval_files = (str(mono_dir / 'val.txt'),)
  config.update(**overrides)
  return config


def _task(config, workdir):
  task = tasks.create(config, str(workdir), sharding.make_mesh())
  task.setup(training=True)
  return task


@pytest.fixture(scope='module')
def mlm_task(tmp_path_factory, mono_dir):
  return _task(tiny(pretrain_mlm_de, mono_dir), tmp_path_factory.mktemp('mlm'))


def _take(iterator, n):
  return [next(iterator) for _ in range(n)]


def test_same_seed_same_batches_and_skip_resumes_the_stream(mlm_task):
  first = _take(mlm_task.train_batches(seed=0, skip=0), 6)
  again = _take(mlm_task.train_batches(seed=0, skip=0), 6)
  skipped = _take(mlm_task.train_batches(seed=0, skip=4), 2)
  other = _take(mlm_task.train_batches(seed=1, skip=0), 1)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  for a, b in zip(first[4:], skipped):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key])
  assert not (first[0]['inputs'].shape == other[0]['inputs'].shape
              and np.array_equal(first[0]['inputs'], other[0]['inputs']))


def test_masked_lm_batches_select_15_percent_of_the_text_pieces(mlm_task):
  batches = _take(mlm_task.train_batches(seed=0, skip=0), 20)
  selected = sum(int(b['weights'].sum()) for b in batches)
  pieces = 0
  for b in batches:
    real = b['inputs'] != 0
    pieces += int(real.sum()) - 2 * int(real[:, 0].sum())  # Without BOS and EOS.
    # Targets and weights are zero outside the selection; BOS/EOS never selected.
    assert np.all((b['targets'] != 0) == (b['weights'] > 0))
    assert np.all(b['weights'][:, 0] == 0)
  # Whole-word masking rounds per sentence and skips words that overshoot: 11-16%.
  assert 0.11 < selected / pieces < 0.16, selected / pieces


def test_masked_lm_loss_counts_the_selected_positions_only(mlm_task):
  batch = _take(mlm_task.train_batches(seed=0, skip=0), 1)[0]
  params = mlm_task.init_params(jax.random.PRNGKey(0))
  loss, metrics = masked_lm.mlm_loss(params, batch, None, model=mlm_task.model,
                                     loss_fn=losses.cross_entropy, mask_prob=0.15,
                                     deterministic=True)
  # Brute force: logits at every position, float64 cross-entropy at the selected ones.
  logits = np.asarray(mlm_task.model.apply({'params': params}, batch['inputs']), np.float64)
  log_probs = logits - logits.max(-1, keepdims=True)
  log_probs -= np.log(np.exp(log_probs).sum(-1, keepdims=True))
  rows, cols = np.nonzero(batch['weights'])
  expected = -log_probs[rows, cols, batch['targets'][rows, cols]].mean()
  np.testing.assert_allclose(float(loss), expected, rtol=1e-5)
  assert float(metrics['num_tokens']) == len(rows)
  # Targets where the weight is 0 do not count.
  changed = {**batch, 'targets': np.where(batch['weights'] > 0, batch['targets'], 7)}
  loss2, _ = masked_lm.mlm_loss(params, changed, None, model=mlm_task.model,
                                loss_fn=losses.cross_entropy, mask_prob=0.15,
                                deterministic=True)
  assert float(loss2) == float(loss)


def test_reserved_symbols_are_never_produced_by_typed_text(mlm_task, mono_dir, tmp_path):
  sp = mlm_task.sp
  assert tokenizer.symbol_ids(sp) == {'<mask>': 4}
  typed = sp.encode('ein <mask> Hund <extra_id_0>')
  assert 4 not in typed
  ids = tokenizer.encode_with_symbols(sp, 'Ein <mask> Hund.')
  assert ids.count(4) == 1
  assert tokenizer.decode_with_symbols(sp, ids) == 'Ein <mask> Hund.'
  span = _task(tiny(pretrain_span, mono_dir), tmp_path)
  symbols = tokenizer.symbol_ids(span.sp)
  assert list(symbols.values()) == list(range(4, 4 + 17))
  assert '<extra_id_15>' in symbols and not set(symbols.values()) & set(
      span.sp.encode('<extra_id_0> <mask> text'))


def test_resumed_pretraining_equals_uninterrupted_run(mono_dir, tmp_path):
  # One bucket of 8 tokens: one compiled shape.
  config = tiny(pretrain_span, mono_dir, num_train_steps=10, checkpoint_every_steps=4,
                eval_every_steps=5, schedule='rsqrt', max_source_length=8,
                max_target_length=8)
  full = train.train_and_evaluate(config, str(tmp_path / 'full'))
  config.num_train_steps = 6  # Stops after a checkpoint at 4 and the final one at 6.
  train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  config.num_train_steps = 10
  resumed = train.train_and_evaluate(config, str(tmp_path / 'resumed'))
  for a, b in zip(jax.tree.leaves((full.params, full.opt_state)),
                  jax.tree.leaves((resumed.params, resumed.opt_state))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# 10 steps, buckets of 8 and 32 (or 64) tokens: few compiled shapes.
FEW_SHAPES = ('--config.num_train_steps=10', '--config.eval_every_steps=10',
              '--config.length_bucket_step=8.0')


def run_main(*args, stdin=None):
  return subprocess.run([sys.executable, '-m', 'transformer_jax.main', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, input=stdin)


def _log_line(workdir, prefix):
  log = (workdir / 'train.log').read_text(encoding='utf-8')
  return next(line for line in log.splitlines() if prefix in line)


def test_cli_masked_lm_then_tagging_loads_the_encoder_and_a_new_head(mono_dir, germeval_dir,
                                                                      tmp_path):
  pretrained, tagger = tmp_path / 'mlm', tmp_path / 'ner'
  proc = run_main('--config=configs/pretrain_mlm_de.py:tiny', f'--workdir={pretrained}',
                  f"--config.train_files=('{mono_dir}/de.txt', '{mono_dir}/en.txt')",
                  f"--config.eval_files=('{mono_dir}/val.txt',)", *FEW_SHAPES)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'step 10: train loss' in proc.stdout + proc.stderr
  lines = ['Ein <mask> fährt nach Berlin .', '', 'Die <mask> <mask> im Park .']
  pred = run_main('--config=configs/pretrain_mlm_de.py:tiny', f'--workdir={pretrained}',
                  '--mode=predict', stdin='\n'.join(lines) + '\n')
  assert pred.returncode == 0, pred.stderr[-3000:]
  out = pred.stdout.split('\n')[:-1]
  assert len(out) == 3 and out[1] == '' and '<mask>' not in out[0] + out[2]
  assert out[0].startswith('Ein') and out[0].endswith('nach Berlin .')

  proc = run_main('--config=configs/germeval_from_mlm.py:tiny', f'--workdir={tagger}',
                  f'--config.init_from={pretrained}', '--config.test_split=',
                  f'--config.data_dir={germeval_dir}', *FEW_SHAPES)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'micro avg' in proc.stdout + proc.stderr
  assert (tagger / 'tokenizer' / 'spm.model').read_bytes() == (
      pretrained / 'tokenizer' / 'spm.model').read_bytes()
  initialized = _log_line(tagger, 'init_from initialized (')
  assert initialized.endswith('init_from initialized (2): head/bias, head/kernel'), initialized
  assert 'mlm_bias' in _log_line(tagger, 'init_from unused (')
  # A tokenizer other than the pretrained run's is a one-line error naming both files.
  (tagger / 'tokenizer' / 'spm.model').write_bytes(b'not the same')
  proc = run_main('--config=configs/germeval_from_mlm.py:tiny', f'--workdir={tagger}',
                  f'--config.init_from={pretrained}', '--config.test_split=',
                  f'--config.data_dir={germeval_dir}', *FEW_SHAPES)
  assert proc.returncode != 0
  error = proc.stderr.strip().splitlines()[-1]
  assert str(tagger / 'tokenizer' / 'spm.model') in error, error
  assert str(pretrained / 'tokenizer' / 'spm.model') in error, error


def test_cli_span_corruption_then_translation_loads_every_parameter(mono_dir, tmp_path):
  pretrained, translator = tmp_path / 'span', tmp_path / 'mt'
  proc = run_main('--config=configs/pretrain_span.py:tiny', f'--workdir={pretrained}',
                  f"--config.train_files=('{mono_dir}/de.txt', '{mono_dir}/en.txt')",
                  f"--config.eval_files=('{mono_dir}/val.txt',)", *FEW_SHAPES)
  assert proc.returncode == 0, proc.stderr[-3000:]
  pred = run_main('--config=configs/pretrain_span.py:tiny', f'--workdir={pretrained}',
                  '--mode=predict', stdin='Ein Hund <extra_id_0> über die Wiese.\n\nHallo\n')
  assert pred.returncode == 0, pred.stderr[-3000:]
  assert len(pred.stdout.split('\n')) == 4 and pred.stdout.split('\n')[1] == ''
  proc = run_main('--config=configs/multi30k_de_en_from_span.py:tiny',
                  f'--workdir={translator}', f'--config.init_from={pretrained}',
                  '--config.bleu_every_steps=0', '--config.test_split=', *FEW_SHAPES)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'step 10: train loss' in proc.stdout + proc.stderr
  summary = _log_line(translator, 'shape mismatches')
  assert summary.endswith(' loaded, 0 initialized, 0 kept by init_rules, 0 unused, 0 shape '
                          'mismatches'), summary
  assert 'train_fraction=0.02: the first 580 of 29000' in (translator / 'train.log').read_text()


def test_masked_lm_predict_cuts_a_line_longer_than_max_length(mlm_task):
  params = mlm_task.init_params(jax.random.PRNGKey(0))
  long_line = ' '.join(['Ein Hund <mask> über die Wiese .'] * 12)  # About 90 pieces > 32.
  out = mlm_task.predict(params, ['Ein <mask> .', long_line, ''])
  assert len(out) == 3 and out[2] == '' and '<mask>' not in out[0] + out[1]
  assert out[1].startswith('Ein Hund') and len(out[1]) < len(long_line)
