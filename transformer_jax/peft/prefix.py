"""Prefix tuning (Li & Liang 2021, "Prefix-Tuning: Optimizing Continuous Prompts for
Generation", sections 4.1-4.3): P trainable key and value vectors prepended at every
attention: encoder self-attention, decoder self-attention and cross-attention.

An attention with projected keys K [B, Tk, H, Kh] and values V attends over
[P_k; K] and [P_v; V] ([B, P + Tk, H, Kh]); every query sees the P prefix positions
(they belong to no segment, so packed rows stay independent). Incremental decoding
prepends the same prefixes to the cached keys and values at every step, so cached
decoding equals the full pass.

Parameters: directly the prefixes, P_k and P_v [P, H, Kh] per attention, initialized
from the activations of real words (the site's key and value projections of the
embeddings of `prefix_length` random vocabulary entries, normalized like a LayerNorm
output: section 7.2 finds this better than random); or, with `prefix_mlp_hidden` = M > 0,
the reparameterization of section 4.3: P = MLP(E), a table E [P, D] and a two-layer tanh
MLP D -> M -> (attentions x 2 x H x Kh) shared by all attentions, trained in its place
(the prefixes it gives could be stored instead after training).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.peft import core

NAME = 'prefix'


def _embedding_table(base):
  table = core.get_path(base, ('source_embedder', 'embed', 'embedding'))
  return None if table is None else jnp.asarray(table, jnp.float32)


class PrefixTuning(core.Method):
  name = 'prefix'
  FIELDS = ('prefix_length', 'prefix_mlp_hidden')

  def select(self, sites):
    return [s for s in sites if s.kind == 'attention']

  def describe_targets(self):
    return 'attention layers'

  @property
  def length(self) -> int:
    return self.settings['prefix_length']

  def init(self, rng, base):
    p, m = self.length, self.settings['prefix_mlp_hidden']
    first = self.sites[0]
    heads, head_dim, d = first.num_heads, first.head_dim, first.d_model
    if m > 0:
      k1, k2, k3 = jax.random.split(rng, 3)
      out = len(self.sites) * 2 * heads * head_dim
      return {'prefix_mlp': {
          'embedding': jax.random.normal(k1, (p, d)),
          'w1': jax.random.normal(k2, (d, m)) * (2.0 / (d + m)) ** 0.5,
          'b1': jnp.zeros((m,)),
          'w2': jax.random.normal(k3, (m, out)) * (2.0 / (m + out)) ** 0.5,
          'b2': jnp.zeros((out,))}}
    table = _embedding_table(base)
    tree = {}
    for i, site in enumerate(self.sites):
      key_layer = core.get_path(base, site.path + ('key',))
      value_layer = core.get_path(base, site.path + ('value',))
      rng_i = jax.random.fold_in(rng, i)
      if table is not None and key_layer is not None and value_layer is not None:
        x = table[jax.random.randint(rng_i, (p,), 4, table.shape[0])]  # [P, D]
        x = (x - x.mean(-1, keepdims=True)) / (x.std(-1, keepdims=True) + 1e-6)
        keys = jnp.einsum('pd,dhk->phk', x, jnp.asarray(key_layer['kernel'], jnp.float32))
        values = jnp.einsum('pd,dhk->phk', x, jnp.asarray(value_layer['kernel'], jnp.float32))
        if 'bias' in value_layer:
          values = values + jnp.asarray(value_layer['bias'], jnp.float32)
      else:
        keys, values = jax.random.normal(rng_i, (2, p, site.num_heads, site.head_dim)) * 0.02
      core.set_path(tree, site.path + (NAME,), {'key': keys, 'value': values})
    return tree

  def prefixes(self, tree) -> dict:
    """{site path: (P_k, P_v)}, each [P, H, Kh]."""
    if 'prefix_mlp' in tree:
      w = tree['prefix_mlp']
      first = self.sites[0]
      out = jnp.tanh(w['embedding'] @ w['w1'] + w['b1']) @ w['w2'] + w['b2']
      out = out.reshape(self.length, len(self.sites), 2, first.num_heads, first.head_dim)
      return {s.path: (out[:, i, 0], out[:, i, 1]) for i, s in enumerate(self.sites)}
    return {s.path: (core.get_path(tree, s.path + (NAME,))['key'],
                     core.get_path(tree, s.path + (NAME,))['value']) for s in self.sites}

  def intercept(self, tree, training):
    del training
    prefixes = self.prefixes(tree)

    def interceptor(next_fun, args, kwargs, context):
      if context.method_name != 'attend' or tuple(context.module.path) not in prefixes:
        return next_fun(*args, **kwargs)
      queries, keys, values, mask, *rest = args
      prefix_k, prefix_v = prefixes[tuple(context.module.path)]
      batch = keys.shape[0]
      grow = lambda p: jnp.broadcast_to(p.astype(keys.dtype), (batch,) + p.shape)
      keys = jnp.concatenate([grow(prefix_k), keys], axis=1)        # [B, P + Tk, H, Kh]
      values = jnp.concatenate([grow(prefix_v), values], axis=1)
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (self.length,), bool), mask], -1)
      return next_fun(queries, keys, values, mask, *rest, **kwargs)

    return interceptor
