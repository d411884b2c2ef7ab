"""Transformer encoder-decoder after Vaswani et al. 2017, "Attention Is All You Need".

Pre-LayerNorm variant (Xiong et al. 2020, "On Layer Normalization in the Transformer
Architecture"): every sub-layer computes `x + Dropout(SubLayer(LayerNorm(x)))`, and the
encoder and decoder stacks end with a final LayerNorm.

Shapes: B batch, S source length, T target length, D d_model, H num_heads,
K = D // H head size, F d_ff, V vocab_size. Token id 0 is padding
(`transformer_jax.tokenizer.PAD_ID`).

Every projection is a named `nn.DenseGeneral` (`query`, `key`, `value`, `out`, `wi`,
`wo`), so parameter-efficient methods can address them by path and keep their own
parameters in a pytree apart from these base `params`.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.tokenizer import BOS_ID, PAD_ID

Array = jax.Array


@dataclasses.dataclass(frozen=True)
class TransformerConfig:
  """Hyper-parameters of the model (a frozen subset of the run config)."""
  vocab_size: int
  d_model: int = 512
  num_heads: int = 8
  d_ff: int = 2048
  num_encoder_layers: int = 6
  num_decoder_layers: int = 6
  dropout_rate: float = 0.1
  attention_dropout_rate: float = 0.1
  share_embeddings: bool = True
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32

  @classmethod
  def from_config(cls, config, vocab_size: int) -> 'TransformerConfig':
    """Builds the model config from a run `ConfigDict` (dtypes given by name)."""
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size', 'dtype', 'param_dtype'}
    return cls(vocab_size=vocab_size,
               dtype=jnp.dtype(config.dtype),
               param_dtype=jnp.dtype(config.param_dtype),
               **{name: config[name] for name in fields})


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
  """Sinusoidal position encodings, Vaswani et al. 2017, section 3.5.

  PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(p / 10000^(2i/D)).

  Returns:
    float32 array [length, d_model].
  """
  positions = np.arange(length, dtype=np.float64)[:, None]
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model))
  angles = positions * inv_freq  # [length, D/2]
  pe = np.zeros((length, d_model), dtype=np.float64)
  pe[:, 0::2] = np.sin(angles)
  pe[:, 1::2] = np.cos(angles[:, :d_model // 2])
  return pe.astype(np.float32)


def padding_mask(query_tokens: Array, key_tokens: Array) -> Array:
  """Attention mask that hides padding keys: bool [B, 1, 1, Tk], broadcast over queries.

  Queries at padding positions still attend to the real keys; their outputs are never
  read, and keeping them finite keeps gradients finite.
  """
  del query_tokens
  return (key_tokens != PAD_ID)[:, None, None, :]


def causal_mask(length: int) -> Array:
  """bool [1, 1, T, T]: query t sees keys 0..t."""
  return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def shift_right(targets: Array) -> Array:
  """Decoder inputs: BOS followed by targets[:, :-1]. int32 [B, T] -> int32 [B, T]."""
  bos = jnp.full_like(targets[:, :1], BOS_ID)
  return jnp.concatenate([bos, targets[:, :-1]], axis=1)


class MultiHeadAttention(nn.Module):
  """Scaled dot-product attention over H heads (Vaswani et al. 2017, eq. 1 and 3.2.2)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, queries: Array, keys_values: Array, mask: Array,
               deterministic: bool) -> Array:
    """queries [B, Tq, D], keys_values [B, Tk, D], mask bool broadcastable to
    [B, H, Tq, Tk] (True = attend) -> [B, Tq, D] in `config.dtype`."""
    cfg = self.config
    head_dim = cfg.d_model // cfg.num_heads
    project = lambda name, use_bias=True: nn.DenseGeneral(
        features=(cfg.num_heads, head_dim), use_bias=use_bias, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype, kernel_init=nn.initializers.xavier_uniform(), name=name)
    q = project('query')(queries)      # [B, Tq, H, K]
    # No key bias: it adds the same q.b to every logit of a query, which softmax ignores.
    k = project('key', use_bias=False)(keys_values)  # [B, Tk, H, K]
    v = project('value')(keys_values)  # [B, Tk, H, K]

    logits = jnp.einsum('bqhk,bthk->bhqt', q, k) / np.sqrt(head_dim).astype(cfg.dtype)
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)  # [B, H, Tq, Tk]
    weights = nn.Dropout(cfg.attention_dropout_rate)(weights, deterministic=deterministic)
    context = jnp.einsum('bhqt,bthk->bqhk', weights, v)  # [B, Tq, H, K]

    return nn.DenseGeneral(features=cfg.d_model, axis=(-2, -1), dtype=cfg.dtype,
                           param_dtype=cfg.param_dtype,
                           kernel_init=nn.initializers.xavier_uniform(), name='out')(context)


