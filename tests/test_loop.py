"""The training loop's behaviour around the steps: cadences, steps in flight and the
progress bar, Ctrl-C, and resuming (the console line, the config comparison)."""
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import time

import jax
import pytest
import tqdm

from configs import encoder, germeval, mt, pretrain_mlm_de, pretrain_span
from tests.conftest import REPO, tiny_config, write_text_dataset
from transformer_jax import config_schema, train


@pytest.fixture(scope='module')
def text8_dir(data_dir, tmp_path_factory) -> str:
  """A 'text' dataset: train = the first 256 Multi30k train pairs, val = 8 val pairs
  (validation BLEU in a second)."""
  return write_text_dataset(tmp_path_factory.mktemp('text8'), data_dir, 256, 8)


def _config(text_dir, **overrides):
  # One packed shape (one compile), short decoding.
  return tiny_config(text_dir, **{'decode_max_length_ratio': 0.5,
                                  'decode_max_length_offset': 2, **overrides})


# --- Cadences -----------------------------------------------------------------------------

def _fires(config, metric_every, num_steps):
  """{event: [steps at which it fires]} over steps 1..num_steps."""
  fires = {}
  for step in range(1, num_steps + 1):
    for event in train.cadence(step, config, metric_every):
      fires.setdefault(event, []).append(step)
  return fires


def test_every_cadence_fires_at_its_own_multiples():
  # The case: BLEU every 850 steps, loss evaluations every 100.
  config = mt.get_config()
  config.update(num_train_steps=2000, eval_every_steps=100, bleu_every_steps=850,
                log_every_steps=50, checkpoint_every_steps=300)
  fires = _fires(config, config.bleu_every_steps, 2000)
  assert fires['metric'] == [850, 1700, 2000]  # Not 1700 first.
  assert fires['eval'] == sorted({*range(100, 2001, 100), 850, 1700})
  assert fires['log'] == sorted({*range(50, 2001, 50), 850, 1700})
  assert fires['checkpoint'] == [*range(300, 2001, 300), 2000]
  assert fires['last'] == [2000]
  # Periods longer than the run still fire once, at the end (BLEU off: never).
  config.update(num_train_steps=30, eval_every_steps=100, log_every_steps=7,
                checkpoint_every_steps=1000)
  fires = _fires(config, 0, 30)
  assert 'metric' not in fires
  assert fires['eval'] == fires['checkpoint'] == fires['last'] == [30]
  assert fires['log'] == [7, 14, 21, 28, 30]
  # Tasks whose metric comes with every evaluation: 'metric' == 'eval'.
  fires = _fires(config, config.eval_every_steps, 30)
  assert fires['metric'] == fires['eval'] == [30]


def test_tiny_run_evaluates_logs_scores_and_saves_at_the_cadence_steps(text8_dir, tmp_path):
  config = _config(text8_dir, num_train_steps=9, eval_every_steps=4, bleu_every_steps=3,
                   log_every_steps=2, checkpoint_every_steps=5, keep_checkpoints=10)
  train.train_and_evaluate(config, str(tmp_path))
  log = (tmp_path / 'train.log').read_text()
  evals = [int(s) for s in re.findall(r'step (\d+): train loss', log)]
  logs = [int(s) for s in re.findall(r'train step (\d+): loss', log)]
  bleus = sorted(int(re.fullmatch(r'val-step(\d+)\.txt', name).group(1))
                 for name in os.listdir(tmp_path / 'translations'))
  saved = sorted(int(name) for name in os.listdir(tmp_path / 'checkpoints') if name.isdigit())
  assert bleus == [3, 6, 9]  # Every bleu_every_steps, though eval_every_steps is 4.
  assert evals == [3, 4, 6, 8, 9]
  assert logs == [2, 3, 4, 6, 8, 9]
  assert saved == [5, 9]
  assert all('BLEU' in line for line in log.splitlines()
             if re.search(r'step [369]: train loss', line))


def test_patience_without_bleu_is_refused_in_one_line(text8_dir):
  config = _config(text8_dir, patience=2, bleu_every_steps=0)
  with pytest.raises(config_schema.ConfigError) as error:
    config_schema.validate(config)
  assert str(error.value) == (
      'config.patience=2: counts validation BLEU evaluations, but config.bleu_every_steps=0 '
      'computes none; set bleu_every_steps > 0 or patience=0')


# --- Steps in flight and the progress bar -------------------------------------------------

