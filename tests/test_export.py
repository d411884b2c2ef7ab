"""--mode=export (transformer_jax.export) and the exported translator (transformer_jax.serving):
its translations equal the in-process Translator's, and loading it needs no training code."""
import json
import os
import shutil
import stat
import subprocess
import sys
import unicodedata

import jax
import ml_dtypes
import numpy as np
import pytest

from tests.conftest import REPO, tiny_config
from transformer_jax import checkpoints, export, init_from, serving, train, translate
from transformer_jax.config_schema import ConfigError

# Loads an export folder and translates the lines of a JSON file greedily and by beam
# search; prints the outputs and the modules it imported.
_SERVE = r'''
import json, sys
from transformer_jax import serving
folder, lines_file = sys.argv[1:]
with open(lines_file, encoding='utf-8') as f:
  lines = json.load(f)
translator = serving.ExportedTranslator(folder)
result = {d: translator.translate(lines, d) for d in ('greedy', 'beam')}
print(json.dumps({**result, 'modules': sorted(sys.modules)}))
'''
# Nothing of the training side may be imported by the loader.
_FORBIDDEN = ('flax', 'optax', 'orbax', 'tensorflow', 'ml_collections')
_ALLOWED_OWN = {'transformer_jax', 'transformer_jax.serving', 'transformer_jax.textnorm'}


@pytest.fixture(scope='module')
def run(small_text_dir, tmp_path_factory):
  """A tiny de→en model trained for 60 steps: its config and workdir."""
  workdir = str(tmp_path_factory.mktemp('run'))
  config = tiny_config(small_text_dir, num_train_steps=60, eval_every_steps=60,
                       checkpoint_every_steps=60, learning_rate=3e-3, schedule='constant',
                       dropout_rate=0.0, attention_dropout_rate=0.0)
  train.train_and_evaluate(config, workdir)
  return config, workdir


@pytest.fixture(scope='module')
def exported(run, tmp_path_factory):
  """The run exported by run_export: (folder, manifest)."""
  config, workdir = run
  folder = str(tmp_path_factory.mktemp('exported') / 'de_en')
  return folder, export.run_export(config, workdir, folder, 'best')


def _in_process(config, workdir) -> dict:
  """{decoding: the in-process Translator} for greedy and beam search, with the run's best
  parameters."""
  from transformer_jax import evaluation  # pylint: disable=g-import-not-at-top
  task, params, _ = evaluation.load_task(config, workdir, 'best')
  return {d: translate.Translator(task.model, params, task.sp,
                                  tiny_config(config.data_dir, decoding=d), task.mesh, task.rules)
          for d in ('greedy', 'beam')}


def fifty_lines(sp, text_dir: str, limit: int) -> list[str]:
  """50 lines: 46 captions of 17 to `limit` tokens (one bucket, EOS included), one of
  them again with a tab, NBSP, zero-width space and decomposed umlauts, an empty and a
  blank line, and one line longer than `limit` tokens (translated in its own bucket)."""
  captions = []
  for split in ('val', 'train'):
    with open(os.path.join(text_dir, f'{split}.de'), encoding='utf-8') as f:
      captions += [line.rstrip('\n') for line in f]
  fitting = [c for c in captions if 16 < len(sp.encode(c)) + 1 <= limit][:46]
  assert len(fitting) == 46
  odd = unicodedata.normalize('NFD', fitting[3]).replace(' ', '\t', 1).replace(
      ' ', '\xa0', 1).replace(' ', ' \u200b', 1)
  long_line = f'{fitting[0]} {fitting[1]}'
  assert limit < len(sp.encode(long_line)) + 1 <= 64
  return fitting[:20] + ['', odd, long_line, '  \t '] + fitting[20:]


def test_manifest_params_and_tokenizer_are_the_runs(run, exported):
  config, workdir = run
  folder, manifest = exported
  assert manifest == serving.read_manifest(folder)
  umask = os.umask(0)
  os.umask(umask)
  assert stat.S_IMODE(os.stat(folder).st_mode) == 0o777 & ~umask  # Not mkdtemp's 0700.
  assert sorted(os.listdir(folder)) == ['beam.jax_exported', 'greedy.jax_exported',
                                        'manifest.json', 'params.npz', 'spm.model']
  assert manifest['checkpoint']['step'] == 60 and manifest['checkpoint']['name'] == 'step60'
  assert (manifest['source_lang'], manifest['target_lang']) == ('de', 'en')
  assert manifest['jax_version'] == jax.__version__
  assert manifest['special_ids'] == {'pad': 0, 'eos': 1, 'bos': 2, 'unk': 3}
  assert manifest['vocab_size'] == manifest['model']['vocab_size'] == config.vocab_size
  assert manifest['model']['d_model'] == 32 and manifest['model']['num_heads'] == 2
  assert manifest['inputs'] == {'max_source_length': 32, 'buckets': [8, 16, 32],
                                'long_bucket_multiple': 64}
  assert manifest['decoding'] == {'default': 'beam', 'beam_size': 2, 'length_penalty': 0.6,
                                  'max_length_ratio': 1.5, 'max_length_offset': 10,
                                  'batch_tokens': 8192}
  assert 'cpu' in manifest['platforms'] and 'cuda' in manifest['platforms']
  with open(os.path.join(folder, 'spm.model'), 'rb') as a, open(
      os.path.join(workdir, 'tokenizer', 'spm.model'), 'rb') as b:
    assert a.read() == b.read()
  # The stored parameters are the checkpoint's, bit for bit, under their paths.
  manager = checkpoints.make_manager(workdir, 1)
  try:
    restored = manager.restore(60)['params']
  finally:
    manager.close()
  expected = init_from.flatten(restored)[0]
  params = serving.load_params(os.path.join(folder, 'params.npz'), {})
  assert sorted(params) == sorted(expected) and len(params) > 20
  assert sum(v.size for v in params.values()) == manifest['params']['num_params']
  for name, value in expected.items():
    np.testing.assert_array_equal(params[name], value)


