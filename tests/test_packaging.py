"""The package installs from a built wheel into a fresh virtual environment and runs from
another folder: `import transformer_jax`, and the `transformer-jax` console script trains
the tiny config found in the installed package."""
import glob
import os
import site
import subprocess
import sys

from tests.conftest import REPO, multi30k_dir


def test_wheel_installs_into_a_fresh_venv_and_trains_from_another_folder(tmp_path):
  wheels, venv, elsewhere = tmp_path / 'wheels', tmp_path / 'venv', tmp_path / 'elsewhere'
  elsewhere.mkdir()
  run = lambda *args, **kw: subprocess.run(args, check=True, capture_output=True, text=True,
                                           timeout=600, **kw)
  # No build isolation: the build must not need the network (setuptools is installed).
  run(sys.executable, '-m', 'pip', 'wheel', '-q', '--no-deps', '--no-build-isolation',
      '-w', str(wheels), REPO)
  [wheel] = glob.glob(str(wheels / 'transformer_jax-*.whl'))
  run(sys.executable, '-m', 'venv', '--without-pip', str(venv))
  python = str(venv / 'bin' / 'python')
  run(sys.executable, '-m', 'pip', '--python', python, 'install', '-q', '--no-deps', wheel)
  # The dependencies come from this interpreter's site-packages (no network here).
  [new_site] = glob.glob(str(venv / 'lib' / 'python*' / 'site-packages'))
  with open(os.path.join(new_site, 'deps.pth'), 'w') as f:
    f.write('\n'.join(site.getsitepackages()) + '\n')
  env = {k: v for k, v in os.environ.items() if k != 'PYTHONPATH'}
  env.update(TRANSFORMER_JAX_DATA_DIR=multi30k_dir(), TF_CPP_MIN_LOG_LEVEL='3')
  # The Python API loads a shipped config (which imports two others) without putting the
  # package's folder on sys.path, where its modules would shadow top-level ones.
  script = ('import os, sys, transformer_jax; from transformer_jax import config_schema; '
            "c = config_schema.load_config('configs/multi30k_de_en.py'); "
            'print(os.path.dirname(transformer_jax.__file__)); print(c.num_train_steps); '
            "print(sorted(p for p in sys.path if p.rstrip('/').endswith('transformer_jax')))")
  where, steps, shadowing = run(python, '-c', script, cwd=elsewhere,
                                env=env).stdout.strip().splitlines()
  assert where.startswith(new_site), where
  assert (steps, shadowing) == ('1400', '[]')
  assert os.path.exists(os.path.join(where, 'configs', 'mt.py'))
  result = run(str(venv / 'bin' / 'transformer-jax'), '--config=configs/mt.py:tiny',
               '--workdir=run', '--config.num_train_steps=2', '--config.eval_every_steps=2',
               '--config.bleu_every_steps=0', '--config.test_split=', cwd=elsewhere, env=env)
  output = result.stdout + result.stderr
  assert 'step 2: train loss' in output, output[-2000:]
  assert os.path.isdir(elsewhere / 'run' / 'checkpoints' / '2')
