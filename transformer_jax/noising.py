"""Pretraining objectives that corrupt one sentence at a time, in NumPy.

  random_spans_noise_mask  T5's noise mask (Raffel et al. 2020, "Exploring the Limits of
                           Transfer Learning with a Unified Text-to-Text Transformer",
                           section 3.1.4; t5.data.preprocessors.random_spans_noise_mask)
  span_corruption          T5's span corruption: spans -> sentinels, targets = the spans
  infilling_spans          BART's text infilling spans (Lewis et al. 2020, "BART:
  text_infilling           Denoising Sequence-to-Sequence Pre-training", section 2.2)
  masked_lm                BERT's masked LM (Devlin et al. 2019, "BERT: Pre-training of
                           Deep Bidirectional Transformers", section 3.1 and appendix A.1),
                           optionally with whole-word masking

Every function is deterministic given the `np.random.Generator` passed in; the caller
seeds one per example, e.g. `np.random.default_rng([seed, epoch, index])`, so a sentence
is corrupted the same way whatever the batching or the number of workers.

All counts written `round(x)` round half to even (`np.round`, as T5's code and Python's
`round`): round(1.5) = 2, round(2.5) = 2.

No EOS is added or removed: the caller appends it after corruption.
"""
from __future__ import annotations

import numpy as np


def _round(x: float) -> int:
  return int(np.round(x))


def _check_open_unit(name: str, value: float) -> None:
  if not 0.0 < value < 1.0:
    raise ValueError(f'{name} must be in (0, 1), got {value}')


def _as_ids(ids, name: str = 'ids') -> np.ndarray:
  ids = np.asarray(ids)
  if ids.ndim != 1:
    raise ValueError(f'{name} must be 1-D, got shape {ids.shape}')
  if ids.size and not np.issubdtype(ids.dtype, np.integer):
    raise ValueError(f'{name} must hold integers, got dtype {ids.dtype}')
  return ids.astype(np.int32)


def _random_segmentation(num_items: int, num_segments: int,
                         rng: np.random.Generator) -> np.ndarray:
  """int64 [num_segments]: positive lengths summing to num_items, uniform over all such
  compositions (num_segments - 1 distinct cut points among the num_items - 1 gaps).
  Requires 1 <= num_segments <= num_items."""
  cuts = np.sort(rng.choice(num_items - 1, num_segments - 1, replace=False)) + 1
  return np.diff(np.concatenate([[0], cuts, [num_items]]))


def random_spans_noise_mask(length: int, noise_density: float, mean_noise_span_length: float,
                            rng: np.random.Generator, max_spans: int | None = None
                            ) -> np.ndarray:
  """T5's noise mask: alternating clean and noise spans (Raffel et al. 2020, section 3.1.4).

    num_noise_tokens = round(length * noise_density), clipped to [1, length - 1]
    num_noise_spans  = max(1, round(num_noise_tokens / mean_noise_span_length)), capped at
                       num_noise_tokens, at length - num_noise_tokens and at `max_spans`

  The noise tokens and the clean tokens are each split into num_noise_spans non-empty
  spans, uniformly over all such splits, and interleaved starting with a clean span, so
  the mask starts False and ends True (as T5's).

  Args:
    length: the number of tokens, >= 0.
    noise_density: the fraction of tokens to noise, in (0, 1).
    mean_noise_span_length: >= 1.
    rng: the source of randomness.
    max_spans: at most this many noise spans (>= 1), e.g. the number of sentinels.

  Returns:
    bool [length]: True at noise tokens; all False when length < 2.

  Raises:
    ValueError: length < 0, noise_density not in (0, 1), mean_noise_span_length < 1 or
      max_spans < 1.
  """
  _check_open_unit('noise_density', noise_density)
  if mean_noise_span_length < 1:
    raise ValueError(f'mean_noise_span_length must be >= 1, got {mean_noise_span_length}')
  if max_spans is not None and max_spans < 1:
    raise ValueError(f'max_spans must be >= 1, got {max_spans}')
  if length < 0:
    raise ValueError(f'length must be >= 0, got {length}')
  if length < 2:
    return np.zeros([length], bool)
  num_noise = min(max(_round(length * noise_density), 1), length - 1)
  num_spans = max(1, _round(num_noise / mean_noise_span_length))
  num_spans = min(num_spans, num_noise, length - num_noise)
  if max_spans is not None:
    num_spans = min(num_spans, max_spans)
  noise_lengths = _random_segmentation(num_noise, num_spans, rng)
  clean_lengths = _random_segmentation(length - num_noise, num_spans, rng)
  lengths = np.stack([clean_lengths, noise_lengths], axis=1).reshape(-1)
  return np.repeat(np.tile([False, True], num_spans), lengths)


