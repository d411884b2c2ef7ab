"""Span corruption, text infilling and masked LM: exact counts, reconstruction and the
distributions of the random draws, against values derived here from the definitions."""
import itertools
import math

import numpy as np
import pytest

from transformer_jax import noising

SENTINELS = np.arange(9, 3, -1, dtype=np.int32)  # 9, 8, ..., 4: span k -> SENTINELS[k]
MASK_ID = 3


def expected_noise(n: int, density: float = 0.15, mean_span: float = 3.0,
                   max_spans: int = len(SENTINELS)) -> tuple[int, int]:
  """(num_noise_tokens, num_noise_spans) as the spec defines them."""
  num_noise = min(max(round(n * density), 1), n - 1)
  num_spans = min(max(1, round(num_noise / mean_span)), num_noise, n - num_noise, max_spans)
  return num_noise, num_spans


def run_lengths(mask: np.ndarray) -> np.ndarray:
  """Lengths of the maximal runs of equal values, left to right."""
  breaks = np.flatnonzero(np.diff(mask)) + 1
  return np.diff(np.concatenate([[0], breaks, [mask.size]]))


def ratio_and_se(numerators: np.ndarray, denominators: np.ndarray) -> tuple[float, float]:
  """The pooled ratio sum(a) / sum(b) over i.i.d. sentences and its standard error (delta
  method, robust to any dependence between the items of one sentence)."""
  ratio = numerators.sum() / denominators.sum()
  se = math.sqrt(np.sum((numerators - ratio * denominators) ** 2)) / denominators.sum()
  return ratio, se


# --- span corruption ---------------------------------------------------------------------


def test_span_corruption_counts_order_and_reconstruction():
  data_rng = np.random.default_rng(1234)
  lengths = data_rng.integers(2, 61, size=10_000)
  total_noise = total_spans = 0
  for i, n in enumerate(lengths.tolist()):
    ids = data_rng.integers(10, 32_000, size=n).astype(np.int32)
    inputs, targets = noising.span_corruption(ids, np.random.default_rng([0, i]), SENTINELS)
    num_noise, num_spans = expected_noise(n)
    assert inputs.dtype == np.int32 and targets.dtype == np.int32
    assert inputs.size == n - num_noise + num_spans
    assert targets.size == num_noise + num_spans
    # Sentinels in order, each once, in both; the targets start with one.
    in_pos = np.flatnonzero(np.isin(inputs, SENTINELS))
    out_pos = np.flatnonzero(np.isin(targets, SENTINELS))
    np.testing.assert_array_equal(inputs[in_pos], SENTINELS[:num_spans])
    np.testing.assert_array_equal(targets[out_pos], SENTINELS[:num_spans])
    assert out_pos[0] == 0
    # T5's mask starts clean and ends noisy: no sentinel first, one last.
    assert in_pos[0] > 0 and in_pos[-1] == inputs.size - 1
    spans = [span[1:] for span in np.split(targets, out_pos[1:])]
    assert all(span.size >= 1 for span in spans)
    assert sum(span.size for span in spans) == num_noise
    pieces = np.split(inputs, in_pos)  # pieces[k + 1] starts with SENTINELS[k]
    rebuilt = [pieces[0]] + [x for k, span in enumerate(spans)
                             for x in (span, pieces[k + 1][1:])]
    np.testing.assert_array_equal(np.concatenate(rebuilt), ids)
    total_noise += num_noise
    total_spans += num_spans
  # The algorithm fixes each sentence's noise count and span count (only the split is
  # random), so the pooled mean span length is determined exactly: tolerance 0 (up to
  # float rounding). Short sentences round to fewer, longer spans, or to fewer noise
  # tokens, so it is not 3.0 here.
  implied = (sum(expected_noise(n)[0] for n in lengths.tolist())
             / sum(expected_noise(n)[1] for n in lengths.tolist()))
  assert total_noise / total_spans == pytest.approx(implied, abs=1e-12)


