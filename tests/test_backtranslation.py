"""Back-translation (transformer_jax/backtranslation.py): resumable generation of synthetic
pairs with a reverse model, and training with them mixed in (ratio, '<BT>' tag)."""
import gzip
import math
import os
import re
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import REPO, head, tiny_config
from transformer_jax import backtranslation, data, evaluation, sharding, tokenizer, train
from transformer_jax.config_schema import ConfigError
from transformer_jax.multi30k import DataError
from transformer_jax.tasks import translation


def run_main(*args):
  return subprocess.run([sys.executable, '-m', 'transformer_jax.main', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600)


@pytest.fixture(scope='module')
def reverse_run(small_text_dir, tmp_path_factory):
  """A tiny de→en model (30 steps): the 'reverse' model that back-translates German."""
  workdir = str(tmp_path_factory.mktemp('reverse'))
  config = tiny_config(small_text_dir, num_train_steps=30, checkpoint_every_steps=30,
                       eval_every_steps=30, learning_rate=3e-3, schedule='constant',
                       dropout_rate=0.0, attention_dropout_rate=0.0)
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope='module')
def mono(data_dir, tmp_path_factory):
  """Two German monolingual files: mono.de (30 lines + 2 blank ones and a line of
  invisible characters; a repeated line) and mono2.de.gz (20 lines)."""
  out = tmp_path_factory.mktemp('mono')
  lines = head(os.path.join(data_dir, 'mono', 'train.1.de.gz'), 50)
  first = lines[:10] + ['', lines[3]] + lines[10:20] + ['  \t ', '\u200b'] + lines[20:30]
  (out / 'mono.de').write_text('\n'.join(first) + '\n', encoding='utf-8')
  with gzip.open(out / 'mono2.de.gz', 'wt', encoding='utf-8') as f:
    f.write('\n'.join(lines[30:50]) + '\n')
  expected = [tokenizer.one_line(line) for line in first + lines[30:50]
              if tokenizer.one_line(line)]
  assert len(expected) == 51
  return [str(out / 'mono.de'), str(out / 'mono2.de.gz')], expected


def loader(config, workdir):
  """`backtranslate`'s `load`: the model loaded once (its compiled searches reused)."""
  loaded = []

  def load():
    if not loaded:
      task, params, name = evaluation.load_task(config, workdir, 'best')
      task.translator.params = params
      loaded.append((task.translator, name))
    return loaded[0]
  return load


def settings(config, workdir):
  return {'workdir': os.path.abspath(workdir),
          'decoding': backtranslation.decoding_settings(config)}


def read_pairs(path):
  with open(path, encoding='utf-8', newline='\n') as f:
    return [line.rstrip('\n').split('\t') for line in f]


@pytest.mark.parametrize('decoding', ['beam', 'greedy'])
def test_pairs_follow_the_input_and_sources_equal_translate_mode(decoding, reverse_run, mono,
                                                                 tmp_path):
  config, workdir = reverse_run
  config = tiny_config(config.data_dir, decoding=decoding, beam_size=3)
  files, expected = mono
  output = str(tmp_path / 'synthetic.tsv')
  load = loader(config, workdir)
  stats = backtranslation.backtranslate(load, files, output, settings(config, workdir),
                                        chunk_lines=16)
  assert stats['pairs'] == stats['new'] == 51 and stats['blank'] == 3
  assert stats['checkpoint'] == 'step30'
  pairs = read_pairs(output)
  assert [t for _, t in pairs] == expected  # One pair per non-blank line, in order.
  # What --mode=translate (the task's predict: Translator.translate of all lines at
  # once, batched otherwise) gives for the same lines.
  translator, _ = load()
  assert [s for s, _ in pairs] == translator.translate(expected)
  assert sum(1 for s, _ in pairs if s) >= 45  # The model writes something.


