"""Start a run from another run's parameters (`config.init_from`), with T5X-style rules.

`config.init_from` names the source:

  ''                      from scratch (nothing to load);
  'hf:FOLDER'             a Hugging Face BERT checkpoint folder (`transformer_jax.hf_import`:
                          config.json, model.safetensors, vocab.txt), converted to our names;
  WORKDIR                 a run's workdir (a folder with checkpoints/): its best checkpoint
                          (WORKDIR/best/STEP) when it has one, else its latest
                          (WORKDIR/checkpoints/STEP);
  WORKDIR/checkpoints/STEP or WORKDIR/best/STEP   that one checkpoint.

Only the parameters are read from a checkpoint (as host numpy arrays; the optimizer state
it also holds is never built), whatever model wrote it: `load_source` needs no template.

`assign` then fills the model's parameter tree, leaf by leaf. A parameter is named by its
'/'-joined path ('encoder/layers_0/self_attention/query/kernel'); `config.init_rules`, a
tuple of (regex, replacement) pairs like T5X's `assignment_map`, maps a model name to the
checkpoint name it takes its value from: the first rule whose regex `re.fullmatch`es the
model name gives `match.expand(replacement)`; a replacement None (or '') keeps the
parameter's initial value; with no matching rule the name is the same. For example

  init_rules = ((r'encoder/layers_1/(.*)', r'encoder/layers_0/\\1'),  # layer 1 <- layer 0
                (r'head/.*', None))                                 # a fresh head

Every parameter ends up in one category of the `Report`: loaded (the checkpoint's value,
cast to the model's dtype), initialized (the checkpoint has no such name), kept (a rule
said so), or mismatched (the shapes differ: the initial value stays); checkpoint names no
parameter took are unused. With `config.init_strict` anything but loaded and kept is an
error (`InitError`): initialized, mismatched and unused names, except the unused ones
that a keep rule turned down on purpose (the checkpoint's value of a kept name).

A run started from another run's workdir must tokenize as it did: `copy_tokenizer` copies
the source's `tokenizer/` files into the new workdir (and refuses a workdir that already
has different ones).
"""
from __future__ import annotations

import dataclasses
import filecmp
import json
import os
import re
import shutil
import sys
from typing import Any, Sequence

from absl import logging
from etils import epath
import jax
import numpy as np
import orbax.checkpoint as ocp

from transformer_jax import checkpoints
from transformer_jax import config_schema
from transformer_jax import multihost

HF_PREFIX = 'hf:'
CHECKPOINTS = 'checkpoints'  # {workdir}/checkpoints/STEP (transformer_jax.checkpoints).
BEST = 'best'                # {workdir}/best/STEP (train.BestCheckpoint).
ITEM = checkpoints.ITEM       # The item folder CheckpointManager writes in a step folder.
TOKENIZER = 'tokenizer'      # {workdir}/tokenizer/ (spm.model, or WordPiece's files).
ADAPTER_CONFIG = 'adapter_config.json'  # A PEFT run's workdir (transformer_jax.peft).

Rules = Sequence[tuple[str, str | None]]


class InitError(config_schema.ConfigError):
  """`config.init_from` cannot be used: not a source, a source without parameters or
  tokenizer, a tokenizer that differs from the workdir's, a bad `config.init_rules`, or
  (`config.init_strict`) parameters that were not all loaded. The message is one line."""