def span_corruption(ids: np.ndarray, rng: np.random.Generator, sentinel_ids: np.ndarray,
                    noise_density: float = 0.15, mean_noise_span_length: float = 3.0
                    ) -> tuple[np.ndarray, np.ndarray]:
  """T5's span corruption (Raffel et al. 2020, section 3.1.4 and figure 2).

  With the noise mask of `random_spans_noise_mask` (max_spans = len(sentinel_ids)), noise
  span k is replaced by sentinel_ids[k] in the inputs, and the targets are the inverse:
  the clean spans replaced by sentinels. The mask starts with a clean span and ends with
  a noise span, so for `c_0 n_0 c_1 n_1 ... c_K n_K` (c clean, n noise, s = sentinel_ids):

    inputs  = c_0 s_0 c_1 s_1 ... c_K s_K
    targets = s_0 n_0 s_1 n_1 ... s_K n_K      (no trailing sentinel)

  Args:
    ids: int [n], one sentence without EOS.
    rng: the source of randomness.
    sentinel_ids: int [S], S >= 1: the sentinel of each span, in order.
    noise_density: the fraction of tokens to noise, in (0, 1).
    mean_noise_span_length: >= 1.

  Returns:
    (inputs int32 [n - num_noise + num_spans], targets int32 [num_noise + num_spans]);
    for n < 2, (a copy of ids, int32 [0]). No EOS is added.

  Raises:
    ValueError: ids or sentinel_ids not 1-D integers, sentinel_ids empty, or the
      arguments of `random_spans_noise_mask` out of range.
  """
  ids = _as_ids(ids)
  sentinel_ids = _as_ids(sentinel_ids, 'sentinel_ids')
  if sentinel_ids.size == 0:
    raise ValueError('sentinel_ids must not be empty')
  mask = random_spans_noise_mask(ids.size, noise_density, mean_noise_span_length, rng,
                                 max_spans=sentinel_ids.size)
  if not mask.any():
    return ids.copy(), np.zeros([0], np.int32)
  previous = np.concatenate([[False], mask[:-1]])
  noise_start = mask & ~previous
  clean_start = ~mask & np.concatenate([[True], previous[1:]])
  sentinels = sentinel_ids[:int(noise_start.sum())]
  inputs = ids.copy()
  inputs[noise_start] = sentinels
  targets = ids.copy()
  targets[clean_start] = sentinels
  return inputs[~mask | noise_start], targets[mask | clean_start]


def _poisson_lengths(num_to_mask: int, poisson_lambda: float,
                     rng: np.random.Generator) -> list[int]:
  """Poisson(poisson_lambda) draws up to the first whose running sum reaches num_to_mask,
  that one truncated so the sum is exactly num_to_mask (> 0)."""
  draws, total = [], 0
  chunk = int(np.ceil(num_to_mask / poisson_lambda)) + 4
  while total < num_to_mask:
    for length in rng.poisson(poisson_lambda, size=chunk).tolist():
      draws.append(min(length, num_to_mask - total))
      total += draws[-1]
      if total == num_to_mask:
        break
  return draws


