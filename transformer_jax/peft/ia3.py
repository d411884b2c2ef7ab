"""IA3: learned rescaling of keys, values and feed-forward activations (Liu et al. 2022,
"Few-Shot Parameter-Efficient Fine-Tuning is Better and Cheaper than In-Context
Learning", section 3.3).

Every attention's keys and values are multiplied elementwise by vectors l_k, l_v
([H, K], one per attention), and the feed-forward's hidden activations by l_ff ([F]):
softmax(Q (l_k * K)^T / sqrt(K)) (l_v * V) and (l_ff * act(x W_i)) W_o. All start at 1,
so step 0 equals the base model. Merging folds them into the weights: the key and value
kernels (and the value bias) are scaled along their output axes, W_o's rows by l_ff.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.peft import core


class IA3(core.Method):
  name = 'ia3'
  FIELDS = ()
  MERGEABLE = True

  def select(self, sites):
    return [s for s in sites if s.kind == 'dense' and s.path[-1] in ('key', 'value', 'wo')]

  def describe_targets(self):
    return "layers named 'key', 'value' and 'wo'"

  def init(self, rng, base):
    del rng, base
    tree = {}
    for site in self.sites:
      # key/value: scale their outputs [H, K]; wo: scale its input [F].
      shape = site.in_shape if site.path[-1] == 'wo' else site.out_shape
      core.set_path(tree, site.path, {'ia3_scale': jnp.ones(shape, jnp.float32)})
    return tree

  def intercept(self, tree, training):
    del training
    sites = {s.path: s for s in self.sites}

    def interceptor(next_fun, args, kwargs, context):
      site = sites.get(tuple(context.module.path)) if context.method_name == '__call__' else None
      if site is None:
        return next_fun(*args, **kwargs)
      scale = core.get_path(tree, site.path)['ia3_scale']
      if site.path[-1] == 'wo':
        x = args[0]
        return next_fun(x * scale.astype(x.dtype), *args[1:], **kwargs)
      out = next_fun(*args, **kwargs)
      return out * scale.astype(out.dtype)

    return interceptor

  def merge(self, base, tree):
    merged = jax.tree.map(lambda x: x, base)
    for site in self.sites:
      scale = core.get_path(tree, site.path)['ia3_scale']
      layer = core.get_path(merged, site.path)
      kernel = layer['kernel']
      if site.path[-1] == 'wo':  # kernel [F, D]: row f times l_ff[f].
        layer['kernel'] = (kernel * scale.reshape(scale.shape + (1,) * (kernel.ndim - scale.ndim))
                           ).astype(kernel.dtype)
      else:  # kernel [D, H, K]: output axes times l.
        layer['kernel'] = (kernel * scale).astype(kernel.dtype)
        if 'bias' in layer:
          layer['bias'] = (layer['bias'] * scale).astype(layer['bias'].dtype)
    return merged