def test_noise_span_lengths_are_a_uniform_composition():
  # n = 200: 30 noise tokens in 10 spans, 170 clean tokens in 10 spans, in every draw.
  noise_lengths, clean_lengths = [], []
  for i in range(10_000):
    mask = noising.random_spans_noise_mask(200, 0.15, 3.0, np.random.default_rng([1, i]))
    runs = run_lengths(mask)
    assert not mask[0] and mask[-1] and runs.size == 20 and mask.sum() == 30
    clean_lengths.append(runs[0::2])
    noise_lengths.append(runs[1::2])
  noise_lengths, clean_lengths = np.array(noise_lengths), np.array(clean_lengths)
  # Mean noise span length: 30 / 10 = 3.0 in every draw, so exactly 3.0 (tolerance 0).
  assert noise_lengths.mean() == 3.0 and clean_lengths.mean() == 17.0
  # Spread: a uniform composition of N into k positive parts is 1 + (a uniform split of
  # N - k into k parts, i.e. Dirichlet-multinomial with alpha = 1), whose part variance is
  # (N - k) (1/k) (1 - 1/k) (N - k + k) / (k + 1): 54/11 = 4.909 (N = 30) and 2448/11 =
  # 222.5 (N = 170), and P(part = 1) = (k - 1) / (N - 1) = 9/29. Each draw gives one
  # i.i.d. estimate (its mean is known exactly), so the tolerance is 5 standard errors of
  # the mean over the 10,000 draws (~0.05 and ~1.8 for the variances).
  for lengths, total, variance in ((noise_lengths, 30, 54 / 11),
                                   (clean_lengths, 170, 2448 / 11)):
    per_draw = ((lengths - total / 10) ** 2).mean(axis=1)
    se = per_draw.std() / math.sqrt(per_draw.size)
    assert abs(per_draw.mean() - variance) < 5 * se, (total, per_draw.mean(), variance)
  ones = (noise_lengths == 1).mean(axis=1)
  assert abs(ones.mean() - 9 / 29) < 5 * ones.std() / math.sqrt(ones.size)


@pytest.mark.parametrize('n', [0, 1])
def test_span_corruption_short_sentences_unchanged(n):
  ids = np.arange(10, 10 + n, dtype=np.int32)
  assert not noising.random_spans_noise_mask(n, 0.15, 3.0, np.random.default_rng(0)).any()
  inputs, targets = noising.span_corruption(ids, np.random.default_rng(0), SENTINELS)
  np.testing.assert_array_equal(inputs, ids)
  assert targets.shape == (0,) and targets.dtype == np.int32


def test_span_corruption_clips_and_caps():
  # n = 2: round(0.3) = 0 noise tokens, clipped up to 1; n = 3 at density 0.9: round(2.7)
  # = 3, clipped down to n - 1 = 2; n = 200: 10 spans capped at max_spans = 2.
  for n, density in ((2, 0.15), (3, 0.9), (200, 0.15)):
    for seed in range(50):
      mask = noising.random_spans_noise_mask(n, density, 3.0, np.random.default_rng(seed),
                                             max_spans=2)
      num_noise, num_spans = expected_noise(n, density, max_spans=2)
      assert mask.sum() == num_noise and run_lengths(mask).size == 2 * num_spans
  # Two sentinels cap a 200-token sentence at 2 spans (10 uncapped), all 30 noise tokens.
  inputs, targets = noising.span_corruption(np.arange(10, 210), np.random.default_rng(0),
                                            SENTINELS[:2])
  assert targets.size == 32 and np.isin(targets, SENTINELS).sum() == 2
  # A mean span length of 1: as many spans as noise tokens allow (clean tokens permitting).
  mask = noising.random_spans_noise_mask(20, 0.5, 1.0, np.random.default_rng(0))
  assert run_lengths(mask).size == 20


def test_span_corruption_is_deterministic_in_the_rng():
  ids = np.arange(10, 70, dtype=np.int32)
  first = noising.span_corruption(ids, np.random.default_rng([5, 1, 2]), SENTINELS)
  again = noising.span_corruption(ids, np.random.default_rng([5, 1, 2]), SENTINELS)
  other = noising.span_corruption(ids, np.random.default_rng([5, 1, 3]), SENTINELS)
  np.testing.assert_array_equal(first[0], again[0])
  np.testing.assert_array_equal(first[1], again[1])
  assert not np.array_equal(first[0], other[0])