@dataclasses.dataclass(frozen=True)
class Source:
  """Parameters to initialize from.

  Attributes:
    params: {name: array}, name the '/'-joined parameter path, host numpy arrays in the
      dtype they were stored with.
    description: where they come from, for the log (e.g. '/runs/a/best/900 (step 900)').
    run_dir: the source run's workdir (its tokenizer and model_config.json); None for a
      Hugging Face folder.
    notes: further lines for the log (e.g. the Hugging Face tensors not converted).
  """
  params: dict[str, np.ndarray]
  description: str
  run_dir: str | None
  notes: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class Report:
  """What `assign` did, by parameter name (model names; `unused` holds checkpoint names).

  Attributes:
    source: the source's description.
    loaded: took the checkpoint's value.
    initialized: the checkpoint has no value for them: initial value.
    kept: an init_rules rule with replacement None said keep the initial value.
    unused: checkpoint names no parameter took (but the checkpoint's values of `kept`
      names, turned down on purpose).
    mismatched: 'name (model SHAPE, checkpoint NAME SHAPE)': shapes differ: initial value.
    notes: the source's notes.
  """
  source: str
  loaded: tuple[str, ...]
  initialized: tuple[str, ...]
  kept: tuple[str, ...]
  unused: tuple[str, ...]
  mismatched: tuple[str, ...]
  notes: tuple[str, ...] = ()

  @property
  def complete(self) -> bool:
    """Whether every parameter was loaded or kept on purpose and every checkpoint value
    used (what `init_strict` requires)."""
    return not (self.initialized or self.unused or self.mismatched)

  def summary(self) -> str:
    """One line: the source and the count of each category."""
    return (f'init_from {self.source}: {len(self.loaded)} loaded, {len(self.initialized)} '
            f'initialized, {len(self.kept)} kept by init_rules, {len(self.unused)} unused, '
            f'{len(self.mismatched)} shape mismatches')

  def problems(self, most: int = 8) -> str:
    """The categories `init_strict` rejects, with their names (the first `most` of each;
    all of them are in train.log), on one line."""
    named = lambda names: ', '.join(names[:most]) + (
        f' and {len(names) - most} more (all in train.log)' if len(names) > most else '')
    parts = [f'{len(names)} {what}: {named(names)}' for what, names in (
        ('initialized (not in the checkpoint)', self.initialized),
        ('shape mismatches', self.mismatched),
        ('unused from the checkpoint', self.unused)) if names]
    return '; '.join(parts) or 'none'

  def log(self) -> str:
    """Logs (absl INFO) the summary, one line per category (count, then the names
    comma-joined) and the notes; prints the summary on the console (stderr: stdout is for
    predictions, with a pointer to train.log for the names); returns the summary."""
    summary = self.summary()
    print(f'{summary} (names in train.log)', file=sys.stderr, flush=True)
    logging.info('%s', summary)
    for what, names in (('loaded', self.loaded), ('initialized', self.initialized),
                        ('kept by init_rules', self.kept), ('unused', self.unused),
                        ('shape mismatches (initial value kept)', self.mismatched)):
      logging.info('init_from %s (%d): %s', what, len(names), ', '.join(names) or 'none')
    for note in self.notes:
      logging.info('init_from note: %s', note)
    return summary


# --- Names ---------------------------------------------------------------------------
def _key_name(key) -> str:
  """A pytree path entry (DictKey, GetAttrKey, SequenceKey, ...) as a string."""
  for attr in ('key', 'name', 'idx'):
    if hasattr(key, attr):
      return str(getattr(key, attr))
  return str(key)


def flatten(tree: Any) -> tuple[dict[str, Any], Any]:
  """A pytree -> ({'/'-joined path: leaf}, treedef), in leaf order."""
  leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
  return {'/'.join(_key_name(k) for k in path): leaf for path, leaf in leaves}, treedef


# --- Sources -------------------------------------------------------------------------
def _bad(init_from: str, why: str) -> InitError:
  return InitError(f'config.init_from={init_from!r}: {why}')


def _latest_step(folder: str) -> int | None:
  steps = ocp.utils.checkpoint_steps(folder) if os.path.isdir(folder) else []
  return max(steps) if steps else None


