"""Translation with an exported model (`--mode=export`), without the training code.

  from transformer_jax.serving import ExportedTranslator
  translator = ExportedTranslator('exported/de_en')
  translator.translate(['Ein Hund rennt.', ''], decoding='greedy')  # ['A dog is running.', '']

This module imports only jax, NumPy, SentencePiece and the standard library (and
`transformer_jax.textnorm`, which is pure Python): no Flax, Optax, Orbax, TensorFlow or
the toolkit's model, data and training modules. The folder `transformer_jax.export`
writes holds:

  manifest.json        FORMAT_VERSION, model dimensions, vocabulary size, special ids,
                       length buckets, decoding settings, jax version, languages,
                       checkpoint step, the platforms the search was lowered for
  spm.model            the run's SentencePiece tokenizer
  params.npz           the parameters, one array per '/'-joined name, in their trained
                       dtype (NumPy's .npz format, read with allow_pickle=False; dtypes NumPy
                       lacks, such as bfloat16, are stored as same-size unsigned integers
                       and named in the manifest's params.stored_dtypes)
  greedy.jax_exported  `jax.export.Exported.serialize()` of the encoder + greedy search,
  beam.jax_exported    and of the encoder + beam search (StableHLO inside); each maps
                       (params {name: array}, inputs int32 [B, S], caps int32 [B],
                       out_positions int32 [L]) -> int32 [B, L], EOS-terminated, 0-padded.
                       B, S and L are symbolic: one module serves every batch size,
                       source length and output length. `caps` is each row's output cap
                       (EOS included); only the length L of `out_positions` is read, as
                       the static output length.

Translation follows `transformer_jax.translate.Translator` step for step, so the outputs
are the same token for token (tested on greedy and beam search): every line is `clean`ed
(`transformer_jax.textnorm`) and encoded by SentencePiece (whose model applies NFKC);
a line without pieces gives ''; the others, with EOS appended, go into the smallest
length bucket that holds them (longer than `max_source_length`: a multiple of 64 tokens,
translated in full, with a warning); a bucket's batches have `batch_tokens // (S *
beams)` rows (the last one padded), and each row's output cap is
ceil(ratio * tokens) + offset, at most L = ceil(ratio * S) + offset. Each (rows, S) shape
is compiled once, on its first use.
"""
from __future__ import annotations

import json
import logging
import math
import os
from typing import Sequence

import jax
import numpy as np
import sentencepiece as spm

from transformer_jax import textnorm

FORMAT = 'transformer_jax.translation_export'
FORMAT_VERSION = 1
MANIFEST = 'manifest.json'
TOKENIZER_FILE = 'spm.model'
PARAMS_FILE = 'params.npz'
DECODINGS = ('greedy', 'beam')
MODULE_SUFFIX = '.jax_exported'

_log = logging.getLogger(__name__)


def max_output_length(source_length, ratio: float, offset: int) -> np.ndarray:
  """Output cap (EOS included) for sources of `source_length` tokens: ceil(ratio * length)
  + offset, int32 (`transformer_jax.translate.max_output_length`, the same rule)."""
  return np.ceil(np.asarray(source_length) * ratio).astype(np.int32) + offset


def read_manifest(folder: str) -> dict:
  """The manifest of an export folder.

  Raises:
    FileNotFoundError: `folder` has no manifest.json.
    ValueError: it is not a translation export of FORMAT_VERSION.
  """
  path = os.path.join(folder, MANIFEST)
  if not os.path.isfile(path):
    raise FileNotFoundError(f'{path}: no such file; is {folder} a --mode=export folder?')
  with open(path, encoding='utf-8') as f:
    manifest = json.load(f)
  if manifest.get('format') != FORMAT or manifest.get('format_version') != FORMAT_VERSION:
    raise ValueError(f'{path}: format {manifest.get("format")!r} version '
                     f'{manifest.get("format_version")!r}; this loader reads {FORMAT!r} '
                     f'version {FORMAT_VERSION}')
  return manifest


def load_params(path: str, stored_dtypes: dict[str, str]) -> dict[str, np.ndarray]:
  """{name: array} of a params.npz; the arrays named in `stored_dtypes` (stored as
  unsigned integers of their size) are viewed as their dtype ('bfloat16', ...)."""
  with np.load(path, allow_pickle=False) as npz:
    params = {name: npz[name] for name in npz.files}
  for name, dtype in stored_dtypes.items():
    params[name] = params[name].view(np.dtype(dtype))  # jax registers bfloat16 etc.
  return params


