"""The fields a run config must have, their types and allowed values.

`validate(config)` runs before any work is done and raises `ConfigError` with one line
naming the field at fault. Unknown fields are errors too, so a typo in a config file
does not silently fall back to a default.
"""
from __future__ import annotations

import json
import os
import re
from typing import Any, Callable

from transformer_jax import multihost


class ConfigError(ValueError):
  """A config field is unknown, missing, of the wrong type or has an impossible value."""


def configs_dir() -> str:
  """The folder of the shipped config files: `configs/` beside the package in a checkout,
  or the copy an installed wheel carries as `transformer_jax/configs`."""
  package = os.path.dirname(os.path.abspath(__file__))
  installed = os.path.join(package, 'configs')
  return installed if os.path.isdir(installed) else os.path.join(os.path.dirname(package),
                                                                   'configs')


def load_config(spec: str):
  """The config of `spec`, 'PATH.py[:variant]' as `--config=` takes it, for Python use:
  `load_config('configs/mt.py:tiny')`. A path that does not exist relative to the working
  directory is looked up by file name among the shipped configs (`configs_dir`), so an
  installed toolkit finds 'configs/mt.py' (or 'mt.py') from any folder. Fields can then be
  set like attributes; `train.train_and_evaluate` validates them.

  Returns:
    The file's `get_config(variant)` (`get_config()` without a variant): an
    ml_collections.ConfigDict.

  Raises:
    FileNotFoundError: no such config file, here or among the shipped ones.
  """
  import importlib.util  # pylint: disable=g-import-not-at-top
  path, _, variant = spec.partition(':')
  if not os.path.isfile(path):
    shipped = os.path.join(configs_dir(), os.path.basename(path))
    if not os.path.isfile(shipped):
      raise FileNotFoundError(f'{spec}: no such config file (nor {shipped})')
    path = shipped
  name = 'transformer_jax_config_' + re.sub(r'\W', '_', os.path.basename(path)[:-3])
  module_spec = importlib.util.spec_from_file_location(name, path)
  module = importlib.util.module_from_spec(module_spec)
  module_spec.loader.exec_module(module)
  return module.get_config(variant) if variant else module.get_config()


_positive = (lambda v: v > 0, 'must be > 0')
_non_negative = (lambda v: v >= 0, 'must be >= 0')
_probability = (lambda v: 0 <= v < 1, 'must be in [0, 1)')
_any = (lambda v: True, '')


def _one_of(*choices):
  return (lambda v: v in choices, f'must be one of {choices}')


def _regex_problem(values) -> str:
  """'' when every value is a string that compiles as a regex, else what is wrong with the
  first one that does not."""
  for v in values:
    if not isinstance(v, str):
      return f'{v!r} is not a string'
    try:
      re.compile(v)
    except re.error as e:
      return f'{v!r} is not a valid regex ({e})'
  return ''


# Characters W&B refuses in a project name.
WANDB_PROJECT_BAD = '/\\#?%:'

LOGICAL_AXES = ('batch', 'length', 'embed', 'heads', 'kv', 'mlp', 'vocab')
MESH_AXES = ('data', 'fsdp', 'tensor')


def _rules_problem(rules) -> str:
  """'' when `rules` are (logical axis, mesh axis, mesh axes or None) pairs over LOGICAL_AXES
  and MESH_AXES, else what is wrong with the first pair that is not."""
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      return f'{rule!r} is not a (logical axis, mesh axes) pair'
    logical, mesh = rule
    if logical not in LOGICAL_AXES:
      return f'{rule!r}: logical axis {logical!r} is not one of {LOGICAL_AXES}'
    names = () if mesh is None else (mesh,) if isinstance(mesh, str) else mesh
    if not isinstance(names, (tuple, list)) or any(n not in MESH_AXES for n in names):
      return f'{rule!r}: {mesh!r} is not None or mesh axes from {MESH_AXES}'
  return ''



# A requirement may be a function of the value, for a message naming what is wrong.
_regexes = (lambda v: not _regex_problem(v),
            lambda v: f'must be valid regexes: {_regex_problem(v)}')
