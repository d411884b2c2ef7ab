"""Scoring and translating with a trained model: the `eval` and `translate` modes.

Both load the tokenizer and a checkpoint from a training workdir: the best by validation
BLEU (`best`, falling back to the latest when BLEU was never computed), the latest
(`latest`), or the average of the parameters of the last k checkpoints
(`config.average_checkpoints` = k > 1; Vaswani et al. 2017, section 6.1).
"""
from __future__ import annotations

import os
import sys
from typing import TextIO

from absl import logging
import jax

from transformer_jax import checkpoints
from transformer_jax import config_schema
from transformer_jax import data
from transformer_jax import scoring
from transformer_jax import sharding
from transformer_jax import tokenizer
from transformer_jax import translate


def score_split(translator: translate.Translator, sources: list[str], references: list[str],
                workdir: str, name: str) -> dict:
  """Translates `sources`, writes them to {workdir}/translations/{name}.txt (one line per
  source line) and returns `scoring.score` against `references`."""
  hypotheses = translator.translate(sources)
  folder = os.path.join(workdir, 'translations')
  os.makedirs(folder, exist_ok=True)
  path = os.path.join(folder, f'{name}.txt')
  with open(path, 'w', encoding='utf-8') as f:
    f.writelines(h + '\n' for h in hypotheses)
  result = scoring.score(hypotheses, references)
  logging.info('%s: BLEU %.2f (%s), chrF %.2f, lowercased BLEU %.2f; hypotheses in %s', name,
               result['bleu'], result['bleu_signature'], result['chrf'],
               result['bleu_lowercase'], path)
  return result


def load_translator(config, workdir: str, checkpoint: str = 'best'
                    ) -> tuple[translate.Translator, str]:
  """A Translator with the workdir's tokenizer and checkpoint, and a name for what was
  loaded ('step1200', 'best-step900', 'avg3-step1200').

  Raises:
    FileNotFoundError: the workdir has no tokenizer or no checkpoint.
    config_schema.ConfigError: a model field differs from the trained model's.
  """
  from transformer_jax import train  # pylint: disable=g-import-not-at-top (cycle)
  config_schema.check_model_config(config, workdir)
  spm_path = os.path.join(workdir, 'tokenizer', 'spm.model')
  if not os.path.exists(spm_path):
    raise FileNotFoundError(f'{spm_path}: no tokenizer; is {workdir} a training workdir?')
  sp = tokenizer.load(spm_path)
  mesh = sharding.make_mesh()
  model, _, state = train.create_state(config, sp.vocab_size(), mesh)
  latest = checkpoints.make_manager(workdir, config.keep_checkpoints)
  best = checkpoints.make_manager(workdir, 1, subdir='best')
  try:
    if config.average_checkpoints > 1:
      steps = latest.all_steps()[-config.average_checkpoints:]
      if not steps:
        raise FileNotFoundError(f'{latest.directory}: no checkpoints')
      params = [checkpoints.restore(latest, state, s).params for s in steps]
      averaged = jax.tree.map(lambda *p: sum(p) / len(p), *params)
      if len(steps) < config.average_checkpoints:
        logging.warning('Averaging %d checkpoints, fewer than the %d asked for', len(steps),
                        config.average_checkpoints)
      return (translate.Translator(model, averaged, sp, config, mesh),
              f'avg{len(steps)}-step{steps[-1]}')
    manager, prefix = latest, ''
    if checkpoint == 'best' and best.latest_step() is not None:
      manager, prefix = best, 'best-'
    step = manager.latest_step()
    if step is None:
      raise FileNotFoundError(f'{latest.directory}: no checkpoints')
    params = checkpoints.restore(manager, state, step).params
    return translate.Translator(model, params, sp, config, mesh), f'{prefix}step{step}'
  finally:
    latest.close()
    best.close()


def run_eval(config, workdir: str, split: str, checkpoint: str = 'best') -> dict:
  """Scores a checkpoint on `split` and prints the report with sacreBLEU signatures."""
  translator, name = load_translator(config, workdir, checkpoint)
  result = score_split(translator, *data.load_pairs(config, split, workdir), workdir,
                       f'{split}-{name}')
  print(f'{split} ({name}, {config.decoding}'
        f'{f" beam {config.beam_size}" if config.decoding == "beam" else ""}):\n'
        + scoring.report(result)
        + f"\nhypotheses: {os.path.join(workdir, 'translations', f'{split}-{name}.txt')}")
  return result


def run_translate(config, workdir: str, source: TextIO = sys.stdin,
                  target: TextIO = sys.stdout, checkpoint: str = 'best') -> int:
  """Translates every line of `source` into `target`, same line count and order.
  Returns the number of lines."""
  translator, _ = load_translator(config, workdir, checkpoint)
  lines = [line.rstrip('\n') for line in source]
  for translation in translator.translate(lines):
    target.write(translation + '\n')
  target.flush()
  return len(lines)
