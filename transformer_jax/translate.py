"""Sentences in, translations out: batching by length, jitted search, detokenization.

`Translator.translate(sentences)` keeps the number and order of lines. Sources are
grouped into length buckets and every batch of a bucket has one shape, so the search
compiles once per bucket. Each line is normalized as in training (`tokenizer`'s module
docstring: whitespace, tabs and NBSP are spaces, control and zero-width characters are
removed, NFD composes), so it never splits or merges lines; a line that is empty after
that gives an empty line, and every output is one line (`tokenizer.one_line`). A source
longer than `max_source_length` is translated in full (in a bucket of its own length,
rounded up to a multiple of 64) with one warning per input. The unknown-piece rate of
the input is logged, with a warning above 0.1% (`tokenizer.check_unknown`).

Sampling (`decoding='sample'`) is reproducible whatever the batching: each sentence draws
from its own random stream, fold_in(PRNGKey(seed), `sample_ids`), which depends on the
sentence's tokens and on how many identical sentences come before it in the input, not on
its batch, row or neighbours. A sentence translated alone gets the same sample as in any
file, and repeated lines get different samples.
"""
from __future__ import annotations

import collections
import functools
import math
import zlib

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import data
from transformer_jax import decode
from transformer_jax import models
from transformer_jax import multihost
from transformer_jax import sharding
from transformer_jax import tokenizer
from transformer_jax.tokenizer import EOS_ID

LONG_QUANTUM = 64  # Over-long sources are padded to a multiple of this.
# What the warnings of --mode=translate call its input: main.py sets the --input file
# (or 'stdin').
INPUT_NAME = 'translate input'


def _line_numbers(numbers: list[int], shown: int = 10) -> str:
  """'line 4' or 'lines 1, 4, 5 and 3 more' (1-based)."""
  if len(numbers) == 1:
    return f'line {numbers[0]}'
  text = ', '.join(map(str, numbers[:shown]))
  return f'lines {text}' + (f' and {len(numbers) - shown} more' if len(numbers) > shown else '')


def max_output_length(source_length, ratio: float, offset: int):
  """Output cap (EOS included) for a source of `source_length` tokens: ratio * len + offset."""
  return np.ceil(np.asarray(source_length) * ratio).astype(np.int32) + offset


def sample_ids(sources: list[np.ndarray]) -> np.ndarray:
  """The random-stream id of each source, for `decode.sample`'s row_ids.

  The CRC-32 of the source's int32 token ids followed by its occurrence number (0 for the
  first time these exact ids appear in `sources`, 1 for the second, ...): the id depends on
  the sentence and on the identical sentences before it, never on the batching.

  Args:
    sources: int token ids, one array per sentence.

  Returns:
    uint32 [len(sources)].
  """
  seen = collections.Counter()
  ids = np.zeros((len(sources),), np.uint32)
  for i, source in enumerate(sources):
    data = np.asarray(source, np.int32).tobytes()
    ids[i] = zlib.crc32(np.uint32(seen[data]).tobytes(), zlib.crc32(data))
    seen[data] += 1
  return ids