# --- text infilling ----------------------------------------------------------------------


def check_infilling(ids, spans, inputs, targets, mask_ratio):
  n = ids.size
  num_to_mask = round(mask_ratio * n)
  assert inputs.dtype == np.int32 and targets.dtype == np.int32
  np.testing.assert_array_equal(targets, ids)
  assert not np.shares_memory(targets, ids)
  assert sum(length for _, length in spans) == num_to_mask
  if num_to_mask:
    assert spans[-1][1] >= 1  # the truncated last draw
  # In range, in order, apart: at least one visible token between two spans.
  for (start, length), (next_start, _) in zip(spans, spans[1:]):
    assert next_start >= start + length + 1
  assert all(0 <= start and start + length <= n for start, length in spans)
  # One mask token per span; expanding each into its span's length gives ids with the
  # spans' positions blanked.
  mask_positions = np.flatnonzero(inputs == MASK_ID)
  assert mask_positions.size == len(spans) == inputs.size - n + num_to_mask
  pieces = np.split(inputs, mask_positions)
  expanded = [pieces[0]] + [x for k, (_, length) in enumerate(spans)
                            for x in (np.full(length, -1), pieces[k + 1][1:])]
  blanked = ids.copy()
  for start, length in spans:
    blanked[start:start + length] = -1
  np.testing.assert_array_equal(np.concatenate(expanded), blanked)
  # Hence the original: the blanks filled from the span list and the targets.
  rebuilt = np.where(blanked < 0, targets, blanked)
  np.testing.assert_array_equal(rebuilt, ids)


@pytest.mark.parametrize('mask_ratio,max_length,count', [(0.3, 60, 5_000), (0.9, 8, 2_000)])
def test_text_infilling_counts_and_reconstruction(mask_ratio, max_length, count):
  # Ratio 0.9 on 1..8 tokens leaves no room for most draws: zero-length spans are dropped
  # and spans merged, and the count must stay exact.
  data_rng = np.random.default_rng(99)
  for i in range(count):
    n = int(data_rng.integers(1, max_length + 1))
    ids = data_rng.integers(10, 32_000, size=n).astype(np.int32)
    spans = noising.infilling_spans(n, np.random.default_rng([2, i]), mask_ratio)
    inputs, targets = noising.text_infilling(ids, np.random.default_rng([2, i]), MASK_ID,
                                             mask_ratio)
    check_infilling(ids, spans, inputs, targets, mask_ratio)


def nonfinal_span_expectations(num_to_mask: int, lam: float) -> np.ndarray:
  """Expected number, per sentence, of non-final spans of each length 0..num_to_mask-1.

  Drawing Poisson lengths until the running sum reaches M is a renewal process: v(s),
  the expected number of draws made at running sum s < M, solves v(s) = [s = 0] +
  sum_{t <= s} v(t) p(s - t); a draw of length l made at s is non-final iff s + l < M.
  So E[count of non-final spans of length l] = p(l) * sum_{s < M - l} v(s). The span
  that crosses M is picked with a bias toward long ones (inspection paradox), so the
  non-final spans are shorter than Poisson(lam) on average.
  """
  p = [math.exp(-lam) * lam ** l / math.factorial(l) for l in range(num_to_mask)]
  v = []
  for s in range(num_to_mask):
    v.append(((s == 0) + sum(v[t] * p[s - t] for t in range(s))) / (1 - p[0]))
  return np.array([p[l] * sum(v[:num_to_mask - l]) for l in range(num_to_mask)])