def resolve(init_from: str) -> tuple[str, str]:
  """The checkpoint folder and the run workdir a (non-'hf:') `init_from` names.

  A workdir (a folder with checkpoints/ or best/) gives its best checkpoint, else its
  latest; a finished checkpoint folder (WORKDIR/checkpoints/STEP, WORKDIR/best/STEP)
  gives itself, its workdir two levels up.

  Raises:
    InitError: naming config.init_from, when it is neither, or a workdir without a
      finished checkpoint.
  """
  path = os.path.abspath(init_from)
  if os.path.isdir(os.path.join(path, CHECKPOINTS)) or os.path.isdir(os.path.join(path, BEST)):
    for sub in (BEST, CHECKPOINTS):
      step = _latest_step(os.path.join(path, sub))
      if step is not None:
        return os.path.join(path, sub, str(step)), path
    raise _bad(init_from, f'{path} has no finished checkpoint in {BEST}/ or {CHECKPOINTS}/')
  if (os.path.basename(path).isdigit() and os.path.isdir(os.path.join(path, ITEM))
      and ocp.utils.is_checkpoint_finalized(path)):
    return path, os.path.dirname(os.path.dirname(path))
  raise _bad(init_from, "neither '' (from scratch), 'hf:FOLDER' (a Hugging Face BERT), a "
             f"run's workdir (with {CHECKPOINTS}/) nor a finished checkpoint folder "
             f'(WORKDIR/{CHECKPOINTS}/STEP or WORKDIR/{BEST}/STEP)')


def source_run_dir(init_from: str) -> str | None:
  """The workdir of the run `init_from` names; None for '' and 'hf:FOLDER' sources. A
  task calls it first thing when training, so a bad `init_from` stops the run at once.

  Raises:
    InitError: as `resolve`; 'hf:' without a folder; a PEFT run (an adapter alone).
  """
  if init_from == HF_PREFIX:
    raise _bad(init_from, f"name the folder: '{HF_PREFIX}/path/to/folder'")
  if not init_from or init_from.startswith(HF_PREFIX):
    return None
  run_dir = resolve(init_from)[1]
  if os.path.exists(os.path.join(run_dir, ADAPTER_CONFIG)):
    raise _bad(init_from, f'{run_dir} is a parameter-efficient run: its checkpoints hold the '
               f'adapter alone; {adapter_hint(run_dir)}')
  return run_dir


def adapter_hint(run_dir: str) -> str:
  """What to start from instead of the PEFT run in `run_dir`: its merged form (lora,
  ia3), else its base."""
  try:
    with open(os.path.join(run_dir, ADAPTER_CONFIG)) as f:
      record = json.load(f)
    method, base = record['settings']['peft_method'], record['base']
  except (OSError, ValueError, KeyError, TypeError):
    return 'start from its base'
  if method in ('lora', 'ia3'):
    return (f'write base + adapter as one run with --mode=merge --workdir={run_dir} '
            '--output=DIR and start from DIR')
  return f'{method} cannot be merged into its base; start from the base, {base}'


def restore_params(checkpoint: str) -> dict[str, np.ndarray]:
  """The parameters of a checkpoint folder written by `checkpoints.save` (any model, any
  optimizer), as {name: host numpy array}, read without building the rest of the state:
  its 'ema' (the moving average of a run with `config.ema_decay`, the parameters that run
  evaluated with) when it has one, else its 'params'.

  Raises:
    InitError: the checkpoint holds no 'params'.
  """
  item = epath.Path(checkpoint) / ITEM
  tree = checkpoints.metadata_tree(item)
  if not isinstance(tree, dict) or 'params' not in tree:
    raise InitError(f'{checkpoint}: the checkpoint holds no params (not written by '
                    'transformer_jax?)')
  key = 'ema' if isinstance(tree.get('ema'), dict) else 'params'
  if key == 'ema':
    logging.info('%s: loading the EMA of the parameters (the run had ema_decay > 0)',
                 checkpoint)
  wanted = {key: tree[key]}
  restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
  with ocp.PyTreeCheckpointer() as checkpointer:
    restored = checkpointer.restore(item, args=ocp.args.PyTreeRestore(
        item=wanted, restore_args=restore_args, partial_restore=True))
  return {name: np.asarray(value) for name, value in flatten(restored[key])[0].items()}