def infilling_spans(length: int, rng: np.random.Generator, mask_ratio: float = 0.3,
                    poisson_lambda: float = 3.0) -> list[tuple[int, int]]:
  """The spans of BART's text infilling (Lewis et al. 2020, section 2.2).

  Exactly num_to_mask = round(mask_ratio * length) tokens are masked. Span lengths are
  drawn i.i.d. from Poisson(poisson_lambda) until their sum reaches num_to_mask, the last
  one truncated so the sum is exact (so it is >= 1); a zero-length span is the insertion
  of one mask token. The spans keep their drawn order from left to right, and at least
  one unmasked token separates any two of them (zero-length ones included), so each
  span shows as one mask token, never next to another. Given the lengths, the placement
  is uniform over all placements that satisfy this.

  When the sentence is too short for that (num_to_mask + num_spans - 1 > length), the
  last zero-length span is dropped, again until none is left, then the last two spans are
  merged, again until the spans fit; the masked count stays exact. This only happens in
  short sentences (it needs ~length * (1 - mask_ratio) spans).

  Args:
    length: the number of tokens, >= 0.
    rng: the source of randomness.
    mask_ratio: the fraction of tokens to mask, in (0, 1).
    poisson_lambda: the mean span length, > 0.

  Returns:
    (start, span_length) pairs sorted by start, [] when num_to_mask = 0. A span covers
    tokens [start, start + span_length); a zero-length span puts its mask token before
    token `start` (at the end when start = length).

  Raises:
    ValueError: length < 0, mask_ratio not in (0, 1) or poisson_lambda <= 0.
  """
  _check_open_unit('mask_ratio', mask_ratio)
  if not poisson_lambda > 0:
    raise ValueError(f'poisson_lambda must be > 0, got {poisson_lambda}')
  if length < 0:
    raise ValueError(f'length must be >= 0, got {length}')
  num_to_mask = _round(mask_ratio * length)
  if num_to_mask == 0:
    return []
  lengths = _poisson_lengths(num_to_mask, poisson_lambda, rng)
  while num_to_mask + len(lengths) - 1 > length:
    if 0 in lengths:
      del lengths[len(lengths) - 1 - lengths[::-1].index(0)]
    else:
      last = lengths.pop()
      lengths[-1] += last
  num_spans = len(lengths)
  # Stars and bars: c_0 < ... < c_{K-1} drawn from range(slack + K) give gaps
  # c_{i+1} - c_i >= 1 between spans and slack = the unmasked tokens beyond those K - 1.
  slack = length - num_to_mask - (num_spans - 1)
  offsets = np.sort(rng.choice(slack + num_spans, num_spans, replace=False))
  starts = offsets + np.concatenate([[0], np.cumsum(lengths)[:-1]])
  return [(int(s), int(n)) for s, n in zip(starts, lengths)]


def text_infilling(ids: np.ndarray, rng: np.random.Generator, mask_id: int,
                   mask_ratio: float = 0.3, poisson_lambda: float = 3.0
                   ) -> tuple[np.ndarray, np.ndarray]:
  """BART's text infilling (Lewis et al. 2020, section 2.2): each span of
  `infilling_spans(len(ids), rng, mask_ratio, poisson_lambda)` (the same draws from
  `rng`) is replaced by one `mask_id`, zero-length spans by an inserted one.

  Args:
    ids: int [n], one sentence.
    rng: the source of randomness.
    mask_id: the mask token.
    mask_ratio: the fraction of tokens to mask, in (0, 1).
    poisson_lambda: the mean span length, > 0.

  Returns:
    (inputs int32 [n - num_to_mask + num_spans], targets int32 [n] = a copy of ids).

  Raises:
    ValueError: ids not 1-D integers, or the arguments of `infilling_spans` out of range.
  """
  ids = _as_ids(ids)
  pieces, position = [], 0
  mask = np.array([mask_id], np.int32)
  for start, span_length in infilling_spans(ids.size, rng, mask_ratio, poisson_lambda):
    pieces += [ids[position:start], mask]
    position = start + span_length
  pieces.append(ids[position:])
  return np.concatenate(pieces).astype(np.int32), ids.copy()


def _word_units(word_ids: np.ndarray, candidates: np.ndarray) -> list[np.ndarray]:
  """The units whole-word masking picks from, ordered by first position: each word whose
  pieces are all candidates (its positions), and each candidate outside words (alone)."""
  in_word = word_ids >= 0
  partial = np.unique(word_ids[in_word & ~candidates])
  usable = candidates & ~(in_word & np.isin(word_ids, partial))
  units = [np.array([p]) for p in np.flatnonzero(usable & ~in_word)]
  positions = np.flatnonzero(usable & in_word)
  positions = positions[np.argsort(word_ids[positions], kind='stable')]
  if positions.size:
    breaks = np.flatnonzero(np.diff(word_ids[positions])) + 1
    units += np.split(positions, breaks)
  units.sort(key=lambda unit: unit[0])
  return units


