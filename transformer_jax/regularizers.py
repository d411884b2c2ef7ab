"""Regularizers that compose with any task's loss: adversarial training on the token
embeddings (FGM, PGD, FreeLB), R-Drop, and an exponential moving average of the parameters.

  adversarial='fgm'     Miyato et al. 2017, "Adversarial Training Methods for
                        Semi-Supervised Text Classification" (one normalized gradient step)
  adversarial='pgd'     Madry et al. 2018, "Towards Deep Learning Models Resistant to
                        Adversarial Attacks" (K projected gradient steps)
  adversarial='freelb'  Zhu et al. 2020, "FreeLB: Enhanced Adversarial Training for Natural
                        Language Understanding" (Algorithm 1: gradients averaged over K steps)
  r_drop_alpha > 0      Liang et al. 2021, "R-Drop: Regularized Dropout for Neural Networks"
  ema_decay > 0         Polyak & Juditsky 1992 averaging, exponential form (as Optax's
                        `optax.ema(decay, debias=True)`)

None of them changes a task. The adversarial and R-Drop ones wrap a task's loss
(`train.LossFn`, (params, batch, dropout_rng) -> (loss, metrics)) into another loss of the
same signature (`wrap`, which the trainer applies once before jitting the train step; R-Drop
also wraps the task's `losses.LossFn` in `losses.get_loss`). The EMA lives in the train state
(`train.TrainState.ema`), updated by `train.train_step` with `ema_update`.

Adversarial perturbations are added to the output of every call of the token embedding table
(the `nn.Embed` named 'embed' inside a `models.Embedder`; its [B, L, D] lookup, before the
sqrt(D) scale, the positions and the token types, which are never perturbed), through a Flax
method interceptor (`flax.linen.intercept_methods`, as `transformer_jax.peft` does): the
encoder's and the decoder's inputs share one table but are separate calls, so each gets its
own perturbation. Calls are keyed by their order in the loss (found once per trace by
`jax.eval_shape` of the loss under a recording interceptor). Padding positions (token id 0)
get no perturbation: the perturbation is multiplied by the mask of real tokens, so its
gradient there is 0 too, and the norms below count real positions only. Epsilon is measured
in the units of the embedding table (before the sqrt(D) scale of `scale_embeddings`).

Norms are per example (per row of the batch; with packing, per packed row) over its [L, D]
perturbation of one call: ||g||_b = sqrt(sum_{l, d} g[b, l, d]^2), as Miyato et al. (section
3: g is the gradient w.r.t. the concatenated embeddings of one example) and Zhu et al.
(Algorithm 1, the Frobenius norm of each example's delta) define them.

Dropout: every pass of one loss evaluation (clean, the ascent steps, the adversarial pass)
reuses the step's dropout rng, so all of them drop the same units: the perturbation is the
worst case for the network it was computed on, and FreeLB's K steps see one network, as Zhu
et al. (section 3.3) prescribe. (R-Drop, by contrast, needs two different masks: its two
copies of a row are different rows of one doubled batch, and draw different bits.)

Cost (a train step of the plain loss is about 3 units: a forward, a backward of 2): each
pass computes its gradients itself (`jax.value_and_grad` inside the loss) and hands the
parameter gradients to the outer differentiation through a custom VJP (`_with_gradient`),
so no backward is repeated and a pass's activations need not live until the end of the
step (plus one parameter-sized gradient buffer): FGM about 6 units (2x), PGD with K steps
about 3 + 2(K - 1) + 3 (the ascent steps after the clean one need no weight gradients),
FreeLB about 3K. With PEFT the weight gradients of the frozen base are computed by no pass:
they are unused, and XLA removes them (checked on compiled FLOPs: FGM on a model whose
head alone is trained costs 3 units, not 6). benchmarks/regularizers.py measures it. The
trainer's throughput log (examples/s, GFLOP/s, MFU) counts the model FLOPs of the plain
step (`Task.batch_stats`), not these extra passes, nor R-Drop's doubled batch.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import sys
from typing import Any, Callable

from absl import logging
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import config_schema
from transformer_jax import models
from transformer_jax.tokenizer import PAD_ID

LossFn = Callable[[Any, dict, jax.Array], tuple[jax.Array, dict]]  # `train.LossFn`.

ADVERSARIAL_METHODS = ('', 'fgm', 'pgd', 'freelb')


# --- Adversarial training on the token embeddings ------------------------------------------

def _is_token_embedding(context) -> bool:
  """Whether an intercepted call is the token lookup `Embedder.embed(tokens)` (not `attend`,
  not the position or type tables)."""
  module = context.module
  return (context.method_name == '__call__' and isinstance(module, nn.Embed)
          and module.name == 'embed' and isinstance(module.parent, models.Embedder))


def _real(tokens: jax.Array) -> jax.Array:
  """int [B, L] -> float32 [B, L, 1]: 1 at real tokens, 0 at padding."""
  return (tokens != PAD_ID).astype(jnp.float32)[..., None]


def embedding_shapes(loss_fn: LossFn, params, batch: dict, dropout_rng) -> list:
  """The outputs of the token-embedding calls of one evaluation of `loss_fn`, in call order:
  a list of jax.ShapeDtypeStruct [B, L, D] (abstract: `jax.eval_shape`, no FLOPs).

  Raises:
    config_schema.ConfigError: the loss calls no `models.Embedder` (a model without one
      cannot be perturbed).
  """
  found = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if _is_token_embedding(context):
      found.append(jax.ShapeDtypeStruct(out.shape, out.dtype))
    return out

  with nn.intercept_methods(record):
    jax.eval_shape(lambda: loss_fn(params, batch, dropout_rng))
  if not found:
    raise config_schema.ConfigError(
        'config.adversarial: the loss calls no token embedding (an nn.Embed named '
        "'embed' inside a models.Embedder) to perturb")
  return found


@contextlib.contextmanager
def perturbed(deltas: list, init: Callable | None = None):
  """Within it, call i of the token embedding (in call order) returns its lookup plus a
  perturbation at its real tokens (padding positions keep their lookup): deltas[i]
  (float32 [B, L, D]), plus `init(i, real)` when given (real: float32 [B, L, 1], 1 at real
  tokens), cast to the lookup's dtype.

  Yields:
    A list that receives, call by call, the perturbation applied (float32 [B, L, D],
    0 at padding).
  """
  applied = []

  def add(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    if not _is_token_embedding(context):
      return out
    i = len(applied)
    if i >= len(deltas):
      raise ValueError(f'adversarial training: the loss called the token embedding more '
                       f'than the {len(deltas)} times it was traced with')
    real = _real(args[0])
    delta = deltas[i] if init is None else deltas[i] + init(i, real)
    applied.append(delta * real)
    return out + applied[-1].astype(out.dtype)

  with nn.intercept_methods(add):
    yield applied


def _row_norm(x: jax.Array) -> jax.Array:
  """float [B, L, D] -> float32 [B, 1, 1]: the Frobenius norm of each row's [L, D]."""
  return jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(1, 2), keepdims=True))