class ExportedTranslator:
  """Translates with an export folder (module docstring).

  Args:
    folder: what `--mode=export` wrote.
    batch_tokens: padded source tokens x beams per batch; None: the value the model was
      exported with (`decode_batch_tokens`), which gives the shapes, and so the outputs,
      of the in-process translator. Another value changes only the batching; XLA may then
      round differently and, rarely, pick another token.

  Raises:
    FileNotFoundError: a file of the folder is missing.
    ValueError: the folder is of another format version, its tokenizer's special ids
      differ from the manifest's, or jax runs on a platform the search was not lowered
      for.
  """

  def __init__(self, folder: str, batch_tokens: int | None = None):
    self.folder = folder
    self.manifest = manifest = read_manifest(folder)
    platform = jax.export.default_export_platform()
    if platform not in manifest['platforms']:
      raise ValueError(f'{folder}: exported for {", ".join(manifest["platforms"])}, but jax '
                       f'runs on {platform}; export the model again on this platform')
    self.sp = spm.SentencePieceProcessor(model_file=self._path(manifest['tokenizer']['file']))
    special = manifest['special_ids']
    found = {'pad': self.sp.pad_id(), 'eos': self.sp.eos_id(), 'bos': self.sp.bos_id(),
             'unk': self.sp.unk_id()}
    if found != special:
      raise ValueError(f'{folder}: the tokenizer\'s special ids {found} differ from the '
                       f'manifest\'s {special}')
    self.eos_id = special['eos']
    params = load_params(self._path(manifest['params']['file']),
                         manifest['params'].get('stored_dtypes', {}))
    self.params = jax.device_put(params)
    self.settings = manifest['decoding']  # beam_size, length_penalty, output caps, ...
    self.batch_tokens = batch_tokens or self.settings['batch_tokens']
    self.buckets = manifest['inputs']['buckets']
    self._searches = {}

  def _path(self, name: str) -> str:
    path = os.path.join(self.folder, name)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'{path}: no such file (an incomplete export folder)')
    return path

  def _search(self, decoding: str):
    """The jitted search of `decoding`, deserialized on first use."""
    if decoding not in self._searches:
      with open(self._path(self.manifest['modules'][decoding]), 'rb') as f:
        exported = jax.export.deserialize(bytearray(f.read()))
      self._searches[decoding] = jax.jit(exported.call)
    return self._searches[decoding]

  def _bucket(self, length: int) -> int:
    for bucket in self.buckets:
      if length <= bucket:
        return bucket
    multiple = self.manifest['inputs']['long_bucket_multiple']
    return math.ceil(length / multiple) * multiple

  def _rows(self, length: int, decoding: str) -> int:
    beams = self.settings['beam_size'] if decoding == 'beam' else 1
    return max(1, self.batch_tokens // (length * beams))

  def translate_ids(self, sources: Sequence[np.ndarray], decoding: str = 'beam'
                    ) -> list[np.ndarray]:
    """EOS-terminated source ids (int [n] each) -> output ids without EOS, int32, in the
    same order.

    Raises:
      ValueError: `decoding` is not 'greedy' or 'beam'.
    """
    if decoding not in DECODINGS:
      raise ValueError(f"decoding={decoding!r}: the export has {' and '.join(DECODINGS)}")
    ratio, offset = self.settings['max_length_ratio'], self.settings['max_length_offset']
    search = self._search(decoding)
    outputs: list[np.ndarray | None] = [None] * len(sources)
    by_bucket: dict[int, list[int]] = {}
    for i, ids in enumerate(sources):
      by_bucket.setdefault(self._bucket(len(ids)), []).append(i)
    for length, indices in sorted(by_bucket.items()):
      rows = self._rows(length, decoding)
      out_positions = np.arange(int(max_output_length(length, ratio, offset)), dtype=np.int32)
      for start in range(0, len(indices), rows):
        chunk = indices[start:start + rows]
        inputs = np.zeros((rows, length), np.int32)
        for row, i in enumerate(chunk):
          inputs[row, :len(sources[i])] = sources[i]
        caps = np.ones((rows,), np.int32)  # Padding rows: outputs thrown away.
        caps[:len(chunk)] = max_output_length([len(sources[i]) for i in chunk], ratio, offset)
        seqs = np.asarray(search(self.params, inputs, caps, out_positions))
        for row, i in enumerate(chunk):
          out = seqs[row]
          end = np.flatnonzero(out == self.eos_id)
          outputs[i] = out[:end[0]] if end.size else out[out != 0]
    return outputs

  def translate(self, lines: Sequence[str], decoding: str | None = None) -> list[str]:
    """Raw lines -> translations, one line (no line break) per input line, same order;
    '' for a line without pieces (empty or blank).

    Args:
      lines: one sentence per item, normalized here as in training.
      decoding: 'greedy' or 'beam' (beam_size and length_penalty of the manifest); None:
        the manifest's default (the run's `decoding`, or 'beam' for a sampling run).

    Raises:
      TypeError: `lines` is a single string (translate([line]) translates one line).
      ValueError: `decoding` is not 'greedy' or 'beam'.
    """
    if isinstance(lines, str):
      raise TypeError('ExportedTranslator.translate takes a list of lines, not one string: '
                      'translate([line])')
    decoding = decoding or self.settings['default']
    encoded = self.sp.encode([textnorm.clean(line) for line in lines])
    todo = [i for i, ids in enumerate(encoded) if ids]
    sources = [np.asarray(encoded[i] + [self.eos_id], np.int32) for i in todo]
    limit = self.manifest['inputs']['max_source_length']
    too_long = [todo[j] + 1 for j, ids in enumerate(sources) if len(ids) > limit]
    if too_long:
      _log.warning('%d line(s) longer than max_source_length=%d tokens, translated in full '
                   'beyond the lengths seen in training (lines %s)', len(too_long), limit,
                   ', '.join(map(str, too_long[:10])) + (', ...' if len(too_long) > 10 else ''))
    results = [''] * len(lines)
    for i, ids in zip(todo, self.translate_ids(sources, decoding)):
      results[i] = textnorm.one_line(self.sp.decode(ids.tolist()))
    return results
