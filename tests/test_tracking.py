"""Weights & Biases tracking beside TensorBoard (transformer_jax/tracking.py), offline: the
W&B run files hold the scalars TensorBoard holds, the config and the final report, and a
resumed training continues the same run; without a project wandb is never imported."""
import glob
import json
import math
import os
import struct
import sys
import zlib

import pytest
from tensorboard.backend.event_processing import event_accumulator
from tensorboard.util import tensor_util

from tests.conftest import tiny_config, write_text_dataset
from transformer_jax import config_schema, multihost, scoring, tracking, train


@pytest.fixture(scope='module')
def text8_dir(data_dir, tmp_path_factory) -> str:
  """train = the first 256 Multi30k train pairs, val = 8 val pairs (BLEU in a second)."""
  return write_text_dataset(tmp_path_factory.mktemp('text8'), data_dir, 256, 8)


@pytest.fixture
def offline(tmp_path, monkeypatch):
  """W&B offline, its settings and caches in tmp_path: nothing logs in or leaves."""
  monkeypatch.setenv('WANDB_MODE', 'offline')
  for name in ('WANDB_DIR', 'WANDB_CONFIG_DIR', 'WANDB_CACHE_DIR', 'WANDB_DATA_DIR',
               'WANDB_ARTIFACT_DIR'):
    monkeypatch.setenv(name, str(tmp_path / 'wandb_home'))
  for name in ('WANDB_API_KEY', 'WANDB_RUN_ID', 'WANDB_RESUME', 'WANDB_PROJECT'):
    monkeypatch.delenv(name, raising=False)


def _config(text_dir, **overrides):
  # One packed shape, short decoding, no BLEU (the resumed run turns it on).
  return tiny_config(text_dir, **{'decode_max_length_ratio': 0.5,
                                  'decode_max_length_offset': 2, 'log_every_steps': 5,
                                  'eval_every_steps': 10, 'checkpoint_every_steps': 10,
                                  **overrides})


# --- Reading what was logged ----------------------------------------------------------------

_BLOCK = 32768  # The LevelDB log format of .wandb files: 32 KiB blocks of chunks.
_HEADER = struct.pack('<4sHB', b':W&B', 0xBEE1, 0)  # File header: ident, magic, version.


def _wandb_records(path: str) -> list:
  """The `wandb_internal_pb2.Record`s of a .wandb file, in order (the LevelDB log format:
  chunks of a 7-byte header (crc32 of type + data, length, type FULL=1, FIRST, MIDDLE,
  LAST=4) that never cross a 32 KiB block; wandb 0.31's Python package has no reader)."""
  from wandb.proto import wandb_internal_pb2  # pylint: disable=g-import-not-at-top
  with open(path, 'rb') as f:
    data = f.read()
  assert data[:len(_HEADER)] == _HEADER
  records, pos, pieces = [], len(_HEADER), b''
  while pos + 7 <= len(data):
    if _BLOCK - pos % _BLOCK < 7:  # A block's tail too short for a header is padding.
      pos += _BLOCK - pos % _BLOCK
      continue
    crc, length, kind = struct.unpack_from('<IHB', data, pos)
    piece = data[pos + 7:pos + 7 + length]
    assert zlib.crc32(piece, zlib.crc32(bytes([kind]))) == crc, f'{path}: bad chunk at {pos}'
    pos += 7 + length
    pieces += piece
    if kind in (1, 4):  # FULL or LAST: a whole record.
      record = wandb_internal_pb2.Record()
      record.ParseFromString(pieces)
      records.append(record)
      pieces = b''
  return records


def _items(updates) -> dict:
  """{'a/b': value} of W&B config/summary/history items (key or nested_key, value_json)."""
  return {item.key or '/'.join(item.nested_key): json.loads(item.value_json)
          for item in updates}