def normalize(g: jax.Array) -> jax.Array:
  """g / ||g|| per row (`_row_norm`); rows whose gradient is 0 (all padding) stay 0.
  float [B, L, D] -> float32 [B, L, D]."""
  norm = _row_norm(g)
  return jnp.where(norm > 0, g / jnp.where(norm > 0, norm, 1.0), 0.0)


def project(delta: jax.Array, epsilon: float) -> jax.Array:
  """The projection onto the ball ||delta_b|| <= epsilon of each row b (Madry et al. 2018,
  the PGD step's Pi): rows outside it scaled back onto its surface. [B, L, D] -> same."""
  norm = _row_norm(delta)
  return delta * jnp.minimum(1.0, epsilon / jnp.maximum(norm, 1e-30))


@jax.custom_vjp
def _with_gradient(params, value, grads):
  """`value`, whose gradient w.r.t. `params` is `grads` (computed by the caller)."""
  del params, grads
  return value


def _with_gradient_fwd(params, value, grads):
  del params
  return value, grads


def _with_gradient_bwd(grads, cotangent):
  return jax.tree.map(lambda g: (cotangent * g).astype(g.dtype), grads), None, None


_with_gradient.defvjp(_with_gradient_fwd, _with_gradient_bwd)


def adversarial_loss(loss_fn: LossFn, method: str, epsilon: float, steps: int = 1,
                     step_size: float = 1.0) -> LossFn:
  """`loss_fn` trained adversarially on its token embeddings (see the module docstring for
  where the perturbation goes, its norms, padding and dropout).

  With L(delta) the loss at embeddings e + delta (delta: one [B, L, D] per embedding call),
  g(delta) its gradient w.r.t. delta, and norms and projections per row:

    fgm     r = epsilon * g(0) / ||g(0)||  (Miyato et al. 2017, section 3: the L2-normalized
            gradient w.r.t. the example's embeddings, after Goodfellow et al. 2015's fast
            gradient method); loss = L(0) + L(r), their clean plus adversarial loss.
    pgd     delta_0 = 0, delta_{t+1} = Proj_eps(delta_t + step_size * g(delta_t) /
            ||g(delta_t)||) for t < K  (Madry et al. 2018, the L2 PGD attack);
            loss = L(0) + L(delta_K): the same clean + adversarial objective as fgm, so that
            K = 1 with step_size = epsilon is fgm.
    freelb  delta_0 = U(-1, 1)^{L x D} * epsilon / sqrt(N_b) per row b, N_b = its real
            tokens x D (Zhu et al. 2020, Algorithm 1's initialization, with its magnitude
            sigma = epsilon), then the pgd ascent for K - 1 steps; loss = (1/K) sum_{t<K}
            L(delta_t), so the parameter gradient is the average of the K gradients
            (Algorithm 1's accumulated g_K). There is no clean pass.

  Every delta is held constant (`jax.lax.stop_gradient`) when the parameters are
  differentiated, as in all three papers.

  Args:
    loss_fn: a task's loss, (params, batch, dropout_rng) -> (float32 scalar, metrics).
    method: 'fgm', 'pgd' or 'freelb'.
    epsilon: > 0, the radius of the ball of each row's perturbation.
    steps: K >= 1, ascent steps (pgd, freelb; fgm: 1).
    step_size: > 0, the ascent step alpha (pgd, freelb).

  Returns:
    A loss of the same signature. Its metrics are those of `loss_fn` at the clean pass
    (freelb: at delta_0), with 'clean_loss' (fgm, pgd) and 'adversarial_loss' (fgm, pgd:
    L at the final perturbation; freelb: the mean of the K losses, which is the loss).

  Raises:
    ValueError: an unknown method, epsilon, steps or step_size out of range.
    config_schema.ConfigError: (when traced) a loss that calls no `models.Embedder`.
  """
  if method not in ADVERSARIAL_METHODS[1:]:
    raise ValueError(f'adversarial method {method!r}: must be one of {ADVERSARIAL_METHODS[1:]}')
  if not epsilon > 0 or not step_size > 0 or int(steps) != steps or steps < 1:
    raise ValueError(f'adversarial training: epsilon={epsilon!r} and step_size={step_size!r} '
                     f'must be > 0, steps={steps!r} an int >= 1')
  steps = 1 if method == 'fgm' else int(steps)
  alpha = epsilon if method == 'fgm' else step_size

  def loss(params, batch, dropout_rng):
    shapes = embedding_shapes(loss_fn, params, batch, dropout_rng)
    constant = jax.lax.stop_gradient(params)  # Differentiated through `_with_gradient`.

    def at(p, deltas, init):
      with perturbed(deltas, init) as applied:
        value, metrics = loss_fn(p, batch, dropout_rng)
      return value, (metrics, applied)

    def evaluate(deltas, need_params: bool, need_deltas: bool, init=None):
      """(loss, metrics, parameter gradient or None, delta gradients or None, the deltas
      applied)."""
      argnums = tuple(i for i, need in ((0, need_params), (1, need_deltas)) if need)
      (value, (metrics, applied)), grads = jax.value_and_grad(
          at, argnums=argnums, has_aux=True)(constant, deltas, init)
      grads = dict(zip(argnums, grads))
      return value, metrics, grads.get(0), grads.get(1), applied

    def ascend(deltas, delta_grads):
      return [jax.lax.stop_gradient(project(d + alpha * normalize(g), epsilon))
              for d, g in zip(deltas, delta_grads)]

    deltas = [jnp.zeros(s.shape, jnp.float32) for s in shapes]
    if method == 'freelb':
      keys = jax.random.split(jax.random.fold_in(dropout_rng, 0x46524C42), len(shapes))

      def init(i, real):  # delta_0 of call i, from its padding mask: Algorithm 1, line 4.
        n = jnp.sum(real, axis=(1, 2), keepdims=True) * shapes[i].shape[-1]  # [B, 1, 1]
        uniform = jax.random.uniform(keys[i], shapes[i].shape, jnp.float32, -1.0, 1.0)
        return uniform * real * epsilon / jnp.sqrt(jnp.maximum(n, 1.0))

      total_value, total_grads, metrics = 0.0, None, None
      for t in range(steps):
        value, step_metrics, grads, delta_grads, applied = evaluate(
            deltas, True, t < steps - 1, init if t == 0 else None)
        total_value = total_value + value / steps
        scaled = jax.tree.map(lambda g: g / steps, grads)
        total_grads = scaled if total_grads is None else jax.tree.map(jnp.add, total_grads,
                                                                      scaled)
        metrics = step_metrics if metrics is None else metrics
        if t < steps - 1:
          deltas = ascend(applied, delta_grads)
      metrics = {**metrics, 'adversarial_loss': total_value}
      return _with_gradient(params, total_value, total_grads), metrics

    # fgm, pgd: the clean pass gives the first ascent direction.
    clean, metrics, clean_grads, delta_grads, _ = evaluate(deltas, True, True)
    for t in range(steps):
      deltas = ascend(deltas, delta_grads)
      if t < steps - 1:
        _, _, _, delta_grads, _ = evaluate(deltas, False, True)
    adversarial, _, adversarial_grads, _, _ = evaluate(deltas, True, False)
    value = clean + adversarial
    grads = jax.tree.map(jnp.add, clean_grads, adversarial_grads)
    metrics = {**metrics, 'clean_loss': clean, 'adversarial_loss': adversarial}
    return _with_gradient(params, value, grads), metrics

  return loss