def _load_hf(folder: str) -> Source:
  from transformer_jax import hf_import  # pylint: disable=g-import-not-at-top
  _, imported, unused = hf_import.load_bert(folder, return_unused=True)
  key_biases = [name for name in unused if name.endswith('attention.self.key.bias')]
  unused = [name for name in unused if name not in key_biases]
  notes = (f'not converted from {folder}: {", ".join(unused) or "none"}',
           f'{len(key_biases)} attention key biases dropped (they add the same value to '
           'every logit of a query, which softmax ignores)')
  return Source(params=flatten(imported)[0], description=f'{folder} (Hugging Face BERT)',
                run_dir=None, notes=notes)


def load_source(init_from: str) -> Source:
  """The parameters `init_from` names ('hf:FOLDER', a workdir or a checkpoint folder).

  Raises:
    InitError: naming config.init_from (see `resolve`), or a checkpoint without params.
    hf_import.HFImportError: a Hugging Face folder that is not a BERT checkpoint.
  """
  if not init_from:
    raise _bad(init_from, 'empty: nothing to initialize from')
  if init_from.startswith(HF_PREFIX):
    source_run_dir(init_from)  # Checks that a folder is named.
    return _load_hf(init_from[len(HF_PREFIX):])
  checkpoint, run_dir = resolve(init_from)
  params = restore_params(checkpoint)
  return Source(params=params, description=f'{checkpoint} (step {os.path.basename(checkpoint)})',
                run_dir=run_dir)


# --- Assignment ----------------------------------------------------------------------
def compile_rules(rules: Rules) -> list[tuple[re.Pattern, str | None]]:
  """`config.init_rules` compiled.

  Raises:
    InitError: naming the rule that is not a (regex, replacement or None) pair or whose
      regex does not compile.
  """
  compiled = []
  for i, rule in enumerate(rules):
    if (not isinstance(rule, (tuple, list)) or len(rule) != 2 or not isinstance(rule[0], str)
        or not (rule[1] is None or isinstance(rule[1], str))):
      raise InitError(f'config.init_rules[{i}]={rule!r}: must be a (regex, replacement or '
                      'None) pair')
    try:
      compiled.append((re.compile(rule[0]), rule[1] or None))
    except re.error as e:
      raise InitError(f'config.init_rules[{i}]={rule!r}: bad regex ({e})') from None
  return compiled


def source_name(name: str, rules: list[tuple[re.Pattern, str | None]]) -> str | None:
  """The checkpoint name model parameter `name` takes its value from (compiled `rules`:
  the first that fullmatches; none: `name` itself); None: keep the initial value.

  Raises:
    InitError: a replacement that refers to a group its regex lacks.
  """
  for pattern, replacement in rules:
    match = pattern.fullmatch(name)
    if match:
      if replacement is None:
        return None
      try:
        return match.expand(replacement)
      except (re.error, IndexError) as e:
        raise InitError(f'config.init_rules: ({pattern.pattern!r}, {replacement!r}) on '
                        f'{name}: {e}') from None
  return name


