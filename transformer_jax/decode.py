"""Model-agnostic search over output sequences: beam search, greedy and sampling.

Each function drives a callback

  tokens_to_logits(tokens int32 [N], cache, index int32 scalar) -> (logits float32 [N, V], cache)

that scores the next token at position `index` given the previous token (BOS at index 0)
and a cache whose leaves all have N as their leading axis (for `Transformer`:
`init_cache` + `decode_step`, keys/values of earlier positions and of the source computed
once). Entries under a top-level 'source' key of a dict cache depend only on the source
sentence: beam search never reorders them (all beams of a sentence hold the same values).
Everything runs inside `jax.lax.while_loop`, so a search jits into one program
whose shape depends only on (batch size, source length, max_length).

Output sequences are int32 [..., max_length]: the generated tokens, EOS included, then
zeros (PAD_ID). `max_lengths` int32 [B] caps each sentence's length, EOS included; EOS
is forced at the last allowed position.

Rules every search follows:

- PAD_ID and BOS_ID (`NEVER_GENERATED`) are never generated, whatever the model
  predicts: their scores are set to NEG_INF before any selection (fairseq's
  SequenceGenerator does the same for PAD). Beam and greedy scores are not renormalized
  over the remaining tokens, so a hypothesis scores the model's log P(Y|X) and beam
  search looks for the most probable sequence free of PAD and BOS; sampling draws from
  the model's distribution restricted to the allowed tokens (renormalized).
- Ties go to the lower token id: greedy takes the first maximum (`jnp.argmax`), and
  `top_k_mask`/`top_p_mask` rank equal scores lower id first, so top_k=1 sampling is
  greedy decoding token for token.
- Sampling applies temperature, then top_k, then top_p (the order of Hugging Face
  transformers' logits warpers); top_p works on the probabilities left after temperature
  and top_k. Row r draws with the key fold_in(fold_in(rng, row_ids[r]), step): its sample
  depends on neither the other rows of the batch nor its position in it.
"""
from __future__ import annotations

import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.tokenizer import BOS_ID, EOS_ID, PAD_ID

NEG_INF = -1.0e9  # Finite, so that -inf - -inf never makes a NaN.
NEVER_GENERATED = (PAD_ID, BOS_ID)  # Ids no search outputs.
# Temperatures below float32's smallest normal number are not exactly representable
# (CPUs may flush subnormals to zero): sampling there is greedy decoding, its limit.
MIN_TEMPERATURE = float(np.finfo(np.float32).tiny)
TokensToLogits = Callable[[jax.Array, Any, jax.Array], tuple[jax.Array, Any]]


def length_penalty(length: jax.Array, alpha: float) -> jax.Array:
  """GNMT length penalty ((5 + |Y|) / 6)^alpha (Wu et al. 2016, eq. 14); 1 when alpha=0."""
  return ((5.0 + length.astype(jnp.float32)) / 6.0) ** alpha


def _allowed(shape: tuple[int, ...], index: jax.Array, max_lengths: jax.Array) -> jax.Array:
  """bool `shape` ([B, ..., V]): the tokens a search may output at position `index`.

  Never PAD_ID or BOS_ID (`NEVER_GENERATED`); only EOS where `index` is a sentence's last
  allowed position (max_lengths int32 [B], EOS included).
  """
  ids = jnp.arange(shape[-1])
  special = functools.reduce(jnp.logical_or, [ids == i for i in NEVER_GENERATED])
  last = (index >= max_lengths - 1).reshape((-1,) + (1,) * (len(shape) - 1))
  return ~special & ~(last & (ids != EOS_ID))


def _order_and_ranks(scores: jax.Array) -> tuple[jax.Array, jax.Array]:
  """scores float [..., V] -> (order, ranks), int32 [..., V]: `order` lists the ids best
  first, equal scores lower id first (a stable sort); ranks[v] is v's place in it."""
  order = jnp.argsort(-scores, axis=-1, stable=True)
  return order, jnp.argsort(order, axis=-1, stable=True)


def top_k_mask(scores: jax.Array, k: int) -> jax.Array:
  """The k best tokens: exactly k, ties broken by the lower id; all when k = 0 or k >= V.

  Args:
    scores: float [..., V], logits or log-probabilities (-inf allowed).
    k: >= 0.

  Returns:
    bool [..., V], True for the kept tokens.

  Raises:
    ValueError: k < 0.
  """
  if k < 0:
    raise ValueError(f'top_k={k}: must be >= 0')
  if k == 0 or k >= scores.shape[-1]:
    return jnp.ones(scores.shape, bool)
  return _order_and_ranks(scores)[1] < k


