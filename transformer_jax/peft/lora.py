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

An embedding table E [V, D] (target 'embed', the token table of an Embedder) is the same
product with a one-hot input: token t embeds to E[t] + (alpha / r) A[t] B, A: [V, r],
B: [r, D], here with A = 0 and B ~ N(0, 1) (as HF PEFT's LoRA for embedding layers: the
rows of A are what each token learns) and no dropout. Where the output logits reuse the
table (`Embed.attend`, tied embeddings), they use E + (alpha / r) A B as well, so the
merged table computes the same model. LoRA on the table lets a frozen model learn token
embeddings it never trained, e.g. a new source language's, for r (V + D) parameters
instead of V D.
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
    return [s for s in sites if s.kind in ('dense', 'embed')
            and any(r.fullmatch(s.name) or r.fullmatch(s.path[-1]) for r in rules)]

  def describe_targets(self):
    return f"lora_targets={tuple(self.settings['lora_targets'])}"

  def init(self, rng, base):
    tree, rank = {}, self.settings['lora_rank']
    for i, site in enumerate(self.sites):
      n, m = math.prod(site.in_shape), math.prod(site.out_shape)
      rng_i = jax.random.fold_in(rng, i)
      if site.kind == 'embed':
        a = jnp.zeros((n, rank), jnp.float32)
        b = jax.random.normal(rng_i, (rank, m), jnp.float32)
      else:
        bound = 1.0 / math.sqrt(n)  # kaiming_uniform(a=sqrt(5)) of an [n, r] matrix.
        a = jax.random.uniform(rng_i, (n, rank), jnp.float32, -bound, bound)
        b = jnp.zeros((rank, m), jnp.float32)
      core.set_path(tree, site.path, {'lora_a': a, 'lora_b': b})
    return tree

  def intercept(self, tree, training):
    sites = {s.path: s for s in self.sites}
    rate, scale = self.settings['lora_dropout'], self.scale

    def interceptor(next_fun, args, kwargs, context):
      out = next_fun(*args, **kwargs)
      site = sites.get(tuple(context.module.path))
      if site is None or context.method_name not in (
          ('__call__', 'attend') if site.kind == 'embed' else ('__call__',)):
        return out
      leaves = core.get_path(tree, site.path)
      x = args[0]
      if site.kind == 'embed':
        a, b = leaves['lora_a'].astype(out.dtype), leaves['lora_b'].astype(out.dtype)
        if context.method_name == '__call__':  # tokens int [...] -> [..., D]
          return out + scale * (a[x] @ b)
        return out + scale * ((x.astype(out.dtype) @ b.T) @ a.T)  # [..., D] -> [..., V]
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
      name = 'embedding' if site.kind == 'embed' else 'kernel'
      delta = self.scale * (leaves['lora_a'] @ leaves['lora_b'])
      layer[name] = (layer[name] + delta.reshape(layer[name].shape)).astype(layer[name].dtype)
    return merged