_rules = (lambda v: not _rules_problem(v),
          lambda v: f'must be (logical axis, mesh axes) pairs: {_rules_problem(v)}')
_file_names = (lambda v: all(isinstance(x, str) and x for x in v), 'must be file paths')

# field -> (type(s), (predicate, what the predicate requires: a message, or a function of
# the value giving one)). Fields every task has:
SCHEMA: dict[str, tuple[Any, tuple[Callable[[Any], bool], str | Callable[[Any], str]]]] = {
    'task': (str, (bool, 'must not be empty')),
    # Data
    'data_dir': (str, _any),
    'train_split': (str, (bool, 'must not be empty')),
    'eval_split': (str, (bool, 'must not be empty')),
    'test_split': (str, _any),
    'truncate': (bool, _any),
    'max_tokens_per_batch': (int, _positive),
    'length_bucket_step': (float, (lambda v: v > 1, 'must be > 1')),
    'shuffle_buffer_size': (int, _positive),
    # Tokenizer (SentencePiece, trained on the training split)
    'vocab_size': (int, (lambda v: v > 4, 'must be > 4 (ids 0-3 are special)')),
    'spm_model_type': (str, _one_of('unigram', 'bpe')),
    'spm_max_sentences': (int, _positive),
    'spm_character_coverage': (float, (lambda v: 0 < v <= 1, 'must be in (0, 1]')),
    # Model
    'd_model': (int, _positive),
    'num_heads': (int, _positive),
    'd_ff': (int, _positive),
    'num_encoder_layers': (int, _positive),
    'dropout_rate': (float, _probability),
    'attention_dropout_rate': (float, _probability),
    'dtype': (str, _one_of('float32', 'bfloat16', 'float16')),
    'param_dtype': (str, _one_of('float32', 'bfloat16', 'float16')),
    # Loss
    'loss': (str, (bool, 'must not be empty')),
    'label_smoothing': (float, _probability),
    # Optimizer
    'optimizer': (str, _one_of('adamw', 'sgd')),
    'learning_rate': (float, _positive),
    'warmup_steps': (int, _non_negative),
    'schedule': (str, _one_of('rsqrt', 'cosine', 'constant', 'linear')),
    'adam_b1': (float, _probability),
    'adam_b2': (float, _probability),
    'adam_eps': (float, _positive),
    'momentum': (float, _probability),
    'nesterov': (bool, _any),
    'weight_decay': (float, _non_negative),
    'max_grad_norm': (float, _non_negative),
    'layer_lr_decay': (float, (lambda v: 0 < v <= 1, 'must be in (0, 1]; 1 = off')),
    # Evaluation and loop
    'patience': (int, _non_negative),
    'average_checkpoints': (int, _positive),
    'seed': (int, _any),
    'num_train_steps': (int, _non_negative),
    'eval_every_steps': (int, _positive),
    'num_eval_batches': (int, (lambda v: v == -1 or v > 0, 'must be -1 (all) or > 0')),
    'checkpoint_every_steps': (int, _positive),
    'keep_checkpoints': (int, _positive),
    'log_every_steps': (int, _positive),
    'peak_flops_per_device': (float, _non_negative),
    # Initialization (transformer_jax/init_from.py): '' (from scratch), 'hf:FOLDER', a run's
    # workdir or one of its checkpoint folders. The path is checked when the run starts
    # (`init_from.resolve`): a config file may name a run that does not exist yet.
    'init_from': (str, _any),
    'init_rules': ((tuple, list), (
        lambda v: all(isinstance(r, (tuple, list)) and len(r) == 2 and isinstance(r[0], str)
                      and (r[1] is None or isinstance(r[1], str)) for r in v),
        'must be (regex, replacement or None) pairs')),
    'init_strict': (bool, _any),
    # Parameter-efficient fine-tuning (transformer_jax/peft/), beside a frozen init_from.
    'peft_method': (str, _one_of('', 'lora', 'adapter', 'prefix', 'prompt', 'ia3')),
    'peft_modules_to_save': ((tuple, list), _regexes),
    'peft_token_rows': ((tuple, list), (lambda v: all(isinstance(i, int) and i >= 0 for i in v),
                                        'must be token ids (integers >= 0)')),
    'peft_token_rows_from': ((tuple, list), _file_names),
    'peft_token_rows_except': ((tuple, list), _file_names),
    'lora_rank': (int, _positive),
    'lora_alpha': (float, _positive),
    'lora_dropout': (float, _probability),
    'lora_targets': ((tuple, list), (lambda v: len(v) > 0 and not _regex_problem(v),
                                     lambda v: 'must be one or more valid regexes'
                                     + (f': {_regex_problem(v)}' if v else ''))),
    'adapter_size': (int, _positive),
    'prefix_length': (int, _positive),
    'prefix_mlp_hidden': (int, _non_negative),
    'prompt_length': (int, _positive),
    # Devices and processes (transformer_jax/sharding.py); checked against the devices at
    # the start (`sharding.make_mesh`).
    'mesh_shape': ((tuple, list), (
        lambda v: (len(v) == 3 and all(isinstance(n, int) and (n > 0 or n == -1) for n in v)
                   and list(v).count(-1) <= 1),
        'must be 3 sizes (data, fsdp, tensor), each > 0 or one of them -1 (the rest)')),
    'logical_axis_rules': ((tuple, list), _rules),
    'grad_accum_steps': (int, _positive),
    'coordinator_address': (str, _any),
    'num_processes': (int, _non_negative),
    'process_id': (int, (lambda v: v >= -1, 'must be >= 0, or -1 (from the environment)')),
    # Experiment tracking (transformer_jax/tracking.py): W&B beside TensorBoard.
    'wandb_project': (str, (lambda v: len(v) <= 128 and not set(v) & set(WANDB_PROJECT_BAD),
                            f'must be at most 128 characters, none of {WANDB_PROJECT_BAD}')),
    'wandb_entity': (str, _any),
    'wandb_run_name': (str, _any),
    # Regularizers (transformer_jax/regularizers.py)
    'adversarial': (str, _one_of('', 'fgm', 'pgd', 'freelb')),
    'adversarial_epsilon': (float, _positive),
    'adversarial_steps': (int, _positive),
    'adversarial_step_size': (float, _positive),
    'r_drop_alpha': (float, _non_negative),
    'ema_decay': (float, _probability),
}

