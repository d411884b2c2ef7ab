"""Tasks: what a run trains. A task owns its data, model and head, loss, evaluation and
prediction; `transformer_jax.train` is the one loop that runs any of them.

  translation     encoder-decoder on sentence pairs, BLEU (tasks/translation.py)
  classification  encoder + sequence head: labels or a regression value per sentence
                  (tasks/classification.py)
  tagging         encoder + token head: a label per word, e.g. NER (tasks/tagging.py)
  span_corruption T5 span corruption, encoder-decoder (tasks/denoising.py)
  text_infilling  BART text infilling, encoder-decoder (tasks/denoising.py)
  masked_lm       BERT masked LM, the encoder alone (tasks/masked_lm.py)

`config.task` names a built-in task or a user's `Task` subclass by import path
('my_pkg.tasks:MyTask'), whose `FIELDS` lists its extra config fields.
"""
from __future__ import annotations

import importlib

from transformer_jax.config_schema import ConfigError
from transformer_jax.tasks.base import Task

BUILTIN = {
    'translation': 'transformer_jax.tasks.translation:TranslationTask',
    'classification': 'transformer_jax.tasks.classification:ClassificationTask',
    'tagging': 'transformer_jax.tasks.tagging:TaggingTask',
    'span_corruption': 'transformer_jax.tasks.denoising:DenoisingTask',
    'text_infilling': 'transformer_jax.tasks.denoising:DenoisingTask',
    'masked_lm': 'transformer_jax.tasks.masked_lm:MaskedLMTask',
}


def get_task_class(name: str) -> type[Task]:
  """The Task subclass for `name`: a built-in task or 'package.module:Class'.

  Raises:
    ConfigError: naming config.task, when it is neither or cannot be imported.
  """
  path = BUILTIN.get(name, name)
  module_name, sep, attr = path.partition(':')
  if not sep or not module_name or not attr:
    raise ConfigError(f'config.task={name!r}: use one of {", ".join(BUILTIN)} or '
                      "'package.module:TaskClass'")
  try:
    cls = getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f'config.task={name!r}: cannot import it ({e})') from e
  if not (isinstance(cls, type) and issubclass(cls, Task)):
    raise ConfigError(f'config.task={name!r}: not a subclass of transformer_jax.tasks.Task')
  return cls


def create(config, workdir: str, mesh) -> Task:
  """An instance of `config.task` for a run in `workdir` on `mesh` (not yet set up)."""
  return get_task_class(config.task)(config, workdir, mesh)