def top_p_mask(scores: jax.Array, p: float) -> jax.Array:
  """Nucleus of softmax(scores): the smallest set of most probable tokens whose total
  probability reaches p (>= p), at least one token (Holtzman et al. 2020, "The Curious
  Case of Neural Text Degeneration", section 3.1). Tokens are taken best first, equal
  probabilities lower id first: a token is kept when the tokens before it total < p.

  On probabilities [0.5, 0.3, 0.15, 0.05]: p = 0.6 keeps 2 tokens, p = 0.85 keeps 3 and
  p = 1.0 (off) keeps all 4.

  Args:
    scores: float [..., V], logits (-inf for excluded tokens, as long as one is finite).
    p: in (0, 1].

  Returns:
    bool [..., V], True for the kept tokens.

  Raises:
    ValueError: p outside (0, 1].
  """
  if not 0 < p <= 1:
    raise ValueError(f'top_p={p}: must be in (0, 1]')
  if p == 1:
    return jnp.ones(scores.shape, bool)
  probs = jax.nn.softmax(scores.astype(jnp.float32), axis=-1)
  order, ranks = _order_and_ranks(probs)
  sorted_probs = jnp.take_along_axis(probs, order, axis=-1)
  before = jnp.cumsum(sorted_probs, axis=-1) - sorted_probs  # Mass of the better tokens.
  num_kept = jnp.sum(before < p, axis=-1, keepdims=True)  # >= 1, as before[..., 0] = 0.
  return ranks < num_kept


def _gather_beams(tree, beam_indices: jax.Array):
  """Selects beams: leaves [B, K, ...] indexed by beam_indices int32 [B, K'] -> [B, K', ...]."""
  return jax.tree.map(lambda x: jnp.take_along_axis(
      x, beam_indices.reshape(beam_indices.shape + (1,) * (x.ndim - 2)), axis=1), tree)


def _split(tree, batch_size: int, beam_size: int):
  return jax.tree.map(lambda x: x.reshape((batch_size, beam_size) + x.shape[1:]), tree)


def _merge(tree):
  return jax.tree.map(lambda x: x.reshape((-1,) + x.shape[2:]), tree)


def _reorder_cache(cache, parents: jax.Array, batch_size: int, beam_size: int):
  """Cache rows [B*K, ...] of the selected parent beams (int32 [B, K]); a dict cache's
  'source' entries are the same for every beam of a sentence and stay as they are."""
  if isinstance(cache, dict) and 'source' in cache:
    rest = {key: value for key, value in cache.items() if key != 'source'}
    return {**_reorder_cache(rest, parents, batch_size, beam_size), 'source': cache['source']}
  return _merge(_gather_beams(_split(cache, batch_size, beam_size), parents))