# Fields of task 'translation' (transformer_jax/tasks/translation.py).
TRANSLATION_SCHEMA = {
    'dataset_name': (str, (bool, 'must not be empty')),
    'tfds_data_dir': (str, _any),
    'source_lang': (str, (bool, 'must not be empty')),
    'target_lang': (str, (bool, 'must not be empty')),
    'max_source_length': (int, (lambda v: v >= 2, 'must be >= 2')),
    'max_target_length': (int, (lambda v: v >= 2, 'must be >= 2')),
    'pack_examples': (bool, _any),
    'train_fraction': (float, (lambda v: 0 < v <= 1, 'must be in (0, 1]')),
    # Back-translation: synthetic pairs mixed into training (transformer_jax/backtranslation.py).
    'synthetic_pairs': (str, _any),
    'synthetic_ratio': (float, _probability),
    'synthetic_tag': (bool, _any),
    'num_decoder_layers': (int, _positive),
    'share_embeddings': (bool, _any),
    'decoding': (str, _one_of('beam', 'greedy', 'sample')),
    'beam_size': (int, _positive),
    'length_penalty': (float, _non_negative),
    'temperature': (float, _positive),
    'top_k': (int, _non_negative),
    'top_p': (float, (lambda v: 0 < v <= 1, 'must be in (0, 1]')),
    'decode_max_length_ratio': (float, _non_negative),
    'decode_max_length_offset': (int, (lambda v: v >= 1, 'must be >= 1')),
    'decode_batch_tokens': (int, _positive),
    'bleu_every_steps': (int, _non_negative),
    'spm_byte_fallback': (bool, _any),  # New tokenizers only (tokenizer.train).
    'spm_extra_text': (str, _any),  # Paths or globs; read for a new tokenizer only.
    # Noise augmentation of the training pairs (transformer_jax/augment.py).
    'noise_side': (str, _one_of('source', 'target', 'both')),
    'word_shuffle': (int, _non_negative),
    'word_dropout': (float, _probability),
    'word_blank': (float, _probability),
}