def test_at_most_two_steps_in_flight_and_the_bar_counts_finished_steps(
    text8_dir, tmp_path, monkeypatch):
  events, bars = [], []

  class Bar(tqdm.tqdm):
    def __init__(self, *args, **kwargs):
      super().__init__(*args, **kwargs)
      bars.append(self)

  class InFlight(train._InFlight):  # pylint: disable=protected-access
    def __init__(self, on_done):
      metrics_of = {}

      def done(step):
        assert all(x.is_ready() for x in jax.tree.leaves(metrics_of[step]))  # Finished.
        on_done(step)
        events.append(('done', step, bars[-1].n))
      super().__init__(done)
      self.metrics_of = metrics_of

    def add(self, step, metrics):
      self.metrics_of[step] = metrics
      super().add(step, metrics)
      events.append(('dispatched', step, len(self.steps), bars[-1].n))

  monkeypatch.setattr(tqdm, 'tqdm', Bar)
  monkeypatch.setattr(train, '_InFlight', InFlight)
  config = _config(text8_dir, num_train_steps=30, log_every_steps=10, eval_every_steps=15,
                   checkpoint_every_steps=30)
  train.train_and_evaluate(config, str(tmp_path))
  dispatched = [e for e in events if e[0] == 'dispatched']
  done = [e for e in events if e[0] == 'done']
  assert [e[1] for e in dispatched] == [e[1] for e in done] == list(range(1, 31))
  assert max(e[2] for e in dispatched) == train.MAX_STEPS_IN_FLIGHT == 2
  # When step n is dispatched, steps up to n - 2 have finished and the bar counts them.
  assert all(step - bar_n <= 2 for _, step, _, bar_n in dispatched)
  # The bar moves when a step finishes, and counts the finished steps: 1, 2, ..., 30.
  assert [bar_n for _, _, bar_n in done] == list(range(1, 31))
  assert bars[-1].n == 30


# --- Ctrl-C -------------------------------------------------------------------------------

def _flags(config_overrides: dict) -> list[str]:
  """--config flags of configs/mt.py:tiny for `_config(...)` with these overrides."""
  flags = []
  for key, value in config_overrides.items():
    flags.append(f'--config.{key}={value}')
  return flags


def _tiny_flags(text_dir, **overrides):
  base = dict(dataset_name='text', data_dir=text_dir, eval_split='val', test_split='',
              bleu_every_steps=0, vocab_size=300, decode_max_length_ratio=0.5,
              decode_max_length_offset=2)
  return ['--config=configs/mt.py:tiny', *_flags({**base, **overrides})]


def test_ctrl_c_saves_the_step_it_names_and_a_rerun_resumes_from_it(text8_dir, tmp_path,
                                                                     capsys):
  workdir = tmp_path / 'wd'
  flags = _tiny_flags(text8_dir, num_train_steps=100000, checkpoint_every_steps=5,
                      eval_every_steps=1000, log_every_steps=5)
  proc = subprocess.Popen([sys.executable, '-m', 'transformer_jax.main', *flags,
                           f'--workdir={workdir}'], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  ckpt_dir = workdir / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpt_dir.exists() and any(
      name.isdigit() and int(name) >= 10 for name in os.listdir(ckpt_dir))):
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  sent = time.time()
  output, _ = proc.communicate(timeout=120)
  assert proc.returncode == 130, output[-3000:]
  assert time.time() - sent < 30, output[-3000:]  # About a step and a save (and exit).
  saved = re.findall(r'Interrupted: saved a checkpoint at step (\d+) in (\S+); a rerun '
                     r'resumes from it', output)
  assert len(saved) == 1, output[-3000:]
  step, path = int(saved[0][0]), saved[0][1]
  complete = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  assert path == str(ckpt_dir / str(step)) and os.path.isdir(path)
  assert complete[-1] == step >= 10
  # The first message named the same step.
  assert (f'Ctrl-C: no further step; saving step {step} when it is computed (a second '
          'Ctrl-C quits at once, without saving it)') in output
  assert f'interrupted: rerun with --workdir={workdir} to resume' in output

  # A rerun resumes from exactly that step, and says so on the console.
  config = _config(text8_dir, num_train_steps=step + 3, checkpoint_every_steps=5,
                   eval_every_steps=1000, log_every_steps=5)
  capsys.readouterr()
  state = train.train_and_evaluate(config, str(workdir))
  console = capsys.readouterr()
  assert int(state.step) == step + 3
  assert f'Resuming from step {step}: restored {ckpt_dir}/{step}' in console.out
  log = (workdir / 'train.log').read_text()
  assert f'Restoring checkpoint at step {step} ' in log
  assert f'step {step + 3}: train loss' in log