def _offline_runs(workdir) -> list[dict]:
  """Each offline run folder of `workdir`, oldest first: its run record's id, config and
  the logged scalars {tag: {step: value}}, its final summary, and its files folder.

  `run.finish()` returns before W&B's service has written everything: call
  `wandb.teardown()` first, which waits for it."""
  runs = []
  for folder in sorted(glob.glob(os.path.join(workdir, 'wandb', 'offline-run-*'))):
    (path,) = glob.glob(os.path.join(folder, 'run-*.wandb'))
    records = _wandb_records(path)
    assert records[-1].WhichOneof('record_type') == 'exit', f'{path}: run not finished'
    (run,) = [r.run for r in records if r.WhichOneof('record_type') == 'run']
    config = _items(run.config.update)
    for r in records:
      if r.WhichOneof('record_type') == 'config':
        config.update(_items(r.config.update))
    scalars, summary = {}, {}
    for r in records:
      kind = r.WhichOneof('record_type')
      if kind == 'history':
        for tag, value in _items(r.history.item).items():
          if not tag.startswith('_'):
            scalars.setdefault(tag, {})[r.history.step.num] = value
      elif kind == 'summary':
        summary.update(_items(r.summary.update))
    runs.append({'id': run.run_id, 'project': run.project, 'name': run.display_name,
                 'config': config, 'scalars': scalars, 'summary': summary,
                 'files': os.path.join(folder, 'files')})
  return runs


def _tensorboard_scalars(workdir) -> dict:
  """{tag: {step: value}} of every event file in {workdir}/tensorboard."""
  events = event_accumulator.EventAccumulator(os.path.join(workdir, 'tensorboard'),
                                              size_guidance={event_accumulator.TENSORS: 0})
  events.Reload()
  return {tag: {e.step: float(tensor_util.make_ndarray(e.tensor_proto))
                for e in events.Tensors(tag)}
          for tag in events.Tags()['tensors']}


def _close(a: float, b: float) -> bool:
  """Equal to float32 rounding (TensorBoard stores float32, W&B float64)."""
  return math.isclose(a, b, rel_tol=2 ** -23, abs_tol=1e-30) or (
      math.isnan(a) and math.isnan(b))


# --- A tracked run, resumed ----------------------------------------------------------------

def test_wandb_run_holds_tensorboard_scalars_config_report_and_resumes(
    text8_dir, tmp_path, offline, capsys):
  import wandb  # pylint: disable=g-import-not-at-top  # Only the tests that use it import it.
  workdir = str(tmp_path / 'run')
  config = _config(text8_dir, num_train_steps=10, wandb_project='tjax-test')
  train.train_and_evaluate(config, workdir)
  wandb.teardown()  # Waits until W&B's service has written the run's files.
  run_id = tracking.read_run_id(workdir)
  assert run_id and len(_offline_runs(workdir)) == 1
  # Resumed with free fields changed: longer, BLEU at the last step (so best/score.json),
  # and a final test report. The same W&B run continues.
  config.update(num_train_steps=20, bleu_every_steps=20, test_split='val', decoding='greedy')
  capsys.readouterr()
  train.train_and_evaluate(config, workdir)
  wandb.teardown()
  out = capsys.readouterr().out
  report = out[out.index('val (best-step20, greedy)'):].strip()
  assert tracking.read_run_id(workdir) == run_id

  first, second = _offline_runs(workdir)
  assert [first['id'], second['id']] == [run_id, run_id]
  assert first['project'] == second['project'] == 'tjax-test'
  assert first['name'] == second['name'] == 'run'  # The workdir's name.
  # The config goes with the run, as each start had it.
  assert first['config']['num_train_steps'] == 10 and second['config']['num_train_steps'] == 20
  assert first['config']['test_split'] == '' and second['config']['test_split'] == 'val'
  assert first['config']['d_model'] == 32 and first['config']['wandb_project'] == 'tjax-test'
  assert first['config']['logical_axis_rules'][0] == ['batch', ['data', 'fsdp']]

  # Every scalar TensorBoard has, at the same steps with the same values, split by start.
  expected = _tensorboard_scalars(workdir)
  assert sorted(expected['train/loss']) == [5, 10, 15, 20]
  assert sorted(expected['eval/loss']) == [10, 20] and sorted(expected['eval/bleu']) == [20]
  assert len(expected) > 10 and 'train/learning_rate' in expected
  assert max(first['scalars']['train/loss']) == 10
  assert min(second['scalars']['train/loss']) == 15
  logged = {tag: {**first['scalars'].get(tag, {}), **second['scalars'].get(tag, {})}
            for tag in expected}
  assert set(first['scalars']) | set(second['scalars']) == set(expected)
  for tag, values in expected.items():
    assert sorted(logged[tag]) == sorted(values), tag
    assert all(_close(logged[tag][step], value) for step, value in values.items()), tag

  # The final report: the test scores (recomputed from the written hypotheses) and
  # best/score.json in the summary, the report and score.json as the run's files.
  with open(os.path.join(workdir, 'translations', 'val-best-step20.txt'),
            encoding='utf-8') as f:
    hypotheses = f.read().splitlines()
  with open(os.path.join(text8_dir, 'val.en'), encoding='utf-8') as f:
    references = f.read().splitlines()
  scores = scoring.score(hypotheses, references)
  with open(os.path.join(workdir, 'best', 'score.json')) as f:
    best = json.load(f)
  summary = second['summary']
  assert {k: v for k, v in summary.items() if k.startswith('test/')} == {
      f'test/{k}': v for k, v in scores.items() if isinstance(v, float)}
  assert summary['best/step'] == best['step'] == 20 and summary['best/bleu'] == best['bleu']
  assert summary['train/loss'] == logged['train/loss'][20]  # W&B's own: the last value.
  with open(os.path.join(second['files'], tracking.REPORT_FILE), encoding='utf-8') as f:
    assert f.read().strip() == report
  with open(os.path.join(second['files'], 'best', 'score.json')) as f:
    assert json.load(f) == best
  assert not os.path.exists(os.path.join(first['files'], tracking.REPORT_FILE))