# --- R-Drop ---------------------------------------------------------------------------------

@dataclasses.dataclass
class _Pairs:
  """Set while a loss runs on a batch whose rows 2i and 2i + 1 are copies of one row; counts
  the `r_drop_loss_fn` calls that added the consistency term."""
  calls: int = 0


_PAIRED: contextvars.ContextVar[_Pairs | None] = contextvars.ContextVar('r_drop_pairs',
                                                                        default=None)


def symmetric_kl(logits_a: jax.Array, logits_b: jax.Array, weights: jax.Array) -> jax.Array:
  """R-Drop's consistency term (Liang et al. 2021, eq. 2): the symmetric KL divergence
  0.5 * (KL(P_a || P_b) + KL(P_b || P_a)) = 0.5 * sum_v (p_a - p_b)(log p_a - log p_b)
  between the softmax distributions of two logits, averaged over positions weighted by
  `weights` (0 = padding, which counts for nothing whatever its logits, even inf or NaN).

  For one output (regression, V = 1, where that KL is always 0) it is the weighted mean of
  0.5 * (a - b)^2 instead.

  Args:
    logits_a, logits_b: float [..., V].
    weights: float [...].

  Returns:
    float32 scalar: sum(w * kl) / max(sum(w), 1e-8), the normalization of
    `losses.cross_entropy`.
  """
  a, b = logits_a.astype(jnp.float32), logits_b.astype(jnp.float32)
  if a.shape[-1] == 1:
    per_position = 0.5 * jnp.square(a[..., 0] - b[..., 0])
  else:
    log_a, log_b = jax.nn.log_softmax(a, axis=-1), jax.nn.log_softmax(b, axis=-1)
    per_position = 0.5 * jnp.sum((jnp.exp(log_a) - jnp.exp(log_b)) * (log_a - log_b), axis=-1)
  weights = weights.astype(jnp.float32)
  per_position = jnp.where(weights > 0, per_position, 0.0)
  return jnp.sum(per_position * weights) / jnp.maximum(jnp.sum(weights), 1e-8)