def assign(params: Any, source: Source, rules: Rules = (), strict: bool = False
           ) -> tuple[Any, Report]:
  """Puts `source`'s values into the model's parameter tree.

  Args:
    params: the model's (initialized) parameter pytree; its structure, shapes and dtypes
      are kept.
    source: `load_source`'s result.
    rules: (regex, replacement or None) pairs (module docstring).
    strict: raise unless every parameter was loaded (or kept by a rule) and every
      checkpoint value used.

  Returns:
    The new tree (loaded leaves: host numpy arrays in the target leaf's dtype, for the
    caller to device_put with the target sharding; other leaves: the originals) and the
    `Report`.

  Raises:
    InitError: a bad rule; with `strict`, naming what was not loaded.
  """
  compiled = compile_rules(rules)
  flat, treedef = flatten(params)
  loaded, initialized, kept, mismatched, used, declined = [], [], [], [], set(), set()
  leaves = []
  for name, leaf in flat.items():
    wanted = source_name(name, compiled)
    value = None if wanted is None else source.params.get(wanted)
    if wanted is None:
      kept.append(name)
      declined.add(name)
    elif value is None:
      initialized.append(name)
    elif tuple(value.shape) != tuple(leaf.shape):
      used.add(wanted)
      mismatched.append(f'{name} (model {tuple(leaf.shape)}, checkpoint '
                        f'{"" if wanted == name else wanted + " "}{tuple(value.shape)})')
    else:
      used.add(wanted)
      loaded.append(name)
      leaves.append(np.asarray(value).astype(leaf.dtype))
      continue
    leaves.append(leaf)
  unused = [name for name in source.params if name not in used and name not in declined]
  report = Report(source=source.description, loaded=tuple(loaded),
                  initialized=tuple(initialized), kept=tuple(kept), unused=tuple(unused),
                  mismatched=tuple(mismatched), notes=source.notes)
  if strict and not report.complete:
    raise InitError(f'config.init_strict=True: init_from {source.description}: '
                    f'{report.problems()}')
  return jax.tree_util.tree_unflatten(treedef, leaves), report


def initialize(config, params: Any) -> Any:
  """`params` with `config.init_from`'s values put in by `config.init_rules` (unchanged
  when init_from is ''), the report logged; see `assign`.

  Raises:
    InitError: as `load_source` and `assign` (with `config.init_strict`).
  """
  if not config.init_from:
    return params
  params, report = assign(params, load_source(config.init_from), config.init_rules,
                          config.init_strict)
  report.log()
  return params


# --- Tokenizer -----------------------------------------------------------------------
def copy_tokenizer(run_dir: str, workdir: str) -> None:
  """Copies the files of {run_dir}/tokenizer/ into {workdir}/tokenizer/, so a run
  initialized from `run_dir` tokenizes as it did. Files the workdir already has must be
  byte-equal to the source's (a rerun); the workdir may hold no other tokenizer file.

  In a multi-process run process 0 copies first; the others then find the files there
  (`multihost.primary_first`): every process must call this.

  Raises:
    InitError: the source has no tokenizer files, or the workdir's tokenizer differs
      (naming both files).
  """
  with multihost.primary_first('copy_tokenizer'):
    _copy_tokenizer(run_dir, workdir)


def _copy_tokenizer(run_dir: str, workdir: str) -> None:
  source = os.path.join(run_dir, TOKENIZER)
  target = os.path.join(workdir, TOKENIZER)
  files = lambda folder: sorted(
      n for n in os.listdir(folder) if os.path.isfile(os.path.join(folder, n))
      and not n.endswith('.tmp')) if os.path.isdir(folder) else []
  names = files(source)
  if not names:
    raise InitError(f'{source}: no tokenizer files; the run initialized from {run_dir} must '
                    'use its tokenizer')
  for name in files(target):
    theirs, ours = os.path.join(source, name), os.path.join(target, name)
    if name not in names:
      raise InitError(f'{ours}: the source run {run_dir} has no {theirs}: this workdir has '
                      'another tokenizer; start the run in a new workdir')
    if not filecmp.cmp(theirs, ours, shallow=False):
      raise InitError(f'{ours} differs from {theirs}: a run initialized from {run_dir} must '
                      'use its tokenizer; start the run in a new workdir')
  os.makedirs(target, exist_ok=True)
  copied = []
  for name in names:
    ours = os.path.join(target, name)
    if not os.path.exists(ours):
      shutil.copyfile(os.path.join(source, name), ours + '.tmp')
      os.replace(ours + '.tmp', ours)  # Atomic: never half a file after a crash.
      copied.append(name)
  if copied:
    logging.info('Copied the tokenizer of %s into %s: %s', run_dir, target, ', '.join(copied))
