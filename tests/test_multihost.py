"""Multi-process training (`transformer_jax.multihost`): two processes of 4 CPU devices each
train on a (2, 2, 2) mesh over their 8 devices, one workdir for both (as a pod's shared
folder), and one process of 8 devices trains the same config in another workdir: same
global batches, same losses, same final parameters; each row of a batch fed by exactly
one process; only process 0 writes the run's own files.

The processes are started with subprocess (a JAX process joins one distributed system
only, at its start) and killed when the test fails or runs past its time limit.
"""
import gzip
import json
import os
import re
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import mt
from tests.conftest import REPO
from transformer_jax import config_schema, multihost

# Every subprocess together must finish within this (seconds); the test took 46-57 s on a
# shared 2-core machine.
TIME_LIMIT = 240

# One training process: argv[1] is JSON {'config': overrides of configs/mt.py:tiny,
# 'workdir', 'out'}. It records the first train batch it feeds (the global batch's digest,
# the row indices `sharding.process_rows` gives it, the rows its devices hold) and writes
# that to 'out' when training is done.
_WORKER = r'''
import hashlib, json, os, sys
args = json.loads(sys.argv[1])
sys.path.insert(0, args['repo'])
import numpy as np
from configs import mt
config = mt.get_config('tiny')
for name, value in args['config'].items():
  config[name] = tuple(value) if isinstance(value, list) else value
from transformer_jax import sharding, tasks, train

fed = {}
put_batch = sharding.put_batch

def recording_put_batch(batch, mesh):
  arrays = put_batch(batch, mesh)
  if not fed:  # The first call: the batch of train step 1.
    rows = len(batch['inputs'])
    index = sharding.process_rows({'index': np.arange(rows)}, mesh)['index']
    local = sharding.process_rows(batch, mesh)
    held = {r for shard in arrays['inputs'].addressable_shards
            for r in range(*shard.index[0].indices(rows))}
    fed.update(rows=rows, index=index.tolist(), held=sorted(held),
               local_is_global_rows=all(np.array_equal(local[k], batch[k][index])
                                        for k in batch),
               digest=hashlib.sha256(b''.join(np.ascontiguousarray(batch[k]).tobytes()
                                              for k in sorted(batch))).hexdigest())
  return arrays

sharding.put_batch = recording_put_batch
train.train_and_evaluate(config, args['workdir'])
import jax
fed.update(process_index=jax.process_index(), process_count=jax.process_count())
with open(args['out'], 'w') as f:
  json.dump(fed, f)
'''


def _free_port() -> int:
  with socket.socket() as s:
    s.bind(('localhost', 0))
    return s.getsockname()[1]


def _start(config: dict, workdir: str, out: str, devices: int, log: str) -> subprocess.Popen:
  env = {**os.environ, 'XLA_FLAGS': f'--xla_force_host_platform_device_count={devices}',
         'JAX_PLATFORMS': 'cpu', 'TF_CPP_MIN_LOG_LEVEL': '3'}
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'OMPI_MCA_orte_hnp_uri'):
    env.pop(name, None)  # Only the config says how many processes there are.
  args = json.dumps({'repo': REPO, 'config': config, 'workdir': workdir, 'out': out})
  with open(log, 'w') as f:
    return subprocess.Popen([sys.executable, '-c', _WORKER, args], stdout=f,
                            stderr=subprocess.STDOUT, env=env, cwd=REPO,
                            start_new_session=True)


def _wait_all(procs: dict, logs: dict) -> None:
  """Waits for every process; on a failure or after TIME_LIMIT kills them all and fails
  with the end of each log."""
  deadline = time.monotonic() + TIME_LIMIT
  failed = None
  try:
    while failed is None and any(p.poll() is None for p in procs.values()):
      failed = next((name for name, p in procs.items() if p.poll()), None)
      if time.monotonic() > deadline:
        failed = f'time limit {TIME_LIMIT} s'
      time.sleep(0.2)
    failed = failed or next((name for name, p in procs.items() if p.returncode), None)
  finally:
    for p in procs.values():
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
  if failed:
    tails = '\n'.join(f'--- {name} (rc {procs[name].returncode}):\n'
                      + open(logs[name], encoding='utf-8', errors='replace').read()[-3000:]
                      for name in procs)
    pytest.fail(f'{failed} failed:\n{tails}')


def _short_pairs(data_dir: str, prefix: str, n: int, max_chars: int) -> tuple[list, list]:
  """The first `n` Multi30k pairs of `prefix` with both sides at most `max_chars` long."""
  with gzip.open(os.path.join(data_dir, f'{prefix}.de.gz'), 'rt', encoding='utf-8') as de, \
       gzip.open(os.path.join(data_dir, f'{prefix}.en.gz'), 'rt', encoding='utf-8') as en:
    pairs = [(s.rstrip('\n'), t.rstrip('\n')) for s, t in zip(de, en)
             if len(s) <= max_chars and len(t) <= max_chars]
  return [s for s, _ in pairs[:n]], [t for _, t in pairs[:n]]


