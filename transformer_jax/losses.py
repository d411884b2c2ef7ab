"""Losses: label-smoothed cross-entropy, mean squared error, user losses by import path.

A loss is any JAX function with the signature

  loss_fn(logits, targets, weights) -> (loss, metrics)

  logits   float32 [..., V]   unnormalized scores (V = 1 for regression)
  targets  [...]              gold ids (int32) or values (float32, regression)
  weights  float32 [...]      1.0 for what counts, 0.0 for padding
  loss     float32 scalar     what is differentiated
  metrics  dict[str, scalar]  anything to log (averaged over the steps between logs)

With gradient accumulation (`config.grad_accum_steps` > 1) the micro-batches' gradients
and metrics are combined into the whole batch's (`train.LossFn`), which needs the loss
to be the weighted mean sum(w * l) / sum(w) with sum(w) in metrics['num_tokens'] (or
'num_examples'), as `cross_entropy` and `mse` give it; a loss with neither counts every
micro-batch alike (exact for a plain mean over the rows). Metrics named 'num_*' are summed.

The leading shape [...] depends on the task:
  translation     [B, T]  one target token per position
  classification  [B]     one label per sentence (regression: float targets, V = 1)
  tagging         [B, S]  one label per word, at its first sub-token; the other
                          sub-tokens and padding have weight 0

`get_loss(config)` returns the built-in `cross_entropy` (with `config.label_smoothing`
bound, and for the tasks whose logits range over the tokenizer's vocabulary,
`VOCABULARY_TASKS`, no smoothing mass on PAD and BOS), `mse`, or a user's function named
by import path, e.g. `config.loss='my_pkg.losses:focal'`.
"""
from __future__ import annotations

import functools
import importlib
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import regularizers
from transformer_jax.config_schema import ConfigError
from transformer_jax.tokenizer import BOS_ID, PAD_ID

LossFn = Callable[[jax.Array, jax.Array, jax.Array], tuple[jax.Array, dict]]

# Tasks whose logits range over the tokenizer's vocabulary, where PAD and BOS are never
# targets (BOS only starts the decoder input), so label smoothing gives them no mass.
# Classification and tagging logits range over labels: there ids 0 and 2 are labels.
VOCABULARY_TASKS = ('translation', 'span_corruption', 'text_infilling', 'masked_lm')
NEVER_TARGETS = (PAD_ID, BOS_ID)


def cross_entropy(logits: jax.Array, targets: jax.Array, weights: jax.Array,
                  label_smoothing: float = 0.0, no_smoothing_ids: tuple[int, ...] = ()
                  ) -> tuple[jax.Array, dict]:
  """Label-smoothed cross-entropy averaged over real (weight > 0) target tokens.

  The smoothed target q puts 1 - label_smoothing on the gold token and spreads
  label_smoothing evenly over the other tokens that can be targets: every id except
  the gold one and `no_smoothing_ids`, which get 0 (with V = vocabulary size and n =
  len(no_smoothing_ids), label_smoothing / (V - 1 - n) each). Label smoothing is Szegedy
  et al. 2016 ("Rethinking the Inception Architecture", section 7), as in Vaswani et al.
  2017, section 5.4; leaving ids that are never targets out of it follows OpenNMT-py's
  LabelSmoothingLoss and the Annotated Transformer, which give PAD no mass (Flax WMT, T5X
  and fairseq spread it over all V). Translation passes (PAD_ID, BOS_ID) (`get_loss`).
  The entropy of q is subtracted, so a perfect prediction of it scores 0 (as in the Flax
  WMT example and T5X).

  Args:
    logits: float [..., V] ([B, T, V] for translation, [B, C] for classification).
    targets: int [...]; at weight > 0 never one of `no_smoothing_ids`.
    weights: float [...]; 0 marks padding.
    label_smoothing: in [0, 1).
    no_smoothing_ids: ids in [0, V) that never are targets and get no smoothing mass.

  Returns:
    (loss, metrics): loss = sum(weights * token_loss) / sum(weights), 0 when all
    weights are 0; metrics has 'nll' (unsmoothed, per real token), 'accuracy' and
    'num_tokens' (the sum of weights).

  Raises:
    ValueError: a no_smoothing_id outside [0, V), or label_smoothing > 0 with no token
      left to receive it (V - 1 - n < 1).
  """
  vocab_size = logits.shape[-1]
  excluded = sorted(set(no_smoothing_ids))
  if any(not 0 <= i < vocab_size for i in excluded):
    raise ValueError(f'no_smoothing_ids={tuple(no_smoothing_ids)}: ids must be in [0, '
                     f'{vocab_size})')
  num_others = vocab_size - 1 - len(excluded)  # Tokens that get the smoothing mass.
  if label_smoothing > 0 and num_others < 1:
    raise ValueError(f'label_smoothing={label_smoothing}: no token to spread it over '
                     f'(V={vocab_size}, no_smoothing_ids={tuple(no_smoothing_ids)})')
  logits = logits.astype(jnp.float32)
  # With log p_v = logits_v - lse, written so that no [B, T, V] log-probabilities are
  # materialized: every term is a reduction over the logits.
  lse = jax.nn.logsumexp(logits, axis=-1)  # [B, T]
  gold_logit = jnp.take_along_axis(logits, targets[..., None], axis=-1)[..., 0]  # [B, T]
  nll = lse - gold_logit
  if label_smoothing > 0:
    confidence = 1.0 - label_smoothing
    low = label_smoothing / num_others
    if excluded:  # A where, not a subtraction: excluded logits may be -inf.
      smoothed = np.ones(vocab_size, bool)
      smoothed[excluded] = False
      logit_sum = jnp.sum(jnp.where(smoothed, logits, 0.0), axis=-1)
    else:
      logit_sum = jnp.sum(logits, axis=-1)
    # -sum_v q_v log p_v, with q = low on the smoothed ids and confidence at the gold one:
    # = lse - (confidence - low) * gold_logit - low * logit_sum (as sum_v q_v = 1).
    token_loss = lse - (confidence - low) * gold_logit - low * logit_sum
    entropy = -(confidence * np.log(confidence) + num_others * low * np.log(low))
    token_loss = token_loss - entropy
  else:
    token_loss = nll
  weights = weights.astype(jnp.float32)
  # Padding positions count for nothing, even where their loss is inf (a -inf logit at
  # the PAD target): a where, as inf * 0 is NaN.
  real = weights > 0
  token_loss, nll = jnp.where(real, token_loss, 0.0), jnp.where(real, nll, 0.0)
  num_tokens = jnp.sum(weights)
  denominator = jnp.maximum(num_tokens, 1e-8)
  correct = (jnp.argmax(logits, axis=-1) == targets).astype(jnp.float32)
  metrics = {
      'nll': jnp.sum(nll * weights) / denominator,
      'accuracy': jnp.sum(correct * weights) / denominator,
      'num_tokens': num_tokens,
  }
  return jnp.sum(token_loss * weights) / denominator, metrics