class FeedForward(nn.Module):
  """Position-wise feed-forward network: W_o ReLU(W_i x) (Vaswani et al. 2017, eq. 2)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """x [B, T, D] -> [B, T, D]."""
    cfg = self.config
    dense = lambda features, name: nn.DenseGeneral(
        features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=nn.initializers.xavier_uniform(), name=name)
    h = nn.relu(dense(cfg.d_ff, 'wi')(x))  # [B, T, F]
    h = nn.Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return dense(cfg.d_model, 'wo')(h)     # [B, T, D]


class EncoderLayer(nn.Module):
  """Pre-LN self-attention and feed-forward sub-layers."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    """x [B, S, D], mask [B, 1, 1, S] -> [B, S, D]."""
    cfg = self.config
    drop = lambda y: nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    h = _layer_norm(cfg, 'self_attention_norm')(x)
    x = x + drop(MultiHeadAttention(cfg, name='self_attention')(h, h, mask, deterministic))
    h = _layer_norm(cfg, 'feed_forward_norm')(x)
    return x + drop(FeedForward(cfg, name='feed_forward')(h, deterministic))


class DecoderLayer(nn.Module):
  """Pre-LN causal self-attention, cross-attention and feed-forward sub-layers."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array,
               deterministic: bool) -> Array:
    """y [B, T, D], encoded [B, S, D], self_mask [B, 1, T, T], cross_mask [B, 1, 1, S]
    -> [B, T, D]."""
    cfg = self.config
    drop = lambda z: nn.Dropout(cfg.dropout_rate)(z, deterministic=deterministic)
    h = _layer_norm(cfg, 'self_attention_norm')(y)
    y = y + drop(MultiHeadAttention(cfg, name='self_attention')(h, h, self_mask, deterministic))
    h = _layer_norm(cfg, 'cross_attention_norm')(y)
    y = y + drop(MultiHeadAttention(cfg, name='cross_attention')(
        h, encoded, cross_mask, deterministic))
    h = _layer_norm(cfg, 'feed_forward_norm')(y)
    return y + drop(FeedForward(cfg, name='feed_forward')(h, deterministic))


def _layer_norm(cfg: TransformerConfig, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(dtype=cfg.dtype, param_dtype=cfg.param_dtype, name=name)


class Embedder(nn.Module):
  """Token embedding scaled by sqrt(D) plus sinusoidal positions (Vaswani et al. 3.4-3.5)."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embedding = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=nn.initializers.normal(stddev=cfg.d_model ** -0.5), name='embed')

  def __call__(self, tokens: Array) -> Array:
    """int32 [B, L] -> [B, L, D] in `config.dtype`."""
    cfg = self.config
    x = self.embedding(tokens) * np.sqrt(cfg.d_model).astype(cfg.dtype)
    positions = sinusoidal_positions(tokens.shape[1], cfg.d_model)
    return x + positions[None].astype(cfg.dtype)

  def attend(self, x: Array) -> Array:
    """Output logits with the transposed embedding table: [B, T, D] -> float32 [B, T, V]."""
    return self.embedding.attend(x).astype(jnp.float32)


class Encoder(nn.Module):
  """Stack of `num_encoder_layers` EncoderLayers over embedded source tokens."""
  config: TransformerConfig
  embedder: Embedder

  @nn.compact
  def __call__(self, inputs: Array, deterministic: bool) -> Array:
    """inputs int32 [B, S] (0 = pad) -> encoded [B, S, D]."""
    cfg = self.config
    x = nn.Dropout(cfg.dropout_rate)(self.embedder(inputs), deterministic=deterministic)
    mask = padding_mask(inputs, inputs)  # [B, 1, 1, S]
    for i in range(cfg.num_encoder_layers):
      x = EncoderLayer(cfg, name=f'layer_{i}')(x, mask, deterministic)
    return _layer_norm(cfg, 'final_norm')(x)


class Decoder(nn.Module):
  """Stack of `num_decoder_layers` DecoderLayers and the output projection to logits."""
  config: TransformerConfig
  embedder: Embedder

  @nn.compact
  def __call__(self, encoded: Array, inputs: Array, targets: Array,
               deterministic: bool) -> Array:
    """encoded [B, S, D], inputs int32 [B, S] (for the cross-attention mask), targets
    int32 [B, T] (0 = pad; fed shifted right) -> logits float32 [B, T, V]."""
    cfg = self.config
    y = self.embedder(shift_right(targets))
    y = nn.Dropout(cfg.dropout_rate)(y, deterministic=deterministic)
    self_mask = padding_mask(targets, targets) & causal_mask(targets.shape[1])  # [B,1,T,T]
    cross_mask = padding_mask(targets, inputs)                                  # [B,1,1,S]
    for i in range(cfg.num_decoder_layers):
      y = DecoderLayer(cfg, name=f'layer_{i}')(y, encoded, self_mask, cross_mask, deterministic)
    y = _layer_norm(cfg, 'final_norm')(y)
    if cfg.share_embeddings:
      return self.embedder.attend(y)
    return nn.DenseGeneral(cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                           name='logits')(y).astype(jnp.float32)


class Transformer(nn.Module):
  """Encoder-decoder Transformer; `__call__` gives teacher-forced logits."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    if cfg.share_embeddings:
      source_embedder = target_embedder = Embedder(cfg, name='shared_embedder')
    else:
      source_embedder = Embedder(cfg, name='source_embedder')
      target_embedder = Embedder(cfg, name='target_embedder')
    self.encoder = Encoder(cfg, source_embedder)
    self.decoder = Decoder(cfg, target_embedder)

  def encode(self, inputs: Array, deterministic: bool = True) -> Array:
    """inputs int32 [B, S] -> encoded [B, S, D]."""
    return self.encoder(inputs, deterministic)

  def decode(self, encoded: Array, inputs: Array, targets: Array,
             deterministic: bool = True) -> Array:
    """encoded [B, S, D], inputs int32 [B, S], targets int32 [B, T] -> float32 [B, T, V]."""
    return self.decoder(encoded, inputs, targets, deterministic)

  def __call__(self, inputs: Array, targets: Array, deterministic: bool = True) -> Array:
    """inputs int32 [B, S], targets int32 [B, T] (0 = pad) -> logits float32 [B, T, V].

    Logits at position t predict targets[:, t] from inputs and targets[:, :t].
    `deterministic=False` turns dropout on and needs a 'dropout' rng.
    """
    encoded = self.encode(inputs, deterministic)
    return self.decode(encoded, inputs, targets, deterministic)