def _losses(workdir: str) -> dict:
  """{'step S': train loss} and {'eval': eval loss} from train.log (4 decimals)."""
  with open(os.path.join(workdir, 'train.log'), encoding='utf-8') as f:
    log = f.read()
  losses = {f'step {s}': float(v) for s, v in re.findall(r'train step (\d+): loss ([\d.]+)',
                                                         log)}
  losses['eval'] = float(re.search(r'\| eval loss ([\d.]+)', log).group(1))
  return losses


def test_two_processes_train_like_one(data_dir, tmp_path):
  text = tmp_path / 'text'
  text.mkdir()
  # train: 256 short pairs (one packed batch shape); val: 8 short pairs, so evaluation
  # and the final translation compile few shapes.
  for split, prefix, n in (('train', 'train', 256), ('val', 'val', 8)):
    sources, targets = _short_pairs(data_dir, prefix, n, 60 if split == 'train' else 40)
    assert len(sources) == n
    (text / f'{split}.de').write_text('\n'.join(sources) + '\n', encoding='utf-8')
    (text / f'{split}.en').write_text('\n'.join(targets) + '\n', encoding='utf-8')
  config = dict(dataset_name='text', data_dir=str(text), eval_split='val', test_split='val',
                bleu_every_steps=0, vocab_size=300, num_train_steps=6, warmup_steps=2,
                eval_every_steps=6, checkpoint_every_steps=3, log_every_steps=1,
                num_eval_batches=1, decoding='greedy', mesh_shape=[2, 2, 2])
  assert mt.get_config('tiny').dropout_rate > 0  # Dropout on: the rng must agree too.
  shared, single = str(tmp_path / 'shared'), str(tmp_path / 'single')
  address = f'localhost:{_free_port()}'
  procs, logs, outs = {}, {}, {}
  started = time.monotonic()
  for name, devices, workdir, extra in (
      ('process 0', 4, shared, dict(coordinator_address=address, num_processes=2,
                                    process_id=0)),
      ('process 1', 4, shared, dict(coordinator_address=address, num_processes=2,
                                    process_id=1)),
      ('one process', 8, single, {})):
    logs[name], outs[name] = str(tmp_path / f'{name}.log'), str(tmp_path / f'{name}.json')
    procs[name] = _start({**config, **extra}, workdir, outs[name], devices, logs[name])
  _wait_all(procs, logs)
  print(f'3 training processes: {time.monotonic() - started:.0f} s')
  fed = {}
  for name in procs:
    with open(outs[name]) as f:
      fed[name] = json.load(f)

  # Each process fed its own rows of the same global batch: together every row once.
  assert [fed[n]['process_index'] for n in procs] == [0, 1, 0]
  assert [fed[n]['process_count'] for n in procs] == [2, 2, 1]
  rows = fed['one process']['rows']
  assert fed['process 0']['rows'] == fed['process 1']['rows'] == rows
  assert fed['process 0']['digest'] == fed['process 1']['digest'] == fed['one process'][
      'digest']
  both = fed['process 0']['index'] + fed['process 1']['index']
  assert sorted(both) == list(range(rows)) and len(set(both)) == rows
  assert fed['one process']['index'] == list(range(rows))
  for name in procs:
    assert fed[name]['held'] == fed[name]['index'], name  # What its devices hold.
    assert fed[name]['local_is_global_rows'], name

  # The same losses (train.log prints 4 decimals) and final parameters.
  two, one = _losses(shared), _losses(single)
  assert sorted(two) == sorted(one) == ['eval'] + [f'step {s}' for s in range(1, 7)]
  for key in one:
    assert abs(two[key] - one[key]) <= 1.5e-4, (key, two, one)
  from transformer_jax import init_from  # pylint: disable=g-import-not-at-top
  params_two = init_from.restore_params(os.path.join(shared, 'checkpoints', '6'))
  params_one = init_from.restore_params(os.path.join(single, 'checkpoints', '6'))
  assert sorted(params_two) == sorted(params_one)
  for name, value in params_one.items():
    np.testing.assert_allclose(params_two[name], value, rtol=1e-5, atol=1e-6, err_msg=name)

  # Checkpoints are written collectively; the other files by process 0 alone.
  assert sorted(os.listdir(os.path.join(shared, 'checkpoints'))) == ['3', '6']
  for path in ('run_config.json', 'model_config.json', 'tokenizer/spm.model',
               'translations/val-step6.txt'):
    assert os.path.isfile(os.path.join(shared, path)), path
  with open(os.path.join(shared, 'translations', 'val-step6.txt'), encoding='utf-8') as f:
    assert len(f.read().splitlines()) == 8
  with open(os.path.join(shared, 'train.log'), encoding='utf-8') as f:
    log = f.read()
  assert log.count('train step 1: loss') == 1 and log.count('step 6: train loss') == 1
  events = os.listdir(os.path.join(shared, 'tensorboard'))
  assert len(events) == 1 and f'.{procs["process 0"].pid}.' in events[0], events
  with open(logs['process 0'], encoding='utf-8', errors='replace') as f:
    assert re.search(r'\btrain: +100%', f.read())  # The progress bar.
  with open(logs['process 1'], encoding='utf-8', errors='replace') as f:
    assert not re.search(r'\btrain: +\d+%', f.read())