# Runs a tiny training that interrupts itself (SIGINT) at step 23, whose save of the
# interrupted step then takes 60 s: the test presses Ctrl-C again during that save.
DOUBLE_CTRL_C_SCRIPT = textwrap.dedent('''
  import os, signal, sys, time
  sys.path.insert(0, {repo!r})
  from tests.conftest import tiny_config
  from transformer_jax import checkpoints, train

  real_save, real_cadence = checkpoints.save, train.cadence

  def slow_save(manager, state):
    handler = signal.getsignal(signal.SIGINT)
    if getattr(getattr(handler, '__self__', None), 'requested', False):
      manager.wait_until_finished()  # The periodic save of step 20 is complete.
      print('SAVING', int(state.step), flush=True)
      time.sleep(60)
    real_save(manager, state)

  def cadence(step, config, metric_every_steps):
    if step == 23:
      os.kill(os.getpid(), signal.SIGINT)  # Ctrl-C before step 23 is dispatched.
    return real_cadence(step, config, metric_every_steps)

  checkpoints.save, train.cadence = slow_save, cadence
  config = tiny_config({text_dir!r}, num_train_steps=1000, checkpoint_every_steps=10,
                       eval_every_steps=1000, log_every_steps=10)
  train.train_and_evaluate(config, {workdir!r})
''')


def test_second_ctrl_c_quits_at_once_naming_the_checkpoint_a_rerun_resumes_from(
    text8_dir, tmp_path, capsys):
  workdir = tmp_path / 'wd'
  script = DOUBLE_CTRL_C_SCRIPT.format(repo=REPO, text_dir=text8_dir, workdir=str(workdir))
  proc = subprocess.Popen([sys.executable, '-c', script], cwd=REPO, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)
  lines = []
  for line in proc.stdout:  # Until the save of the interrupted step has started.
    lines.append(line)
    if line.startswith('SAVING'):
      break
  assert lines and lines[-1] == 'SAVING 22\n', ''.join(lines)[-3000:]
  proc.send_signal(signal.SIGINT)
  sent = time.time()
  output = ''.join(lines) + proc.stdout.read()
  proc.wait(timeout=60)
  assert time.time() - sent < 5, output[-3000:]  # Not the 60 s of the save.
  assert proc.returncode == 130, output[-3000:]
  ckpt_dir = workdir / 'checkpoints'
  assert ('Ctrl-C: no further step; saving step 22 when it is computed (a second Ctrl-C '
          'quits at once, without saving it)') in output
  assert ('Interrupted again while saving step 22: a rerun resumes from step 20, the latest '
          f'complete checkpoint ({ckpt_dir}/20)') in output
  assert 'Interrupted: saved' not in output
  assert sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit()) == [10, 20]

  config = _config(text8_dir, num_train_steps=24, checkpoint_every_steps=10,
                   eval_every_steps=1000, log_every_steps=10)
  capsys.readouterr()
  train.train_and_evaluate(config, str(workdir))
  assert f'Resuming from step 20: restored {ckpt_dir}/20' in capsys.readouterr().out


def test_an_evaluation_cut_short_by_ctrl_c_is_made_when_the_run_resumes(text8_dir, tmp_path,
                                                                       monkeypatch, capsys):
  workdir = tmp_path / 'wd'
  config = _config(text8_dir, num_train_steps=12, checkpoint_every_steps=5,
                   eval_every_steps=5, log_every_steps=5)
  create, evaluated = train.tasks.create, []

  def create_interrupting(*args, **kwargs):  # Ctrl-C in the middle of step 10's evaluation.
    task = create(*args, **kwargs)
    evaluate = task.evaluate

    def interrupted(params, step, last):
      if step == 10 and not evaluated:
        evaluated.append(step)
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(30)  # The handler raises KeyboardInterrupt here.
      return evaluate(params, step, last)
    task.evaluate = interrupted
    return task

  monkeypatch.setattr(train.tasks, 'create', create_interrupting)
  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(config, str(workdir))
  output = capsys.readouterr().out
  assert ('Ctrl-C: abandoning the evaluation of step 10; saving step 10 (a second Ctrl-C quits '
          'at once, without saving it); a rerun evaluates it first') in output
  assert json.loads((workdir / train.PENDING_EVAL_FILE).read_text()) == {'step': 10}
  log = (workdir / 'train.log').read_text()
  assert re.findall(r'step (\d+): train loss [^|]+\| eval loss', log) == ['5']

  monkeypatch.setattr(train.tasks, 'create', create)
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == 12
  output = capsys.readouterr().out
  assert 'Evaluating step 10, whose evaluation the interruption abandoned' in output
  log = (workdir / 'train.log').read_text()
  assert re.findall(r'step (\d+): (?:train loss [^|]+\| )?eval loss', log) == ['5', '10', '12']
  assert not (workdir / train.PENDING_EVAL_FILE).exists()


