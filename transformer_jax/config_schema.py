"""The fields a run config must have, their types and allowed values.

`validate(config)` runs before any work is done and raises `ConfigError` with one line
naming the field at fault. Unknown fields are errors too, so a typo in a config file
does not silently fall back to a default.
"""
from __future__ import annotations

import json
import os
from typing import Any, Callable


class ConfigError(ValueError):
  """A config field is unknown, missing, of the wrong type or has an impossible value."""


_positive = (lambda v: v > 0, 'must be > 0')
_non_negative = (lambda v: v >= 0, 'must be >= 0')
_probability = (lambda v: 0 <= v < 1, 'must be in [0, 1)')
_any = (lambda v: True, '')


def _one_of(*choices):
  return (lambda v: v in choices, f'must be one of {choices}')


# field -> (type(s), (predicate, what the predicate requires))
SCHEMA: dict[str, tuple[Any, tuple[Callable[[Any], bool], str]]] = {
    # Data
    'dataset_name': (str, (bool, 'must not be empty')),
    'data_dir': (str, _any),
    'tfds_data_dir': (str, _any),
    'source_lang': (str, (bool, 'must not be empty')),
    'target_lang': (str, (bool, 'must not be empty')),
    'train_split': (str, (bool, 'must not be empty')),
    'eval_split': (str, (bool, 'must not be empty')),
    'max_source_length': (int, (lambda v: v >= 2, 'must be >= 2')),
    'max_target_length': (int, (lambda v: v >= 2, 'must be >= 2')),
    'truncate': (bool, _any),
    'max_tokens_per_batch': (int, _positive),
    'length_bucket_step': (float, (lambda v: v > 1, 'must be > 1')),
    'shuffle_buffer_size': (int, _positive),
    'pack_examples': (bool, _any),
    # Tokenizer
    'vocab_size': (int, (lambda v: v > 4, 'must be > 4 (ids 0-3 are special)')),
    'spm_model_type': (str, _one_of('unigram', 'bpe')),
    'spm_max_sentences': (int, _positive),
    'spm_character_coverage': (float, (lambda v: 0 < v <= 1, 'must be in (0, 1]')),
    # Model
    'd_model': (int, _positive),
    'num_heads': (int, _positive),
    'd_ff': (int, _positive),
    'num_encoder_layers': (int, _positive),
    'num_decoder_layers': (int, _positive),
    'dropout_rate': (float, _probability),
    'attention_dropout_rate': (float, _probability),
    'share_embeddings': (bool, _any),
    'dtype': (str, _one_of('float32', 'bfloat16', 'float16')),
    'param_dtype': (str, _one_of('float32', 'bfloat16', 'float16')),
    # Loss
    'loss': (str, (bool, 'must not be empty')),
    'label_smoothing': (float, _probability),
    # Optimizer
    'learning_rate': (float, _positive),
    'warmup_steps': (int, _non_negative),
    'schedule': (str, _one_of('rsqrt', 'cosine', 'constant')),
    'adam_b1': (float, _probability),
    'adam_b2': (float, _probability),
    'adam_eps': (float, _positive),
    'weight_decay': (float, _non_negative),
    'max_grad_norm': (float, _non_negative),
    # Decoding and evaluation
    'test_split': (str, _any),
    'decoding': (str, _one_of('beam', 'greedy', 'sample')),
    'beam_size': (int, _positive),
    'length_penalty': (float, _non_negative),
    'temperature': (float, _positive),
    'top_k': (int, _non_negative),
    'decode_max_length_ratio': (float, _non_negative),
    'decode_max_length_offset': (int, (lambda v: v >= 1, 'must be >= 1')),
    'decode_batch_tokens': (int, _positive),
    'bleu_every_steps': (int, _non_negative),
    'patience': (int, _non_negative),
    'average_checkpoints': (int, _positive),
    # Loop
    'seed': (int, _any),
    'num_train_steps': (int, _non_negative),
    'eval_every_steps': (int, _positive),
    'num_eval_batches': (int, (lambda v: v == -1 or v > 0, 'must be -1 (all) or > 0')),
    'checkpoint_every_steps': (int, _positive),
    'keep_checkpoints': (int, _positive),
    'log_every_steps': (int, _positive),
    'peak_flops_per_device': (float, _non_negative),
}


def validate(config) -> None:
  """Checks every field of `config` (an ml_collections.ConfigDict) against SCHEMA.

  Raises:
    ConfigError: naming the first field that is unknown, missing, of the wrong type
      (ints are accepted for floats) or out of range, or d_model not divisible by
      num_heads, or source_lang == target_lang.
  """
  for name in config.keys():
    if name not in SCHEMA:
      raise ConfigError(f'config.{name}: unknown field')
  for name, (kind, (ok, requirement)) in SCHEMA.items():
    if name not in config:
      raise ConfigError(f'config.{name}: missing field')
    value = config[name]
    kinds = (int, float) if kind is float else (kind,)
    if not isinstance(value, kinds) or (kind is not bool and isinstance(value, bool)):
      raise ConfigError(f'config.{name}={value!r}: must be of type {kind.__name__}')
    if not ok(value):
      raise ConfigError(f'config.{name}={value!r}: {requirement}')
  if config.d_model % config.num_heads:
    raise ConfigError(f'config.d_model={config.d_model}: must be divisible by '
                      f'config.num_heads={config.num_heads}')
  if config.source_lang == config.target_lang:
    raise ConfigError(f'config.target_lang={config.target_lang!r}: must differ from '
                      'config.source_lang')


# Fields that fix the shapes of the parameters: eval/translate must use the trained values.
MODEL_FIELDS = ('d_model', 'num_heads', 'd_ff', 'num_encoder_layers', 'num_decoder_layers',
                'share_embeddings', 'param_dtype')


def save_model_config(config, vocab_size: int, workdir: str) -> None:
  """Writes {workdir}/model_config.json: MODEL_FIELDS and the tokenizer's vocab size."""
  fields = {name: config[name] for name in MODEL_FIELDS}
  fields['vocab_size'] = vocab_size
  path = os.path.join(workdir, 'model_config.json')
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(fields, f, indent=1)
  os.replace(path + '.tmp', path)


def check_model_config(config, workdir: str) -> None:
  """Raises ConfigError naming the first model field that differs from the one the
  checkpoints in `workdir` were trained with (nothing to check if it has no record)."""
  path = os.path.join(workdir, 'model_config.json')
  if not os.path.exists(path):
    return
  with open(path, encoding='utf-8') as f:
    trained = json.load(f)
  for name in MODEL_FIELDS:
    if name in trained and config[name] != trained[name]:
      raise ConfigError(f'config.{name}={config[name]!r}, but the model in {workdir} was '
                        f'trained with {trained[name]!r}: pass --config.{name}={trained[name]}')
