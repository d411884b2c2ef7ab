"""Monolingual text for pretraining: sentence files, mixed by ratio, in a deterministic order.

A corpus is a list of sources, one per entry of `config.train_files`; an entry is a file
path or a glob, each file plain or `.gz`:
  one sentence per line    (e.g. ../shared/data/multi30k/mono/train.*.de.gz); blank
                           lines are skipped;
  *.conll / *.conll.gz     token-per-line files (CoNLL, e.g. GermEval 2014): the tokens of
                           each sentence (column 0) joined by spaces; `-DOCSTART-` and
                           `# ` comment lines are skipped.

`example_order` draws every example's source by the mixing weights and walks each source
through its own reshuffled epochs, so the order depends on the seed alone and any prefix
of it can be regenerated (exact resume).
"""
from __future__ import annotations

import glob
import itertools
import os
from typing import Iterator, Sequence

from absl import logging
import numpy as np

from transformer_jax import multi30k
from transformer_jax.config_schema import ConfigError

_BLOCK = 4096  # Source draws are made this many at a time.


def expand(patterns: Sequence[str], field: str) -> list[list[str]]:
  """Each path or glob of `patterns` -> its sorted files.

  Raises:
    ConfigError: naming config.`field` and the pattern, when it matches no file.
  """
  files = []
  for pattern in patterns:
    matched = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matched:
      raise ConfigError(f'config.{field}: {pattern!r} matches no file')
    files.append(matched)
  return files


def read_sentences(path: str) -> list[str]:
  """The sentences of one file (see the module docstring for the formats).

  Raises:
    multi30k.DataError: a missing or unreadable file, invalid UTF-8 (naming file:line), or
      a file without any sentence.
  """
  sentences = []
  if path.endswith(('.conll', '.conll.gz')):
    words = []
    for _, line in multi30k._read_lines(path):  # pylint: disable=protected-access
      if line.startswith(('-DOCSTART-', '# ')):
        continue
      if line:
        words.append(line.split()[0])
      elif words:
        sentences.append(' '.join(words))
        words = []
    if words:
      sentences.append(' '.join(words))
  else:
    sentences = [line for _, line in multi30k._read_lines(path) if line]  # pylint: disable=protected-access
  if not sentences:
    raise multi30k.DataError(f'{path}: no sentence in the file')
  return sentences


def read_corpus(patterns: Sequence[str], field: str) -> list[list[str]]:
  """The sentences of each entry of `patterns` (all its files, in sorted order)."""
  corpus = []
  for files in expand(patterns, field):
    sentences = [s for path in files for s in read_sentences(path)]
    logging.info('%s: %d sentences from %s', field, len(sentences), ', '.join(files))
    corpus.append(sentences)
  return corpus


def mixing_probabilities(sizes: Sequence[int], weights: Sequence[float]) -> np.ndarray:
  """The probability of drawing each source: `weights` normalized, or with no weights the
  sources' sizes (every sentence equally likely, as one concatenated corpus).

  Raises:
    ConfigError: naming config.train_weights, when it has another length than
      config.train_files or a weight < 0, or all weights are 0.
  """
  if not weights:
    weights = sizes
  elif len(weights) != len(sizes):
    raise ConfigError(f'config.train_weights has {len(weights)} weights for '
                      f'{len(sizes)} entries of config.train_files')
  weights = np.asarray(weights, np.float64)
  if (weights < 0).any() or weights.sum() <= 0:
    raise ConfigError(f'config.train_weights={tuple(weights)}: need weights >= 0, not all 0')
  return weights / weights.sum()


def example_order(sizes: Sequence[int], probabilities: np.ndarray, seed: int
                  ) -> Iterator[tuple[int, int]]:
  """Endless (source, index) pairs: each example's source drawn with `probabilities`,
  and within a source the indices of a fresh permutation per epoch (epoch e of source s
  is permuted with the seed (seed, s, e)). Deterministic for `seed`."""
  draws = np.random.default_rng([seed, 0])
  positions = [0] * len(sizes)
  epochs = [0] * len(sizes)
  orders = [np.random.default_rng([seed, 1, s, 0]).permutation(n) for s, n in enumerate(sizes)]
  for _ in itertools.count():
    for s in draws.choice(len(sizes), size=_BLOCK, p=probabilities):
      if positions[s] == sizes[s]:
        epochs[s] += 1
        positions[s] = 0
        orders[s] = np.random.default_rng([seed, 1, s, epochs[s]]).permutation(sizes[s])
      yield int(s), int(orders[s][positions[s]])
      positions[s] += 1
