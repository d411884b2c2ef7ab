"""AdamW or SGD with warmup and decay, gradient clipping and a weight-decay mask (Optax)."""
from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import optax


def learning_rate_schedule(config) -> optax.Schedule:
  """The learning rate of each optimizer update: linear warmup, then `config.schedule`.

  The schedule is indexed like Optax's step count: `schedule(k)` (k = 0, 1, ...; an int
  or an int32 array) is the rate of update n = k + 1, the one that takes the train state
  from step k to step k + 1, so `train_step` logs `schedule(state.step)`. With
  W = max(`warmup_steps`, 1) (0 and 1 both mean no warmup), N = `num_train_steps` and
  lr = `learning_rate`, update n has rate

    lr * min(n / W, 1) * decay(n)

  so the first update already moves the parameters (at lr / W; a schedule evaluated at
  the update's 0-based count would give it rate 0 and waste it), and the rate peaks at lr
  at update W. decay(n) is 1 up to update W, then:

    'rsqrt':    sqrt(W / n): Vaswani et al. 2017, eq. 3 (step_num = n, counted
                from 1) rescaled so the peak equals lr;
    'cosine':   (1 + cos(pi * t)) / 2 (Loshchilov & Hutter 2017);
    'linear':   1 - t (BERT, Devlin et al. 2019);
    'constant': 1;

  with t = (n - W) / (N + 1 - W) in [0, 1]. 'linear' and 'cosine' reach 0 at update
  N + 1, the one that never runs: the last update N still moves the parameters, at
  lr / (N + 1 - W) for 'linear' (lr * (1 + cos(pi * (N - W) / (N + 1 - W))) / 2 for
  'cosine'). The schedule's zeros, updates 0 and N + 1, are never applied. (Shifting
  only the warmup of a 0-based schedule would give lr to updates W and W + 1 and
  lr / (N - W) to the last; this keeps one peak.)

  Raises:
    ValueError: an unknown `config.schedule`.
  """
  peak, warmup = float(config.learning_rate), max(config.warmup_steps, 1)
  span = max(config.num_train_steps + 1 - warmup, 1)  # Updates W..N+1: t from 0 to 1.
  kind = config.schedule
  if kind not in ('rsqrt', 'cosine', 'linear', 'constant'):
    raise ValueError(f"config.schedule={kind!r}: use 'rsqrt', 'cosine', 'linear' or "
                     "'constant'")

  def schedule(count):
    n = jnp.asarray(count, jnp.float32) + 1.0  # The update's number, from 1.
    rate = peak * jnp.minimum(n / warmup, 1.0)
    t = jnp.clip((n - warmup) / span, 0.0, 1.0)
    if kind == 'rsqrt':
      return rate * jnp.sqrt(warmup / jnp.maximum(n, warmup))
    if kind == 'cosine':
      return rate * 0.5 * (1.0 + jnp.cos(jnp.pi * t))
    if kind == 'linear':
      return rate * (1.0 - t)
    return rate

  return schedule


# Parameters, gradients and optimizer state are kept in float32 whatever
# `config.param_dtype` is: in bfloat16 an AdamW update of lr = 1e-4 rounds away (the
# bfloat16 values below 1.0 are 2**-8 apart), and float16 flushes adam_eps = 1e-9 to 0
# (a zero gradient then gives 0 / 0 = NaN).
MASTER_DTYPE = jnp.float32


def to_master(params):
  """`params` with every floating leaf narrower than float32 (bfloat16, float16) cast to
  float32 (`MASTER_DTYPE`), other leaves as they are: the master copy the train state,
  the optimizer and the checkpoints hold.

  Mixed precision as in T5X and MaxText (Micikevicius et al. 2018, section 3.1: float32
  master weights): the model's layers cast these to `config.dtype` when they compute.
  """
  return jax.tree.map(lambda x: x.astype(MASTER_DTYPE) if _narrow(x) else x, params)


def _narrow(x) -> bool:
  return jnp.issubdtype(x.dtype, jnp.floating) and jnp.finfo(x.dtype).bits < 32


