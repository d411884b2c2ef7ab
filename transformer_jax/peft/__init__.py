"""Parameter-efficient fine-tuning: a trainable tree beside the frozen base parameters.

  lora     low-rank updates of chosen projections (Hu et al. 2021)        peft/lora.py
  adapter  bottleneck adapters after every sub-layer (Houlsby et al. 2019)  peft/adapter.py
  prefix   key/value prefixes at every attention (Li & Liang 2021)         peft/prefix.py
  prompt   soft prompt before the encoder input (Lester et al. 2021)       peft/prompt.py
  ia3      rescaled keys, values and FF activations (Liu et al. 2022)      peft/ia3.py

Beside any method, rows of the token table can train in full (a new language's pieces):
`config.peft_token_rows*`, peft/token_rows.py.

A PEFT run (`config.peft_method`) starts from a base model (`config.init_from`: a run's
workdir or checkpoint, or 'hf:' BERT). Its train state holds only the trainable tree:
{'peft': the method's parameters, 'base': the base parameters named by
`config.peft_modules_to_save` (regexes; e.g. a new classification head), trained in
full}. The train step differentiates that tree alone, the optimizer state exists for it
alone, and weight decay never touches the frozen base. Its checkpoints are therefore the
adapter alone; {workdir}/adapter_config.json records the method's settings, where the
base came from, the base's fingerprint and the tokenizer's hash, and every later start
(resume, eval, predict, merge) reloads the base and refuses one that differs.

`Adapter` ties it together for the trainer and the eval/predict modes; `merge` folds LoRA
or IA3 into the base parameters (`--mode=merge`).
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import re
from typing import Any

from absl import logging
import flax
import flax.linen as nn
from flax import traverse_util
import jax
import numpy as np

from transformer_jax import config_schema
from transformer_jax import init_from
from transformer_jax import multihost
from transformer_jax.peft import adapter as adapter_lib
from transformer_jax.peft import core
from transformer_jax.peft import ia3
from transformer_jax.peft import lora
from transformer_jax.peft import prefix
from transformer_jax.peft import prompt
from transformer_jax.peft import token_rows
from transformer_jax.peft.core import Params, Site  # pylint: disable=unused-import

METHODS = {m.name: m for m in (lora.LoRA, adapter_lib.BottleneckAdapter,
                               prefix.PrefixTuning, prompt.PromptTuning, ia3.IA3)}
CONFIG_FILE = init_from.ADAPTER_CONFIG  # 'adapter_config.json'


class AdapterError(config_schema.ConfigError):
  """An adapter cannot be used: its base or tokenizer differs from the one it was trained
  on, its adapter_config.json is missing or broken, or it cannot be merged. One line."""


def fingerprint(params: Any) -> str:
  """sha256 (first 16 hex digits) over the names, shapes, dtypes and float32 bytes of
  every leaf of a parameter tree: equal for equal parameters, whatever their storage
  (also split over processes: every process must then call this, `multihost.to_host`)."""
  digest = hashlib.sha256()
  flat = traverse_util.flatten_dict(flax.core.unfreeze(multihost.to_host(params)), sep='/')
  for name in sorted(flat):
    value = np.asarray(flat[name], np.float32)
    digest.update(f'{name}:{value.shape};'.encode())
    digest.update(np.ascontiguousarray(value).tobytes())
  return digest.hexdigest()[:16]


def tokenizer_hash(workdir: str) -> str:
  """sha256 (first 16 hex digits) of the files in {workdir}/tokenizer ('' if none)."""
  folder = os.path.join(workdir, 'tokenizer')
  if not os.path.isdir(folder):
    return ''
  digest = hashlib.sha256()
  for name in sorted(os.listdir(folder)):
    with open(os.path.join(folder, name), 'rb') as f:
      digest.update(name.encode() + b'\0' + f.read())
  return digest.hexdigest()[:16]


# The fields of every method: base parameters and token-table rows trained in full.
COMMON_FIELDS = ('peft_modules_to_save', 'peft_token_rows', 'peft_token_rows_from',
                 'peft_token_rows_except')
# adapter_config.json's list of the rows (`token_rows.resolve`), written once they are
# resolved: eval and predict read it and no text file.
ROW_IDS = 'peft_token_row_ids'


def settings_from_config(config) -> dict:
  """adapter_config.json's method part: {'peft_method', its FIELDS,
  'peft_modules_to_save' and the token rows' fields} from a run config."""
  method = METHODS[config.peft_method]
  return {'peft_method': config.peft_method,
          **{name: _jsonable(config[name]) for name in method.FIELDS},
          **{name: _jsonable(config.get(name, ())) for name in COMMON_FIELDS}}


def _jsonable(value):
  return list(value) if isinstance(value, (tuple, list)) else value


