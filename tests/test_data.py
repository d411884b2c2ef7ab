"""Input pipeline: bucketing, determinism, resumable position, bounded shapes."""
import collections
import logging

import numpy as np
import pytest

from transformer_jax import data, tokenizer
from transformer_jax.tokenizer import EOS_ID


def _fake_pairs(n, seed=0, max_len=30):
  rng = np.random.default_rng(seed)
  make = lambda: [np.append(rng.integers(4, 100, size=rng.integers(1, max_len)), EOS_ID)
                  .astype(np.int32) for _ in range(n)]
  return make(), make()


def test_bucket_lengths_and_batch_sizes():
  assert data.bucket_lengths(64, 1.25) == [8, 16, 24, 32, 40, 48, 64]
  assert data.bucket_lengths(32, 2.0) == [8, 16, 32]
  assert data.bucket_lengths(30, 2.0) == [8, 16, 30]
  assert data.bucket_batch_sizes([8, 16, 30], 512, 1) == [64, 32, 17]
  assert data.bucket_batch_sizes([8, 16, 30], 512, 8) == [64, 32, 16]
  assert data.bucket_batch_sizes([8, 512], 100, 4) == [12, 4]  # never below num_devices


def test_train_batches_have_bucket_shapes_and_keep_every_token():
  src, tgt = _fake_pairs(200)
  batcher = data.Batcher(32, 256, 2.0, num_devices=2)
  batches = list(batcher.train({'inputs': src, 'targets': tgt}, seed=0,
                               shuffle_buffer_size=1000)
                 .take(40).as_numpy_iterator())
  shapes = {b['inputs'].shape for b in batches}
  assert shapes <= {(bs, length) for bs, length in zip(batcher.batch_sizes, batcher.lengths)}
  originals = {(tuple(s), tuple(t)) for s, t in zip(src, tgt)}
  for b in batches:
    assert b['inputs'].shape == b['targets'].shape and b['inputs'].dtype == np.int32
    for s, t in zip(b['inputs'], b['targets']):
      # Each row is an original pair followed by padding only.
      pair = (tuple(s[s != 0]), tuple(t[t != 0]))
      assert pair in originals
      assert (s[:len(pair[0])] != 0).all() and (t[:len(pair[1])] != 0).all()


def test_train_pipeline_is_deterministic_and_skip_resumes_it():
  src, tgt = _fake_pairs(300, seed=1)
  batcher = data.Batcher(32, 256, 2.0, num_devices=1)
  run = lambda skip: [b['targets'] for b in batcher.train(
      {'inputs': src, 'targets': tgt}, seed=7, shuffle_buffer_size=1000,
      skip=skip).take(30).as_numpy_iterator()]
  full, again, resumed = run(0), run(0), run(12)
  assert len(full) == 30
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(full[12:], resumed):
    np.testing.assert_array_equal(a, b)
  other_seed = [b['targets'] for b in batcher.train({'inputs': src, 'targets': tgt}, seed=8,
                                                    shuffle_buffer_size=1000)
                .take(30).as_numpy_iterator()]
  assert any(a.shape != b.shape or (a != b).any() for a, b in zip(full, other_seed))


def test_eval_pass_covers_each_pair_once_and_pads_rows():
  src, tgt = _fake_pairs(50, seed=2)
  batcher = data.Batcher(32, 256, 2.0, num_devices=4)
  seen = []
  for batch in batcher.eval({'inputs': src, 'targets': tgt}).as_numpy_iterator():
    padded = batcher.pad_rows(batch)
    length = padded['inputs'].shape[1]
    assert padded['inputs'].shape[0] == batcher.batch_sizes[batcher.lengths.index(length)]
    assert (padded['targets'][batch['targets'].shape[0]:] == 0).all()
    seen += [tuple(t[t != 0]) for t in batch['targets']]
  assert sorted(seen) == sorted(tuple(t) for t in tgt)


@pytest.mark.parametrize('truncate', [False, True])
def test_over_long_pairs_are_dropped_or_truncated(truncate):
  class FakeSp:  # One id per character, like a character-level model.
    def encode(self, sentences):
      return [[4 + ord(c) % 50 for c in s] for s in sentences]

  config = type('C', (), {'max_source_length': 5, 'max_target_length': 4,
                          'truncate': truncate})()
  src, tgt = data.tokenize_pairs(FakeSp(), ['abc', 'abcdefg', 'ab'], ['xy', 'xy', 'wxyz'],
                                 config)
  if truncate:
    assert [len(s) for s in src] == [4, 5, 3] and [len(t) for t in tgt] == [3, 3, 4]
    assert all(s[-1] == EOS_ID for s in src + tgt)
  else:
    assert len(src) == 1 and list(src[0][-1:]) == [EOS_ID] and len(src[0]) == 4


