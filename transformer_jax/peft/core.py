"""What every parameter-efficient method shares: the sites it can change, the two
parameter trees, and the hook that changes the base model's computation.

The base model's code knows nothing of PEFT. A method changes it through a Flax method
interceptor (`flax.linen.intercept_methods`): while the base model is applied, every call
of a module method goes through the method's `intercept`, which may change the call's
inputs, its output, or both, for the modules it targets (found by their path, e.g.
('encoder', 'layers_0', 'self_attention', 'query')). The interceptor reads the method's
parameters from the trainable tree it was built with, so they are traced arguments of the
jitted step like the base parameters, never constants.

`Params(base, trainable)` is what tasks receive in a PEFT run wherever they otherwise get
the parameter tree; `PeftModel` stands in for the task's model and applies the method when
it is given one.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax
import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp

Tree = dict


@flax.struct.dataclass
class Params:
  """The parameters of a PEFT run, as one pytree.

  Attributes:
    base: the frozen base model's parameters ({'encoder': ..., ...}).
    trainable: {'peft': the method's tree (nested by module path), 'base': base parameters
      trained in full (`peft_modules_to_save`, e.g. a new classification head), nested
      like `base`; they replace their frozen values}.
  """
  base: Any
  trainable: Any


@dataclasses.dataclass(frozen=True)
class Site:
  """A place in the base model a method can change, found by `discover_sites`.

  kind 'dense': a Dense or DenseGeneral layer; `in_shape` are the kernel's input axes,
    `out_shape` its output axes (query: (D,), (H, K); out: (H, K), (D,)).
  kind 'embed': an Embed table (its lookup `__call__` and, where the output logits reuse
    it, `attend`); `in_shape` is (vocabulary size,), `out_shape` (D,).
  kind 'attention': a MultiHeadAttention (its `attend`), with num_heads, head_dim, d_model.
  kind 'feed_forward': a FeedForward, with d_model and d_ff.
  kind 'encoder': an Encoder stack, with d_model, and how its token embeddings are
    scaled (`embed_scale`: sqrt(D) or 1) and normalized (`embed_norm`: a LayerNorm).
  """
  kind: str
  path: tuple[str, ...]
  in_shape: tuple[int, ...] = ()
  out_shape: tuple[int, ...] = ()
  num_heads: int = 0
  head_dim: int = 0
  d_model: int = 0
  d_ff: int = 0
  embed_scale: float = 1.0
  embed_norm: bool = False

  @property
  def name(self) -> str:
    return '/'.join(self.path)


def discover_sites(init_fn: Callable[[], Any]) -> list[Site]:
  """The sites of a model, in call order, found by running `init_fn` (which initializes
  the model, e.g. `lambda: task.init_params(rng)`) abstractly (`jax.eval_shape`: no
  FLOPs, no memory) with a recording interceptor."""
  sites: dict[tuple, Site] = {}

  def record(next_fun, args, kwargs, context):
    module, method = context.module, context.method_name
    kind = type(module).__name__
    path = tuple(module.path)
    if kind in ('Dense', 'DenseGeneral') and method == '__call__' and path not in sites:
      x = args[0]
      axes = (-1,) if kind == 'Dense' else (
          (module.axis,) if isinstance(module.axis, int) else tuple(module.axis))
      features = module.features if isinstance(module.features, tuple) else (module.features,)
      sites[path] = Site('dense', path, tuple(x.shape[a] for a in axes), tuple(features))
    elif kind == 'Embed' and method == '__call__' and path not in sites:
      sites[path] = Site('embed', path, (module.num_embeddings,), (module.features,))
    elif kind == 'MultiHeadAttention' and method == 'attend' and path not in sites:
      queries, keys = args[0], args[1]
      sites[path] = Site('attention', path, num_heads=keys.shape[-2], head_dim=keys.shape[-1],
                         d_model=queries.shape[-1])
    elif kind == 'FeedForward' and method == '__call__' and path not in sites:
      sites[path] = Site('feed_forward', path, d_model=args[0].shape[-1],
                         d_ff=module.config.d_ff)
    elif kind == 'Encoder' and method == '__call__' and path not in sites:
      cfg = module.config
      sites[path] = Site('encoder', path, d_model=cfg.d_model,
                         embed_scale=cfg.d_model ** 0.5 if cfg.scale_embeddings else 1.0,
                         embed_norm=cfg.embedding_norm)
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    # A new function each time: eval_shape caches its traces by function.
    jax.eval_shape(lambda: init_fn())  # pylint: disable=unnecessary-lambda
  return list(sites.values())


def get_path(tree: Tree, path: tuple[str, ...]) -> Any:
  """tree[path[0]][path[1]]...; None when a key is missing."""
  for key in path:
    if not isinstance(tree, dict) or key not in tree:
      return None
    tree = tree[key]
  return tree


def set_path(tree: Tree, path: tuple[str, ...], value: Any) -> None:
  """tree[path[0]]...[path[-1]] = value, creating the dicts on the way."""
  for key in path[:-1]:
    tree = tree.setdefault(key, {})
  tree[path[-1]] = value


def overlay(base: Tree, replacements: Tree) -> Tree:
  """`base` with the leaves of `replacements` (a nested dict of some of its leaves) put
  in their place."""
  if not replacements:
    return base
  flat = traverse_util.flatten_dict(flax.core.unfreeze(base))
  flat.update(traverse_util.flatten_dict(replacements))
  return traverse_util.unflatten_dict(flat)


class Method:
  """A parameter-efficient fine-tuning method. Subclasses set `name` and `FIELDS`, and
  implement `init` and `intercept` (and `merge` if the method can be folded into the
  base).

  Attributes:
    name: the `config.peft_method` value.
    FIELDS: the config fields it reads, recorded in adapter_config.json.
    MERGEABLE: whether `merge` is implemented.
    sites: the sites it changes (chosen by `select` from the model's sites).
  """
  name = ''
  FIELDS: tuple[str, ...] = ()
  MERGEABLE = False  # Whether `merge` folds the method into the base's weights.

  def __init__(self, settings: dict, sites: list[Site]):
    self.settings = dict(settings)
    self.sites = self.select(sites)
    if not self.sites:
      raise ValueError(f'peft_method={self.name!r}: no module of the model matches '
                       f'{self.describe_targets()}')

  def select(self, sites: list[Site]) -> list[Site]:
    """The sites this method changes."""
    raise NotImplementedError

  def describe_targets(self) -> str:
    return 'the sites it needs'

  def init(self, rng: jax.Array, base: Tree) -> Tree:
    """Freshly initialized parameters of the method (float32), nested by module path."""
    raise NotImplementedError

  def intercept(self, tree: Tree, training: bool) -> Callable:
    """An interceptor (`flax.linen.intercept_methods`) that applies the method with
    parameters `tree`; `training` turns the method's own dropout on (it then draws from
    the 'dropout' rng)."""
    raise NotImplementedError

  def merge(self, base: Tree, tree: Tree) -> Tree:
    """`base` with the method folded into its weights, so that the plain model computes
    what base + method computed.

    Raises:
      ValueError: the method cannot be merged (it adds computation the base lacks).
    """
    raise ValueError(f'peft_method={self.name!r} adds layers or positions to the model; '
                     'only lora and ia3 can be merged into the base parameters')


def dropout(module: nn.Module, x: jax.Array, rate: float, training: bool) -> jax.Array:
  """Inverted dropout of `x` with `module`'s 'dropout' rng (training only)."""
  if not training or rate == 0:
    return x
  keep = jax.random.bernoulli(module.make_rng('dropout'), 1.0 - rate, x.shape)
  return jnp.where(keep, x / (1.0 - rate), 0).astype(x.dtype)