def test_infilling_span_lengths_follow_poisson():
  firsts, per_sentence = [], []
  for i in range(10_000):
    spans = noising.infilling_spans(100, np.random.default_rng([3, i]))
    lengths = np.array([length for _, length in spans[:-1]])
    firsts.append(spans[0][1])
    per_sentence.append(lengths)
  # 1) The first span of a 100-token sentence (30 to mask) is non-final unless its draw is
  # >= 30 (P ~ 1e-20): plain Poisson(3). Over 10,000 i.i.d. draws the standard error is
  # sqrt(3 / 1e4) = 0.017 for the mean and sqrt((mu4 - sigma^4) / 1e4) = sqrt(21 / 1e4) =
  # 0.046 for the variance (Poisson: mu4 = lam (1 + 3 lam) = 30): tolerance 5 SE.
  firsts = np.array(firsts)
  assert abs(firsts.mean() - 3.0) < 5 * 0.0173
  assert abs(firsts.var() - 3.0) < 5 * 0.0458
  zero_rate = (firsts == 0).mean()
  p0 = math.exp(-3)
  assert abs(zero_rate - p0) < 5 * math.sqrt(p0 * (1 - p0) / firsts.size)
  # 2) All non-final spans, pooled: the stopping rule biases them (see
  # nonfinal_span_expectations): mean 2.895 and zero rate 0.0550 instead of 3 and e^-3 =
  # 0.0498. ~95,000 spans give standard errors ~0.006 (mean), ~0.015 (variance) and
  # ~0.0008 (zero rate), computed per sentence (delta method); tolerance 5 SE, so the
  # bias (~0.1, ~17 SE) is resolved and an unbiased Poisson(3) would fail.
  expected = nonfinal_span_expectations(30, 3.0)
  q = expected / expected.sum()
  lengths = np.arange(q.size)
  mean = float(q @ lengths)
  variance = float(q @ (lengths - mean) ** 2)
  assert abs(mean - 3.0) > 0.1 and abs(q[0] - p0) > 0.005  # the bias being measured
  counts = np.array([x.size for x in per_sentence], float)
  for f, value in ((lambda x: x, mean), (lambda x: (x - mean) ** 2, variance),
                   (lambda x: x == 0, q[0])):
    estimate, se = ratio_and_se(np.array([f(x).sum() for x in per_sentence]), counts)
    assert abs(estimate - value) < 5 * se, (estimate, value, se)


def test_infilling_placement_is_uniform():
  # 6 tokens, 2 to mask: for each drawn tuple of lengths, every valid placement (apart by
  # >= 1 token, inside the sentence) must occur, and equally often: binomial counts
  # within 5 standard deviations where >= 50 are expected per placement.
  by_lengths = {}
  for i in range(5_000):
    spans = noising.infilling_spans(6, np.random.default_rng([4, i]))
    lengths = tuple(length for _, length in spans)
    starts = tuple(start for start, _ in spans)
    by_lengths.setdefault(lengths, []).append(starts)
  assert by_lengths[(2,)] and by_lengths[(1, 1)]
  for lengths, observed in by_lengths.items():
    valid = [starts for starts in itertools.product(range(7), repeat=len(lengths))
             if starts[-1] + lengths[-1] <= 6
             and all(b >= a + l + 1 for a, b, l in zip(starts, starts[1:], lengths))]
    counts = {starts: observed.count(starts) for starts in valid}
    assert sum(counts.values()) == len(observed), lengths  # nothing invalid
    expected = len(observed) / len(valid)
    if expected >= 50:
      p = 1 / len(valid)
      sd = math.sqrt(len(observed) * p * (1 - p))
      assert all(abs(c - expected) < 5 * sd for c in counts.values()), (lengths, counts)


def test_text_infilling_is_deterministic_in_the_rng():
  ids = np.arange(10, 110, dtype=np.int32)
  first = noising.text_infilling(ids, np.random.default_rng([7, 0]), MASK_ID)[0]
  again = noising.text_infilling(ids, np.random.default_rng([7, 0]), MASK_ID)[0]
  other = noising.text_infilling(ids, np.random.default_rng([7, 1]), MASK_ID)[0]
  np.testing.assert_array_equal(first, again)
  assert not np.array_equal(first, other)
  assert noising.infilling_spans(1, np.random.default_rng(0)) == []  # round(0.3) = 0


# --- masked LM ---------------------------------------------------------------------------

RANDOM_IDS = np.arange(2000, 2010, dtype=np.int32)  # disjoint from ids and MASK_ID


def num_to_predict(candidates: np.ndarray) -> int:
  return max(1, round(0.15 * candidates.sum())) if candidates.any() else 0


