"""Every config file in configs/ loads and passes the schema; the schema rejects bad values."""
import glob
import importlib.util
import os
import sys

import ml_collections
import pytest

from tests.conftest import REPO
from transformer_jax import config_schema
from configs import mt

CONFIG_FILES = sorted(p for p in glob.glob(os.path.join(REPO, 'configs', '*.py'))
                      if not p.endswith('__init__.py'))


@pytest.mark.parametrize('path', CONFIG_FILES, ids=os.path.basename)
def test_config_file_is_valid(path):
  spec = importlib.util.spec_from_file_location('config_under_test', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config_schema.validate(module.get_config())


def test_schema_covers_exactly_the_default_fields():
  assert set(mt.get_config().keys()) == (set(config_schema.SCHEMA)
                                         | set(config_schema.TRANSLATION_SCHEMA))
  config_schema.validate(mt.get_config('tiny'))


@pytest.mark.parametrize('field, value, message', [
    ('d_model', 250, 'must be divisible by config.num_heads=4'),
    ('num_train_steps', -1, 'must be >= 0'),
    ('dropout_rate', 1.0, 'must be in [0, 1)'),
    ('beam_size', 0, 'must be > 0'),
    ('target_lang', 'de', 'must differ from config.source_lang'),
    ('vocab_size', 4, 'must be > 4'),
    ('share_embeddings', 1, 'must be of type bool'),
    ('learning_rate', '1e-3', 'must be of type float'),
])
def test_bad_values_name_the_field(field, value, message):
  # A config file may build any types: start from a plain dict, not the typed defaults.
  config = ml_collections.ConfigDict({**mt.get_config().to_dict(), field: value})
  with pytest.raises(config_schema.ConfigError, match=f'config.{field}') as e:
    config_schema.validate(config)
  assert message in str(e.value)


def test_unknown_field_is_an_error():
  config = mt.get_config()
  config.d_modle = 128
  with pytest.raises(config_schema.ConfigError, match='config.d_modle: unknown field'):
    config_schema.validate(config)


def test_model_config_is_checked_only_once_a_checkpoint_exists(tmp_path):
  config = mt.get_config('tiny')
  config_schema.save_model_config(config, 500, str(tmp_path))
  config.d_model = 64  # A first start that stopped at an error trained nothing: allowed.
  config_schema.check_model_config(config, str(tmp_path))
  (tmp_path / 'checkpoints' / '10').mkdir(parents=True)
  with pytest.raises(config_schema.ConfigError, match='config.d_model=64, but the model'):
    config_schema.check_model_config(config, str(tmp_path))


def test_load_config_takes_a_variant_and_finds_the_shipped_files_from_any_folder(
    tmp_path, monkeypatch):
  monkeypatch.chdir(tmp_path)
  assert config_schema.load_config('configs/mt.py:tiny').d_model == 32
  assert config_schema.load_config('mt.py').d_model == 256
  (tmp_path / 'mine.py').write_text(
      'import ml_collections\n'
      'def get_config(variant=""):\n'
      '  return ml_collections.ConfigDict({"variant": variant})\n')
  assert config_schema.load_config('mine.py:big').variant == 'big'
  with pytest.raises(FileNotFoundError, match='nope.py: no such config file'):
    config_schema.load_config('configs/nope.py')


def test_translation_data_dir_falls_back_to_the_shared_data_folder(monkeypatch, tmp_path):
  monkeypatch.delenv(mt.DATA_DIR_ENV, raising=False)
  monkeypatch.delenv(mt.SHARED_DATA_ENV, raising=False)
  # The configs package that mt.py imported (configs, or transformer_jax.configs).
  monkeypatch.setattr(sys.modules[mt.shared_data_root.__module__], 'BESIDE_CHECKOUT',
                      str(tmp_path))
  assert mt.get_config().data_dir == ''  # Download.
  (tmp_path / 'multi30k').mkdir()  # ../shared/data/multi30k beside the checkout.
  assert mt.get_config().data_dir == str(tmp_path / 'multi30k')
  monkeypatch.setenv(mt.SHARED_DATA_ENV, '/data/shared')
  assert mt.get_config().data_dir == '/data/shared/multi30k'
  monkeypatch.setenv(mt.DATA_DIR_ENV, '/data/m30k')
  assert mt.get_config().data_dir == '/data/m30k'
