"""LoRA: low-rank updates of chosen projections (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models", section 4.1).

A targeted Dense layer with kernel W (its input axes flattened to n, its output axes to
m) computes

  h = x W + b + (alpha / r) * Dropout(x) A B,    A: [n, r], B: [r, m],

with A initialized like a Dense kernel (Kaiming-uniform, a = sqrt(5), as the reference
implementation and HF PEFT) and B = 0, so step 0 equals the base model. Merging writes
W + (alpha / r) A B (reshaped to W's shape). Targets are regexes over the layer's
'/'-joined module path ('encoder/layers_0/self_attention/query'); one matches a layer when
it `re.fullmatch`es the path or its last name, so ('query', 'value') is the paper's
choice, W_q and W_v of every attention.
"""
from __future__ import annotations

import math
import re

import jax
import jax.numpy as jnp

from transformer_jax.peft import core


class LoRA(core.Method):
  name = 'lora'
  FIELDS = ('lora_rank', 'lora_alpha', 'lora_dropout', 'lora_targets')
  MERGEABLE = True

  @property
  def scale(self) -> float:
    return self.settings['lora_alpha'] / self.settings['lora_rank']

  def select(self, sites):
    rules = [re.compile(t) for t in self.settings['lora_targets']]
    return [s for s in sites if s.kind == 'dense'
            and any(r.fullmatch(s.name) or r.fullmatch(s.path[-1]) for r in rules)]

  def describe_targets(self):
    return f"lora_targets={tuple(self.settings['lora_targets'])}"

  def init(self, rng, base):
    tree, rank = {}, self.settings['lora_rank']
    for i, site in enumerate(self.sites):
      n, m = math.prod(site.in_shape), math.prod(site.out_shape)
      bound = 1.0 / math.sqrt(n)  # kaiming_uniform(a=sqrt(5)) of an [n, r] matrix.
      a = jax.random.uniform(jax.random.fold_in(rng, i), (n, rank), jnp.float32, -bound, bound)
      core.set_path(tree, site.path, {'lora_a': a, 'lora_b': jnp.zeros((rank, m), jnp.float32)})
    return tree

  def intercept(self, tree, training):
    sites = {s.path: s for s in self.sites}
    rate, scale = self.settings['lora_dropout'], self.scale

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      site = sites.get(tuple(context.module.path)) if context.method_name == '__call__' else None
      if site is None:
        return out
      leaves = core.get_path(tree, site.path)
      x = args[0]
      lead = x.shape[:x.ndim - len(site.in_shape)]
      x = core.dropout(context.module, x.reshape(*lead, -1), rate, training)  # [..., n]
      delta = (x @ leaves['lora_a'].astype(x.dtype)) @ leaves['lora_b'].astype(x.dtype)
      return out + (scale * delta).reshape(out.shape).astype(out.dtype)

    return interceptor

  def merge(self, base, tree):
    merged = jax.tree.map(lambda x: x, base)
    for site in self.sites:
      leaves = core.get_path(tree, site.path)
      layer = core.get_path(merged, site.path)
      kernel = layer['kernel']
      delta = self.scale * (leaves['lora_a'] @ leaves['lora_b'])
      layer['kernel'] = (kernel + delta.reshape(kernel.shape)).astype(kernel.dtype)
    return merged
