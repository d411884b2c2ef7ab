"""Prompt tuning (Lester et al. 2021, "The Power of Scale for Parameter-Efficient Prompt
Tuning", section 2): P trainable embeddings prepended to the encoder's input.

The encoder embeds its tokens (`Encoder.embed`: [B, S, D] and the attention mask), then
the prompt [P, D] is prepended ([B, P + S, D]; every position sees the prompt, and the
prompt sees every real token), the layers run over P + S positions, and the P prompt
outputs are dropped again, so heads and cross-attention read the S token positions as
without a prompt. (Lester et al.'s T5 decoder also attends to the prompt's outputs; here
the prompt acts through the encoder's self-attention only.) Packed rows are refused
(`config_schema`): one prompt per row would join the pairs packed into it.

The prompt is initialized from the embeddings of `prompt_length` random vocabulary
entries (section 3.2: better than random init), scaled like the model's token embeddings
(and normalized, if the model normalizes them: BERT).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from transformer_jax.peft import core
from transformer_jax.peft import prefix

NAME = 'prompt'


class PromptTuning(core.Method):
  name = 'prompt'
  FIELDS = ('prompt_length',)

  def select(self, sites):
    return [s for s in sites if s.kind == 'encoder']

  def describe_targets(self):
    return 'an encoder'

  def init(self, rng, base):
    p = self.settings['prompt_length']
    tree = {}
    table = prefix._embedding_table(base)  # pylint: disable=protected-access
    for i, site in enumerate(self.sites):
      rng_i = jax.random.fold_in(rng, i)
      if table is None:
        prompt = jax.random.normal(rng_i, (p, site.d_model)) * 0.5
      else:
        prompt = table[jax.random.randint(rng_i, (p,), 4, table.shape[0])] * site.embed_scale
        if site.embed_norm:  # As the embeddings leave a LayerNorm.
          prompt = ((prompt - prompt.mean(-1, keepdims=True))
                    / (prompt.std(-1, keepdims=True) + 1e-6))
      core.set_path(tree, site.path + (NAME,), prompt)
    return tree

  def intercept(self, tree, training):
    del training
    sites = {s.path for s in self.sites}
    p = self.settings['prompt_length']

    def interceptor(next_fun, args, kwargs, context):
      path = tuple(context.module.path)
      if path not in sites or context.method_name not in ('embed', '__call__'):
        return next_fun(*args, **kwargs)
      if context.method_name == '__call__':
        return next_fun(*args, **kwargs)[:, p:]  # [B, P + S, D] -> [B, S, D]
      x, mask = next_fun(*args, **kwargs)  # [B, S, D], bool [B, 1, 1, S]
      prompt = core.get_path(tree, path + (NAME,)).astype(x.dtype)
      x = jnp.concatenate([jnp.broadcast_to(prompt, (x.shape[0],) + prompt.shape), x], 1)
      mask = jnp.concatenate([jnp.ones(mask.shape[:-1] + (p,), bool), mask], -1)
      return x, mask

    return interceptor