def test_masked_lm_counts_and_80_10_10():
  data_rng = np.random.default_rng(7)
  outcomes = np.zeros(3, int)  # mask, random, unchanged
  replacements = []
  for i in range(5_000):
    n = int(data_rng.integers(1, 80))
    ids = data_rng.integers(100, 1000, size=n).astype(np.int32)
    candidates = data_rng.random(n) > 0.1
    candidates[[0, -1]] = False  # BOS / EOS
    inputs, targets, weights = noising.masked_lm(
        ids, np.random.default_rng([5, i]), mask_id=MASK_ID, random_ids=RANDOM_IDS,
        candidates=candidates)
    assert (inputs.dtype, targets.dtype, weights.dtype) == (np.int32, np.int32, np.float32)
    selected = weights > 0
    assert set(np.unique(weights)) <= {0.0, 1.0}
    assert selected.sum() == num_to_predict(candidates)
    assert not (selected & ~candidates).any()
    np.testing.assert_array_equal(targets, np.where(selected, ids, 0))
    np.testing.assert_array_equal(inputs[~selected], ids[~selected])
    chosen, original = inputs[selected], ids[selected]
    is_random = np.isin(chosen, RANDOM_IDS)
    assert ((chosen == MASK_ID) | is_random | (chosen == original)).all()
    outcomes += [(chosen == MASK_ID).sum(), is_random.sum(), (chosen == original).sum()]
    replacements.append(chosen[is_random])
  # Each selected position is an independent trinomial draw: the counts are binomial,
  # tolerance 5 standard deviations.
  total = outcomes.sum()
  for count, p in zip(outcomes, (0.8, 0.1, 0.1)):
    assert abs(count - p * total) < 5 * math.sqrt(total * p * (1 - p)), (outcomes, total)
  # Random replacements uniform over RANDOM_IDS (~300 draws each): chi-square with 9
  # degrees of freedom below its mean + 5 standard deviations (9 + 5 * sqrt(18)).
  replacements = np.concatenate(replacements) - RANDOM_IDS[0]
  observed = np.bincount(replacements, minlength=RANDOM_IDS.size)
  expected = replacements.size / RANDOM_IDS.size
  assert ((observed - expected) ** 2 / expected).sum() < 9 + 5 * math.sqrt(18)


def test_masked_lm_selects_candidates_uniformly():
  # 40 positions, candidates 1..38 except multiples of 5 (31 candidates): 5 selected per
  # draw (round(4.65)), each candidate with probability 5/31; over 10,000 draws the counts
  # are binomial, tolerance 5 standard deviations.
  ids = np.arange(100, 140, dtype=np.int32)
  candidates = np.ones(40, bool)
  candidates[[0, 39]] = False
  candidates[::5] = False
  counts = np.zeros(40)
  for i in range(10_000):
    counts += noising.masked_lm(ids, np.random.default_rng([6, i]), mask_id=MASK_ID,
                                random_ids=RANDOM_IDS, candidates=candidates)[2]
  assert (counts[~candidates] == 0).all()
  p = 5 / 31
  assert np.abs(counts[candidates] - 10_000 * p).max() < 5 * math.sqrt(10_000 * p * (1 - p))


def test_whole_word_masking():
  data_rng = np.random.default_rng(8)
  for i in range(3_000):
    pieces = data_rng.integers(1, 5, size=int(data_rng.integers(1, 25)))  # per word
    word_ids = np.concatenate([[-1], np.repeat(np.arange(pieces.size), pieces), [-1]])
    n = word_ids.size
    ids = data_rng.integers(100, 1000, size=n).astype(np.int32)
    candidates = word_ids >= 0
    if i % 3 == 0:  # a word with a non-candidate piece is never selected
      candidates[data_rng.integers(1, n - 1)] = False
    if i % 3 == 1:  # a candidate outside words counts as a word of one piece
      word_ids[data_rng.integers(1, n - 1)] = -1
    inputs, targets, weights = noising.masked_lm(
        ids, np.random.default_rng([9, i]), mask_id=MASK_ID, random_ids=RANDOM_IDS,
        candidates=candidates, word_ids=word_ids)
    selected = weights > 0
    limit = num_to_predict(candidates)
    assert not (selected & ~candidates).any()
    assert selected.sum() <= limit
    np.testing.assert_array_equal(targets, np.where(selected, ids, 0))
    units = [np.flatnonzero(word_ids == w) for w in np.unique(word_ids[word_ids >= 0])]
    units += [np.array([p]) for p in np.flatnonzero((word_ids < 0) & candidates)]
    shortfall = limit - selected.sum()
    for unit in units:
      taken = selected[unit]
      assert taken.all() or not taken.any(), (i, unit)  # all or nothing
      if candidates[unit].all() and not taken.any():
        # Skipped only when it did not fit: larger than what was left then (>= now).
        assert unit.size > shortfall, (i, unit, shortfall)