def r_drop_loss_fn(loss_fn, alpha: float):
  """A `losses.LossFn` (logits [2B, ...], targets, weights) -> (loss, metrics) that, inside
  `r_drop_loss` (rows 2i and 2i + 1 are two dropout passes of one row), returns
  loss_fn's loss (the mean of the two copies' losses, as they have equal weights) plus
  alpha * `symmetric_kl`(logits[0::2], logits[1::2], weights[0::2]), and the term as metric
  'r_drop_kl'. Anywhere else (evaluation) it is `loss_fn` itself. `losses.get_loss` applies
  it when `config.r_drop_alpha` > 0.

  Liang et al. 2021 (eq. 3) minimize NLL_1 + NLL_2 + alpha' * KL_sym: twice this loss with
  alpha = alpha' / 2.

  Raises:
    ValueError: (when traced inside `r_drop_loss`) logits with an odd number of rows.
  """

  def fn(logits, targets, weights):
    value, metrics = loss_fn(logits, targets, weights)
    pairs = _PAIRED.get()
    if pairs is None:
      return value, metrics
    if logits.shape[0] % 2:
      raise ValueError(f'R-Drop: logits of {logits.shape[0]} rows; the doubled batch has pairs '
                       'of rows 2i, 2i + 1 (is the leading axis the batch?)')
    pairs.calls += 1
    kl = symmetric_kl(logits[0::2], logits[1::2], weights[0::2])
    return value + alpha * kl, {**metrics, 'r_drop_kl': kl}

  return fn