def test_sampling_resumes_byte_for_byte_after_a_crash_and_a_torn_line(reverse_run, mono,
                                                                     tmp_path):
  config, workdir = reverse_run
  config = tiny_config(config.data_dir, decoding='sample', top_k=10, seed=7)
  files, expected = mono
  load, keep = loader(config, workdir), settings(config, workdir)
  whole = str(tmp_path / 'whole.tsv')
  backtranslation.backtranslate(load, files, whole, keep, chunk_lines=16)
  reference = open(whole, 'rb').read()
  assert reference.count(b'\n') == 51

  # A run killed after its second chunk (of 16 lines), then a torn half-written line.
  class Killed(Exception):
    pass

  def kill_after_chunk_1(chunk):
    if chunk == 1:
      raise Killed
  part = str(tmp_path / 'part.tsv')
  with pytest.raises(Killed):
    backtranslation.backtranslate(load, files, part, keep, chunk_lines=16,
                                  after_chunk=kill_after_chunk_1)
  assert open(part, 'rb').read() == reference[:len(b''.join(
      reference.splitlines(keepends=True)[:32]))]
  with open(part, 'ab') as f:
    f.write('Ein halber Sa'.encode('utf-8'))
  stats = backtranslation.backtranslate(load, files, part, keep, chunk_lines=16)
  assert stats['new'] == 51 - 32
  assert open(part, 'rb').read() == reference

  # Killed inside a chunk (21 complete lines, a torn 22nd): the chunk is redone, its
  # first 5 lines are not written twice.
  lines = reference.splitlines(keepends=True)
  with open(part, 'wb') as f:
    f.write(b''.join(lines[:21]) + lines[21][:7])
  assert backtranslation.backtranslate(load, files, part, keep, chunk_lines=16)['new'] == 30
  assert open(part, 'rb').read() == reference

  # A complete file: nothing to do, the model is not even loaded.
  def no_load():
    raise AssertionError('loaded a model for a complete file')
  assert backtranslation.backtranslate(no_load, files, part, keep, chunk_lines=16)['new'] == 0
  assert open(part, 'rb').read() == reference

  # Sampling: the same seed gives the same file (a new model load: nothing cached).
  again = str(tmp_path / 'again.tsv')
  backtranslation.backtranslate(loader(config, workdir), files, again, keep, chunk_lines=16)
  assert open(again, 'rb').read() == reference
  sources = [s for s, _ in read_pairs(whole)]
  # The repeated line (input lines 4 and 12, one chunk) got two different samples.
  assert expected[3] == expected[10] and sources[3] != sources[10]

  # Other settings, or a file written from other input: one-line errors.
  with pytest.raises(DataError, match=r"was begun with other settings \(decoding: .*'sample'"):
    backtranslation.backtranslate(load, files, part, settings(reverse_run[0], workdir),
                                  chunk_lines=16)
  with pytest.raises(DataError, match=r"was begun with other settings \(inputs: "):
    backtranslation.backtranslate(load, files[1:], part, keep, chunk_lines=16)
  edited = tmp_path / 'edited.de'  # Same file name, other text.
  edited.write_text('\n'.join(expected[:20]) + '\n', encoding='utf-8')
  with pytest.raises(Killed):
    backtranslation.backtranslate(load, [str(edited)], str(tmp_path / 'e.tsv'), keep,
                                  chunk_lines=16, after_chunk=kill_after_chunk_1)
  edited.write_text('\n'.join(expected[:1] + ['Anders.'] + expected[2:20]) + '\n',
                    encoding='utf-8')
  with pytest.raises(DataError, match=r'e.tsv:2: is not a pair for .*edited.de:2; the file'):
    backtranslation.backtranslate(load, [str(edited)], str(tmp_path / 'e.tsv'), keep,
                                  chunk_lines=16)
  (tmp_path / 'mine.tsv').write_text('a\tb\n')
  with pytest.raises(DataError, match='exists and was not written by --mode=backtranslate'):
    backtranslation.backtranslate(load, files, str(tmp_path / 'mine.tsv'), keep)