class Translator:
  """Decodes with `config.decoding` ('beam', 'greedy' or 'sample').

  Args:
    model: the Transformer.
    params: its parameters (replicated over `mesh`).
    sp: the SentencePiece processor.
    config: the run config (max_source_length, length_bucket_step, decoding, beam_size,
      length_penalty, temperature, top_k, top_p, decode_max_length_ratio,
      decode_max_length_offset, decode_batch_tokens, seed).
    mesh: devices; batch rows are split over its 'data' axis.
  """

  def __init__(self, model: models.Transformer, params, sp, config, mesh,
               rules: sharding.Rules = sharding.DEFAULT_RULES):
    self.model, self.params, self.sp, self.config, self.mesh = model, params, sp, config, mesh
    self.rules = rules
    self.lengths = data.bucket_lengths(config.max_source_length, config.length_bucket_step)
    self._compiled = {}
    self._warned = set()  # Inputs already warned about over-long lines (once each).

  def _rows(self, length: int) -> int:
    """Batch rows for sources padded to `length`: decode_batch_tokens / (length * beams)."""
    beams = self.config.beam_size if self.config.decoding == 'beam' else 1
    n = sharding.batch_shards(self.mesh)
    return max(n, self.config.decode_batch_tokens // (length * beams) // n * n)

  def _search_fn(self, source_length: int):
    if source_length not in self._compiled:
      cfg = self.config
      max_length = int(max_output_length(source_length, cfg.decode_max_length_ratio,
                                         cfg.decode_max_length_offset))
      self._compiled[source_length] = sharding.jit(
          functools.partial(search, model=self.model, config=cfg, max_length=max_length),
          self.mesh, self.rules, out_shardings=sharding.batch_sharding(self.mesh))
    return self._compiled[source_length]

  def _bucket(self, length: int) -> int:
    for bucket in self.lengths:
      if length <= bucket:
        return bucket
    return math.ceil(length / LONG_QUANTUM) * LONG_QUANTUM

  def translate_ids(self, sources: list[np.ndarray]) -> list[np.ndarray]:
    """EOS-terminated source ids -> output ids without EOS (never PAD or BOS: `decode`),
    in the same order. A sentence's output depends on it alone (and, sampling, on the
    identical sentences before it: `sample_ids`), not on the batching."""
    cfg = self.config
    outputs: list[np.ndarray | None] = [None] * len(sources)
    streams = sample_ids(sources)
    by_bucket: dict[int, list[int]] = {}
    for i, ids in enumerate(sources):
      by_bucket.setdefault(self._bucket(len(ids)), []).append(i)
    for length, indices in sorted(by_bucket.items()):
      rows = self._rows(length)
      search_fn = self._search_fn(length)
      for start in range(0, len(indices), rows):
        chunk = indices[start:start + rows]
        inputs = np.zeros((rows, length), np.int32)
        for row, i in enumerate(chunk):
          inputs[row, :len(sources[i])] = sources[i]
        caps = np.ones((rows,), np.int32)
        caps[:len(chunk)] = max_output_length([len(sources[i]) for i in chunk],
                                              cfg.decode_max_length_ratio,
                                              cfg.decode_max_length_offset)
        row_ids = np.zeros((rows,), np.uint32)  # Padding rows: outputs thrown away.
        row_ids[:len(chunk)] = streams[chunk]
        batch = sharding.put_batch({'inputs': inputs, 'caps': caps, 'row_ids': row_ids},
                                   self.mesh)
        # Every process gets every row (the rows of other processes' devices too).
        seqs = np.asarray(multihost.to_host(search_fn(self.params, batch['inputs'],
                                                   batch['caps'], batch['row_ids'])))
        for row, i in enumerate(chunk):
          out = seqs[row]
          end = np.flatnonzero(out == EOS_ID)
          outputs[i] = out[:end[0]] if end.size else out[out != 0]
    return outputs

  def translate(self, sentences: list[str], name: str = 'input',
                check_unknown: bool = True) -> list[str]:
    """Raw sentences -> detokenized translations, one line per input line, same order.

    Args:
      sentences: one sentence per item, normalized here (module docstring).
      name: what the sentences are, for the warnings ("split 'test_2016' sources (de)",
        '--input=in.txt').
      check_unknown: log their unknown-piece rate (`tokenizer.check_unknown`); off where
        the caller has already reported it.

    Returns:
      One line (no line break) per sentence; '' for a sentence without pieces.
    """
    cfg = self.config
    encoded = self.sp.encode([tokenizer.clean(s) for s in sentences])
    if check_unknown:
      tokenizer.check_unknown(encoded, name)
    todo = [i for i, ids in enumerate(encoded) if ids]
    sources = [np.asarray(encoded[i] + [EOS_ID], np.int32) for i in todo]
    too_long = [todo[j] + 1 for j, ids in enumerate(sources) if len(ids) > cfg.max_source_length]
    if too_long:
      one = len(too_long) == 1
      message = (f'{name}: {len(too_long)} {"line is" if one else "lines are"} longer than '
                 f'max_source_length={cfg.max_source_length} tokens and '
                 f'{"is" if one else "are"} translated in full, beyond the lengths seen in '
                 f'training ({_line_numbers(too_long)})')
      if name in self._warned:  # Once per input: validation BLEU translates it again.
        logging.info('%s', message)
      else:
        self._warned.add(name)
        logging.warning('%s', message)
    results = [''] * len(sentences)
    for i, ids in zip(todo, self.translate_ids(sources)):
      results[i] = tokenizer.one_line(self.sp.decode(ids.tolist()))
    return results


def search(params, inputs: jax.Array, caps: jax.Array, row_ids: jax.Array, *,
           model: models.Transformer, config, max_length: int) -> jax.Array:
  """inputs int32 [B, S], caps int32 [B], row_ids uint32 [B] (each row's random stream,
  `sample_ids`; sampling only) -> best sequences int32 [B, max_length]."""
  cache = model.apply({'params': params}, inputs, max_length, method=models.Transformer.init_cache)

  def tokens_to_logits(tokens, cache, index):
    return model.apply({'params': params}, cache, tokens, index,
                       method=models.Transformer.decode_step)

  caps = jnp.minimum(caps, max_length)
  if config.decoding == 'beam':
    seqs, _ = decode.beam_search(tokens_to_logits, cache, caps, max_length, config.beam_size,
                                 config.length_penalty)
    return seqs[:, 0]
  rng = jax.random.PRNGKey(config.seed) if config.decoding == 'sample' else None
  return decode.sample(tokens_to_logits, cache, caps, max_length, rng, config.temperature,
                       config.top_k, config.top_p, row_ids)