_labels = (lambda v: all(isinstance(x, str) and x for x in v) and len(set(v)) == len(v),
           'must be distinct non-empty strings')

# Fields of the encoder-only tasks 'classification' and 'tagging'
# (transformer_jax/tasks/classification.py, tagging.py).
ENCODER_SCHEMA = {
    'max_length': (int, (lambda v: v >= 3, 'must be >= 3')),
    'num_labels': (int, _positive),
    'labels': ((tuple, list), _labels),
    'labels_file': (str, _any),
    'pooling': (str, _one_of('first', 'mean')),
    'text_column': (str, _any),
    'label_column': (str, _any),
    'tag_column': (int, _positive),
    'repair_iob': (bool, _any),
    'word_unk': (float, _probability),
    'word_unk_max_count': (int, _non_negative),
}

_files = (lambda v: len(v) > 0 and all(isinstance(x, str) and x for x in v),
          'must name at least one file or glob')
_density = (lambda v: 0 < v < 1, 'must be in (0, 1)')

# Fields of every pretraining task (transformer_jax/tasks/pretraining.py).
PRETRAINING_SCHEMA = {
    'train_files': ((tuple, list), _files),
    'train_weights': ((tuple, list), (lambda v: all(isinstance(x, (int, float)) and x >= 0
                                                    for x in v), 'must be numbers >= 0')),
    'eval_files': ((tuple, list), _files),
    'num_sentinels': (int, _non_negative),
}

# Translation fields that change the parallel training pairs (noise, back-translation):
# the denoising tasks, which read monolingual text, do not have them.
AUGMENTATION_FIELDS = ('noise_side', 'word_shuffle', 'word_dropout', 'word_blank',
                       'synthetic_pairs', 'synthetic_ratio', 'synthetic_tag')

# Fields of 'span_corruption' and 'text_infilling' (tasks/denoising.py): the translation
# model and decoding fields, without the parallel data.
DENOISING_SCHEMA = {
    **{k: v for k, v in TRANSLATION_SCHEMA.items()
       if k not in ('dataset_name', 'tfds_data_dir', 'source_lang', 'target_lang',
                    'pack_examples', 'train_fraction', 'bleu_every_steps', 'spm_extra_text',
                    *AUGMENTATION_FIELDS)},
    **PRETRAINING_SCHEMA,
    'noise_density': (float, _density),
    'mean_noise_span_length': (float, (lambda v: v >= 1, 'must be >= 1')),
    'mask_ratio': (float, _density),
    'poisson_lambda': (float, _positive),
}

# Fields of 'masked_lm' (tasks/masked_lm.py).
MASKED_LM_SCHEMA = {
    **PRETRAINING_SCHEMA,
    'max_length': (int, (lambda v: v >= 3, 'must be >= 3')),
    'mask_prob': (float, _density),
    'whole_word_masking': (bool, _any),
}

TASK_SCHEMAS = {'translation': TRANSLATION_SCHEMA, 'classification': ENCODER_SCHEMA,
                'tagging': ENCODER_SCHEMA, 'span_corruption': DENOISING_SCHEMA,
                'text_infilling': DENOISING_SCHEMA, 'masked_lm': MASKED_LM_SCHEMA}


def task_schema(name: str) -> dict:
  """The extra fields of task `name`: a built-in task's, or the `FIELDS` dict of a user's
  task class named by import path ('my_pkg.tasks:MyTask'; {} if it has none).

  Raises:
    ConfigError: the name is neither a built-in task nor an importable class.
  """
  if name in TASK_SCHEMAS:
    return TASK_SCHEMAS[name]
  from transformer_jax import tasks  # pylint: disable=g-import-not-at-top (heavy imports)
  return getattr(tasks.get_task_class(name), 'FIELDS', {})