@pytest.mark.parametrize('fields, message', [
    (dict(coordinator_address='localhost'), "must be 'host:port'"),
    (dict(coordinator_address='h:1234'), 'config.num_processes=0: '),
    (dict(coordinator_address='h:1234', num_processes=2), 'config.process_id=-1: '),
    (dict(num_processes=2, process_id=2), 'config.process_id=2: must be < '),
])
def test_bad_process_settings_name_the_field(fields, message):
  config = mt.get_config('tiny')
  for name, value in fields.items():
    config[name] = value
  with pytest.raises(config_schema.ConfigError, match=re.escape(message)) as e:
    config_schema.validate(config)
  assert '\n' not in str(e.value)


def test_initialize_starts_nothing_on_a_plain_machine(monkeypatch):
  for name in ('JAX_COORDINATOR_ADDRESS', 'SLURM_JOB_ID', 'OMPI_MCA_orte_hnp_uri'):
    monkeypatch.delenv(name, raising=False)
  assert multihost.launcher() == ''
  assert not multihost.initialize(mt.get_config('tiny'))  # Nothing asked: no-op.
  config = mt.get_config('tiny')
  config.num_processes = 2
  config.process_id = 1
  with pytest.raises(config_schema.ConfigError, match=r'^config\.num_processes=2: needs '
                     r'config\.coordinator_address'):
    multihost.initialize(config)


def test_environment_alone_never_restarts_a_running_jax(monkeypatch):
  import jax  # pylint: disable=g-import-not-at-top
  jax.devices()  # JAX has started in this process: too late for jax.distributed.
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'localhost:1')
  assert not multihost.initialize(mt.get_config('tiny'))
  config = mt.get_config('tiny')
  config.coordinator_address, config.num_processes, config.process_id = 'localhost:1', 2, 0
  with pytest.raises(config_schema.ConfigError, match=r"^config\.coordinator_address="
                     r"'localhost:1': jax\.distributed cannot start: "):
    multihost.initialize(config)


def test_launcher_reads_slurm_and_open_mpi(monkeypatch):
  monkeypatch.delenv('JAX_COORDINATOR_ADDRESS', raising=False)
  monkeypatch.delenv('OMPI_MCA_orte_hnp_uri', raising=False)
  for name, value in (('SLURM_JOB_ID', '7'), ('SLURM_STEP_NODELIST', 'node[1-2]'),
                      ('SLURM_NTASKS', '1'), ('SLURM_PROCID', '0'), ('SLURM_LOCALID', '0')):
    monkeypatch.setenv(name, value)
  assert multihost.launcher() == ''  # One task: one process.
  monkeypatch.setenv('SLURM_NTASKS', '2')
  assert multihost.launcher() == 'Slurm'
  monkeypatch.delenv('SLURM_JOB_ID')
  monkeypatch.setenv('OMPI_MCA_orte_hnp_uri', '1.0;tcp://10.0.0.1:1234')
  monkeypatch.setenv('OMPI_COMM_WORLD_SIZE', '4')
  assert multihost.launcher() == 'Open MPI'
  monkeypatch.setenv('JAX_COORDINATOR_ADDRESS', 'h:1')
  assert multihost.launcher() == '$JAX_COORDINATOR_ADDRESS'


def test_one_process_helpers_are_plain():
  import jax  # pylint: disable=g-import-not-at-top
  assert multihost.is_primary() and multihost.process_count() == jax.process_count() == 1
  multihost.barrier('nothing to wait for')
  with multihost.primary_first('x'):
    pass
  x = jax.numpy.arange(4.0)
  out = multihost.to_host({'x': x})
  assert isinstance(out['x'], np.ndarray) and out['x'].tolist() == [0, 1, 2, 3]