class PeftModel:
  """Stands in for a task's flax model: `apply` with a `Params` applies the base model to
  `Params.base` (with the trained `modules_to_save` put in) inside the method's
  interceptor; with a plain tree it is the base model's `apply`. Every other attribute is
  the base model's."""

  def __init__(self, model: nn.Module, adapter: 'Adapter'):
    self.model, self.adapter = model, adapter

  def __getattr__(self, name):
    return getattr(self.model, name)

  def init(self, *args, **kwargs):
    return self.model.init(*args, **kwargs)

  def apply(self, variables, *args, rngs=None, **kwargs):
    params = variables['params']
    if not isinstance(params, Params):
      return self.model.apply(variables, *args, rngs=rngs, **kwargs)
    base = core.overlay(params.base, params.trainable['base'])
    training = bool(rngs) and 'dropout' in rngs
    tree, adapter = params.trainable['peft'], self.adapter
    rows = (nn.intercept_methods(token_rows.intercept(tree, adapter.rows, adapter.tables))
            if adapter.rows else contextlib.nullcontext())
    with nn.intercept_methods(adapter.method.intercept(tree, training)), rows:
      return self.model.apply({**variables, 'params': base}, *args, rngs=rngs, **kwargs)


class Adapter:
  """A PEFT method on a task's model.

  Build it from the run config (training) or from a workdir's adapter_config.json
  (`from_workdir`: eval, predict, merge), give it to the task before `setup`
  (`task.peft = adapter`; the task wraps its model with `wrap`), then call `bind(task)`
  once the task is set up: it finds the model's sites and builds the method.

  Attributes:
    settings: the method's settings (`settings_from_config`).
    method: the `core.Method` (after `bind`).
    rows: token ids whose rows of every token table train in full (`token_rows`; after
      `bind`), sorted; tables: those tables' sites.
    frozen: the base parameters (set by `train.create_state`).
  """

  def __init__(self, settings: dict):
    self.settings = settings
    self.method: core.Method | None = None
    self.rows: list[int] = []
    self.tables: list[Site] = []
    self.frozen = None
    self._save = [re.compile(r) for r in settings['peft_modules_to_save']]

  @classmethod
  def from_config(cls, config) -> 'Adapter | None':
    return cls(settings_from_config(config)) if config.peft_method else None

  @classmethod
  def from_workdir(cls, workdir: str) -> 'Adapter | None':
    """The adapter a workdir was trained with; None when it is not a PEFT run."""
    record = load_config(workdir)
    return None if record is None else cls(record['settings'])

  def wrap(self, model: nn.Module) -> PeftModel:
    return PeftModel(model, self)

  def bind(self, task) -> None:
    """Finds the sites of `task.model` (an abstract init), builds the method and
    resolves the token rows (`token_rows.resolve`, with the task's tokenizer; recorded
    in settings[ROW_IDS]).

    Raises:
      AdapterError: no module of the model is one the method changes; a token row
        outside the table, or rows asked of a model without a token table.
      FileNotFoundError: a file of peft_token_rows_from/except is missing.
    """
    sites = core.discover_sites(lambda: task.init_params(jax.random.PRNGKey(0)))
    try:
      self.method = METHODS[self.settings['peft_method']](self.settings, sites)
    except ValueError as e:
      raise AdapterError(str(e)) from None
    if ROW_IDS not in self.settings:
      encode, unk_id = _tokenizer(task)
      self.settings[ROW_IDS] = token_rows.resolve(
          self.settings.get('peft_token_rows', ()), self.settings.get('peft_token_rows_from', ()),
          self.settings.get('peft_token_rows_except', ()), encode, special=(unk_id,))
    self.rows = list(self.settings[ROW_IDS])
    if self.rows:
      self.tables = token_rows.tables(sites)
      if not self.tables:
        raise AdapterError('config.peft_token_rows: the model has no token table')
      try:
        token_rows.check(self.rows, self.tables)
      except ValueError as e:
        raise AdapterError(str(e)) from None

  def init(self, rng: jax.Array, base: Any) -> dict:
    """The trainable tree at step 0: the method's fresh parameters and copies of the
    `modules_to_save` base parameters."""
    flat = traverse_util.flatten_dict(flax.core.unfreeze(base), sep='/')
    saved = {name: value for name, value in flat.items()
             if any(r.fullmatch(name) for r in self._save)}
    tree = self.method.init(rng, base)
    if self.rows:
      token_rows.init(tree, self.rows, self.tables)
    return {'peft': tree, 'base': traverse_util.unflatten_dict(saved, sep='/')}

  def view(self, trainable: Any) -> Params:
    """What the task's functions take: `Params(frozen, trainable)`."""
    return Params(self.frozen, trainable)

  def describe(self, trainable: Any) -> str:
    """'lora on 12 sites: 73,728 trainable parameters (0.33% of 22,713,344), 2 base
    parameters trained in full (head/bias, head/kernel)'."""
    count = lambda tree: sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))
    n, total = count(trainable), count(self.frozen)
    saved = sorted(traverse_util.flatten_dict(trainable['base'], sep='/'))
    sites = len(self.method.sites)
    rows = (f"; {len(self.rows):,} of the {self.tables[0].in_shape[0]:,} rows of "
            f"{', '.join(s.name for s in self.tables)} trained in full") if self.rows else ''
    return (f"{self.method.name} on {sites} site{'s' if sites != 1 else ''}: {n:,} trainable "
            f"parameters ({100 * n / max(total, 1):.2f}% of the base's {total:,})"
            + (f"; trained in full: {', '.join(saved)}" if saved else '') + rows)

  def merged(self, trainable: Any) -> Any:
    """The base parameters with the method folded in and the `modules_to_save` put in:
    the plain model computes with them what base + adapter computed.

    Raises:
      AdapterError: the method cannot be merged (adapter, prefix, prompt).
    """
    try:
      merged = self.method.merge(flax.core.unfreeze(self.frozen), trainable['peft'])
    except ValueError as e:
      raise AdapterError(str(e)) from None
    if self.rows:
      merged = token_rows.merge(merged, trainable['peft'], self.rows, self.tables)
    return core.overlay(merged, trainable['base'])

  # --- adapter_config.json -----------------------------------------------------------
  def record(self, workdir: str, base_source: str) -> None:
    """Writes {workdir}/adapter_config.json at the first start, or checks the base and
    tokenizer against it on a later one (`check`)."""
    path = os.path.join(workdir, CONFIG_FILE)
    if os.path.exists(path):
      self.check(workdir)
      return
    record = {'settings': self.settings,
              'base': config_schema.absolute_init_from(base_source),
              'base_fingerprint': fingerprint(self.frozen),  # On every process.
              'tokenizer_hash': tokenizer_hash(workdir)}
    if not multihost.is_primary():  # Process 0 writes the file.
      return
    tmp = path + '.tmp'
    with open(tmp, 'w') as f:
      json.dump(record, f, indent=2)
    os.replace(tmp, path)

  def check(self, workdir: str) -> None:
    """Refuses a base or tokenizer other than the ones the adapter in `workdir` was
    trained with.

    Raises:
      AdapterError: naming both fingerprints (or hashes).
    """
    record = load_config(workdir)
    got = fingerprint(self.frozen)
    if record['base_fingerprint'] != got:
      raise AdapterError(
          f'{os.path.join(workdir, CONFIG_FILE)}: the adapter was trained on base '
          f"{record['base']} with fingerprint {record['base_fingerprint']}; the base "
          f'loaded now has {got} (a different or changed base model)')
    tok = tokenizer_hash(workdir)
    if record['tokenizer_hash'] and tok != record['tokenizer_hash']:
      raise AdapterError(f"{workdir}/tokenizer: hash {tok}, but the adapter was trained with "
                         f"{record['tokenizer_hash']}")


