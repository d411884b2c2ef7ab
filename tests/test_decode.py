"""Search against brute force: beam search == exhaustive search, beam 1 == greedy."""
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import decode
from transformer_jax.tokenizer import BOS_ID, EOS_ID

VOCAB = 7          # ids 0 pad, 1 EOS, 2 BOS, 3 unk, 4-6 words
WORDS = (3, 4, 5, 6)
MAX_LENGTH = 5


def _tables(seed, batch):
  """Fixed next-token log-probabilities per sentence, position and previous token:
  float [B, MAX_LENGTH, VOCAB (previous), VOCAB (next)]; pad and BOS never come next."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, MAX_LENGTH, VOCAB, VOCAB)) * 2
  logits[..., 0] = logits[..., BOS_ID] = -1e9
  logits[0, 1, :, EOS_ID] += 3   # EOS is likely at position 1 for sentence 0...
  logits[1:, :, :, EOS_ID] -= 3   # ...and unlikely for the others (until forced).
  return jax.nn.log_softmax(jnp.asarray(logits, jnp.float32))


def _callback(tables):
  def tokens_to_logits(tokens, cache, index):
    return tables[cache['row'], index, tokens], cache
  return tokens_to_logits


def _cache(batch):
  return {'row': jnp.arange(batch)}


def exhaustive(table, max_length, alpha):
  """All (score, sequence) of one sentence, best first, by enumeration in float64."""
  table = np.asarray(table, np.float64)
  results = []
  for n in range(1, max_length + 1):
    for words in itertools.product(WORDS, repeat=n - 1):
      seq = list(words) + [EOS_ID]
      prev, logp = BOS_ID, 0.0
      for i, tok in enumerate(seq):
        row = table[i, prev]
        if i == max_length - 1:  # EOS forced at the last allowed position
          row = np.where(np.arange(VOCAB) == EOS_ID, row, -np.inf)
        logp += row[tok]
        prev = tok
      results.append((logp / ((5 + n) / 6) ** alpha, seq))
  return sorted(results, key=lambda r: -r[0])


@pytest.mark.parametrize('alpha', [0.0, 0.6, 2.0])
def test_beam_search_equals_exhaustive_search(alpha):
  batch = 3
  tables = _tables(0, batch)
  max_lengths = jnp.array([5, 3, 4], jnp.int32)  # per-sentence caps, EOS included
  beam = 2 * 4 ** (MAX_LENGTH - 1)  # wider than all candidates of a step: exact search
  seqs, scores = jax.jit(decode.beam_search, static_argnums=(0, 3, 4, 5))(
      _callback(tables), _cache(batch), max_lengths, MAX_LENGTH, beam, alpha)
  for b in range(batch):
    ref = exhaustive(tables[b], int(max_lengths[b]), alpha)
    for k in range(3):  # the three best, in order
      ref_score, ref_seq = ref[k]
      got = list(np.asarray(seqs[b, k]))
      assert got == ref_seq + [0] * (MAX_LENGTH - len(ref_seq)), (b, k, got, ref_seq)
      np.testing.assert_allclose(scores[b, k], ref_score, rtol=1e-5)
  lengths = [int(np.count_nonzero(seqs[b, 0])) for b in range(batch)]
  assert len(set(lengths)) > 1  # EOS came at different steps in the batch


def test_small_beam_stops_early_and_matches_exhaustive_best():
  tables = _tables(1, 3)
  max_lengths = jnp.array([5, 5, 5], jnp.int32)
  seqs, _ = decode.beam_search(_callback(tables), _cache(3), max_lengths, MAX_LENGTH, 8, 0.6)
  for b in range(3):
    best = exhaustive(tables[b], 5, 0.6)[0][1]
    assert list(np.asarray(seqs[b, 0]))[:len(best)] == best


def test_beam_size_one_equals_greedy():
  for seed in range(5):
    tables = _tables(seed, 3)
    max_lengths = jnp.array([5, 4, 2], jnp.int32)
    beam, _ = decode.beam_search(_callback(tables), _cache(3), max_lengths, MAX_LENGTH, 1, 0.0)
    greedy = decode.sample(_callback(tables), _cache(3), max_lengths, MAX_LENGTH)
    np.testing.assert_array_equal(beam[:, 0], greedy)
    # Greedy is the step-by-step argmax with EOS forced at the cap.
    for b in range(3):
      prev, expect = BOS_ID, []
      for i in range(int(max_lengths[b])):
        tok = EOS_ID if i == max_lengths[b] - 1 else int(np.argmax(tables[b, i, prev]))
        expect.append(tok)
        if tok == EOS_ID:
          break
        prev = tok
      assert list(np.asarray(greedy[b]))[:len(expect)] == expect


def test_sampling_respects_top_k_and_temperature():
  tables = _tables(2, 3)
  caps = jnp.array([5, 5, 5], jnp.int32)
  draws = [decode.sample(_callback(tables), _cache(3), caps, MAX_LENGTH,
                         jax.random.PRNGKey(s), temperature=1.0, top_k=1) for s in range(3)]
  greedy = decode.sample(_callback(tables), _cache(3), caps, MAX_LENGTH)
  for d in draws:  # top_k=1 is greedy whatever the rng
    np.testing.assert_array_equal(d, greedy)
  hot = {tuple(np.asarray(decode.sample(_callback(tables), _cache(3), caps, MAX_LENGTH,
                                        jax.random.PRNGKey(s), temperature=5.0)[0]))
         for s in range(10)}
  assert len(hot) > 1
  for seq in hot:  # still well-formed: EOS within the cap, pad after it
    seq = list(seq)
    assert EOS_ID in seq and all(t == 0 for t in seq[seq.index(EOS_ID) + 1:])


def test_length_penalty_formula():
  np.testing.assert_allclose(decode.length_penalty(jnp.array(7), 0.6), (12 / 6) ** 0.6)
  assert float(decode.length_penalty(jnp.array(7), 0.0)) == 1.0
