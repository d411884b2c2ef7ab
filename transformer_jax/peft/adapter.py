"""Bottleneck adapters (Houlsby et al. 2019, "Parameter-Efficient Transfer Learning for
NLP", section 2.1 and figure 2).

After every attention (self and cross) and every feed-forward sub-layer, before its
output joins the residual stream, an adapter maps h [..., D] to

  h + ReLU(h W_down + b_down) W_up + b_up,    W_down: [D, m], W_up: [m, D],

m = `adapter_size`. W_down starts as a small Gaussian (std 0.01) and W_up, b_down, b_up
at 0, so step 0 equals the base model (the paper's near-identity initialization, made
exact). Adapters add layers, so they cannot be merged into the base.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.peft import core

NAME = 'adapter'  # The method's parameters sit under this name at each site.


class BottleneckAdapter(core.Method):
  name = 'adapter'
  FIELDS = ('adapter_size',)

  def select(self, sites):
    return [s for s in sites if s.kind in ('attention', 'feed_forward')]

  def describe_targets(self):
    return 'attention or feed-forward sub-layers'

  def init(self, rng, base):
    del base
    tree, m = {}, self.settings['adapter_size']
    for i, site in enumerate(self.sites):
      d = site.d_model
      core.set_path(tree, site.path + (NAME,), {
          'down_kernel': 0.01 * jax.random.normal(jax.random.fold_in(rng, i), (d, m)),
          'down_bias': jnp.zeros((m,), jnp.float32),
          'up_kernel': jnp.zeros((m, d), jnp.float32),
          'up_bias': jnp.zeros((d,), jnp.float32)})
    return tree

  def intercept(self, tree, training):
    del training
    methods = {'attention': 'attend', 'feed_forward': '__call__'}
    sites = {s.path: s for s in self.sites}

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      site = sites.get(tuple(context.module.path))
      if site is None or context.method_name != methods[site.kind]:
        return out
      w = core.get_path(tree, site.path + (NAME,))
      cast = lambda a: a.astype(out.dtype)
      hidden = jax.nn.relu(out @ cast(w['down_kernel']) + cast(w['down_bias']))  # [..., m]
      return out + hidden @ cast(w['up_kernel']) + cast(w['up_bias'])

    return interceptor
