"""Input pipeline: raw sentence pairs -> SentencePiece ids -> length-bucketed batches.

The `Batcher` serves every task: translation batches pairs (bucketed or packed), the
encoder tasks batch token ids with a label per sentence or per token (bucketed).

Sources (`config.dataset_name`):
  'multi30k'  Multi30k task 1 through our TFDS builder (`transformer_jax.multi30k`),
              reading the raw files in `config.data_dir` (downloaded when it is empty).
  'text'      a user's own files `{data_dir}/{split}.{lang}` (or `.gz`), one sentence
              per line, line i of the source translating line i of the target.
  other       any TFDS translation dataset by name, e.g. 'wmt14_translate/de-en',
              whose examples are dicts keyed by language code.

Batches are dicts {'inputs': int32 [B, L], 'targets': int32 [B, L]}, EOS-terminated,
0-padded. Training batches hold about `max_tokens_per_batch` padded tokens per side,
in one of two ways:
  bucketing  pairs are grouped into buckets by length and every bucket has one fixed
             shape, so the train step compiles once per bucket, not once per batch;
  packing    (`pack=True`) several pairs share a row of `max_length` tokens, with
             segment ids and per-pair positions in the batch (`PACKING_KEYS`), as in the
             Flax WMT example: one compiled shape, and on Multi30k about 90% of the
             computed target positions are real tokens instead of about 76%.
The pipeline is deterministic for a given seed, and `skip` resumes it at any step. An
optional per-example `transform` of the training stream (e.g. the word noise of
`transformer_jax.augment`) runs before batching, deterministically too.
"""
from __future__ import annotations

import itertools
import math
import os
from typing import Callable, Iterator

from absl import logging
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from transformer_jax import multi30k
from transformer_jax import multihost
from transformer_jax import tokenizer
from transformer_jax.config_schema import ConfigError
from transformer_jax.tokenizer import EOS_ID

_BUCKET_QUANTUM = 8  # Bucket lengths are multiples of this many tokens.
# Extra batch entries of packed rows, named as in the Flax WMT example; the model takes
# them as keyword arguments.
PACKING_KEYS = ('inputs_segmentation', 'targets_segmentation', 'inputs_position',
                'targets_position')
# A transform of training examples (`Batcher.train`), called on groups of them:
# (positions int64 [n] in the endless training stream, {name: n arrays}) -> {name: n arrays}.
Transform = Callable[[np.ndarray, dict], dict]
# Examples per call of a transform.
TRANSFORM_GROUP = 256


def tfds_dir(config, workdir: str) -> str:
  """Folder where TFDS keeps prepared data: `config.tfds_data_dir` or {workdir}/tfds."""
  return config.tfds_data_dir or os.path.join(workdir, 'tfds')


def load_pairs(config, split: str, workdir: str) -> tuple[list[str], list[str]]:
  """Reads one split as two aligned lists of raw sentences (source, target).

  Raises:
    multi30k.DataError: a missing file, invalid UTF-8 or differing line counts, naming
      the file and line; or a split without any sentence pair.
    ConfigError: an unsupported language pair or an unknown split.
  """
  sources, targets = _load_pairs(config, split, workdir)
  if not sources:
    raise multi30k.DataError(f'split {split!r} of {config.dataset_name} '
                             f'({config.data_dir or "downloaded"}) has no sentence pairs')
  return sources, targets


