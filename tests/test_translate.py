"""Translation and scoring: sacreBLEU parity, batching invariance (sampling included),
the eval/translate modes, unusual input text (normalized alike in translation and
scoring; lines split on '\n' only)."""
import json
import logging
import os
import subprocess
import sys
import unicodedata

import jax
import numpy as np
import pytest
import sacrebleu

from tests.conftest import REPO, tiny_config
from transformer_jax import evaluation, scoring, sharding, tokenizer, train, translate
from transformer_jax.tasks import translation
from transformer_jax.tokenizer import EOS_ID


def test_scores_match_sacrebleu_called_directly():
  hyps = ['The cat sat on the mat.', 'A dog runs in the park!', 'two men , one ball', '']
  refs = ['The cat sat on a mat.', 'A dog is running in the park!', 'Two men, one ball.', 'x']
  result = scoring.score(hyps, refs)
  assert result['bleu'] == sacrebleu.corpus_bleu(hyps, [refs]).score
  assert result['bleu_lowercase'] == sacrebleu.corpus_bleu(hyps, [refs], lowercase=True).score
  assert result['chrf'] == sacrebleu.corpus_chrf(hyps, [refs]).score
  assert result['bleu_lowercase'] > result['bleu'] > 0
  assert result['bleu_signature'].startswith('nrefs:1|case:mixed|eff:no|tok:13a|smooth:exp')
  assert 'case:lc' in result['bleu_lowercase_signature']
  with pytest.raises(ValueError, match='3 hypotheses but 4 references'):
    scoring.score(hyps[:3], refs)


@pytest.fixture(scope='module')
def trained(small_text_dir, tmp_path_factory):
  """A tiny model trained for 100 steps with validation BLEU and a final test score."""
  workdir = str(tmp_path_factory.mktemp('trained'))
  config = tiny_config(small_text_dir, num_train_steps=100, bleu_every_steps=50, test_split='val',
                       eval_every_steps=50, checkpoint_every_steps=50, learning_rate=3e-3,
                       schedule='constant', dropout_rate=0.0, attention_dropout_rate=0.0)
  state = train.train_and_evaluate(config, workdir)
  return config, workdir, state


def test_training_keeps_best_bleu_checkpoint_and_scores_test(trained):
  config, workdir, state = trained
  assert int(state.step) == 100
  with open(os.path.join(workdir, 'best', 'score.json'), encoding='utf-8') as f:
    best = json.load(f)
  assert best['step'] in (50, 100) and 0 <= best['bleu'] <= 100
  assert sorted(os.listdir(os.path.join(workdir, 'best'))) == [str(best['step']), 'score.json']
  names = sorted(os.listdir(os.path.join(workdir, 'translations')))
  assert 'val-step50.txt' in names and 'val-step100.txt' in names
  assert f"val-best-step{best['step']}.txt" in names  # the final test score
  with open(os.path.join(workdir, 'translations', 'val-step100.txt'), encoding='utf-8') as f:
    assert len(f.read().splitlines()) == 64  # one line per source line
  log = open(os.path.join(workdir, 'train.log'), encoding='utf-8').read()
  assert 'val BLEU' in log
  # The final report's header names the decoding once (it read 'beam beam 2' once).
  assert f"INFO val (best-step{best['step']}, beam 2):\n" in log and 'beam beam' not in log


def load_translator(config, workdir, checkpoint='best'):
  """The translation task's Translator with the parameters of `checkpoint`."""
  task, params, name = evaluation.load_task(config, workdir, checkpoint)
  task.translator.params = params
  return task.translator, name


def test_batch_of_sentences_equals_each_sentence_alone(trained):
  config, workdir, _ = trained
  for decoding in ('beam', 'greedy'):
    config = tiny_config(config.data_dir, decoding=decoding, beam_size=3)
    translator, _ = load_translator(config, workdir, 'latest')
    rng = np.random.default_rng(0)
    sources = [np.append(rng.integers(4, 300, size=n), EOS_ID).astype(np.int32)
               for n in (3, 17, 9, 30, 1, 12)]
    together = translator.translate_ids(sources)
    for src, out in zip(sources, together):
      alone = translator.translate_ids([src])[0]
      np.testing.assert_array_equal(out, alone)
    assert any(len(o) > 0 for o in together)