def test_bad_inputs_are_one_line_errors_naming_file_and_line(tmp_path):
  with pytest.raises(DataError, match=f'--input: {tmp_path}/none.txt: no such file'):
    backtranslation.expand(f'{tmp_path}/none.txt', '--input')
  with pytest.raises(DataError, match=re.escape(f'--input: {tmp_path}/x*.gz: no such file')):
    backtranslation.expand(f'{tmp_path}/x*.gz', '--input')
  (tmp_path / 'empty.en').write_text('')
  (tmp_path / 'blank.en').write_text('\n  \n')
  (tmp_path / 'bad.en').write_bytes(b'A dog.\nA cat.\nA \xff bird.\n')
  for name, message in (('empty.en', 'no sentence in the file (it is empty)'),
                        ('blank.en', 'no sentence in the file (its 2 lines are blank)'),
                        ('bad.en', 'invalid UTF-8')):
    with pytest.raises(DataError) as e:
      backtranslation.read_monolingual([str(tmp_path / name)])
    assert str(e.value).startswith(f'{tmp_path / name}' + (':3: ' if name == 'bad.en' else ': '))
    assert message in str(e.value) and '\n' not in str(e.value)
  (tmp_path / 'syn.tsv').write_text('Ein Hund.\tA dog.\nEine Katze. A cat.\n')
  with pytest.raises(DataError, match=re.escape(f'{tmp_path}/syn.tsv:2: expected '
                                                'source<TAB>target, found 0 tabs')):
    backtranslation.read_synthetic([str(tmp_path / 'syn.tsv')])
  (tmp_path / 'syn.tsv').write_text('\tA dog.\nEin Hund.\t\n\n')
  with pytest.raises(DataError, match='config.synthetic_pairs: no sentence pair in'):
    backtranslation.read_synthetic([str(tmp_path / 'syn.tsv')])


def test_mix_reaches_the_ratio_by_upsampling_the_smaller_side():
  real, synthetic = backtranslation.mix(100, 500, 0.5, seed=0)
  assert len(real) == len(synthetic) == 500 and np.bincount(real).tolist() == [5] * 100
  real, synthetic = backtranslation.mix(100, 500, 0.8, seed=0)  # 125 real: 1 copy + 25
  assert len(real) == 125 and len(synthetic) == 500 and set(np.bincount(real)) == {1, 2}
  real, synthetic = backtranslation.mix(100, 20, 0.3, seed=0)  # 43 synthetic
  assert len(real) == 100 and len(synthetic) == 43
  assert abs(len(synthetic) / 143 - 0.3) < 0.005
  real, synthetic = backtranslation.mix(100, 20, 0.0, seed=0)
  assert real.tolist() == list(range(100)) and synthetic.tolist() == list(range(20))
  assert all((a == b).all() for a, b in zip(backtranslation.mix(100, 500, 0.8, seed=3),
                                            backtranslation.mix(100, 500, 0.8, seed=3)))


@pytest.fixture(scope='module')
def synthetic_tsv(data_dir, tmp_path_factory):
  """600 'synthetic' pairs (mono German captions -> mono English captions, not
  translations: only the counting matters), plus 2 with an empty side."""
  de = head(os.path.join(data_dir, 'mono', 'train.2.de.gz'), 600)
  en = head(os.path.join(data_dir, 'mono', 'train.2.en.gz'), 600)
  path = tmp_path_factory.mktemp('syn') / 'synthetic.tsv'
  path.write_text(''.join(f'{s}\t{t}\n' for s, t in zip(de, en)) + '\tx\ny\t\n',
                  encoding='utf-8')
  return str(path), en


def setup_task(config, workdir):
  task = translation.TranslationTask(config, str(workdir), sharding.config_mesh(config))
  task.setup(training=True)
  return task


@pytest.mark.parametrize('pack', [True, False])
def test_training_stream_mixes_real_and_tagged_synthetic_pairs_by_ratio(
    pack, small_text_dir, synthetic_tsv, tmp_path):
  path, synthetic_targets = synthetic_tsv
  config = tiny_config(small_text_dir, synthetic_pairs=path, synthetic_ratio=0.5,
                       synthetic_tag=True, pack_examples=pack, max_source_length=128,
                       max_target_length=128)
  task = setup_task(config, tmp_path)
  tag = tokenizer.symbol_ids(task.sp)[tokenizer.BT_TAG]
  assert tag == tokenizer.UNK_ID + 1  # A reserved single id, typed text never gives it.
  assert tag not in task.sp.encode(f'Ein {tokenizer.BT_TAG} Hund <BT>')
  # The built lists: 256 real pairs upsampled to 600, 600 synthetic (no empty side).
  tagged = [s[0] == tag for s in task.train_src]
  assert len(task.train_src) == 1200 and sum(tagged) == 600
  assert sum(int(np.count_nonzero(s == tag)) for s in task.train_src) == 600  # First only.
  assert ({tuple(t) for t, is_syn in zip(task.train_tgt, tagged) if is_syn}
          == {tuple(t) for t in data.encode(task.sp, synthetic_targets, 128, False)})
  # The batches: half of the pairs have a tagged source.
  pairs = synthetic = 0
  batches = task.train_batches(config.seed, 0)
  first = [next(batches) for _ in range(60)]
  for batch in first:
    starts = (batch['inputs_position'] == 0 if pack else
              np.arange(batch['inputs'].shape[1]) == 0) & (batch['inputs'] != 0)
    pairs += int(starts.sum())
    synthetic += int(((batch['inputs'] == tag) & starts).sum())
    assert int((batch['inputs'] == tag).sum()) == int(((batch['inputs'] == tag) & starts).sum())
  assert pairs > 400 and abs(synthetic / pairs - 0.5) < 0.1, (synthetic, pairs)
  # Exact resume: skipping k batches gives batch k of the stream.
  resumed = next(task.train_batches(config.seed, 7))
  assert all((resumed[k] == first[7][k]).all() for k in first[7])