def beam_search(tokens_to_logits: TokensToLogits, cache, max_lengths: jax.Array,
                max_length: int, beam_size: int, alpha: float = 0.6
                ) -> tuple[jax.Array, jax.Array]:
  """Beam search with the GNMT length penalty (Wu et al. 2016, section 7).

  A hypothesis ending in EOS at length n scores log P(Y|X) / ((5 + n) / 6)^alpha; it never
  contains PAD or BOS (module docstring: their log-probabilities are NEG_INF, the others
  are not renormalized). Each step extends the live beams by every token, keeps the 2K
  best extensions, moves those among the K best that end in EOS to the finished set (top
  K by score) and keeps the K best others alive. A sentence stops when no live beam can
  beat its K-th best finished hypothesis any more (log probabilities only fall and, for
  alpha >= 0, the penalty is largest at the maximum length) or when it reaches its
  maximum length; the search stops when all have.

  Args:
    tokens_to_logits: the model callback (module docstring).
    cache: decoding cache for the B source sentences, leaves [B, ...]; expanded to
      B * beam_size rows here.
    max_lengths: int32 [B], each sentence's maximum output length (EOS included),
      at most max_length.
    max_length: static output length of the returned arrays.
    beam_size: K.
    alpha: length penalty exponent (>= 0).

  Returns:
    sequences int32 [B, K, max_length], best first (EOS-terminated, 0-padded), and their
    scores float32 [B, K].
  """
  batch_size = max_lengths.shape[0]
  k = beam_size
  cache = jax.tree.map(lambda x: jnp.repeat(x, k, axis=0), cache)  # [B*K, ...]
  init = {
      'index': jnp.array(0, jnp.int32),
      'last_tokens': jnp.full((batch_size, k), BOS_ID, jnp.int32),
      'live_seqs': jnp.zeros((batch_size, k, max_length), jnp.int32),
      # Only beam 0 is live at the start, so the K beams do not repeat each other.
      'live_log_probs': jnp.tile(jnp.array([0.0] + [NEG_INF] * (k - 1)), (batch_size, 1)),
      'finished_seqs': jnp.zeros((batch_size, k, max_length), jnp.int32),
      'finished_scores': jnp.full((batch_size, k), NEG_INF),
      'cache': cache,
  }

  def done(state) -> jax.Array:
    """bool [B]: nothing live can still enter the K best finished hypotheses."""
    best_possible = (jnp.max(state['live_log_probs'], axis=1)
                     / length_penalty(max_lengths, alpha))
    worst_finished = jnp.min(state['finished_scores'], axis=1)
    no_live = jnp.max(state['live_log_probs'], axis=1) <= NEG_INF / 2
    return no_live | (worst_finished > best_possible) | (state['index'] >= max_lengths)

  def cond(state):
    return (state['index'] < max_length) & ~jnp.all(done(state))

  def body(state):
    index = state['index']
    logits, cache = tokens_to_logits(state['last_tokens'].reshape(-1), state['cache'], index)
    log_probs = jax.nn.log_softmax(logits.astype(jnp.float32)).reshape(batch_size, k, -1)
    log_probs = jnp.where(_allowed(log_probs.shape, index, max_lengths), log_probs, NEG_INF)
    vocab_size = log_probs.shape[-1]
    candidates = (state['live_log_probs'][..., None] + log_probs).reshape(batch_size, -1)
    cand_log_probs, flat = jax.lax.top_k(candidates, 2 * k)  # [B, 2K]
    parents, tokens = flat // vocab_size, flat % vocab_size
    cand_seqs = _gather_beams(state['live_seqs'], parents)  # [B, 2K, L]
    cand_seqs = jax.lax.dynamic_update_slice_in_dim(
        cand_seqs, tokens[..., None], index, axis=2)
    is_eos = tokens == EOS_ID
    dead = cand_log_probs <= NEG_INF / 2

    # Finished: EOS candidates among the K best join the finished set (as in fairseq;
    # with K = 1 this is exactly greedy decoding); keep the set's K best.
    in_top_k = jnp.arange(2 * k) < k
    new_scores = jnp.where(is_eos & in_top_k & ~dead,
                           cand_log_probs / length_penalty(index + 1, alpha), NEG_INF)
    all_scores = jnp.concatenate([state['finished_scores'], new_scores], axis=1)
    all_seqs = jnp.concatenate([state['finished_seqs'], cand_seqs], axis=1)
    finished_scores, top = jax.lax.top_k(all_scores, k)
    finished_seqs = _gather_beams(all_seqs, top)

    # Live: the K best candidates that did not end.
    live_candidates = jnp.where(is_eos, NEG_INF, cand_log_probs)
    live_log_probs, top = jax.lax.top_k(live_candidates, k)
    live_seqs = _gather_beams(cand_seqs, top)
    last_tokens = jnp.take_along_axis(tokens, top, axis=1)
    cache = _reorder_cache(cache, jnp.take_along_axis(parents, top, axis=1), batch_size, k)

    # Sentences already done keep their finished set as it was.
    stop = done(state)[:, None]
    return {
        'index': index + 1,
        'last_tokens': last_tokens,
        'live_seqs': live_seqs,
        'live_log_probs': jnp.where(stop, NEG_INF, live_log_probs),
        'finished_seqs': jnp.where(stop[..., None], state['finished_seqs'], finished_seqs),
        'finished_scores': jnp.where(stop, state['finished_scores'], finished_scores),
        'cache': cache,
    }

  state = jax.lax.while_loop(cond, body, init)
  return state['finished_seqs'], state['finished_scores']