def test_sampling_is_reproducible_whatever_the_batching(trained):
  config, workdir, _ = trained
  rng = np.random.default_rng(1)
  sources = [np.append(rng.integers(4, 300, size=n), EOS_ID).astype(np.int32)
             for n in (8, 9, 7, 17, 3)]
  a, b, c = sources[:3]
  outputs = {}
  for batch_tokens in (8192, 1):  # Batches of many rows, then of one row each.
    config = tiny_config(config.data_dir, decoding='sample', temperature=1.0,
                         decode_batch_tokens=batch_tokens)
    translator, _ = load_translator(config, workdir, 'latest')
    outputs[batch_tokens] = translator.translate_ids(sources)
    together = translator.translate_ids([a, b, c])
    alone = translator.translate_ids([c])[0]
    np.testing.assert_array_equal(together[2], alone)
    np.testing.assert_array_equal(outputs[batch_tokens][2], alone)
    repeated = translator.translate_ids([c, c, c, c])  # Each copy draws its own sample...
    np.testing.assert_array_equal(repeated[0], alone)  # ...the first one this one.
    assert len({tuple(out) for out in repeated}) > 1
    for out in outputs[batch_tokens] + repeated:
      assert not np.isin(out, [0, 2]).any()  # Never PAD or BOS.
  for x, y in zip(outputs[8192], outputs[1]):
    np.testing.assert_array_equal(x, y)
  # top_p wired through: a nucleus of (almost) nothing keeps only the best token: greedy.
  nucleus, _ = load_translator(tiny_config(config.data_dir, decoding='sample', top_p=1e-6),
                               workdir, 'latest')
  greedy, _ = load_translator(tiny_config(config.data_dir, decoding='greedy'), workdir,
                              'latest')
  for x, y in zip(nucleus.translate_ids(sources), greedy.translate_ids(sources)):
    np.testing.assert_array_equal(x, y)


def test_sample_ids_depend_on_the_sentence_and_its_repeats_only():
  a, b = np.array([5, 6, 1], np.int32), np.array([7, 1], np.int32)
  ids = translate.sample_ids([a, b, a, a.astype(np.int64), b])  # a 3 times, b twice.
  assert ids.dtype == np.uint32 and len(set(ids.tolist())) == 5  # Each copy its own.
  np.testing.assert_array_equal(translate.sample_ids([b, a]), ids[[1, 0]])  # Order-free.
  np.testing.assert_array_equal(translate.sample_ids([a, a, a]), ids[[0, 2, 3]])


