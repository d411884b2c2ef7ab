"""Shared fixtures: the real Multi30k files and small configs built from them."""
import gzip
import os
import shutil
import sys
import tempfile

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# JAX's persistent compilation cache, one folder per test run, shared by the pytest-xdist
# workers (they inherit this environment from the controller, which imports this file
# first) and by the CLI subprocesses of the tests: the same tiny models are compiled in
# many tests, and a program compiled once is then read back. Set before jax is imported.
# Programs that compile in under a second are not cached (JAX's default threshold).
_CACHE_ENV = 'JAX_COMPILATION_CACHE_DIR'
_OWN_CACHE = None
if not os.environ.get(_CACHE_ENV):
  _OWN_CACHE = tempfile.mkdtemp(prefix='transformer_jax_test_jax_cache_')
  os.environ[_CACHE_ENV] = _OWN_CACHE


def pytest_sessionfinish(session, exitstatus):  # pylint: disable=unused-argument
  """The process that made the cache folder removes it (the xdist controller last)."""
  if _OWN_CACHE and not os.environ.get('PYTEST_XDIST_WORKER'):
    shutil.rmtree(_OWN_CACHE, ignore_errors=True)
sys.path.insert(0, REPO)  # `configs` is imported as a package in tests.

from configs import encoder, mt  # pylint: disable=g-import-not-at-top


def multi30k_dir() -> str:
  """$TRANSFORMER_JAX_DATA_DIR, else ../shared/data/multi30k beside the checkout."""
  return os.environ.get(mt.DATA_DIR_ENV) or os.path.join(REPO, '..', 'shared', 'data',
                                                         'multi30k')


@pytest.fixture(scope='session')
def data_dir() -> str:
  path = multi30k_dir()
  if not os.path.exists(os.path.join(path, 'train.de.gz')):
    pytest.fail(f'Multi30k not found in {path}; set {mt.DATA_DIR_ENV}')
  return path


def head(path: str, n: int) -> list[str]:
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    return [next(f).rstrip('\n') for _ in range(n)]


def write_text_dataset(out, data_dir: str, num_train: int, num_val: int) -> str:
  """A 'text' dataset in `out`: train = the first `num_train` Multi30k train pairs, val =
  the first `num_val` val pairs."""
  for split, prefix, n in (('train', 'train', num_train), ('val', 'val', num_val)):
    for lang in ('de', 'en'):
      lines = head(os.path.join(data_dir, f'{prefix}.{lang}.gz'), n)
      (out / f'{split}.{lang}').write_text('\n'.join(lines) + '\n', encoding='utf-8')
  return str(out)


@pytest.fixture(scope='session')
def small_text_dir(data_dir, tmp_path_factory) -> str:
  """A 'text' dataset: train = first 256 Multi30k train pairs, val = first 64 val pairs."""
  return write_text_dataset(tmp_path_factory.mktemp('text'), data_dir, 256, 64)


def tiny_config(text_dir: str, **overrides):
  """configs/mt.py:tiny on a 'text' dataset, with overrides."""
  config = mt.get_config('tiny')
  config.dataset_name = 'text'
  config.data_dir = text_dir
  config.eval_split = 'val'
  config.test_split = ''        # Tests of decoding turn these on.
  config.bleu_every_steps = 0
  config.vocab_size = 300
  for key, value in overrides.items():
    config[key] = value
  return config


@pytest.fixture(scope='session')
def sst2_dir(tmp_path_factory) -> str:
  """train = the first 400 SST-2 training rows, validation = the first 100 of them."""
  out = tmp_path_factory.mktemp('sst2')
  path = os.path.join(encoder.shared_data('sst2'), 'train.tsv.gz')
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    lines = [next(f) for _ in range(401)]
  (out / 'train.tsv').write_text(''.join(lines), encoding='utf-8')
  (out / 'validation.tsv').write_text(''.join(lines[:101]), encoding='utf-8')
  return str(out)


@pytest.fixture(scope='session')
def germeval_dir(tmp_path_factory):
  """train = the first 300 GermEval training sentences, validation = the first 60."""
  out = tmp_path_factory.mktemp('germeval')
  sentences, current = [], []
  with gzip.open(os.path.join(encoder.shared_data('germeval2014'), 'train.conll.gz'), 'rt',
                 encoding='utf-8') as f:
    for line in f:
      current.append(line)
      if not line.strip():
        sentences.append(''.join(current))
        current = []
        if len(sentences) == 300:
          break
  (out / 'train.conll').write_text(''.join(sentences), encoding='utf-8')
  (out / 'validation.conll').write_text(''.join(sentences[:60]), encoding='utf-8')
  return str(out)


@pytest.fixture(scope='session')
def source_run(sst2_dir, tmp_path_factory):
  """A tiny classification run of 6 steps (checkpoints and evaluations at 3 and 6): its
  workdir, its config and its final parameters (flat, host)."""
  workdir = str(tmp_path_factory.mktemp('source'))
  from tests.test_tasks import classification_config  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  from transformer_jax import init_from, train  # pylint: disable=g-import-not-at-top
  config = classification_config(sst2_dir, num_train_steps=6, eval_every_steps=3,
                                 checkpoint_every_steps=3)
  state = train.train_and_evaluate(config, workdir)
  return workdir, config, init_from.flatten(jax.device_get(state.params))[0]