def _unpack(batch):
  """(source, target) token tuples of every pair in a packed batch, row by row."""
  pairs = []
  for r in range(batch['inputs'].shape[0]):
    for segment in range(1, batch['inputs_segmentation'][r].max() + 1):
      pair = []
      for side in ('inputs', 'targets'):
        where = batch[f'{side}_segmentation'][r] == segment
        np.testing.assert_array_equal(batch[f'{side}_position'][r][where],
                                      np.arange(where.sum()))
        pair.append(tuple(batch[side][r][where]))
      pairs.append(tuple(pair))
  return pairs


def test_pack_pairs_keeps_every_pair_once_in_order_per_row():
  src, tgt = _fake_pairs(300, seed=3)
  order = np.random.default_rng(0).permutation(300)
  batches = list(data.pack_pairs(src, tgt, iter(order), rows=8, length=64))
  unpacked = [p for b in batches for p in _unpack(b)]
  assert sorted(unpacked) == sorted((tuple(s), tuple(t)) for s, t in zip(src, tgt))
  for b in batches:
    assert all(b[k].shape == (8, 64) and b[k].dtype == np.int32 for k in b)
    for side in ('inputs', 'targets'):  # Padding is exactly where the segment id is 0.
      np.testing.assert_array_equal(b[side] == 0, b[f'{side}_segmentation'] == 0)
  # First fit fills rows far better than one pair per row (mean length ~16 of 64) would.
  fill = np.mean([(b['targets'] != 0).mean() for b in batches[:-1]])
  assert fill > 0.8, fill
  with pytest.raises(ValueError, match='more than the row length 32'):
    list(data.pack_pairs([np.ones(33, np.int32)], [np.ones(3, np.int32)], iter([0]), 8, 32))


def test_packed_train_pipeline_is_deterministic_and_skip_resumes_it():
  src, tgt = _fake_pairs(300, seed=4)
  batcher = data.Batcher(32, 256, 2.0, num_devices=2, pack=True)
  assert batcher.packed_rows == 8
  run = lambda skip, seed=7: list(batcher.train({'inputs': src, 'targets': tgt}, seed=seed,
                                                shuffle_buffer_size=1,
                                                skip=skip).take(40).as_numpy_iterator())
  full, resumed = run(0), run(10)
  assert {b['inputs'].shape for b in full} == {(8, 32)}
  assert set(full[0]) == {'inputs', 'targets', *data.PACKING_KEYS}
  for a, b in zip(full[10:], resumed):
    for k in a:
      np.testing.assert_array_equal(a[k], b[k])
  # 40 batches hold more than one epoch: every pair is seen, none twice more than another.
  counts = collections.Counter(p for b in full for p in _unpack(b))
  assert set(counts) == {(tuple(s), tuple(t)) for s, t in zip(src, tgt)}
  assert max(counts.values()) - min(counts.values()) <= 1 and sum(counts.values()) > 300
  assert any((a['targets'] != b['targets']).any() for a, b in zip(full, run(0, seed=8)))


def test_tokenize_pairs_reports_the_unknown_rate_of_each_side(tmp_path, caplog):
  words = 'ein mann eine frau fährt liest nach hause das buch a man woman reads drives home'
  rng = np.random.default_rng(0)
  corpus = [' '.join(rng.choice(words.split(), 6)) for _ in range(300)]
  sp = tokenizer.train(corpus, str(tmp_path / 'spm.model'), 60)
  config = type('C', (), {'max_source_length': 64, 'max_target_length': 64, 'truncate': False,
                          'source_lang': 'de', 'target_lang': 'en'})()
  sources = ['ein mann fährt nach hause'] * 9 + ['ein mann ☃ fährt nach 東京']
  targets = ['a man drives home'] * 10
  with caplog.at_level(logging.INFO):
    src, tgt = data.tokenize_pairs(sp, sources, targets, config, "split 'train'")
  assert len(src) == len(tgt) == 10 and all(s[-1] == EOS_ID for s in src)
  warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
  assert len(warnings) == 1, warnings  # The targets have no unknown piece: no warning.
  unknown = sum(int((s == tokenizer.UNK_ID).sum()) for s in src)
  pieces = sum(len(s) - 1 for s in src)
  assert unknown == 2 and warnings[0].startswith(
      f"split 'train' sources (de): {100 * unknown / pieces:.2f}% of the pieces ({unknown} of "
      f'{pieces}) are unknown')
  assert 'spm_byte_fallback' in warnings[0]
  assert "split 'train' targets (en): 0 of" in caplog.text  # Logged (train.log) either way.