def r_drop_loss(loss_fn: LossFn) -> LossFn:
  """R-Drop (Liang et al. 2021) around a task's loss: every batch array [B, ...] is doubled
  (`jnp.repeat(x, 2, axis=0)`: rows 2i and 2i + 1 are row i, so that a pair sits on one
  device when rows are sharded), the loss runs once on the 2B rows with the step's dropout
  rng (the copies draw different dropout masks), and its `losses.LossFn`
  (`r_drop_loss_fn`, from `losses.get_loss`) adds the consistency term. Metrics named
  'num_*' are counts over the doubled batch and are halved, so that 'num_tokens' counts
  the batch's real tokens (gradient accumulation weighs micro-batches by it: `train.LossFn`).

  Raises:
    config_schema.ConfigError: (when traced) the task's loss did not call the LossFn of
      `losses.get_loss(config)` with R-Drop on (a task with its own loss function).
  """

  def loss(params, batch, dropout_rng):
    doubled = jax.tree.map(
        lambda x: nn.with_logical_constraint(jnp.repeat(x, 2, axis=0),
                                             ('batch',) + (None,) * (jnp.ndim(x) - 1)), batch)
    pairs = _Pairs()
    token = _PAIRED.set(pairs)
    try:
      value, metrics = loss_fn(params, doubled, dropout_rng)
    finally:
      _PAIRED.reset(token)
    if not pairs.calls:
      raise config_schema.ConfigError(
          "config.r_drop_alpha: the task's loss never called the loss function of "
          'losses.get_loss(config), which adds the KL term')
    return value, {k: v / 2 if k.startswith('num_') else v for k, v in metrics.items()}

  return loss


