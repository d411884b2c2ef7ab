"""AdamW or SGD with warmup and decay, gradient clipping and a weight-decay mask (Optax)."""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  """Linear warmup from 0 to `config.learning_rate` over `warmup_steps`, then decay.

  'rsqrt': lr * sqrt(warmup_steps / step) (Vaswani et al. 2017, eq. 3, rescaled so the
  peak equals `learning_rate`); 'cosine': cosine decay to 0 at `num_train_steps`
  (Loshchilov & Hutter 2017); 'linear': linear decay to 0 at `num_train_steps` (BERT
  fine-tuning, Devlin et al. 2019); 'constant': stays at the peak.
  """
  peak, warmup = config.learning_rate, config.warmup_steps
  warmup_fn = optax.linear_schedule(0.0, peak, max(warmup, 1))
  if config.schedule == 'rsqrt':
    w = max(warmup, 1)
    decay_fn = lambda count: peak * jnp.sqrt(w / jnp.maximum(count + w, w))
  elif config.schedule == 'cosine':
    decay_fn = optax.cosine_decay_schedule(peak, max(config.num_train_steps - warmup, 1))
  elif config.schedule == 'linear':
    decay_fn = optax.linear_schedule(peak, 0.0, max(config.num_train_steps - warmup, 1))
  elif config.schedule == 'constant':
    decay_fn = optax.constant_schedule(peak)
  else:
    raise ValueError(f"config.schedule={config.schedule!r}: use 'rsqrt', 'cosine', 'linear' "
                     "or 'constant'")
  return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def weight_decay_mask(params) -> dict:
  """True for the matrices of Dense layers (leaves named 'kernel'); False for biases,
  LayerNorm scales and biases, and embeddings, which AdamW leaves undecayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping (if `max_grad_norm` > 0) followed by the `config.optimizer`:

  'adamw': AdamW (Loshchilov & Hutter 2019) with decoupled, masked weight decay
    (`adam_b1`, `adam_b2`, `adam_eps`, `weight_decay`);
  'sgd': SGD with `momentum` (heavy ball, or Nesterov's with `nesterov`; Sutskever et
    al. 2013) and the same masked weight decay, added to the gradient (L2) before the
    momentum, as `torch.optim.SGD` does.

  Both follow `learning_rate_schedule(config)`.
  """
  schedule = learning_rate_schedule(config)
  if config.optimizer == 'sgd':
    steps = [optax.sgd(schedule, momentum=config.momentum or None, nesterov=config.nesterov)]
    if config.weight_decay > 0:
      steps.insert(0, optax.add_decayed_weights(config.weight_decay, mask=weight_decay_mask))
    optimizer = optax.chain(*steps)
  else:
    optimizer = optax.adamw(schedule, b1=config.adam_b1, b2=config.adam_b2,
                            eps=config.adam_eps, weight_decay=config.weight_decay,
                            mask=weight_decay_mask)
  if config.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optimizer)
  return optimizer
