"""The command line: one-line errors for bad options, Ctrl-C and resume on Multi30k, a
console without library chatter."""
import os
import signal
import subprocess
import sys
import time

import pytest

from tests.conftest import REPO
from transformer_jax import hugepages


def run_main(*args, **kwargs):
  return subprocess.run([sys.executable, '-m', 'transformer_jax.main', *args], cwd=REPO,
                        capture_output=True, text=True, timeout=600, **kwargs)


# As a user's shell has it: TensorFlow's C++ log level not set.
USER_ENV = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
# TensorFlow's C++ start-up lines and TFDS's prints: never on the console.
CHATTER = ('All log messages before absl::InitializeLog()', 'oneDNN custom operations',
           'cpu_feature_guard', 'Downloading and preparing dataset', 'downloaded and prepared',
           "Unable to initialize backend")  # JAX's INFO line for each platform it lacks.


def assert_no_chatter(console: str) -> None:
  found = [text for text in CHATTER if text in console]
  assert not found, (found, console[-3000:])


def test_console_shows_no_tensorflow_startup_lines(tmp_path):
  # Imports TensorFlow, JAX and the task, then stops: the workdir has no tokenizer.
  proc = run_main('--config=configs/mt.py:tiny', f'--workdir={tmp_path}', '--mode=translate',
                  input='', env=USER_ENV)
  assert proc.returncode == 1
  assert_no_chatter(proc.stdout + proc.stderr)
  assert proc.stderr.splitlines() == [
      f'workdir: {tmp_path}',
      f'error: {tmp_path}/tokenizer/spm.model: no tokenizer; is {tmp_path} a training workdir?']


@pytest.mark.parametrize('flag, message', [
    ('--config.no_such_field=1', 'error: --config.no_such_field: unknown config field'),
    ('--config.d_modle=128',
     'error: --config.d_modle: unknown config field (did you mean d_model?)'),
    ('--config.num_train_steps=abc', "error: flag --config.num_train_steps=abc: invalid literal"),
    ('--config.num_train_steps=-5', 'error: config.num_train_steps=-5: must be >= 0'),
    ('--config.d_model=30', 'error: config.d_model=30: must be divisible by config.num_heads=4'),
    ('--config.label_smoothing=1.5', 'error: config.label_smoothing=1.5: must be in [0, 1)'),
    ('--config.schedule=exponential', "error: config.schedule='exponential': must be one of"),
    ('--config=configs/no_such_file.py', 'error: --config: cannot load the config file'),
])
def test_bad_option_stops_with_one_line_before_any_work(flag, message, tmp_path):
  workdir = tmp_path / 'wd'
  args = ['--config=configs/mt.py', flag] if flag.startswith('--config.') else [flag]
  proc = run_main(*args, f'--workdir={workdir}')
  assert proc.returncode != 0
  lines = [l for l in proc.stderr.splitlines() if l.strip()]
  assert len(lines) == 1 and lines[0].startswith(message), proc.stderr
  if 'd_modle' in flag:
    assert lines[0] == message
  assert not workdir.exists()


def test_missing_data_dir_names_the_folder(tmp_path):
  proc = run_main('--config=configs/mt.py:tiny', f'--workdir={tmp_path}',
                  f'--config.data_dir={tmp_path}/nope')
  assert proc.returncode == 1
  lines = proc.stderr.strip().splitlines()
  assert len(lines) == 1 and lines[0].startswith(
      f"error: config.data_dir='{tmp_path}/nope': no such folder (a relative path counts "
      'from the current folder; set $TRANSFORMER_JAX_DATA_DIR'), lines
  assert os.listdir(tmp_path) == []  # Nothing written.


def test_ctrl_c_leaves_a_restorable_checkpoint_and_rerun_resumes(data_dir, tmp_path):
  args = ['--config=configs/mt.py:tiny', f'--workdir={tmp_path}', f'--config.data_dir={data_dir}',
          '--config.checkpoint_every_steps=5', '--config.eval_every_steps=1000',
          '--config.bleu_every_steps=0', '--config.test_split=']
  proc = subprocess.Popen([sys.executable, '-m', 'transformer_jax.main', *args,
                           '--config.num_train_steps=100000'], cwd=REPO,
                          stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          env=USER_ENV)
  ckpt_dir = tmp_path / 'checkpoints'
  deadline = time.time() + 300
  while time.time() < deadline and not (ckpt_dir.exists() and any(
      name.isdigit() and int(name) >= 10 for name in os.listdir(ckpt_dir))):
    time.sleep(0.2)
  proc.send_signal(signal.SIGINT)
  stdout, stderr = proc.communicate(timeout=120)
  assert proc.returncode == 130, stderr[-2000:]
  # Multi30k was prepared from the local files (TFDS) and TensorFlow started: silently.
  assert_no_chatter(stdout + stderr)
  assert (f'interrupted: rerun with --workdir={tmp_path} to resume from its latest checkpoint'
          in stderr)
  steps = sorted(int(n) for n in os.listdir(ckpt_dir) if n.isdigit())
  assert steps and steps[-1] >= 10
  latest = steps[-1]
  # The step reached at Ctrl-C was saved, whether or not it is a multiple of 5.
  log = (tmp_path / 'train.log').read_text()
  assert f'Interrupted: saved a checkpoint at step {latest}' in log
  # The CLI re-executed itself with huge pages for malloc where that helps (hugepages.py).
  environ = hugepages.cli_environ()
  assert f"malloc huge pages: {'on' if hugepages.active(environ) else 'off'}" in log
  # Rerun: restores the latest checkpoint and trains 5 more steps.
  done = run_main(*args, f'--config.num_train_steps={latest + 5}', env=USER_ENV)
  assert done.returncode == 0, done.stderr[-2000:]
  assert_no_chatter(done.stdout + done.stderr)
  log = (tmp_path / 'train.log').read_text()
  assert f'Restoring checkpoint at step {latest}' in log
  assert f'step {latest + 5}: train loss' in log
  assert str(latest + 5) in os.listdir(ckpt_dir)


@pytest.mark.parametrize('make_files, message', [
    (lambda d: [(d / f'train.{l}').write_text('') for l in ('de', 'en')],
     "split 'train' of text ({d}) has no sentence pairs"),
    (lambda d: None, 'no such file: tried {d}/train.de.gz and {d}/train.de'),
])
def test_bad_text_dataset_names_the_problem(make_files, message, tmp_path):
  data = tmp_path / 'data'
  data.mkdir()
  make_files(data)
  proc = run_main('--config=configs/mt.py:tiny', f'--workdir={tmp_path}/wd',
                  '--config.dataset_name=text', f'--config.data_dir={data}',
                  '--config.eval_split=train', '--config.test_split=')
  assert proc.returncode == 1
  assert proc.stderr.strip().splitlines()[-1] == 'error: ' + message.format(d=data)


def test_eval_of_unknown_split_or_missing_workdir_is_one_line(tmp_path):
  proc = run_main('--config=configs/mt.py', f'--workdir={tmp_path}/none', '--mode=eval')
  assert proc.stderr.strip().splitlines() == [
      f'error: --workdir={tmp_path}/none: no such folder (train a model there first)']