def validate(config) -> None:
  """Checks every field of `config` (an ml_collections.ConfigDict) against SCHEMA plus the
  fields of its task (`task_schema(config.task)`).

  Raises:
    ConfigError: naming the first field that is unknown, missing, of the wrong type
      (ints are accepted for floats) or out of range, or d_model not divisible by
      num_heads, or (translation) source_lang == target_lang, or (classification,
      tagging) labels that disagree with num_labels, or cadences the loop cannot honour
      (`check_cadences`), or multi-process settings that cannot start (`check_processes`).
  """
  if not isinstance(config.get('task'), str):
    raise ConfigError('config.task: missing field (translation, classification, tagging or '
                      "'package.module:TaskClass')")
  schema = {**SCHEMA, **task_schema(config.task)}
  for name in config.keys():
    if name not in schema:
      owners = [task for task, fields in TASK_SCHEMAS.items() if name in fields]
      hint = (f' (a field of task {" and ".join(owners)}: is config.task right, or the config '
              'file?)' if owners else '')
      raise ConfigError(f'config.{name}: unknown field for task {config.task!r}{hint}')
  for name, (kind, (ok, requirement)) in schema.items():
    if name not in config:
      raise ConfigError(f'config.{name}: missing field')
    value = config[name]
    kinds = (int, float) if kind is float else kind if isinstance(kind, tuple) else (kind,)
    if not isinstance(value, kinds) or (bool not in kinds and isinstance(value, bool)):
      names = 'float' if kind is float else '/'.join(k.__name__ for k in kinds)
      raise ConfigError(f'config.{name}={value!r}: must be of type {names}')
    if not ok(value):
      raise ConfigError(f'config.{name}={value!r}: '
                        f'{requirement(value) if callable(requirement) else requirement}')
  if config.d_model % config.num_heads:
    raise ConfigError(f'config.d_model={config.d_model}: must be divisible by '
                      f'config.num_heads={config.num_heads}')
  if 'source_lang' in schema and config.source_lang == config.target_lang:
    raise ConfigError(f'config.target_lang={config.target_lang!r}: must differ from '
                      'config.source_lang')
  if 'labels' in schema and config.labels and len(config.labels) != config.num_labels:
    raise ConfigError(f'config.num_labels={config.num_labels}: config.labels has '
                      f'{len(config.labels)} labels')
  if 'labels' in schema and config.labels and config.labels_file:
    raise ConfigError(f'config.labels_file={config.labels_file!r}: config.labels is set too '
                      f'({tuple(config.labels)!r}); pass --config.labels="()" to use the file')
  if config.task == 'classification' and config.word_unk > 0:
    raise ConfigError(f'config.word_unk={config.word_unk}: word UNK replacement is for task '
                      "'tagging'; set it to 0")
  if config.peft_method and not config.init_from:
    raise ConfigError(f'config.peft_method={config.peft_method!r}: needs config.init_from, the '
                      'base model the adapter is trained on (a workdir, a checkpoint or hf:)')
  rows = [n for n in ('peft_token_rows', 'peft_token_rows_from') if config.get(n)]
  if rows and not config.peft_method:
    raise ConfigError(f'config.{rows[0]}: token rows train beside a PEFT method; set '
                      'config.peft_method, or leave it empty (full fine-tuning trains every row)')
  if config.peft_method == 'prompt' and config.get('pack_examples'):
    raise ConfigError("config.peft_method='prompt': one prompt per row would join the pairs "
                      'packed into it; set config.pack_examples=False')
  check_cadences(config)
  check_processes(config)


# Fields that fix the shapes of the parameters: eval/translate must use the trained values.
MODEL_FIELDS = ('d_model', 'num_heads', 'd_ff', 'num_encoder_layers', 'num_decoder_layers',
                'share_embeddings', 'param_dtype')