def _load_pairs(config, split: str, workdir: str) -> tuple[list[str], list[str]]:
  src, tgt = config.source_lang, config.target_lang
  if config.dataset_name == 'text':
    pairs = list(multi30k.read_parallel(multi30k.find_file(config.data_dir, split, src),
                                        multi30k.find_file(config.data_dir, split, tgt)))
    return [p[0] for p in pairs], [p[1] for p in pairs]
  if config.dataset_name == 'multi30k':
    if split.split('[')[0] not in multi30k.SPLITS:
      raise ConfigError(f'split {split!r}: Multi30k has the splits {", ".join(multi30k.SPLITS)}')
    other = {src, tgt} - {'en'}
    if len(other) != 1 or not other <= set(multi30k.LANGUAGES):
      raise ConfigError(f'config.source_lang={src!r}, config.target_lang={tgt!r}: Multi30k '
                       f'pairs English with one of {multi30k.LANGUAGES}')
    # Process 0 prepares the TFDS data; the other processes then reuse it.
    with multihost.primary_first('multi30k'):
      ds = multi30k.load_split(config.data_dir, f'{other.pop()}-en', split,
                               tfds_dir(config, workdir))
  else:
    try:
      with multihost.primary_first('tfds'):
        ds = tfds.load(config.dataset_name, split=split, data_dir=tfds_dir(config, workdir),
                       download=True)
    except ValueError as e:  # Unknown split, or a bad dataset name.
      raise ConfigError(f'{config.dataset_name} split {split!r}: {e}') from e
  sources, targets = [], []
  for examples in ds.batch(4096).as_numpy_iterator():
    sources.extend(s.decode('utf-8') for s in examples[src])
    targets.extend(t.decode('utf-8') for t in examples[tgt])
  return sources, targets


def encode(sp, sentences: list[str], max_length: int, truncate: bool,
           name: str | None = None) -> list[np.ndarray]:
  """SentencePiece ids + EOS per sentence (`tokenizer.clean`ed), int32 [<= max_length]
  each.

  Over-long sentences are cut to `max_length` (ending in EOS) when `truncate`, else
  returned whole (the caller drops them). With a `name` ("split 'train' sources (de)"),
  the unknown-piece rate of the sentences, before any cut, is logged
  (`tokenizer.check_unknown`: a warning above 0.1%).
  """
  pieces = sp.encode([tokenizer.clean(s) for s in sentences])
  if name is not None:
    tokenizer.check_unknown(pieces, name)
  encoded = []
  for ids in pieces:
    if truncate and len(ids) >= max_length:
      ids = ids[:max_length - 1]
    encoded.append(np.asarray(ids + [EOS_ID], dtype=np.int32))
  return encoded


