"""Search against brute force: beam search == exhaustive search, beam 1 == greedy; PAD and
BOS never generated; top-k/top-p masks and sampling rules."""
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
  """All (score, sequence) of one sentence, best first, by enumeration in float64 over the
  sequences of WORDS then EOS (never PAD or BOS); `table` holds log-probabilities."""
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


# --- PAD and BOS are never generated -----------------------------------------------------

def _special_loving_logits(seed, batch):
  """Raw logits [B, MAX_LENGTH, VOCAB, VOCAB] of a model that prefers PAD at step 0 and BOS
  at every later step by a wide margin (not log-probabilities: the searches normalize)."""
  rng = np.random.default_rng(seed)
  logits = rng.normal(size=(batch, MAX_LENGTH, VOCAB, VOCAB)) * 2
  logits[:, 0, :, 0] = 12.0
  logits[:, 1:, :, BOS_ID] = 12.0
  logits[:, :, :, EOS_ID] -= 1.0
  return np.asarray(logits, np.float32)


def _log_softmax64(logits):
  logits = np.asarray(logits, np.float64)
  top = logits.max(-1, keepdims=True)
  return logits - top - np.log(np.exp(logits - top).sum(-1, keepdims=True))


def _greedy_reference(log_probs, max_length):
  """Step-by-step argmax over the allowed tokens (no PAD, no BOS; only EOS at the cap)."""
  prev, out = BOS_ID, []
  for i in range(max_length):
    row = np.array(log_probs[i, prev], np.float64)
    row[[0, BOS_ID]] = -np.inf
    tok = EOS_ID if i == max_length - 1 else int(np.argmax(row))
    out.append(tok)
    if tok == EOS_ID:
      break
    prev = tok
  return out


def _table_logits(tokens, cache, index):
  """A callback whose logits come from cache['table'] float [N, MAX_LENGTH, VOCAB (previous),
  VOCAB (next)], one table per row: one function, so `_draw` compiles once per setting."""
  return cache['table'][jnp.arange(tokens.shape[0]), index, tokens], cache


_jit_sample = jax.jit(decode.sample, static_argnums=(0, 3),
                      static_argnames=('temperature', 'top_k', 'top_p'))


def _draw(tables, caps, rng, **kwargs):
  """decode.sample, jitted, of the table model `tables` [B, MAX_LENGTH, VOCAB, VOCAB]."""
  return _jit_sample(_table_logits, {'table': jnp.asarray(tables, jnp.float32)},
                     jnp.asarray(caps, jnp.int32), MAX_LENGTH, rng, **kwargs)


def _well_formed(seq, max_length):
  """EOS within the cap, no PAD before it, nothing after it, never BOS."""
  seq = list(np.asarray(seq))
  assert EOS_ID in seq[:max_length], seq
  end = seq.index(EOS_ID)
  assert all(t not in (0, BOS_ID) for t in seq[:end]), seq
  assert all(t == 0 for t in seq[end + 1:]), seq


@pytest.mark.parametrize('alpha', [0.0, 0.6])
def test_beam_and_greedy_never_output_pad_or_bos(alpha):
  batch = 3
  logits = _special_loving_logits(3, batch)
  tables = jnp.asarray(logits)
  max_lengths = jnp.array([5, 4, 3], jnp.int32)
  log_probs = _log_softmax64(logits)  # Not renormalized without PAD/BOS: the model's P(Y|X).
  exact = 2 * 4 ** (MAX_LENGTH - 1)  # Wider than all candidates of a step.
  seqs, scores = decode.beam_search(_callback(tables), _cache(batch), max_lengths,
                                    MAX_LENGTH, exact, alpha)
  for b in range(batch):  # The best sequences without PAD/BOS, in order, and their scores.
    ref = exhaustive(log_probs[b], int(max_lengths[b]), alpha)
    for k in range(3):
      got = list(np.asarray(seqs[b, k]))
      assert got == ref[k][1] + [0] * (MAX_LENGTH - len(ref[k][1])), (b, k, got, ref[k])
      np.testing.assert_allclose(scores[b, k], ref[k][0], rtol=1e-5)
  greedy = decode.sample(_callback(tables), _cache(batch), max_lengths, MAX_LENGTH)
  for b in range(batch):
    expect = _greedy_reference(log_probs[b], int(max_lengths[b]))
    assert list(np.asarray(greedy[b])) == expect + [0] * (MAX_LENGTH - len(expect))
  one, _ = decode.beam_search(_callback(tables), _cache(batch), max_lengths, MAX_LENGTH, 1,
                              alpha)
  np.testing.assert_array_equal(one[:, 0], greedy)
  four, _ = decode.beam_search(_callback(tables), _cache(batch), max_lengths, MAX_LENGTH, 4,
                               alpha)
  for b in range(batch):  # A narrow beam is not exact, but well-formed all the same.
    for seq in four[b]:
      _well_formed(seq, int(max_lengths[b]))