def save_model_config(config, vocab_size: int, workdir: str, extra: dict | None = None,
                      fields: tuple[str, ...] = MODEL_FIELDS) -> None:
  """Writes {workdir}/model_config.json: the `fields` of `config` it has, the tokenizer's
  vocab size and `extra` (e.g. a task's imported architecture and its labels). Only
  process 0 of a multi-process run writes it (`multihost.is_primary`)."""
  if not multihost.is_primary():
    return
  record = {name: config[name] for name in fields if name in config}
  record['vocab_size'] = vocab_size
  record.update(extra or {})
  path = os.path.join(workdir, 'model_config.json')
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)


def load_model_config(workdir: str) -> dict:
  """{workdir}/model_config.json as written by `save_model_config` ({} if absent)."""
  path = os.path.join(workdir, 'model_config.json')
  if not os.path.exists(path):
    return {}
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def check_model_config(config, workdir: str) -> None:
  """Raises ConfigError naming the first field that differs from the one the checkpoints in
  `workdir` were trained with: the task, then its labels and pooling, then every field of
  the model's shape that differs, in one line (nothing to check if the workdir has no
  record or no checkpoint)."""
  trained = load_model_config(workdir)
  checkpoints = os.path.join(workdir, 'checkpoints')
  if not trained or not (os.path.isdir(checkpoints) and os.listdir(checkpoints)):
    return  # Nothing was trained yet (e.g. a first start that stopped at an error).
  task = trained.get('task', 'translation')
  if config.task != task:
    raise ConfigError(f'config.task={config.task!r}, but {workdir} holds a {task!r} model: '
                      'pass the config file it was trained with')
  if 'labels' in trained and 'labels' in config and not config.labels_file and (
      list(config.labels) != trained['labels']):
    raise ConfigError(f'config.labels={tuple(config.labels)!r}, but the model in {workdir} '
                      f'was trained with {tuple(trained["labels"])!r}')
  if 'pooling' in trained and 'pooling' in config and config.pooling != trained['pooling']:
    raise ConfigError(f'config.pooling={config.pooling!r}, but the model in {workdir} was '
                      f'trained with {trained["pooling"]!r}: pass --config.pooling='
                      f'{trained["pooling"]}')
  differ = [name for name in MODEL_FIELDS
            if name in trained and name in config and config[name] != trained[name]]
  if len(differ) == 1:
    name = differ[0]
    raise ConfigError(f'config.{name}={config[name]!r}, but the model in {workdir} was '
                      f'trained with {trained[name]!r}: pass --config.{name}={trained[name]}')
  if differ:
    raise ConfigError(
        ', '.join(f'config.{name}={config[name]!r}' for name in differ)
        + f', but the model in {workdir} was trained with '
        + ', '.join(f'{name}={trained[name]!r}' for name in differ) + ': pass '
        + ' '.join(f'--config.{name}={trained[name]}' for name in differ)
        + ' (or the config file and variant, e.g. :tiny, it was trained with)')