def _tokenizer(task) -> tuple:
  """(lines -> token ids per line, the UNK id) of the task's tokenizer: a SentencePiece
  processor `sp` (translation), or an encoder task's `tokenizer`."""
  if getattr(task, 'sp', None) is not None:
    return task.sp.encode, task.sp.unk_id()
  return lambda lines: task.tokenizer.encode(lines, 1 << 30), task.tokenizer.unk_id


def batch_stats(stats: dict) -> dict:
  """A task's `batch_stats` for a PEFT train step: the backward pass through the frozen
  base computes the activation gradients (one forward's FLOPs) but no weight gradients,
  so the step costs about 2 forwards instead of 3 (the method's own FLOPs are not
  counted: a small fraction for every method here)."""
  return {**stats, 'flops': stats['flops'] * 2 / 3}


def load_config(workdir: str) -> dict | None:
  """{workdir}/adapter_config.json as a dict; None when the file does not exist.

  Raises:
    AdapterError: the file is not valid JSON or lacks a field.
  """
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return None
  try:
    with open(path) as f:
      record = json.load(f)
    method = record['settings']['peft_method']
    for name in ('base', 'base_fingerprint', 'tokenizer_hash'):
      record[name]  # pylint: disable=pointless-statement
  except (ValueError, KeyError, TypeError) as e:
    raise AdapterError(f'{path}: not an adapter config ({type(e).__name__}: {e})') from None
  if method not in METHODS:
    raise AdapterError(f'{path}: unknown peft_method {method!r}')
  logging.info('Adapter config %s: %s', path, record)
  return record