def masked_lm(ids: np.ndarray, rng: np.random.Generator, *, mask_id: int,
              random_ids: np.ndarray, candidates: np.ndarray,
              word_ids: np.ndarray | None = None, mask_prob: float = 0.15,
              mask_token_prob: float = 0.8, random_token_prob: float = 0.1
              ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """BERT's masked LM (Devlin et al. 2019, section 3.1 and appendix A.1).

  num_to_predict = max(1, round(mask_prob * candidates.sum())) positions (0 when there is
  no candidate) are selected uniformly at random among the candidates. With `word_ids`,
  whole-word masking as Google BERT's create_pretraining_data.py: the words are visited
  in random order and taken whole while the count stays <= num_to_predict; a word that
  would exceed it is skipped, so fewer may be selected. A word with a non-candidate piece
  is never selected; a candidate with word id -1 counts as a word of its own.

  Each selected position independently becomes `mask_id` with probability
  mask_token_prob, a uniform draw from `random_ids` with probability random_token_prob,
  and is left unchanged otherwise (80% / 10% / 10% in BERT).

  Args:
    ids: int [n], may include BOS/EOS.
    rng: the source of randomness.
    mask_id: the mask token.
    random_ids: int [R], R >= 1: the ids a random replacement is drawn from.
    candidates: bool [n]: the positions that may be selected (False at specials).
    word_ids: int [n] or None: the word index of each position, -1 outside words.
    mask_prob: the fraction of candidates to predict, in (0, 1).
    mask_token_prob: in [0, 1].
    random_token_prob: in [0, 1], with mask_token_prob + random_token_prob <= 1.

  Returns:
    (inputs int32 [n], targets int32 [n], weights float32 [n]): targets holds the
    original ids at the selected positions and 0 elsewhere; weights is 1.0 at the
    selected positions and 0.0 elsewhere.

  Raises:
    ValueError: ids not 1-D integers; candidates or word_ids of another shape than ids;
      random_ids empty; mask_prob not in (0, 1); mask_token_prob or random_token_prob
      not in [0, 1], or summing to more than 1.
  """
  ids = _as_ids(ids)
  random_ids = _as_ids(random_ids, 'random_ids')
  candidates = np.asarray(candidates)
  if candidates.shape != ids.shape:
    raise ValueError(f'candidates has shape {candidates.shape}, ids {ids.shape}')
  candidates = candidates.astype(bool)
  if word_ids is not None:
    word_ids = np.asarray(word_ids)
    if word_ids.shape != ids.shape:
      raise ValueError(f'word_ids has shape {word_ids.shape}, ids {ids.shape}')
  if random_ids.size == 0:
    raise ValueError('random_ids must not be empty')
  _check_open_unit('mask_prob', mask_prob)
  for name, value in (('mask_token_prob', mask_token_prob),
                      ('random_token_prob', random_token_prob)):
    if not 0.0 <= value <= 1.0:
      raise ValueError(f'{name} must be in [0, 1], got {value}')
  if mask_token_prob + random_token_prob > 1.0:
    raise ValueError(f'mask_token_prob + random_token_prob must be <= 1, got '
                     f'{mask_token_prob} + {random_token_prob}')

  inputs = ids.copy()
  targets = np.zeros(ids.shape, np.int32)
  weights = np.zeros(ids.shape, np.float32)
  num_candidates = int(candidates.sum())
  if num_candidates == 0:
    return inputs, targets, weights
  num_to_predict = max(1, _round(mask_prob * num_candidates))
  if word_ids is None:
    selected = rng.choice(np.flatnonzero(candidates), num_to_predict, replace=False)
  else:
    units = _word_units(word_ids, candidates)
    chosen, count = [], 0
    for u in rng.permutation(len(units)):
      if count >= num_to_predict:
        break
      if count + units[u].size > num_to_predict:
        continue
      chosen.append(units[u])
      count += units[u].size
    selected = np.concatenate(chosen) if chosen else np.zeros([0], np.int64)
  selected = np.sort(selected)
  draw = rng.random(selected.size)
  replacements = rng.choice(random_ids, size=selected.size)
  to_mask = draw < mask_token_prob
  to_random = ~to_mask & (draw < mask_token_prob + random_token_prob)
  inputs[selected[to_mask]] = mask_id
  inputs[selected[to_random]] = replacements[to_random]
  targets[selected] = ids[selected]
  weights[selected] = 1.0
  return inputs, targets, weights