def test_tag_needs_a_tokenizer_that_reserves_it(small_text_dir, synthetic_tsv, tmp_path):
  config = tiny_config(small_text_dir, synthetic_pairs=synthetic_tsv[0],
                       max_source_length=128, max_target_length=128)
  task = setup_task(config, tmp_path)  # Untagged: a tokenizer without '<BT>'.
  assert tokenizer.BT_TAG not in tokenizer.symbol_ids(task.sp)
  assert len(task.train_src) == 256 + 600  # synthetic_ratio=0: every pair once.
  config.synthetic_tag = True
  with pytest.raises(ConfigError, match=r"config.synthetic_tag=True: the tokenizer has no "
                                        r"'<BT>' symbol"):
    setup_task(config, tmp_path)


def test_command_line_generates_then_trains_with_the_synthetic_pairs(reverse_run, mono,
                                                                    tmp_path):
  config, workdir = reverse_run
  files, expected = mono
  output = tmp_path / 'synthetic.tsv'
  proc = run_main('--config=configs/mt.py:tiny', f'--workdir={workdir}',
                  '--mode=backtranslate', f'--input={os.path.dirname(files[0])}/mono*',
                  f'--output={output}', '--config.decoding=greedy', '--checkpoint=latest',
                  '--config.vocab_size=300')
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert 'backtranslate: 51 sentences from 2 file(s), 3 blank lines skipped' in proc.stderr
  assert re.search(r'wrote .*synthetic.tsv: 51 pairs \(51 new in [\d.]+ s, [\d.]+ '
                   r'sentences/s\)', proc.stderr)
  greedy = tiny_config(config.data_dir, decoding='greedy')
  task, params, _ = evaluation.load_task(greedy, workdir, 'latest')
  pairs = read_pairs(output)
  assert [t for _, t in pairs] == expected
  assert [s for s, _ in pairs] == task.predict(params, expected)

  # German targets, synthetic English sources: an en→de model trains on them.
  final = tmp_path / 'final'
  proc = run_main('--config=configs/mt.py:tiny', f'--workdir={final}',
                  '--config.dataset_name=text', f'--config.data_dir={config.data_dir}',
                  '--config.source_lang=en', '--config.target_lang=de',
                  '--config.eval_split=val', '--config.test_split=', '--config.vocab_size=300',
                  '--config.max_source_length=128', '--config.max_target_length=128',
                  '--config.num_train_steps=10', '--config.bleu_every_steps=0',
                  '--config.eval_every_steps=10', '--config.checkpoint_every_steps=10',
                  f'--config.synthetic_pairs={output}', '--config.synthetic_ratio=0.5',
                  '--config.synthetic_tag=True')
  assert proc.returncode == 0, proc.stderr[-3000:]
  log = (final / 'train.log').read_text(encoding='utf-8')
  empty = sum(1 for s, _ in pairs if not s)
  assert re.search(rf'Back-translation: 256 real pairs .* \+ {51 - empty} synthetic pairs '
                   r'.* training pairs, \d+\.\d% synthetic \(synthetic_ratio=0.5\); '
                   r'synthetic sources tagged: <BT> \(id 4\)', log), log[-3000:]
  losses = [float(x) for x in re.findall(r'step \d+: train loss ([\d.naif]+)', log)]
  assert losses and all(math.isfinite(x) for x in losses), log[-3000:]

  # Bad input on the command line: one line.
  proc = run_main('--config=configs/mt.py:tiny', f'--workdir={workdir}',
                  '--mode=backtranslate', f'--input={tmp_path}/none*.gz', f'--output={output}')
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines() == [f'error: --input: {tmp_path}/none*.gz: no such file']