def test_exported_translations_equal_in_process_ones_without_training_code(run, exported,
                                                                           tmp_path):
  config, workdir = run
  folder, _ = exported
  translators = _in_process(config, workdir)
  lines = fifty_lines(translators['greedy'].sp, config.data_dir, config.max_source_length)
  (tmp_path / 'lines.json').write_text(json.dumps(lines), encoding='utf-8')
  # The loader runs in a fresh interpreter while this one translates in process.
  serve = subprocess.Popen([sys.executable, '-c', _SERVE, folder, str(tmp_path / 'lines.json')],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  expected = {d: translator.translate(lines) for d, translator in translators.items()}
  stdout, stderr = serve.communicate(timeout=300)
  assert serve.returncode == 0, stderr[-3000:]
  served = json.loads(stdout)
  for decoding in ('greedy', 'beam'):
    assert len(served[decoding]) == 50
    assert served[decoding] == expected[decoding], decoding
    assert served[decoding][20] == served[decoding][23] == ''  # Empty and blank lines.
    assert served[decoding][21] == served[decoding][3]  # Normalized as in training.
    assert len(set(served[decoding])) > 25  # Real, varied translations.
  assert expected['greedy'] != expected['beam']
  assert 'longer than max_source_length=32' in stderr  # The long line, warned about.
  modules = served['modules']
  assert 'transformer_jax.serving' in modules and 'jax' in modules
  assert {m for m in modules if m.split('.')[0] == 'transformer_jax'} == _ALLOWED_OWN
  assert not [m for m in modules if m.split('.')[0] in _FORBIDDEN]


def test_export_errors_are_one_line(run, exported, tmp_path):
  config, workdir = run
  folder, _ = exported
  # Through the command line (checked at the end): an existing, non-empty output folder.
  cli = subprocess.Popen(
      [sys.executable, '-m', 'transformer_jax.main', '--config=configs/mt.py:tiny',
       f'--workdir={workdir}', '--mode=export', f'--output={folder}'], cwd=REPO,
      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
  # Not a translation task.
  with pytest.raises(ConfigError, match=r"^--mode=export: config.task='classification'; only "
                     'translation models can be exported$'):
    export.run_export(tiny_config(config.data_dir, task='classification'), workdir,
                      str(tmp_path / 'a'), 'best')
  # A workdir with the tokenizer but no checkpoint: nothing is written.
  empty = tmp_path / 'no_checkpoints'
  shutil.copytree(os.path.join(workdir, 'tokenizer'), empty / 'tokenizer')
  with pytest.raises(FileNotFoundError, match=r'checkpoints: no checkpoints$'):
    export.run_export(config, str(empty), str(tmp_path / 'b'), 'best')
  assert not (tmp_path / 'b').exists()
  # The loader: an unknown decoding, another format version.
  translator = serving.ExportedTranslator(folder)
  with pytest.raises(ValueError, match=r"^decoding='sample': the export has greedy and beam$"):
    translator.translate(['Ein Hund.'], 'sample')
  with pytest.raises(TypeError, match=r'a list of lines, not one string'):
    translator.translate('Ein Hund.')  # Would be one line per character.
  copy = tmp_path / 'v2'
  shutil.copytree(folder, copy)
  manifest = json.loads((copy / 'manifest.json').read_text(encoding='utf-8'))
  (copy / 'manifest.json').write_text(json.dumps({**manifest, 'format_version': 2}))
  with pytest.raises(ValueError, match=r'version 2; this loader reads .* version 1$'):
    serving.ExportedTranslator(str(copy))
  with pytest.raises(FileNotFoundError, match=r'manifest.json: no such file'):
    serving.ExportedTranslator(str(tmp_path))
  _, stderr = cli.communicate(timeout=300)
  assert cli.returncode == 1
  assert stderr.strip().splitlines()[-1] == (
      f'error: --output={folder}: already exists and is not an empty folder; choose a new one')


def test_bfloat16_parameters_round_trip_through_npz(tmp_path):
  values = np.array([1.0, -2.5, 3.140625, 1e-3], np.float32)
  flat = {'encoder/kernel': values.astype(ml_dtypes.bfloat16), 'decoder/bias': values}
  stored, dtypes = export._storable(flat)  # pylint: disable=protected-access
  assert dtypes == {'encoder/kernel': 'bfloat16'} and stored['encoder/kernel'].dtype == np.uint16
  export._save_npz(str(tmp_path / 'p.npz'), stored)  # pylint: disable=protected-access
  loaded = serving.load_params(str(tmp_path / 'p.npz'), dtypes)
  assert loaded['encoder/kernel'].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(loaded['encoder/kernel'], flat['encoder/kernel'])
  np.testing.assert_array_equal(loaded['decoder/bias'], values)