def tokenize_pairs(sp, sources: list[str], targets: list[str], config, name: str = 'pairs'
                   ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """Encodes both sides and drops (or, with `config.truncate`, cuts) over-long pairs.

  The unknown-piece rate of each side is logged, naming `name` (e.g. "split 'train'")
  and the language; above 0.1% it is a warning (`tokenizer.check_unknown`).
  """
  src_lang = getattr(config, 'source_lang', None)
  tgt_lang = getattr(config, 'target_lang', None)
  src = encode(sp, sources, config.max_source_length, config.truncate,
               f'{name} sources' + (f' ({src_lang})' if src_lang else ''))
  tgt = encode(sp, targets, config.max_target_length, config.truncate,
               f'{name} targets' + (f' ({tgt_lang})' if tgt_lang else ''))
  keep = [i for i in range(len(src)) if len(src[i]) <= config.max_source_length
          and len(tgt[i]) <= config.max_target_length]
  if len(keep) < len(src):
    logging.info('%s: dropped %d of %d pairs longer than %d/%d tokens', name,
                 len(src) - len(keep), len(src), config.max_source_length,
                 config.max_target_length)
  return [src[i] for i in keep], [tgt[i] for i in keep]


def bucket_lengths(max_length: int, step: float) -> list[int]:
  """Padded lengths of the buckets: multiples of 8 growing by `step`, ending at max_length."""
  lengths, length = [], float(_BUCKET_QUANTUM)
  while True:
    padded = min(max_length, math.ceil(length / _BUCKET_QUANTUM) * _BUCKET_QUANTUM)
    if not lengths or padded > lengths[-1]:
      lengths.append(padded)
    if padded >= max_length:
      return lengths
    length *= step


def bucket_batch_sizes(lengths: list[int], max_tokens: int, num_devices: int) -> list[int]:
  """Rows per batch for each bucket: about max_tokens / length, a multiple of num_devices."""
  return [max(num_devices, max_tokens // length // num_devices * num_devices)
          for length in lengths]


def pack_pairs(sources: list[np.ndarray], targets: list[np.ndarray], order: Iterator[int],
               rows: int, length: int, transform: Transform | None = None) -> Iterator[dict]:
  """Packs pairs, taken in `order`, into batches of `rows` rows of `length` tokens a side.

  Greedy first fit: a pair goes into the first row of the current batch where both of
  its sides still fit; when none has room, the batch is emitted and a new one begun.

  Args:
    sources, targets: int32 [<= length] token ids per pair (EOS included).
    order: pair indices (an endless stream for training).
    rows, length: the batch shape [rows, length].
    transform: applied to the pairs before they are packed, TRANSFORM_GROUP at a time:
      `transform(j, {'inputs': sources, 'targets': targets})` with j the positions of
      the pairs in `order` (0, 1, ...); see `Batcher.train`.

  Yields:
    dicts of int32 [rows, length]: 'inputs', 'targets' (0-padded), and PACKING_KEYS:
    '*_segmentation' (1, 2, ... per pair within a row, 0 on padding) and '*_position'
    (0, 1, ... within each pair, 0 on padding).

  Raises:
    ValueError: a pair longer than `length` on either side (after `transform`).
  """
  def new_batch():
    return np.zeros(rows, np.int64), np.zeros(rows, np.int64), [[] for _ in range(rows)]

  def emit(contents):
    batch = {k: np.zeros((rows, length), np.int32) for k in ('inputs', 'targets',
                                                             *PACKING_KEYS)}
    for r, pairs in enumerate(contents):
      for side, seqs in (('inputs', [p[0] for p in pairs]), ('targets', [p[1] for p in pairs])):
        start = 0
        for segment, seq in enumerate(seqs, 1):
          end = start + len(seq)
          batch[side][r, start:end] = seq
          batch[f'{side}_segmentation'][r, start:end] = segment
          batch[f'{side}_position'][r, start:end] = np.arange(len(seq))
          start = end
    return batch

  def pairs():  # (index, source, target) in `order`, transformed.
    if transform is None:
      yield from ((i, sources[i], targets[i]) for i in order)
      return
    stream = enumerate(order)
    while group := list(itertools.islice(stream, TRANSFORM_GROUP)):
      positions, indices = (np.array(x, np.int64) for x in zip(*group))
      out = transform(positions, {'inputs': [sources[i] for i in indices],
                                  'targets': [targets[i] for i in indices]})
      yield from zip(indices, out['inputs'], out['targets'])

  used_src, used_tgt, contents = new_batch()
  for i, *pair in pairs():
    n_src, n_tgt = len(pair[0]), len(pair[1])
    if n_src > length or n_tgt > length:
      raise ValueError(f'pair {i} has {n_src}/{n_tgt} tokens, more than the row '
                       f'length {length}')
    fits = np.flatnonzero((used_src + n_src <= length) & (used_tgt + n_tgt <= length))
    if not fits.size:
      yield emit(contents)
      used_src, used_tgt, contents = new_batch()
      fits = [0]
    used_src[fits[0]] += n_src
    used_tgt[fits[0]] += n_tgt
    contents[fits[0]].append(pair)
  if any(contents):
    yield emit(contents)


def _to_dataset(features: dict) -> tf.data.Dataset:
  """{name: list of int32 [n_i] sequences (ragged) or an array [N, ...] (one value per
  example)} -> a dataset of per-example dicts."""
  def ragged(seqs):
    return tf.RaggedTensor.from_row_lengths(
        np.concatenate(seqs) if seqs else np.zeros([0], np.int32),
        np.array([len(s) for s in seqs], dtype=np.int64))
  columns = {k: v if isinstance(v, np.ndarray) else ragged(v) for k, v in features.items()}
  ds = tf.data.Dataset.from_tensor_slices(columns)
  # Rows of a ragged tensor come out as ragged-rank-0 values; make them plain tensors.
  return ds.map(lambda x: {k: tf.convert_to_tensor(v) for k, v in x.items()})


def _bucket(ds: tf.data.Dataset, lengths: list[int], batch_sizes: list[int],
            drop_remainder: bool) -> tf.data.Dataset:
  # Bucket i holds examples whose longest sequence is in (lengths[i-1], lengths[i]] and
  # pads every sequence to lengths[i]; the last, never-used bucket catches anything longer.
  def length(x):
    return tf.reduce_max(tf.stack([tf.shape(v)[0] for v in x.values() if v.shape.rank]))
  return ds.bucket_by_sequence_length(
      element_length_func=length,
      bucket_boundaries=[length + 1 for length in lengths],
      bucket_batch_sizes=batch_sizes + [batch_sizes[-1]],
      pad_to_bucket_boundary=True, drop_remainder=drop_remainder)


def _map_transform(ds: tf.data.Dataset, transform: Transform) -> tf.data.Dataset:
  """`ds` (per-example dicts of 1-D sequences or fixed-shape values) with `transform`
  (`Batcher.train`) applied to groups of TRANSFORM_GROUP consecutive examples, in a
  `tf.numpy_function`; the order is kept."""
  spec = ds.element_spec
  keys = sorted(spec)
  ragged = {k: spec[k].shape.rank == 1 and spec[k].shape[0] is None for k in keys}

  def call(positions, *columns):
    columns = iter(columns)
    examples = {}
    for k in keys:  # A ragged column comes as (values, row lengths).
      examples[k] = (np.split(next(columns), np.cumsum(next(columns))[:-1]) if ragged[k]
                     else list(next(columns)))
    out = transform(positions, examples)
    flat = []
    for k in keys:
      dtype = spec[k].dtype.as_numpy_dtype
      if ragged[k]:
        flat += [np.concatenate([np.asarray(v, dtype).reshape(-1) for v in out[k]]),
                 np.array([np.size(v) for v in out[k]], np.int64)]
      else:
        flat.append(np.stack([np.asarray(v, dtype) for v in out[k]]))
    return flat

  def apply(positions, group):
    columns = [t for k in keys for t in ((group[k].flat_values, group[k].row_lengths())
                                          if ragged[k] else (group[k],))]
    types = [t for k in keys for t in ((spec[k].dtype, tf.int64) if ragged[k]
                                        else (spec[k].dtype,))]
    flat = iter(tf.numpy_function(call, [positions, *columns], types, stateful=False))
    out = {}
    for k in keys:
      if ragged[k]:
        out[k] = tf.RaggedTensor.from_row_lengths(tf.ensure_shape(next(flat), [None]),
                                                  tf.ensure_shape(next(flat), [None]))
      else:
        out[k] = tf.ensure_shape(next(flat), [None, *spec[k].shape])
    return out

  ds = ds.enumerate().ragged_batch(TRANSFORM_GROUP)
  ds = ds.map(apply, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True).unbatch()
  # Rows of a ragged tensor come out as ragged-rank-0 values; make them plain tensors.
  return ds.map(lambda x: {k: tf.convert_to_tensor(v) for k, v in x.items()})


def _options() -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  return options


class Batcher:
  """Builds the train and eval `tf.data` pipelines for one bucketing scheme.

  Args:
    max_length: the longest side allowed (max of source and target limits).
    max_tokens: padded tokens per global batch and side.
    bucket_step: growth factor of the bucket lengths.
    num_devices: batch sizes are multiples of this, so the batch splits evenly.
    pack: training batches pack several pairs per row of `max_length` tokens
      (`pack_pairs`); eval batches are bucketed either way.
  """

  def __init__(self, max_length: int, max_tokens: int, bucket_step: float, num_devices: int,
               pack: bool = False):
    self.lengths = bucket_lengths(max_length, bucket_step)
    self.batch_sizes = bucket_batch_sizes(self.lengths, max_tokens, num_devices)
    self.pack = pack
    self.packed_rows = bucket_batch_sizes([max_length], max_tokens, num_devices)[0]
    self.max_length = max_length

  def train(self, features: dict, seed: int, shuffle_buffer_size: int,
            skip: int = 0, transform: Transform | None = None) -> tf.data.Dataset:
    """Endless, shuffled (reshuffled each epoch, deterministically from `seed`) batches,
    starting after the first `skip` batches.

    `features`: {name: list of int32 sequences, or an array with one value per
    example}, e.g. {'inputs': sources, 'targets': targets} (packing uses just these
    two) or {'inputs': ids, 'labels': int32 [N], 'weights': float32 [N]}. Sequences
    are padded with 0 to their bucket's length.

    `transform` (e.g. `augment.WordNoise`), if given, changes the examples before they
    are batched, TRANSFORM_GROUP consecutive ones per call: `transform(positions,
    examples)` gets their positions (int64 [n]: 0, 1, ... along the endless shuffled
    stream, so each epoch has new ones) and {name: list of n NumPy arrays} (one per
    example, as in `features`), and returns the same names with n arrays each, of the
    same dtypes; sequences may change length but must stay within the batcher's max
    length. Example i of the result must depend only on positions[i] and example i:
    then the grouping does not matter and a run resumed with `skip` sees the batches
    an uninterrupted one does. Bucketed batches apply it in a `tf.data` map
    (`tf.numpy_function`, order kept), packed ones before packing (`pack_pairs`).
    """
    if self.pack:
      return self._packed(features['inputs'], features['targets'], seed, skip, transform)
    ds = _to_dataset(features)
    ds = ds.shuffle(shuffle_buffer_size, seed=seed, reshuffle_each_iteration=True).repeat()
    if transform is not None:
      ds = _map_transform(ds, transform)
    ds = _bucket(ds, self.lengths, self.batch_sizes, drop_remainder=True)
    return ds.skip(skip).prefetch(tf.data.AUTOTUNE).with_options(_options())

  def stream(self, examples, signature: dict, skip: int = 0) -> tf.data.Dataset:
    """Bucketed batches of an endless stream of examples (pretraining), starting after the
    first `skip` batches.

    Args:
      examples: a function returning an iterator of dicts {name: array [n]}, every array
        of one example of one length n (e.g. {'inputs', 'targets'}), in a deterministic
        order; a resumed run regenerates and skips the first batches.
      signature: {name: tf.TensorSpec([None], dtype)} of the examples.
      skip: batches to skip.
    """
    ds = tf.data.Dataset.from_generator(examples, output_signature=signature)
    ds = _bucket(ds, self.lengths, self.batch_sizes, drop_remainder=True)
    return ds.skip(skip).prefetch(tf.data.AUTOTUNE).with_options(_options())

  def _packed(self, sources, targets, seed: int, skip: int,
              transform: Transform | None = None) -> tf.data.Dataset:
    # A full shuffle per epoch (seeded by (seed, epoch)); packing runs across epochs.
    def order():
      for epoch in itertools.count():
        yield from np.random.default_rng([seed, epoch]).permutation(len(sources))

    def batches():
      return itertools.islice(pack_pairs(sources, targets, order(), self.packed_rows,
                                         self.max_length, transform), skip, None)

    spec = tf.TensorSpec([self.packed_rows, self.max_length], tf.int32)
    ds = tf.data.Dataset.from_generator(
        batches, output_signature={k: spec for k in ('inputs', 'targets', *PACKING_KEYS)})
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

  def eval(self, features: dict) -> tf.data.Dataset:
    """One pass over `features` (as in `train`) in a fixed order, grouped by length; the
    last batch of a bucket may be short (`pad_rows`)."""
    ds = _bucket(_to_dataset(features), self.lengths, self.batch_sizes,
                 drop_remainder=False)
    return ds.prefetch(tf.data.AUTOTUNE).with_options(_options())

  def pad_rows(self, batch: dict) -> dict:
    """Pads a short eval batch with all-zero rows (padding, weight 0) up to its bucket's
    batch size, so eval compiles once per bucket."""
    length = batch['inputs'].shape[1]
    rows = self.batch_sizes[self.lengths.index(length)] - batch['inputs'].shape[0]
    return {k: np.pad(v, ((0, rows),) + ((0, 0),) * (v.ndim - 1)) for k, v in batch.items()}