# --- Without W&B --------------------------------------------------------------------------

def test_without_a_project_wandb_is_never_imported(text8_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)  # `import wandb` now raises ImportError.
  workdir = tmp_path / 'run'
  # No step (compiling one is slow): the run still sets up, opens its writers and ends.
  train.train_and_evaluate(_config(text8_dir, num_train_steps=0), str(workdir))
  assert sys.modules['wandb'] is None  # Nothing imported it (or replaced the None).
  assert os.listdir(workdir / 'tensorboard')
  assert not (workdir / 'wandb').exists() and not (workdir / tracking.RUN_ID_FILE).exists()


def test_a_project_without_the_wandb_package_is_one_line_config_error(
    text8_dir, tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, 'wandb', None)
  config = _config(text8_dir, wandb_project='tjax-test')
  message = ("config.wandb_project='tjax-test': the wandb package is not installed; pip install "
             "'transformer_jax[wandb]', or set config.wandb_project=''")
  with pytest.raises(config_schema.ConfigError) as error:
    tracking.create_writer(config, str(tmp_path))
  assert str(error.value) == message
  # The trainer stops before it writes anything (no workdir, no checkpoint manager).
  with pytest.raises(config_schema.ConfigError) as error:
    train.train_and_evaluate(config, str(tmp_path / 'run'))
  assert str(error.value) == message and not (tmp_path / 'run').exists()


def test_wandb_refusing_to_start_is_one_line_config_error(text8_dir, tmp_path, monkeypatch):
  import wandb  # pylint: disable=g-import-not-at-top
  def refuse(**kwargs):
    del kwargs
    raise wandb.errors.UsageError('No API key configured. Use `wandb login` to log in.')
  monkeypatch.setattr(wandb, 'init', refuse)  # What wandb.init raises without a terminal.
  config = _config(text8_dir, wandb_project='tjax-test')
  with pytest.raises(config_schema.ConfigError) as error:
    tracking.create_writer(config, str(tmp_path))
  assert str(error.value) == (
      "config.wandb_project='tjax-test': W&B could not start the run: No API key configured. "
      'Use `wandb login` to log in. (WANDB_MODE=offline logs without a network)')
  assert os.listdir(tmp_path) == []  # No id recorded, no TensorBoard writer opened.


def test_other_processes_write_nothing(text8_dir, tmp_path, monkeypatch, offline):
  monkeypatch.setattr(multihost, 'is_primary', lambda: False)
  workdir = tmp_path / 'run'
  workdir.mkdir()
  with tracking.create_writer(_config(text8_dir, wandb_project='tjax-test'),
                              str(workdir)) as writer:
    writer.scalar('train/loss', 1.0, 1)
    writer.report({'test/bleu': 1.0}, 'report')
  assert os.listdir(tmp_path) == ['run'] and os.listdir(workdir) == []


@pytest.mark.parametrize('project', ['a/b', 'a:b', 'x' * 129])
def test_a_bad_project_name_names_the_field(text8_dir, project):
  config = _config(text8_dir, wandb_project=project)
  with pytest.raises(config_schema.ConfigError, match='config.wandb_project=') as error:
    config_schema.validate(config)
  assert 'must be at most 128 characters, none of /\\#?%:' in str(error.value)