def sample(tokens_to_logits: TokensToLogits, cache, max_lengths: jax.Array, max_length: int,
           rng: jax.Array | None = None, temperature: float = 1.0, top_k: int = 0,
           top_p: float = 1.0, row_ids: jax.Array | None = None) -> jax.Array:
  """Greedy decoding (rng=None) or ancestral sampling from softmax(logits / temperature),
  restricted to the top_k most likely tokens and then to the top_p nucleus.

  PAD and BOS are never output (module docstring). Greedy takes the most likely allowed
  token, the lowest id among equals. Sampling is greedy decoding where the rules make it
  so: top_k=1 keeps exactly the greedy token, and a temperature below MIN_TEMPERATURE
  (float32's smallest normal number, 1.2e-38) decodes greedily; above it the logits are
  shifted so that their maximum is 0 before they are divided, so a tiny temperature
  concentrates the distribution on the best token(s) and never overflows into NaN.

  Args:
    tokens_to_logits: the model callback (module docstring).
    cache: decoding cache, leaves [B, ...].
    max_lengths: int32 [B], maximum output lengths (EOS included).
    max_length: static output length.
    rng: PRNG key for sampling; None decodes greedily (argmax).
    temperature: > 0 (a static float); divides the logits before sampling.
    top_k: sample among this many best tokens (exactly k: ties go to the lower id); 0 = all.
    top_p: in (0, 1]; sample within the nucleus of this probability (`top_p_mask`) of the
      top_k tokens; 1.0 = all.
    row_ids: int32 or uint32 [B], the identity of each row's random stream: row r draws
      with fold_in(fold_in(rng, row_ids[r]), step), so equal ids give equal samples in
      any batch, at any row. None: 0, 1, ..., B - 1.

  Returns:
    sequences int32 [B, max_length], EOS-terminated and 0-padded.

  Raises:
    ValueError: temperature <= 0, top_k < 0 or top_p outside (0, 1].
  """
  if not temperature > 0:
    raise ValueError(f'temperature={temperature}: must be > 0')
  if top_k < 0:
    raise ValueError(f'top_k={top_k}: must be >= 0')
  if not 0 < top_p <= 1:
    raise ValueError(f'top_p={top_p}: must be in (0, 1]')
  batch_size = max_lengths.shape[0]
  greedy = rng is None or temperature < MIN_TEMPERATURE
  if not greedy:
    if row_ids is None:
      row_ids = jnp.arange(batch_size, dtype=jnp.uint32)
    row_keys = jax.vmap(lambda i: jax.random.fold_in(rng, i))(row_ids)
  init = {'index': jnp.array(0, jnp.int32),
          'last_tokens': jnp.full((batch_size,), BOS_ID, jnp.int32),
          'seqs': jnp.zeros((batch_size, max_length), jnp.int32),
          'finished': jnp.zeros((batch_size,), bool),
          'cache': cache}

  def cond(state):
    return (state['index'] < max_length) & ~jnp.all(state['finished'])

  def body(state):
    index = state['index']
    logits, cache = tokens_to_logits(state['last_tokens'], state['cache'], index)
    logits = logits.astype(jnp.float32)
    allowed = _allowed(logits.shape, index, max_lengths)
    if greedy:
      tokens = jnp.argmax(jnp.where(allowed, logits, NEG_INF), axis=-1).astype(jnp.int32)
    else:
      logits = jnp.where(allowed, logits, -jnp.inf)
      keep = allowed & top_k_mask(logits, top_k)
      # Max 0 before dividing: the best token scores exactly 0, the rest at most -inf.
      scaled = (logits - jnp.max(logits, axis=-1, keepdims=True)) / temperature
      scaled = jnp.where(keep, scaled, -jnp.inf)
      keep = keep & top_p_mask(scaled, top_p)
      scaled = jnp.where(keep, scaled, -jnp.inf)
      keys = jax.vmap(lambda key: jax.random.fold_in(key, index))(row_keys)
      tokens = jax.vmap(jax.random.categorical)(keys, scaled).astype(jnp.int32)
    tokens = jnp.where(state['finished'], 0, tokens)
    return {'index': index + 1, 'last_tokens': tokens,
            'seqs': state['seqs'].at[:, index].set(tokens),
            'finished': state['finished'] | (tokens == EOS_ID), 'cache': cache}

  return jax.lax.while_loop(cond, body, init)['seqs']
