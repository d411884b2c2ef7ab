"""The trainer on 8 fake CPU devices: a run resumed on another mesh continues like the
uninterrupted one, and PEFT and the pretraining tasks train under non-trivial meshes (in
one subprocess started with XLA_FLAGS=--xla_force_host_platform_device_count=8; a file of
its own so that it runs beside test_sharding.py under pytest-xdist)."""
import gzip
import os
import textwrap

import pytest

from tests.conftest import REPO
from tests.test_sharding import PARAM_ATOL, run_8_devices

TRAINER_SCRIPT = textwrap.dedent('''
  import json, os, sys
  sys.path.insert(0, {repo!r})
  import jax, numpy as np
  from configs import pretrain_mlm_de, pretrain_span
  from tests.conftest import tiny_config
  from transformer_jax import train
  assert jax.device_count() == 8, jax.devices()
  out, tmp = {{}}, {tmp!r}

  def mesh_line(workdir):
    log = open(os.path.join(workdir, 'train.log'), encoding='utf-8').read()
    return [line for line in log.splitlines() if ' Mesh ' in line][-1].split(' Mesh ')[1]

  def translation(**overrides):
    return tiny_config({text_dir!r}, **{{'num_train_steps': 8, 'checkpoint_every_steps': 4,
                                        'eval_every_steps': 4, 'num_eval_batches': 1,
                                        **overrides}})

  full = train.train_and_evaluate(translation(mesh_shape=(2, 2, 2)), tmp + '/full')
  train.train_and_evaluate(translation(mesh_shape=(2, 2, 2), num_train_steps=4),
                           tmp + '/resumed')
  resumed = train.train_and_evaluate(translation(mesh_shape=(8, 1, 1)), tmp + '/resumed')
  out['resume_diff'] = max(float(np.max(np.abs(np.asarray(a) - np.asarray(b))))
                           for a, b in zip(jax.tree.leaves(full), jax.tree.leaves(resumed)))
  out['resume_steps'] = [int(full.step), int(resumed.step)]
  out['resume_mesh'] = mesh_line(tmp + '/resumed')

  lora = translation(mesh_shape=(1, 4, 2), num_train_steps=4, init_from=tmp + '/full',
                     peft_method='lora', grad_accum_steps=2)
  state = train.train_and_evaluate(lora, tmp + '/lora')
  out['lora'] = [int(state.step), sorted(state.params), mesh_line(tmp + '/lora')]

  mono = {mono!r}
  for name, module, shape in (('span', pretrain_span, (2, 4, 1)),
                              ('mlm', pretrain_mlm_de, (2, 2, 2))):
    config = module.get_config('tiny')
    config.update(train_files=(mono,), train_weights=(), eval_files=(mono,), num_train_steps=3,
                  eval_every_steps=3, checkpoint_every_steps=3, num_eval_batches=1,
                  mesh_shape=shape)
    state = train.train_and_evaluate(config, tmp + '/' + name)
    out[name] = [int(state.step), mesh_line(tmp + '/' + name)]
  print('RESULT', json.dumps(out))
''')


@pytest.fixture(scope='module')
def trainer_runs(small_text_dir, data_dir, tmp_path_factory):
  tmp = tmp_path_factory.mktemp('meshes')
  with gzip.open(os.path.join(data_dir, 'mono', 'train.1.de.gz'), 'rt', encoding='utf-8') as f:
    (tmp / 'mono.de').write_text(''.join(next(f) for _ in range(500)), encoding='utf-8')
  return run_8_devices(TRAINER_SCRIPT.format(repo=REPO, tmp=str(tmp), text_dir=small_text_dir,
                                              mono=str(tmp / 'mono.de')))


def test_a_run_resumed_on_another_mesh_continues_like_the_uninterrupted_one(trainer_runs):
  assert trainer_runs['resume_steps'] == [8, 8]
  assert trainer_runs['resume_mesh'].startswith("{'data': 8, 'fsdp': 1, 'tensor': 1}")
  assert trainer_runs['resume_diff'] < PARAM_ATOL, trainer_runs


def test_peft_and_pretraining_run_under_non_trivial_meshes(trainer_runs):
  steps, trees, mesh = trainer_runs['lora']
  assert steps == 4 and trees == ['base', 'peft'], trainer_runs['lora']
  assert mesh.startswith("{'data': 1, 'fsdp': 4, 'tensor': 2}"), mesh
  assert trainer_runs['span'][0] == 3 and "'fsdp': 4" in trainer_runs['span'][1]
  assert trainer_runs['mlm'][0] == 3 and "'tensor': 2" in trainer_runs['mlm'][1]