# --- Resuming: the config a run started with (`{workdir}/run_config.json`) ---------------
#
# A rerun with the same workdir resumes the latest checkpoint. Every field is in one of two
# lists. Changing a RESUME_FIXED_FIELDS field would continue the checkpoint as a different
# run (another model, objective, optimizer, tokenizer, or other batches in another order), so
# `check_run_config` refuses it; RESUME_FREE_FIELDS change only how long the run goes, how
# often it evaluates, logs and saves, and how it evaluates and decodes, so they may change on
# resume (with a console warning). A field in neither list (a user task's `FIELDS`) counts as
# fixed.
RESUME_FIXED_FIELDS = (
    # What is trained, and on which objective.
    'task', 'loss', 'label_smoothing',
    # The training data and its order (batch k of the stream depends on all of these).
    'data_dir', 'dataset_name', 'source_lang', 'target_lang', 'train_split', 'train_fraction',
    'train_files', 'train_weights', 'truncate', 'max_source_length', 'max_target_length',
    'max_length', 'max_tokens_per_batch', 'length_bucket_step', 'pack_examples',
    'shuffle_buffer_size', 'seed',
    # Back-translated pairs mixed into the training pairs.
    'synthetic_pairs', 'synthetic_ratio', 'synthetic_tag',
    # Labels of the encoder tasks, and how they are read.
    'num_labels', 'labels', 'labels_file', 'text_column', 'label_column', 'tag_column',
    'repair_iob',
    # Word replacement by UNK in tagging (other batches).
    'word_unk', 'word_unk_max_count',
    # Noising of the pretraining objectives.
    'noise_density', 'mean_noise_span_length', 'mask_ratio', 'poisson_lambda', 'mask_prob',
    'whole_word_masking',
    # Noise augmentation of translation pairs (a different noise, other batches).
    'noise_side', 'word_shuffle', 'word_dropout', 'word_blank',
    # The tokenizer.
    'vocab_size', 'spm_model_type', 'spm_max_sentences', 'spm_character_coverage',
    'num_sentinels',
    # The model (shape, computation, dropout).
    'd_model', 'num_heads', 'd_ff', 'num_encoder_layers', 'num_decoder_layers',
    'share_embeddings', 'pooling', 'dropout_rate', 'attention_dropout_rate', 'dtype',
    'param_dtype',
    # Its initialization (read once, at the first start), and the adapter trained on it.
    'init_from', 'init_rules', 'init_strict', 'peft_method', 'peft_modules_to_save',
    'peft_token_rows', 'peft_token_rows_from', 'peft_token_rows_except', 'lora_rank',
    'lora_alpha', 'lora_dropout', 'lora_targets', 'adapter_size', 'prefix_length',
    'prefix_mlp_hidden', 'prompt_length',
    # The optimizer (its state in the checkpoint) and its schedule.
    'optimizer', 'learning_rate', 'warmup_steps', 'schedule', 'adam_b1', 'adam_b2',
    'adam_eps', 'momentum', 'nesterov', 'weight_decay', 'max_grad_norm', 'layer_lr_decay',
    # Regularizers: the objective (adversarial, R-Drop) and the EMA kept in the checkpoint.
    'adversarial', 'adversarial_epsilon', 'adversarial_steps', 'adversarial_step_size',
    'r_drop_alpha', 'ema_decay',
)
RESUME_FREE_FIELDS = (
    # How long the run goes, and the cadences (`train.cadence`).
    'num_train_steps', 'eval_every_steps', 'bleu_every_steps', 'checkpoint_every_steps',
    'log_every_steps', 'keep_checkpoints', 'patience',
    # Evaluation and the final test.
    'eval_split', 'eval_files', 'num_eval_batches', 'test_split', 'average_checkpoints',
    # Decoding.
    'decoding', 'beam_size', 'length_penalty', 'temperature', 'top_k', 'top_p',
    'decode_max_length_ratio', 'decode_max_length_offset', 'decode_batch_tokens',
    # Read only when a new tokenizer is trained: a resumed run keeps its tokenizer (and
    # runs recorded before byte fallback became the default resume unchanged).
    'spm_byte_fallback', 'spm_extra_text',
    # Where prepared data is cached; the peak FLOP/s the MFU is computed against.
    'tfds_data_dir', 'peak_flops_per_device',
    # Where it runs: a checkpoint restores onto another mesh, and accumulating gradients
    # over micro-batches gives the same update as the whole batch at once.
    'mesh_shape', 'logical_axis_rules', 'grad_accum_steps', 'coordinator_address',
    'num_processes', 'process_id',
    # Where the run is tracked: a resumed run continues its W&B run (`tracking`).
    'wandb_project', 'wandb_entity', 'wandb_run_name',
)
RUN_CONFIG_FILE = 'run_config.json'


def _jsonable(value):
  """`value` as it reads back from JSON (tuples become lists)."""
  return json.loads(json.dumps(value, default=repr))


def absolute_init_from(value: str) -> str:
  """`init_from` with its folder made absolute ('' and 'hf:' alone stay as they are), so
  that a recorded value means the same from any working directory."""
  if not value or value == 'hf:':
    return value
  if value.startswith('hf:'):
    return 'hf:' + os.path.abspath(value[3:])
  return os.path.abspath(value)


def _recorded(name: str, value):
  """A field's value as run_config.json records and compares it."""
  return absolute_init_from(value) if name == 'init_from' else _jsonable(value)