def test_sampling_never_outputs_pad_or_bos():
  batch = 64
  tables = np.repeat(_special_loving_logits(4, 1), batch, axis=0)
  caps = np.full((batch,), MAX_LENGTH)
  for temperature, top_k, top_p in ((1.0, 0, 1.0), (5.0, 0, 1.0), (1.0, 3, 1.0),
                                    (1.0, 0, 0.9)):
    for seed in range(3):
      seqs = _draw(tables, caps, jax.random.PRNGKey(seed), temperature=temperature,
                   top_k=top_k, top_p=top_p)
      for seq in seqs:
        _well_formed(seq, MAX_LENGTH)


# --- top-k: exactly k tokens, ties to the lower id; temperature -> 0 -------------------

def test_top_k_mask_keeps_exactly_k_lower_id_first():
  def mask(row, k):
    return np.asarray(decode.top_k_mask(jnp.asarray(row, jnp.float32), k)).tolist()
  assert mask([3, 3, 0], 1) == [True, False, False]
  assert mask([3, 3, 0], 2) == [True, True, False]
  assert mask([2, 1, 1, 1, 0], 2) == [True, True, False, False, False]
  assert mask([0, 1, 1, 1, 2], 3) == [False, True, True, False, True]
  assert mask([1, -np.inf, 1], 2) == [True, False, True]
  assert mask([2, 1, 1, 1, 0], 0) == [True] * 5   # 0 = all
  assert mask([2, 1, 1, 1, 0], 9) == [True] * 5
  batch = np.asarray(decode.top_k_mask(jnp.array([[1.0, 1.0, 1.0], [0.0, 2.0, 2.0]]), 1))
  assert batch.tolist() == [[True, False, False], [False, True, False]]
  with pytest.raises(ValueError, match='top_k=-1'):
    decode.top_k_mask(jnp.zeros(3), -1)


def _step0_logits(word_logits, batch):
  """Tables [B, MAX_LENGTH, VOCAB, VOCAB] whose step-0 distribution over the allowed
  tokens is softmax(word_logits) on WORDS (PAD and BOS favoured but banned, EOS
  impossible); later steps random."""
  logits = np.random.default_rng(5).normal(size=(1, MAX_LENGTH, VOCAB, VOCAB))
  logits[0, 0, :, :] = -1e9
  logits[0, 0, :, 0] = logits[0, 0, :, BOS_ID] = 10.0
  logits[0, 0, :, 3:] = word_logits
  return np.repeat(logits, batch, axis=0)


def test_top_k_sampling_draws_among_exactly_k_tokens():
  batch = 256
  tables = _step0_logits([2.0, 1.0, 1.0, 1.0], batch)
  first = set()
  for seed in range(2):
    seqs = _draw(tables, np.full((batch,), MAX_LENGTH), jax.random.PRNGKey(seed), top_k=2)
    first |= set(np.asarray(seqs[:, 0]).tolist())
  assert first == {3, 4}  # The best word and the lowest id of the three tied ones.


def _tied_tables(seed, batch):
  """Integer logits in {0, 1, 2}: many ties at every step (PAD and BOS among them)."""
  return np.random.default_rng(seed).integers(0, 3, size=(batch, MAX_LENGTH, VOCAB, VOCAB))


def test_top_k_one_and_tiny_temperature_are_greedy_token_for_token():
  batch = 32
  caps = np.array([5, 4, 3, 2] * 8)
  for seed in range(2):
    for tied, tables in ((True, _tied_tables(seed, batch)),
                         (False, np.asarray(_tables(seed, batch)))):
      greedy = decode.sample(_table_logits, {'table': jnp.asarray(tables, jnp.float32)},
                             jnp.asarray(caps, jnp.int32), MAX_LENGTH)
      log_probs = _log_softmax64(tables)
      for b in range(batch):  # Greedy: the first (lowest-id) maximum among allowed tokens.
        expect = _greedy_reference(log_probs[b], int(caps[b]))
        assert list(np.asarray(greedy[b])) == expect + [0] * (MAX_LENGTH - len(expect))
      for rng_seed in range(3):
        for temperature in (0.5, 1.0, 5.0):
          top1 = _draw(tables, caps, jax.random.PRNGKey(rng_seed), temperature=temperature,
                       top_k=1)
          np.testing.assert_array_equal(top1, greedy)
      if not tied:  # No ties: temperature -> 0 tends to greedy. (1e-45 overflowed the
        # logits to inf before, and the softmax to NaN.)
        for temperature in (1e-45, 1e-38, 1e-30):
          for top_p in (1.0, 0.9):
            cold = _draw(tables, caps, jax.random.PRNGKey(0), temperature=temperature,
                         top_p=top_p)
            np.testing.assert_array_equal(cold, greedy)