def run_main(*args, stdin=None):
  return subprocess.run([sys.executable, '-m', 'transformer_jax.main', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, input=stdin)


def _config_flags(config):
  return ['--config=configs/mt.py:tiny', '--config.dataset_name=text',
          f'--config.data_dir={config.data_dir}', '--config.eval_split=val',
          '--config.test_split=val', f'--config.vocab_size={config.vocab_size}']


def test_translate_mode_keeps_line_count_order_empty_and_long_lines(trained, tmp_path):
  config, workdir, _ = trained
  long_line = ' '.join(['Ein Mann fährt mit dem Fahrrad durch die Stadt.'] * 8)
  lines = ['Ein Hund läuft.', '', 'Zwei Kinder spielen im Sand.', long_line, '   ', 'Hallo']
  (tmp_path / 'in.txt').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  proc = run_main(*_config_flags(config), f'--workdir={workdir}', '--mode=translate',
                  f'--input={tmp_path}/in.txt', f'--output={tmp_path}/out.txt')
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = (tmp_path / 'out.txt').read_text(encoding='utf-8').split('\n')
  assert out[-1] == '' and len(out[:-1]) == len(lines)
  assert out[1] == '' and out[4] == ''
  assert all(out[i] for i in (0, 2, 3, 5))
  assert 'longer than max_source_length' in proc.stderr
  # Same translations through stdin/stdout, and line by line: the order is kept.
  piped = run_main(*_config_flags(config), f'--workdir={workdir}', '--mode=translate',
                   stdin='\n'.join(lines) + '\n')
  assert piped.stdout.split('\n') == out
  translator, _ = load_translator(config, workdir, 'best')
  assert [translator.translate([line])[0] for line in lines] == out[:-1]


def test_eval_mode_prints_sacrebleu_report(trained):
  config, workdir, _ = trained
  proc = run_main(*_config_flags(config), f'--workdir={workdir}', '--mode=eval',
                  '--split=val', '--checkpoint=latest', '--config.decoding=greedy')
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert 'val (step100, greedy)' in proc.stdout
  lines = proc.stdout.splitlines()
  assert lines[1].startswith('bleu ') and 'nrefs:1|case:mixed|eff:no|tok:13a' in lines[1]
  assert lines[2].startswith('bleu_lowercase ') and 'case:lc' in lines[2]
  assert lines[3].startswith('chrf ') and 'nc:6|nw:0' in lines[3]
  assert os.path.exists(os.path.join(workdir, 'translations', 'val-step100.txt'))


def test_checkpoint_averaging_averages_parameters(trained):
  config, workdir, _ = trained
  config = tiny_config(config.data_dir, average_checkpoints=2)
  translator, name = load_translator(config, workdir)
  assert name == 'avg2-step100'
  from transformer_jax import checkpoints, optim, tasks  # pylint: disable=g-import-not-at-top
  mesh = sharding.make_mesh()
  task = tasks.create(config, workdir, mesh)
  task.setup(training=False)
  state = train.create_state(task, optim.make_optimizer(config), config.seed, mesh)
  manager = checkpoints.make_manager(workdir, 3)
  p20 = checkpoints.restore(manager, state, 50).params
  p40 = checkpoints.restore(manager, state, 100).params
  manager.close()
  for avg, a, b in zip(jax.tree.leaves(translator.params), jax.tree.leaves(p20),
                       jax.tree.leaves(p40)):
    np.testing.assert_allclose(avg, (a + b) / 2, rtol=1e-6)


def test_early_stopping_after_patience_evaluations_without_gain(small_text_dir, tmp_path):
  # A learning rate too small to change the translations: BLEU never improves.
  config = tiny_config(small_text_dir, bleu_every_steps=10, eval_every_steps=10, patience=2,
                       num_train_steps=200, learning_rate=1e-9, schedule='constant',
                       test_split='', decode_max_length_ratio=0.5, decode_max_length_offset=2)
  state = train.train_and_evaluate(config, str(tmp_path))
  # Best at step 10; steps 20 and 30 bring no gain: stop at 30, with a checkpoint there.
  assert int(state.step) == 30
  assert '30' in os.listdir(tmp_path / 'checkpoints')
  assert 'Early stopping at step 30' in (tmp_path / 'train.log').read_text()


def test_eval_and_translate_errors_are_one_line(trained):
  config, workdir, _ = trained
  flags = [*_config_flags(config), f'--workdir={workdir}']
  wrong_model = run_main(*flags, '--mode=translate', '--config.d_model=64', stdin='Hallo\n')
  assert wrong_model.returncode == 1
  assert wrong_model.stderr.strip().splitlines()[-1] == (
      f'error: config.d_model=64, but the model in {workdir} was trained with 32: '
      'pass --config.d_model=32')
  two_fields = run_main(*flags, '--mode=translate', '--config.d_model=64', '--config.d_ff=96',
                        stdin='Hallo\n')
  assert two_fields.returncode == 1
  assert two_fields.stderr.strip().splitlines()[-1] == (
      f'error: config.d_model=64, config.d_ff=96, but the model in {workdir} was trained with '
      f'd_model=32, d_ff={config.d_ff}: pass --config.d_model=32 --config.d_ff={config.d_ff} '
      '(or the config file and variant, e.g. :tiny, it was trained with)')
  bad_split = run_main(*flags, '--mode=eval', '--split=nosuch')
  assert bad_split.returncode == 1
  assert bad_split.stderr.strip().splitlines()[-1].startswith(
      f'error: no such file: tried {config.data_dir}/nosuch.de.gz')
  multi30k_split = run_main('--config=configs/mt.py:tiny', f'--workdir={workdir}',
                            '--mode=eval', '--split=test')
  assert multi30k_split.stderr.strip().splitlines()[-1] == (
      "error: split 'test': Multi30k has the splits train, validation, test_2016")
  latin1 = os.path.join(workdir, 'latin1.txt')
  with open(latin1, 'wb') as f:
    f.write('Ein Mädchen läuft.\n'.encode('latin-1'))
  not_utf8 = run_main(*flags, '--mode=translate', f'--input={latin1}')
  assert not_utf8.returncode == 1
  assert not_utf8.stderr.strip().splitlines()[-1].startswith(
      f'error: --input={latin1}: not UTF-8 text (invalid continuation byte')


def test_scoring_normalizes_hypotheses_and_references_alike(tmp_path):
  hyps = ['Ein Mann fährt über die Brücke.', 'Zwei Hunde spielen im Schnee.']
  refs = [unicodedata.normalize('NFD', hyps[0]),            # Decomposed umlauts.
          'Zwei\tHunde\xa0spielen im Schn\u200bee.\x00']     # Tab, NBSP, zero-width, NUL.
  assert scoring.score(hyps, refs)['bleu'] == pytest.approx(100)
  assert scoring.score(hyps, refs, normalize=False)['bleu'] < 100
  assert scoring.score(refs, hyps)['chrf'] == pytest.approx(100)  # Either side.

  class Echo:  # A "model" that outputs its source: score_split must find a perfect score.
    def translate(self, sentences, name, check_unknown):
      return list(sentences)

  result = translation.score_split(Echo(), hyps, refs, str(tmp_path), 'echo')
  assert result['bleu'] == pytest.approx(100) and result['chrf'] == pytest.approx(100)


@pytest.fixture(scope='module')
def translator(trained):
  config, workdir, _ = trained
  return load_translator(config, workdir, 'latest')[0]


PLAIN = 'Ein Mann fährt über die Brücke.'


def _translates_as(translator, text, plain=PLAIN):
  """`text` has the pieces of `plain`, and so its translation."""
  assert translator.sp.encode(tokenizer.clean(text)) == translator.sp.encode(plain)
  out = translator.translate([text, plain])
  assert out[0] == out[1] and len(out) == 2


def test_nfd_input_translates_as_its_nfc_form(translator):
  nfd = unicodedata.normalize('NFD', PLAIN)
  assert nfd != PLAIN
  _translates_as(translator, nfd)


def test_tabs_and_unicode_spaces_are_spaces(translator):
  _translates_as(translator, '\tEin\xa0Mann  fährt\u2009über die\u3000Brücke. \u202f')


def test_zero_width_characters_are_removed(translator):
  # Zero-width space, soft hyphen, joiner, BOM, word joiner, LRM: removed, not spaces.
  _translates_as(translator, 'Ein Ma\u200bnn fä\xadhrt\u200d über\ufeff die Brü\u2060cke.\u200e')


def test_control_characters_never_crash_or_split_a_line(translator):
  lines = ['Ein\x00 Mann\x07 fährt\x7f über\x9b die Brücke.',            # Removed.
           'Ein\x1cMann\x0bfährt\x85über\u2028die\rBrücke.\u2029',        # Separators: spaces.
           '\x00\x01\x1b', '\u200b\ufeff', 'Hallo']
  out = translator.translate(lines)
  assert len(out) == len(lines) and all(len(o.splitlines()) <= 1 for o in out)
  plain, hallo = translator.translate([PLAIN, 'Hallo'])
  assert out == [plain, plain, '', '', hallo]  # Nothing left: an empty line.


def test_a_5000_character_line_is_translated_in_full_with_one_warning(trained, caplog):
  config, workdir, _ = trained
  translator, _ = load_translator(config, workdir, 'latest')  # Nothing warned yet.
  long_line = ('Ein Mann fährt mit dem Fahrrad durch die Stadt. ' * 110)[:5000]
  assert len(translator.sp.encode(long_line)) > 10 * config.max_source_length
  with caplog.at_level(logging.WARNING):
    out = translator.translate(['Hallo', long_line, 'Hallo'], 'long.txt')
    assert len(out) == 3 and out[0] == out[2] and out[1] and '\n' not in out[1]
    translator.translate([long_line], 'long.txt')  # Warned once per input.
    translator.translate([long_line, 'Hallo', long_line], 'two.txt')
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert warnings == [
      'long.txt: 1 line is longer than max_source_length=32 tokens and is translated in '
      'full, beyond the lengths seen in training (line 2)',
      'two.txt: 2 lines are longer than max_source_length=32 tokens and are translated in '
      'full, beyond the lengths seen in training (lines 1, 3)']


def _run_bytes(*args, stdin=b''):
  """The CLI with bytes in and out (no newline translation), without
  TF_CPP_MIN_LOG_LEVEL in its environment."""
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  return subprocess.run([sys.executable, '-m', 'transformer_jax.main', *args], cwd=REPO,
                        capture_output=True, timeout=600, input=stdin, env=env)


def test_translate_mode_splits_lines_at_newline_only(trained, tmp_path):
  config, workdir, _ = trained
  lines = ['Ein Hund läuft.', 'Ein Hund\rläuft.', 'Ein\x0bHund\x0cläuft.',
           'Ein\x1cHund\x1dläuft.\x1e', 'Ein\x85Hund\u2028läuft.\u2029', '',
           'Ein Mann ☃ fährt 🚲 nach 東京.', 'Zwei Kinder spielen.\r']  # The last: a CRLF line.
  data = ('\n'.join(lines) + '\n').encode('utf-8')
  (tmp_path / 'in.txt').write_bytes(data)
  flags = [*_config_flags(config), f'--workdir={workdir}', '--mode=translate']
  by_file = _run_bytes(*flags, f'--input={tmp_path}/in.txt', f'--output={tmp_path}/out.txt')
  assert by_file.returncode == 0, by_file.stderr[-2000:]
  out = (tmp_path / 'out.txt').read_bytes()
  piped = _run_bytes(*flags, stdin=data)
  assert piped.returncode == 0, piped.stderr[-2000:]
  assert piped.stdout == out
  translator, _ = load_translator(config, workdir, 'best')
  expected = [translator.translate([line])[0] for line in lines]
  assert out.decode('utf-8').split('\n') == expected + ['']
  assert expected[1] == expected[2] == expected[3] == expected[4] == expected[0]
  assert expected[5] == ''
  for proc, name in ((by_file, f'--input={tmp_path}/in.txt'), (piped, 'stdin')):
    stderr = proc.stderr.decode('utf-8')
    assert f'{name}: ' in stderr and 'are unknown' in stderr and 'spm_byte_fallback' in stderr
    assert 'absl::InitializeLog' not in stderr and 'oneDNN' not in stderr


def test_eval_loads_the_parameters_whatever_optimizer_the_config_now_builds(trained):
  # The optimizer state is not restored: an optimizer of another structure (no clipping,
  # layer-wise decay, SGD) loads the same parameters the training process ended with.
  config, workdir, state = trained
  other = config.copy_and_resolve_references()
  other.max_grad_norm, other.layer_lr_decay, other.optimizer = 0.0, 0.5, 'sgd'
  _, params, name = evaluation.load_task(other, workdir, 'latest')
  assert name == 'step100'
  for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state.params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