def test_whole_word_masking_with_one_piece_words_is_exact():
  ids = np.arange(100, 160, dtype=np.int32)
  word_ids = np.arange(60)
  for i in range(50):
    weights = noising.masked_lm(ids, np.random.default_rng([10, i]), mask_id=MASK_ID,
                                random_ids=RANDOM_IDS, candidates=np.ones(60, bool),
                                word_ids=word_ids)[2]
    assert weights.sum() == 9


def test_masked_lm_no_candidates_and_determinism():
  ids = np.arange(100, 130, dtype=np.int32)
  inputs, targets, weights = noising.masked_lm(
      ids, np.random.default_rng(0), mask_id=MASK_ID, random_ids=RANDOM_IDS,
      candidates=np.zeros(30, bool))
  np.testing.assert_array_equal(inputs, ids)
  assert not targets.any() and not weights.any()
  candidates = np.ones(30, bool)
  runs = [noising.masked_lm(ids, np.random.default_rng(seed), mask_id=MASK_ID,
                            random_ids=RANDOM_IDS, candidates=candidates,
                            word_ids=np.arange(30) // 2)
          for seed in ([11, 0], [11, 0], [11, 1])]
  for a, b in zip(runs[0], runs[1]):
    np.testing.assert_array_equal(a, b)
  assert not np.array_equal(runs[0][2], runs[2][2])


# --- argument checks ---------------------------------------------------------------------


@pytest.mark.parametrize('call,message', [
    (lambda r: noising.random_spans_noise_mask(10, 0.0, 3.0, r), 'noise_density'),
    (lambda r: noising.random_spans_noise_mask(10, 1.0, 3.0, r), 'noise_density'),
    (lambda r: noising.random_spans_noise_mask(10, 0.15, 0.5, r), 'mean_noise_span_length'),
    (lambda r: noising.random_spans_noise_mask(10, 0.15, 3.0, r, max_spans=0), 'max_spans'),
    (lambda r: noising.span_corruption(np.arange(10, 20), r, np.zeros([0], int)),
     'sentinel_ids'),
    (lambda r: noising.span_corruption(np.ones((2, 3), int), r, SENTINELS), '1-D'),
    (lambda r: noising.infilling_spans(10, r, mask_ratio=1.5), 'mask_ratio'),
    (lambda r: noising.infilling_spans(10, r, poisson_lambda=0.0), 'poisson_lambda'),
    (lambda r: noising.text_infilling(np.arange(10, 20), r, MASK_ID, mask_ratio=0.0),
     'mask_ratio'),
    (lambda r: noising.masked_lm(np.arange(5), r, mask_id=3, random_ids=RANDOM_IDS,
                                 candidates=np.ones(4, bool)), 'candidates has shape'),
    (lambda r: noising.masked_lm(np.arange(5), r, mask_id=3, random_ids=RANDOM_IDS,
                                 candidates=np.ones(5, bool), word_ids=np.arange(6)),
     'word_ids has shape'),
    (lambda r: noising.masked_lm(np.arange(5), r, mask_id=3, random_ids=np.zeros([0], int),
                                 candidates=np.ones(5, bool)), 'random_ids'),
    (lambda r: noising.masked_lm(np.arange(5), r, mask_id=3, random_ids=RANDOM_IDS,
                                 candidates=np.ones(5, bool), mask_prob=1.0), 'mask_prob'),
    (lambda r: noising.masked_lm(np.arange(5), r, mask_id=3, random_ids=RANDOM_IDS,
                                 candidates=np.ones(5, bool), mask_token_prob=0.95),
     'must be <= 1'),
])
def test_bad_arguments_raise(call, message):
  with pytest.raises(ValueError, match=message):
    call(np.random.default_rng(0))
