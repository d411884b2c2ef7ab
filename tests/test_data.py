"""Input pipeline: bucketing, determinism, resumable position, bounded shapes."""
import numpy as np
import pytest

from transformer_jax import data
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
  batches = list(batcher.train(src, tgt, seed=0, shuffle_buffer_size=1000)
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
      src, tgt, seed=7, shuffle_buffer_size=1000, skip=skip).take(30).as_numpy_iterator()]
  full, again, resumed = run(0), run(0), run(12)
  assert len(full) == 30
  for a, b in zip(full, again):
    np.testing.assert_array_equal(a, b)
  for a, b in zip(full[12:], resumed):
    np.testing.assert_array_equal(a, b)
  other_seed = [b['targets'] for b in batcher.train(src, tgt, seed=8, shuffle_buffer_size=1000)
                .take(30).as_numpy_iterator()]
  assert any(a.shape != b.shape or (a != b).any() for a, b in zip(full, other_seed))


def test_eval_pass_covers_each_pair_once_and_pads_rows():
  src, tgt = _fake_pairs(50, seed=2)
  batcher = data.Batcher(32, 256, 2.0, num_devices=4)
  seen = []
  for batch in batcher.eval(src, tgt).as_numpy_iterator():
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