def mse(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict]:
  """Mean squared error for regression, averaged over weight > 0 examples.

  Args:
    logits: float [..., 1], the predicted values.
    targets: float [...].
    weights: float [...]; 0 marks padding.

  Returns:
    (loss, metrics): loss = sum(weights * (logits - targets)^2) / sum(weights), 0 when
    all weights are 0; metrics has 'mse' (the same) and 'num_examples'.
  """
  errors = jnp.square(logits[..., 0].astype(jnp.float32) - targets.astype(jnp.float32))
  weights = weights.astype(jnp.float32)
  num = jnp.sum(weights)
  loss = jnp.sum(errors * weights) / jnp.maximum(num, 1e-8)
  return loss, {'mse': loss, 'num_examples': num}


def get_loss(config) -> LossFn:
  """Resolves `config.loss`: 'cross_entropy', 'mse' or 'package.module:function'.

  'cross_entropy' is bound to `config.label_smoothing` and, when `config.task` is one of
  `VOCABULARY_TASKS`, to no_smoothing_ids=(PAD_ID, BOS_ID): no smoothing mass on ids that
  are never targets. With `config.r_drop_alpha` > 0 the loss is wrapped by
  `regularizers.r_drop_loss_fn`, which adds R-Drop's KL term when the trainer's
  `regularizers.r_drop_loss` runs it on a doubled batch (elsewhere it is the loss itself).

  Raises:
    ConfigError: the name is neither, or the import path cannot be imported.
  """
  loss_fn = _resolve(config)
  if config.get('r_drop_alpha', 0.0) > 0:  # R-Drop's KL term (transformer_jax/regularizers.py).
    loss_fn = regularizers.r_drop_loss_fn(loss_fn, config.r_drop_alpha)
  return loss_fn


def _resolve(config) -> LossFn:
  """`get_loss` without R-Drop."""
  name = config.loss
  if name == 'cross_entropy':
    never = NEVER_TARGETS if config.get('task') in VOCABULARY_TASKS else ()
    return functools.partial(cross_entropy, label_smoothing=config.label_smoothing,
                             no_smoothing_ids=never)
  if name == 'mse':
    return mse
  module_name, sep, attr = name.partition(':')
  if not sep or not module_name or not attr:
    raise ConfigError(f"config.loss={name!r}: use 'cross_entropy', 'mse' or "
                      "'package.module:function'")
  try:
    return getattr(importlib.import_module(module_name), attr)
  except (ImportError, AttributeError) as e:
    raise ConfigError(f'config.loss={name!r}: cannot import it ({e})') from e