def save_run_config(config, workdir: str) -> None:
  """Writes every field of `config` to {workdir}/run_config.json, atomically (a temporary
  file renamed): the config the run started with, which `check_run_config` compares a
  resumed run's config to. Only process 0 of a multi-process run writes it."""
  if not multihost.is_primary():
    return
  record = {name: _recorded(name, config[name]) for name in sorted(config.keys())}
  path = os.path.join(workdir, RUN_CONFIG_FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    json.dump(record, f, indent=1)
  os.replace(path + '.tmp', path)


def load_run_config(workdir: str) -> dict | None:
  """{workdir}/run_config.json as written by `save_run_config` (None if absent)."""
  path = os.path.join(workdir, RUN_CONFIG_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return json.load(f)


def check_run_config(config, started: dict, workdir: str) -> list[tuple[str, Any, Any]]:
  """Compares the config of a resumed run with the one it `started` with.

  Fields present in only one of them (added or removed by another version) are not
  compared.

  Args:
    config: the config of the rerun.
    started: `load_run_config(workdir)`.
    workdir: the run's folder, for the message.

  Returns:
    (name, old value, new value) of each changed RESUME_FREE_FIELDS field, in name order.

  Raises:
    ConfigError: one line naming every changed field that is not free to change
      (RESUME_FIXED_FIELDS and unlisted ones) with its old and new value.
  """
  changed = [(name, started[name], _recorded(name, config[name]))
             for name in sorted(config.keys())
             if name in started and _recorded(name, config[name]) != _recorded(name, started[name])]
  fixed = [(name, old, new) for name, old, new in changed if name not in RESUME_FREE_FIELDS]
  if fixed:
    fields = ', '.join(f'config.{name}={new!r} (started with {old!r})'
                       for name, old, new in fixed)
    raise ConfigError(
        f'{fields}: the run in {workdir} cannot resume with '
        f'{"this change" if len(fixed) == 1 else "these changes"}, which would change its '
        'model, optimizer or data order; pass the values it started with, or train in a new '
        f'--workdir{_start_from_hint(workdir)}')
  return changed


def _start_from_hint(workdir: str) -> str:
  if os.path.exists(os.path.join(workdir, 'adapter_config.json')):  # A PEFT run.
    return ''
  return f' (--config.init_from={workdir} starts from its parameters)'


def check_cadences(config) -> None:
  """Refuses cadence combinations the training loop cannot honour (`train.cadence` honours
  every eval, BLEU, checkpoint and log cadence by itself).

  Raises:
    ConfigError: patience > 0 with BLEU turned off (bleu_every_steps=0), where patience
      counts BLEU evaluations and would never stop the run.
  """
  if config.get('patience') and config.get('bleu_every_steps', None) == 0:
    raise ConfigError(f'config.patience={config.patience}: counts validation BLEU '
                      'evaluations, but config.bleu_every_steps=0 computes none; set '
                      'bleu_every_steps > 0 or patience=0')


def check_processes(config) -> None:
  """Refuses multi-process settings (coordinator_address, num_processes, process_id) that
  cannot start (`multihost.initialize`); a config without them passes.

  Raises:
    ConfigError: coordinator_address not 'host:port'; coordinator_address set with
      num_processes 0, or with process_id -1 for more than one process;
      process_id >= num_processes.
  """
  address = config.get('coordinator_address', '')
  num_processes = config.get('num_processes', 0)
  process_id = config.get('process_id', -1)
  if address and not re.fullmatch(r'.+:\d+', address):
    raise ConfigError(f"config.coordinator_address={address!r}: must be 'host:port', the "
                      'address of process 0')
  if address and not num_processes:
    raise ConfigError(f'config.num_processes=0: config.coordinator_address={address!r} needs '
                      'the number of processes (>= 1)')
  if address and num_processes > 1 and process_id < 0:
    raise ConfigError(f'config.process_id=-1: config.coordinator_address={address!r} needs '
                      f"this process's id, 0..{num_processes - 1}")
  if num_processes and process_id >= num_processes:
    raise ConfigError(f'config.process_id={process_id}: must be < config.num_processes='
                      f'{num_processes}')