def low_precision_leaves(params) -> list[str]:
  """'path: dtype' of each floating leaf of `params` narrower than float32 (bfloat16,
  float16, ...), which `to_master` would widen; [] for master weights."""
  flat = jax.tree_util.tree_flatten_with_path(params)[0]
  return [f'{jax.tree_util.keystr(path)}: {x.dtype}' for path, x in flat
          if _narrow(x)]


def weight_decay_mask(params) -> dict:
  """True for the matrices of Dense layers (leaves named 'kernel'); False for biases,
  LayerNorm scales and biases, and embeddings, which AdamW leaves undecayed."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: getattr(path[-1], 'key', None) == 'kernel', params)


_LAYER = re.compile(r'layers_(\d+)')


def layer_depths(params) -> tuple[dict, int]:
  """(depths, L): the depth of each leaf of `params` (a tree of the same structure, of
  ints) and the number of layers L of the deepest stack.

  Depth counts from the input: 0 for the embedders (a leaf with a path component ending
  in 'embedder': its token, position and type tables and their LayerNorm), i + 1 for the
  leaves of layer i of a stack (a path component 'layers_i'), L + 1 for everything above
  the stacks (their final LayerNorm, a task head). In an encoder-decoder, layer i of the
  encoder and of the decoder share depth i + 1, and a tied token table, which also gives
  the output logits, counts as an embedder (the lowest rate). A PEFT tree (nested by the
  same module names) gets the depths of the layers it changes; L is then the deepest layer
  the tree holds (0 for LoRA on the token table alone).
  """
  def depth(path) -> int | None:
    names = [str(getattr(k, 'key', getattr(k, 'name', k))) for k in path]
    for name in names:
      match = _LAYER.fullmatch(name)
      if match:
        return int(match.group(1)) + 1
    return 0 if any(n.endswith('embedder') for n in names) else None

  found = jax.tree_util.tree_map_with_path(lambda path, _: depth(path), params)
  num_layers = max((d for d in jax.tree.leaves(found) if d), default=0)
  depths = jax.tree.map(lambda d: num_layers + 1 if d is None else d, found,
                        is_leaf=lambda d: d is None)
  return depths, num_layers


def scale_by_layer_decay(decay: float) -> optax.GradientTransformation:
  """Multiplies the update of each leaf at depth d (`layer_depths`) by
  decay ** (L + 1 - d): the head and final LayerNorm keep the full learning rate, layer
  i of L gets decay ** (L - i), the embeddings decay ** (L + 1).

  Layer-wise learning-rate decay for fine-tuning a pretrained encoder (Howard & Ruder
  2018, "discriminative fine-tuning"; Clark et al. 2020, ELECTRA, appendix A): lower
  layers, which hold more general features, move less. Placed after the optimizer, it
  scales the whole AdamW step, weight decay included, as a per-layer learning rate does.
  Stateless.

  Raises:
    ValueError: `decay` not in (0, 1].
  """
  if not 0 < decay <= 1:
    raise ValueError(f'layer_lr_decay={decay}: must be in (0, 1]')

  def update(updates, state, params=None):
    del params
    depths, num_layers = layer_depths(updates)
    return jax.tree.map(lambda u, d: u * decay ** (num_layers + 1 - d), updates,
                        depths), state

  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(config) -> optax.GradientTransformation:
  """Global-norm clipping (if `max_grad_norm` > 0) followed by the `config.optimizer`:

  'adamw': AdamW (Loshchilov & Hutter 2019) with decoupled, masked weight decay
    (`adam_b1`, `adam_b2`, `adam_eps`, `weight_decay`);
  'sgd': SGD with `momentum` (heavy ball, or Nesterov's with `nesterov`; Sutskever et
    al. 2013) and the same masked weight decay, added to the gradient (L2) before the
    momentum, as `torch.optim.SGD` does.

  Both follow `learning_rate_schedule(config)`, each layer's update scaled by
  `scale_by_layer_decay(config.layer_lr_decay)` when that is below 1 (a config without
  the field: 1). Give it float32 parameters and gradients (`to_master`): its state then
  is float32 too.
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
  layer_decay = config.get('layer_lr_decay', 1.0)
  if layer_decay != 1:
    optimizer = optax.chain(optimizer, scale_by_layer_decay(layer_decay))
  if config.max_grad_norm > 0:
    return optax.chain(optax.clip_by_global_norm(config.max_grad_norm), optimizer)
  return optimizer