# --- Resuming with a changed config -------------------------------------------------------

def test_every_config_field_is_either_fixed_or_free_on_resume():
  fixed, free = config_schema.RESUME_FIXED_FIELDS, config_schema.RESUME_FREE_FIELDS
  assert len(set(fixed)) == len(fixed) and len(set(free)) == len(free)
  assert not set(fixed) & set(free)
  fields = set(config_schema.SCHEMA).union(*config_schema.TASK_SCHEMAS.values())
  assert fields == set(fixed) | set(free)
  for module in (mt, encoder, germeval, pretrain_span, pretrain_mlm_de):
    assert set(module.get_config().keys()) <= fields


def test_check_run_config_refuses_model_or_data_changes_and_lists_free_ones(tmp_path):
  config = mt.get_config('tiny')
  config_schema.save_run_config(config, str(tmp_path))
  started = config_schema.load_run_config(str(tmp_path))
  assert started == json.loads((tmp_path / 'run_config.json').read_text())
  assert started['init_rules'] == [] and started['d_model'] == 32
  assert config_schema.check_run_config(config, started, str(tmp_path)) == []

  config.update(num_train_steps=80, beam_size=3)
  assert config_schema.check_run_config(config, started, str(tmp_path)) == [
      ('beam_size', 2, 3), ('num_train_steps', 40, 80)]
  config.update(seed=1, max_source_length=16)
  with pytest.raises(config_schema.ConfigError) as error:
    config_schema.check_run_config(config, started, str(tmp_path))
  message = str(error.value)
  assert '\n' not in message
  assert message.startswith('config.max_source_length=16 (started with 32), config.seed=1 '
                            f'(started with 0): the run in {tmp_path} cannot resume with '
                            'these changes')
  assert 'num_train_steps' not in message
  # A field of a user's task that neither list knows counts as fixed.
  started['my_field'] = 1
  config = mt.get_config('tiny')
  config.my_field = 2
  with pytest.raises(config_schema.ConfigError, match=r'config.my_field=2 \(started with 1\)'):
    config_schema.check_run_config(config, started, str(tmp_path))


def test_resume_with_changed_config_refuses_or_warns(text8_dir, tmp_path, capsys):
  overrides = dict(num_train_steps=4, checkpoint_every_steps=4, eval_every_steps=4)
  train.train_and_evaluate(_config(text8_dir, **overrides), str(tmp_path))
  started = (tmp_path / 'run_config.json').read_text()
  # Data order and model: refused before any work, naming the fields and both values.
  with pytest.raises(config_schema.ConfigError) as error:
    train.train_and_evaluate(_config(text8_dir, **{**overrides, 'seed': 3, 'd_ff': 128,
                                                   'num_train_steps': 6}), str(tmp_path))
  assert str(error.value).startswith('config.d_ff=128 (started with 64), config.seed=3 '
                                     '(started with 0): the run in')
  assert sorted(os.listdir(tmp_path / 'checkpoints')) == ['4']
  # Cadences and length: allowed, with a console line naming the changes.
  capsys.readouterr()
  state = train.train_and_evaluate(
      _config(text8_dir, **{**overrides, 'num_train_steps': 6, 'eval_every_steps': 3}),
      str(tmp_path))
  out = capsys.readouterr().out
  assert int(state.step) == 6
  assert f'Resuming from step 4: restored {tmp_path}/checkpoints/4' in out
  assert ('Config changed since the run started (allowed on resume): eval_every_steps 4 -> 3, '
          'num_train_steps 4 -> 6') in out
  # run_config.json keeps the config the run started with.
  assert (tmp_path / 'run_config.json').read_text() == started


# --- Warnings while the bar is open ---------------------------------------------------------
def test_console_warnings_land_above_the_bar_on_their_own_line(capfd):
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  root, console = py_logging.getLogger(), logging.get_absl_handler()
  if console not in root.handlers:
    root.addHandler(console)
  bar = tqdm.tqdm(total=10, desc='train', file=sys.stderr)
  above = train._ConsoleAboveBar()  # pylint: disable=protected-access
  try:
    bar.update(3)
    logging.warning('3 lines are longer than max_source_length')
  finally:
    above.restore()
    bar.close()
  assert console in root.handlers and above not in root.handlers
  err = capfd.readouterr().err
  lines = re.split(r'[\r\n]', err)
  warning = [l for l in lines if 'lines are longer than max_source_length' in l]
  assert len(warning) == 1 and warning[0].startswith('W'), err