# --- Exponential moving average of the parameters -------------------------------------------

def ema_update(ema: Any, params: Any, decay: float, step: jax.Array) -> Any:
  """The debiased exponential moving average after update `step` = t >= 1 (1 for the first
  update) of `params`, from the one after update t - 1.

  The average is Optax's `optax.ema(decay, debias=True)` (Kingma & Ba 2015's bias
  correction): mu_t = d mu_{t-1} + (1 - d) params_t from mu_0 = 0, and the average is
  mu_t / (1 - d^t), a weighted mean of params_1..params_t alone (the random or pretrained
  initialization gets no weight, so early evaluations are not pulled towards it). It is
  kept in its debiased form: ema_t = ema_{t-1} + w_t (params_t - ema_{t-1}) with w_t =
  (1 - d) / (1 - d^t) (1 at t = 1: ema_1 = params_1), which equals mu_t / (1 - d^t) for
  any ema_0. (TensorFlow's ExponentialMovingAverage instead starts from the initial values
  and, given num_updates, caps the decay at (1 + t) / (10 + t).)

  Args:
    ema: float32 pytree, the average after t - 1 updates.
    params: float32 pytree of the same structure, the parameters after update t.
    decay: d in [0, 1).
    step: int scalar t >= 1 (may be traced).

  Returns:
    The average after t updates, float32 like `ema`.
  """
  one_minus_d = 1.0 - decay  # In float64: 1 - d keeps its digits for d near 1.
  t = jnp.asarray(step, jnp.float32)
  bias = -jnp.expm1(t * np.log1p(-one_minus_d))  # 1 - d^t, accurate for d near 1.
  weight = jnp.float32(one_minus_d) / bias
  return jax.tree.map(lambda e, p: e + weight * (p.astype(e.dtype) - e), ema, params)


# --- Selection by config --------------------------------------------------------------------

def wrap(config, loss_fn: LossFn) -> LossFn:
  """`loss_fn` (a task's `loss`) with the config's loss regularizers: R-Drop
  (`config.r_drop_alpha` > 0; the task's `losses.get_loss` adds its term) inside, then the
  adversarial method (`config.adversarial`). The loss itself when none is on; a config
  without the fields has none."""
  if config.get('r_drop_alpha', 0.0) > 0:
    loss_fn = r_drop_loss(loss_fn)
  method = config.get('adversarial', '')
  if method:
    loss_fn = adversarial_loss(loss_fn, method, config.adversarial_epsilon,
                               config.adversarial_steps, config.adversarial_step_size)
  return loss_fn


def describe(config) -> str:
  """One line for train.log naming the regularizers on ('' when none is):
  'Regularizers: pgd (epsilon 0.1, 3 steps of 0.05); R-Drop (alpha 5); EMA of the parameters
  (decay 0.999, debiased): evaluation, the best checkpoint, the test and
  eval/predict/export use the EMA'."""
  parts = []
  method = config.get('adversarial', '')
  if method == 'fgm':
    parts.append(f'fgm (epsilon {config.adversarial_epsilon:g})')
  elif method:
    parts.append(f'{method} (epsilon {config.adversarial_epsilon:g}, '
                 f'{config.adversarial_steps} steps of {config.adversarial_step_size:g})')
  if config.get('r_drop_alpha', 0.0) > 0:
    parts.append(f'R-Drop (alpha {config.r_drop_alpha:g})')
  if config.get('ema_decay', 0.0) > 0:
    parts.append(f'EMA of the parameters (decay {config.ema_decay:g}, debiased): '
                 'evaluation, the best checkpoint, the test and eval/predict/export use '
                 'the EMA')
  return 'Regularizers: ' + '; '.join(parts) if parts else ''


def log(config) -> None:
  """Writes `describe(config)` to the log (train.log) and the console when a regularizer
  is on."""
  line = describe(config)
  if line:
    logging.info('%s', line)
    if jax.process_index() == 0:
      print(line, file=sys.stderr)