def test_sample_rejects_impossible_settings():
  tables = _tables(0, 1)
  caps = jnp.array([5], jnp.int32)
  for kwargs, message in (({'temperature': 0.0}, 'temperature=0.0'),
                          ({'top_k': -1}, 'top_k=-1'), ({'top_p': 0.0}, 'top_p=0.0'),
                          ({'top_p': 1.5}, 'top_p=1.5')):
    with pytest.raises(ValueError, match=message):
      decode.sample(_callback(tables), _cache(1), caps, MAX_LENGTH, jax.random.PRNGKey(0),
                    **kwargs)


# --- Nucleus (top-p) sampling -----------------------------------------------------------

def test_top_p_mask_keeps_the_smallest_prefix_reaching_p():
  def mask(probs, p):
    logits = jnp.log(jnp.asarray(probs, jnp.float32))
    return np.asarray(decode.top_p_mask(logits, p)).tolist()
  probs = [0.5, 0.3, 0.15, 0.05]
  assert mask(probs, 0.6) == [True, True, False, False]   # 0.5 < 0.6 <= 0.8
  assert mask(probs, 0.85) == [True, True, True, False]   # 0.8 < 0.85 <= 0.95
  assert mask(probs, 0.3) == [True, False, False, False]  # at least the best one
  assert mask(probs, 1.0) == [True] * 4                   # off
  assert mask([0.15, 0.5, 0.05, 0.3], 0.6) == [False, True, False, True]  # by probability
  assert mask([0.4, 0.2, 0.2, 0.2], 0.5) == [True, True, False, False]   # ties: lower id
  logits = jnp.array([[0.0, -jnp.inf, 0.0], [5.0, 0.0, -jnp.inf]])
  assert np.asarray(decode.top_p_mask(logits, 0.9)).tolist() == [[True, False, True],
                                                                  [True, False, False]]
  for p in (0.0, -0.1, 1.01):
    with pytest.raises(ValueError, match='top_p'):
      decode.top_p_mask(logits, p)


def test_top_p_sampling_frequencies():
  batch = 4096
  probs = np.array([0.5, 0.3, 0.15, 0.05])
  tables = _step0_logits(np.log(probs), batch)

  def frequencies(**kwargs):
    seqs = _draw(tables, np.full((batch,), MAX_LENGTH), jax.random.PRNGKey(7), **kwargs)
    return np.bincount(np.asarray(seqs[:, 0]), minlength=VOCAB)[3:] / batch

  np.testing.assert_allclose(frequencies(top_p=1.0), probs, atol=0.03)
  nucleus = frequencies(top_p=0.85)
  assert nucleus[3] == 0.0
  np.testing.assert_allclose(nucleus[:3], probs[:3] / probs[:3].sum(), atol=0.03)
  two = frequencies(top_p=0.6)
  assert two[2] == two[3] == 0.0
  np.testing.assert_allclose(two[:2], probs[:2] / probs[:2].sum(), atol=0.03)
  # top_p applies to the distribution left by top_k: [0.5, 0.3, 0.15] / 0.95 reaches 0.83
  # after two tokens (0.84), the full distribution only after three.
  after_top_k = frequencies(top_k=3, top_p=0.83)
  assert after_top_k[2] == after_top_k[3] == 0.0


# --- A row's sample depends on its row id only ----------------------------------------

def test_sample_depends_on_row_id_not_on_batch_or_position():
  tables = np.repeat(np.asarray(_tables(6, 1)), 8, axis=0)  # The same model in every row.
  rng = jax.random.PRNGKey(3)

  def draw(row_ids):
    n = len(row_ids)
    return np.asarray(_draw(tables[:n], np.full((n,), MAX_LENGTH), rng,
                            row_ids=jnp.asarray(row_ids, jnp.uint32), temperature=3.0))

  together = draw([10, 11, 12, 13, 14, 15, 16, 17])
  assert len({tuple(row) for row in together}) > 1  # Different ids, different streams.
  np.testing.assert_array_equal(draw([17, 12, 10]), together[[7, 2, 0]])
  np.testing.assert_array_equal(draw([13]), together[[3]])
