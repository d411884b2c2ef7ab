"""Transformer encoder-decoder after Vaswani et al. 2017, "Attention Is All You Need".

Pre-LayerNorm variant (Xiong et al. 2020, "On Layer Normalization in the Transformer
Architecture"): every sub-layer computes `x + Dropout(SubLayer(LayerNorm(x)))`, and the
encoder and decoder stacks end with a final LayerNorm.

The encoder can also express BERT (Devlin et al. 2019) through `TransformerConfig`:
post-LN sub-layers `LayerNorm(x + Dropout(SubLayer(x)))` with no final LayerNorm
(`norm_position='post'`), GELU (`activation`), learned positions
(`position_embedding='learned'`), token-type embeddings (`type_vocab_size`), a LayerNorm
over the summed embeddings (`embedding_norm`) and unscaled token embeddings
(`scale_embeddings=False`); `transformer_jax.hf_import` maps Hugging Face BERT checkpoints
onto it. `SequenceClassifier` and `TokenClassifier` put a head on the encoder alone. The
decoder is always pre-LN.

Shapes: B batch, S source length, T target length, D d_model, H num_heads,
K = D // H head size, F d_ff, V vocab_size. Token id 0 is padding
(`transformer_jax.tokenizer.PAD_ID`).

Packed rows (several sentence pairs per row, `transformer_jax.data.pack_pairs`) carry
segment ids (int32 [B, L], 1, 2, ... per pair, 0 on padding) and per-pair positions
(int32 [B, L], restarting at 0); attention then stays inside a pair, as in the Flax WMT
example and T5X.

Every projection is a named `nn.DenseGeneral` (`query`, `key`, `value`, `out`, `wi`,
`wo`), so parameter-efficient methods can address them by path and keep their own
parameters in a pytree apart from these base `params`.

Every parameter names its axes (`nn.with_logical_partitioning`; `model.init` returns the
plain arrays, and inside `with models.axis_names():` the `nn.LogicallyPartitioned` boxes
that carry the names) and the activations between layers name theirs
(`nn.with_logical_constraint`, a no-op outside `transformer_jax.sharding.rules_context`):
'batch', 'length', 'embed' (D), 'heads' (H), 'kv' (K), 'mlp' (F), 'vocab' (V).
`transformer_jax.sharding` maps them onto a device mesh.
"""
from __future__ import annotations

import contextlib
import contextvars
import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax.tokenizer import BOS_ID, PAD_ID

Array = jax.Array


_AXIS_NAMES = contextvars.ContextVar('axis_names', default=False)


@contextlib.contextmanager
def axis_names():
  """Within it, `init` of these models returns each parameter boxed with its logical axis
  names (`nn.LogicallyPartitioned`; `nn.get_partition_spec` reads them, `nn.unbox` drops
  them); outside, the plain arrays. Use it around `jax.eval_shape(model.init, ...)`."""
  token = _AXIS_NAMES.set(True)
  try:
    yield
  finally:
    _AXIS_NAMES.reset(token)


def _named(init, *axes: str | None):
  """`init` whose parameter carries logical axis names `axes` (one per dimension) inside
  `axis_names()`; the values are the same either way."""
  boxed = nn.with_logical_partitioning(init, axes)
  return lambda *args: boxed(*args) if _AXIS_NAMES.get() else init(*args)


def _constrain(x: Array, *axes: str | None) -> Array:
  """x sharded as the logical `axes` say (under `sharding.rules_context`; else x)."""
  return nn.with_logical_constraint(x, axes)


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
  # Encoder architecture; the defaults are the pre-LN translation model above.
  norm_position: str = 'pre'             # 'pre' | 'post' (BERT; encoder only).
  activation: str = 'relu'               # 'relu' | 'gelu' (exact, erf) | 'gelu_tanh'.
  position_embedding: str = 'sinusoidal'  # 'sinusoidal' | 'learned' (an nn.Embed table).
  max_position_embeddings: int = 512     # Rows of the learned position table.
  type_vocab_size: int = 0               # > 0: a token-type embedding table (BERT: 2).
  layer_norm_eps: float = 1e-6           # Epsilon of every LayerNorm (BERT: 1e-12).
  scale_embeddings: bool = True          # Token embeddings times sqrt(D) (BERT: False).
  embedding_norm: bool = False           # LayerNorm over the summed embeddings (BERT: True).

  def __post_init__(self):
    for name, choices in (('norm_position', ('pre', 'post')),
                          ('activation', tuple(ACTIVATIONS)),
                          ('position_embedding', ('sinusoidal', 'learned'))):
      if getattr(self, name) not in choices:
        raise ValueError(f'TransformerConfig.{name}={getattr(self, name)!r} is not one of '
                         f'{choices}')

  @classmethod
  def from_config(cls, config, vocab_size: int) -> 'TransformerConfig':
    """Builds the model config from a run `ConfigDict` (dtypes given by name); fields the
    run config lacks keep their dataclass defaults."""
    fields = {f.name for f in dataclasses.fields(cls)} - {'vocab_size', 'dtype', 'param_dtype'}
    return cls(vocab_size=vocab_size,
               dtype=jnp.dtype(config.dtype),
               param_dtype=jnp.dtype(config.param_dtype),
               **{name: config[name] for name in fields if name in config})


# TransformerConfig.activation -> function of the feed-forward hidden layer.
ACTIVATIONS = {
    'relu': nn.relu,
    'gelu': lambda x: jax.nn.gelu(x, approximate=False),  # x * Phi(x), as BERT's 'gelu'.
    'gelu_tanh': lambda x: jax.nn.gelu(x, approximate=True),  # HF 'gelu_new'.
}


def sinusoidal_positions(length: int, d_model: int) -> np.ndarray:
  """Sinusoidal position encodings, Vaswani et al. 2017, section 3.5.

  PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(p / 10000^(2i/D)).

  Returns:
    float32 array [length, d_model].
  """
  return np.asarray(sinusoid_at(np.arange(length), d_model))


def sinusoid_at(positions, d_model: int) -> jax.Array:
  """The encodings of `positions` (int array [...], may be traced) -> float32 [..., D]."""
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model))
  angles = jnp.asarray(positions, jnp.float32)[..., None] * inv_freq.astype(np.float32)
  pe = jnp.stack([jnp.sin(angles), jnp.cos(angles)], axis=-1)  # [..., D/2, 2]: sin, cos
  return pe.reshape(*pe.shape[:-2], -1)[..., :d_model]


def padding_mask(key_tokens: Array) -> Array:
  """Attention mask that hides padding keys: bool [B, 1, 1, Tk], broadcast over queries.

  Queries at padding positions still attend to the real keys; their outputs are never
  read, and keeping them finite keeps gradients finite.
  """
  return (key_tokens != PAD_ID)[:, None, None, :]


def segment_mask(query_segments: Array, key_segments: Array) -> Array:
  """bool [B, 1, Tq, Tk]: a query sees only keys of its own segment (packed rows).
  int32 [B, Tq], [B, Tk] -> bool [B, 1, Tq, Tk]."""
  return query_segments[:, None, :, None] == key_segments[:, None, None, :]


class Dropout(nn.Module):
  """Inverted dropout (Srivastava et al. 2014) with 8 random bits per element.

  `flax.linen.Dropout` draws 32 random bits (one threefry hash) per element; here one
  32-bit draw serves 4 elements, which makes a train step of the small issue-4 shape on a
  2-core CPU about 15% faster (docs/performance.md). An element is dropped when its
  byte is below round(rate * 256), so the rate is rounded to a multiple of 1/256
  (0.1 -> 26/256 = 0.1016); kept elements are scaled by 1 / (1 - that rate). Uses the
  'dropout' rng; `deterministic=True` or rate 0 returns the input unchanged.
  """
  rate: float

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """x [..., N] -> same shape and dtype."""
    threshold = round(self.rate * 256)
    if deterministic or threshold == 0:
      return x
    *lead, last = x.shape
    words = jax.random.bits(self.make_rng('dropout'), (*lead, -(-last // 4)), jnp.uint32)
    shifts = jnp.arange(0, 32, 8, dtype=jnp.uint32)
    random_bytes = ((words[..., None] >> shifts) & 0xFF).reshape(*lead, -1)[..., :last]
    keep_prob = 1.0 - threshold / 256
    return jnp.where(random_bytes >= threshold, x / keep_prob, 0).astype(x.dtype)


def causal_mask(length: int) -> Array:
  """bool [1, 1, T, T]: query t sees keys 0..t."""
  return jnp.tril(jnp.ones((length, length), dtype=bool))[None, None]


def shift_right(targets: Array, positions: Array | None = None) -> Array:
  """Decoder inputs: BOS followed by targets[:, :-1]. int32 [B, T] -> int32 [B, T].

  With per-pair `positions` (packed rows, int32 [B, T]), every pair starts with BOS.
  """
  bos = jnp.full_like(targets[:, :1], BOS_ID)
  shifted = jnp.concatenate([bos, targets[:, :-1]], axis=1)
  if positions is not None:
    shifted = jnp.where(positions == 0, BOS_ID, shifted)
  return shifted


class MultiHeadAttention(nn.Module):
  """Scaled dot-product attention over H heads (Vaswani et al. 2017, eq. 1 and 3.2.2).

  `__call__` projects keys and values itself; `project_kv` and `attend` split that in
  two so incremental decoding can cache the projected keys and values.
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    head_dim = cfg.d_model // cfg.num_heads
    project = lambda use_bias=True: nn.DenseGeneral(
        features=(cfg.num_heads, head_dim), use_bias=use_bias, dtype=cfg.dtype,
        param_dtype=cfg.param_dtype,
        kernel_init=_named(nn.initializers.xavier_uniform(), 'embed', 'heads', 'kv'),
        bias_init=_named(nn.initializers.zeros_init(), 'heads', 'kv'))
    self.query = project()
    # No key bias: it adds the same q.b to every logit of a query, which softmax ignores.
    self.key = project(use_bias=False)
    self.value = project()
    self.out = nn.DenseGeneral(
        features=cfg.d_model, axis=(-2, -1), dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=_named(nn.initializers.xavier_uniform(), 'heads', 'kv', 'embed'),
        bias_init=_named(nn.initializers.zeros_init(), 'embed'))
    self.dropout = Dropout(cfg.attention_dropout_rate)

  def project_kv(self, keys_values: Array) -> tuple[Array, Array]:
    """[B, Tk, D] -> keys, values [B, Tk, H, K]."""
    axes = ('batch', 'length', 'heads', 'kv')
    return (_constrain(self.key(keys_values), *axes),
            _constrain(self.value(keys_values), *axes))

  def attend(self, queries: Array, keys: Array, values: Array, mask: Array,
             deterministic: bool) -> Array:
    """queries [B, Tq, D], projected keys/values [B, Tk, H, K], mask bool broadcastable to
    [B, H, Tq, Tk] (True = attend) -> [B, Tq, D] in `config.dtype`."""
    cfg = self.config
    q = _constrain(self.query(queries), 'batch', 'length', 'heads', 'kv')  # [B, Tq, H, K]
    logits = jnp.einsum('bqhk,bthk->bhqt', q, keys) / np.sqrt(q.shape[-1]).astype(cfg.dtype)
    logits = jnp.where(mask, logits.astype(jnp.float32), jnp.finfo(jnp.float32).min)
    weights = jax.nn.softmax(logits, axis=-1).astype(cfg.dtype)  # [B, H, Tq, Tk]
    weights = self.dropout(weights, deterministic=deterministic)
    context = jnp.einsum('bhqt,bthk->bqhk', weights, values)  # [B, Tq, H, K]
    context = _constrain(context, 'batch', 'length', 'heads', 'kv')
    return _constrain(self.out(context), 'batch', 'length', 'embed')

  def __call__(self, queries: Array, keys_values: Array, mask: Array,
               deterministic: bool) -> Array:
    """queries [B, Tq, D], keys_values [B, Tk, D], mask -> [B, Tq, D]."""
    keys, values = self.project_kv(keys_values)
    return self.attend(queries, keys, values, mask, deterministic)


class FeedForward(nn.Module):
  """Position-wise feed-forward network: W_o act(W_i x) (Vaswani et al. 2017, eq. 2), with
  act = `config.activation` (ReLU by default)."""
  config: TransformerConfig

  @nn.compact
  def __call__(self, x: Array, deterministic: bool) -> Array:
    """x [B, T, D] -> [B, T, D]."""
    cfg = self.config
    dense = lambda features, name, axes: nn.DenseGeneral(
        features, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        kernel_init=_named(nn.initializers.xavier_uniform(), *axes),
        bias_init=_named(nn.initializers.zeros_init(), axes[1]), name=name)
    h = ACTIVATIONS[cfg.activation](dense(cfg.d_ff, 'wi', ('embed', 'mlp'))(x))  # [B, T, F]
    h = _constrain(h, 'batch', 'length', 'mlp')
    h = Dropout(cfg.dropout_rate)(h, deterministic=deterministic)
    return _constrain(dense(cfg.d_model, 'wo', ('mlp', 'embed'))(h),  # [B, T, D]
                      'batch', 'length', 'embed')


def _layer_norm(cfg: TransformerConfig) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=cfg.layer_norm_eps, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                      scale_init=_named(nn.initializers.ones_init(), 'embed'),
                      bias_init=_named(nn.initializers.zeros_init(), 'embed'))


class EncoderLayer(nn.Module):
  """Self-attention and feed-forward sub-layers, pre-LN `x + Dropout(SubLayer(LN(x)))` or,
  with `norm_position='post'`, post-LN `LN(x + Dropout(SubLayer(x)))` (same parameters)."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.self_attention_norm = _layer_norm(cfg)
    self.self_attention = MultiHeadAttention(cfg)
    self.feed_forward_norm = _layer_norm(cfg)
    self.feed_forward = FeedForward(cfg)
    self.dropout = Dropout(cfg.dropout_rate)

  def __call__(self, x: Array, mask: Array, deterministic: bool) -> Array:
    """x [B, S, D], mask [B, 1, 1, S] -> [B, S, D]."""
    drop = lambda y: self.dropout(y, deterministic=deterministic)
    if self.config.norm_position == 'post':
      x = self.self_attention_norm(x + drop(self.self_attention(x, x, mask, deterministic)))
      return self.feed_forward_norm(x + drop(self.feed_forward(x, deterministic)))
    h = self.self_attention_norm(x)
    x = x + drop(self.self_attention(h, h, mask, deterministic))
    h = self.feed_forward_norm(x)
    return _constrain(x + drop(self.feed_forward(h, deterministic)), 'batch', 'length', 'embed')


class DecoderLayer(nn.Module):
  """Pre-LN causal self-attention, cross-attention and feed-forward sub-layers."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.self_attention_norm = _layer_norm(cfg)
    self.self_attention = MultiHeadAttention(cfg)
    self.cross_attention_norm = _layer_norm(cfg)
    self.cross_attention = MultiHeadAttention(cfg)
    self.feed_forward_norm = _layer_norm(cfg)
    self.feed_forward = FeedForward(cfg)
    self.dropout = Dropout(cfg.dropout_rate)

  def __call__(self, y: Array, encoded: Array, self_mask: Array, cross_mask: Array,
               deterministic: bool) -> Array:
    """y [B, T, D], encoded [B, S, D], self_mask [B, 1, T, T], cross_mask [B, 1, 1, S]
    -> [B, T, D]."""
    drop = lambda z: self.dropout(z, deterministic=deterministic)
    h = self.self_attention_norm(y)
    y = y + drop(self.self_attention(h, h, self_mask, deterministic))
    h = self.cross_attention_norm(y)
    y = y + drop(self.cross_attention(h, encoded, cross_mask, deterministic))
    h = self.feed_forward_norm(y)
    return _constrain(y + drop(self.feed_forward(h, deterministic)), 'batch', 'length', 'embed')

  def init_cache(self, encoded: Array, max_length: int) -> dict:
    """Cross-attention keys/values, computed once per source, and an empty self-attention
    cache: {'cross_k', 'cross_v': [B, S, H, K], 'self_k', 'self_v': [B, max_length, H, K]}."""
    cross_k, cross_v = self.cross_attention.project_kv(encoded)
    empty = jnp.zeros((encoded.shape[0], max_length) + cross_k.shape[2:], cross_k.dtype)
    return {'cross_k': cross_k, 'cross_v': cross_v, 'self_k': empty, 'self_v': empty}

  def step(self, y: Array, cache: dict, index: Array, cross_mask: Array
           ) -> tuple[Array, dict]:
    """One position: y [B, 1, D] at `index` (int scalar) -> ([B, 1, D], updated cache).

    Writes this position's self-attention key/value into the cache and attends to
    positions 0..index; no earlier position is recomputed.
    """
    h = self.self_attention_norm(y)
    k, v = self.self_attention.project_kv(h)  # [B, 1, H, K]
    self_k = jax.lax.dynamic_update_slice_in_dim(cache['self_k'], k, index, axis=1)
    self_v = jax.lax.dynamic_update_slice_in_dim(cache['self_v'], v, index, axis=1)
    visible = (jnp.arange(self_k.shape[1]) <= index)[None, None, None, :]  # [1,1,1,L]
    y = y + self.self_attention.attend(h, self_k, self_v, visible, True)
    h = self.cross_attention_norm(y)
    y = y + self.cross_attention.attend(h, cache['cross_k'], cache['cross_v'], cross_mask, True)
    h = self.feed_forward_norm(y)
    y = y + self.feed_forward(h, True)
    return y, {**cache, 'self_k': self_k, 'self_v': self_v}


class Embedder(nn.Module):
  """Token embedding scaled by sqrt(D) plus sinusoidal positions (Vaswani et al. 3.4-3.5).

  Configurable for BERT: unscaled tokens (`scale_embeddings=False`), a learned position
  table `position_embed` ([max_position_embeddings, D]), a token-type table `type_embed`
  ([type_vocab_size, D]) and a LayerNorm `norm` over the sum (`embedding_norm`).
  """
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.embed = nn.Embed(
        cfg.vocab_size, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=_named(nn.initializers.normal(stddev=cfg.d_model ** -0.5),
                              'vocab', 'embed'))
    table = lambda rows: nn.Embed(
        rows, cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
        embedding_init=_named(nn.initializers.normal(stddev=0.02), None, 'embed'))
    if cfg.position_embedding == 'learned':
      self.position_embed = table(cfg.max_position_embeddings)
    if cfg.type_vocab_size > 0:
      self.type_embed = table(cfg.type_vocab_size)
    if cfg.embedding_norm:
      self.norm = _layer_norm(cfg)

  def __call__(self, tokens: Array, offset: Array | int = 0,
               positions: Array | None = None, token_types: Array | None = None) -> Array:
    """int32 [B, L] at positions offset..offset+L-1, or at `positions` (int32 [B, L],
    packed rows), of token types `token_types` (int32 [B, L], default all 0; needs
    `type_vocab_size` > 0) -> [B, L, D] in `config.dtype`.

    Learned positions must stay below `max_position_embeddings` (a longer static length
    raises ValueError; a traced position past the table would read NaN).
    """
    cfg = self.config
    x = self.embed(tokens)
    if cfg.scale_embeddings:
      x = x * np.sqrt(cfg.d_model).astype(cfg.dtype)
    if positions is None:
      if (cfg.position_embedding == 'learned' and isinstance(offset, int)
          and offset + tokens.shape[1] > cfg.max_position_embeddings):
        raise ValueError(f'{offset + tokens.shape[1]} positions exceed '
                         f'max_position_embeddings={cfg.max_position_embeddings}')
      positions = (offset + jnp.arange(tokens.shape[1]))[None]  # [1, L]
    if cfg.position_embedding == 'learned':
      x = x + self.position_embed(positions)
    else:
      x = x + sinusoid_at(positions, cfg.d_model).astype(cfg.dtype)
    if cfg.type_vocab_size > 0:
      x = x + self.type_embed(jnp.zeros_like(tokens) if token_types is None else token_types)
    elif token_types is not None:
      raise ValueError('token_types given but TransformerConfig.type_vocab_size is 0')
    return _constrain(self.norm(x) if cfg.embedding_norm else x, 'batch', 'length', 'embed')

  def attend(self, x: Array) -> Array:
    """Output logits with the transposed embedding table: [B, T, D] -> float32 [B, T, V]."""
    return _constrain(self.embed.attend(x).astype(jnp.float32), 'batch', 'length', 'vocab')


class Encoder(nn.Module):
  """Stack of `num_encoder_layers` EncoderLayers over embedded source tokens, ending with
  a LayerNorm when pre-LN (post-LN layers already end with one)."""
  config: TransformerConfig
  embedder: Embedder

  def setup(self):
    cfg = self.config
    self.layers = [EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers)]
    if cfg.norm_position == 'pre':
      self.final_norm = _layer_norm(cfg)
    self.dropout = Dropout(cfg.dropout_rate)

  def embed(self, inputs: Array, deterministic: bool, segmentation: Array | None = None,
            positions: Array | None = None, token_types: Array | None = None
            ) -> tuple[Array, Array]:
    """The layers' input: embedded tokens (dropout applied) [B, S, D] and the attention
    mask, bool [B, 1, 1, S] or, with packing, [B, 1, S, S]. A separate method so that
    prompt tuning (`transformer_jax.peft.prompt`) can prepend positions."""
    x = self.dropout(self.embedder(inputs, positions=positions, token_types=token_types),
                     deterministic=deterministic)
    mask = padding_mask(inputs)  # [B, 1, 1, S]
    if segmentation is not None:
      mask = mask & segment_mask(segmentation, segmentation)  # [B, 1, S, S]
    return x, mask

  def __call__(self, inputs: Array, deterministic: bool, segmentation: Array | None = None,
               positions: Array | None = None, token_types: Array | None = None) -> Array:
    """inputs int32 [B, S] (0 = pad), optional packing segment ids and positions, and
    token types, int32 [B, S] -> encoded [B, S, D]."""
    x, mask = self.embed(inputs, deterministic, segmentation, positions, token_types)
    for layer in self.layers:
      x = layer(x, mask, deterministic)
    return self.final_norm(x) if self.config.norm_position == 'pre' else x


class Decoder(nn.Module):
  """Stack of `num_decoder_layers` DecoderLayers and the output projection to logits
  (always pre-LN: `config.norm_position` applies to the encoder only)."""
  config: TransformerConfig
  embedder: Embedder

  def setup(self):
    cfg = self.config
    self.layers = [DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers)]
    self.final_norm = _layer_norm(cfg)
    self.dropout = Dropout(cfg.dropout_rate)
    if not cfg.share_embeddings:
      self.logits = nn.DenseGeneral(
          cfg.vocab_size, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
          kernel_init=_named(nn.initializers.lecun_normal(), 'embed', 'vocab'),
          bias_init=_named(nn.initializers.zeros_init(), 'vocab'))

  def _to_logits(self, y: Array) -> Array:
    y = self.final_norm(y)
    if self.config.share_embeddings:
      return self.embedder.attend(y)
    return _constrain(self.logits(y).astype(jnp.float32), 'batch', 'length', 'vocab')

  def __call__(self, encoded: Array, inputs: Array, targets: Array,
               deterministic: bool, inputs_segmentation: Array | None = None,
               targets_segmentation: Array | None = None,
               targets_position: Array | None = None) -> Array:
    """encoded [B, S, D], inputs int32 [B, S] (for the cross-attention mask), targets
    int32 [B, T] (0 = pad; fed shifted right), optional packing segment ids and target
    positions -> logits float32 [B, T, V]."""
    decoder_inputs = shift_right(targets, targets_position)
    y = self.dropout(self.embedder(decoder_inputs, positions=targets_position),
                     deterministic=deterministic)
    self_mask = padding_mask(targets) & causal_mask(targets.shape[1])  # [B,1,T,T]
    cross_mask = padding_mask(inputs)                                  # [B,1,1,S]
    if targets_segmentation is not None:
      self_mask &= segment_mask(targets_segmentation, targets_segmentation)
      cross_mask = cross_mask & segment_mask(targets_segmentation, inputs_segmentation)
    for layer in self.layers:
      y = layer(y, encoded, self_mask, cross_mask, deterministic)
    return self._to_logits(y)

  def init_cache(self, encoded: Array, inputs: Array, max_length: int) -> dict:
    """Decoding state for up to `max_length` target positions:
    {'source': {'cross_mask': bool [B, 1, 1, S], 'cross': per layer {'cross_k',
    'cross_v': [B, S, H, K]}}, 'layers': per layer {'self_k', 'self_v'}}. The 'source'
    part never changes while decoding (`decode.beam_search` does not reorder it)."""
    caches = [layer.init_cache(encoded, max_length) for layer in self.layers]
    cross = [{k: c[k] for k in ('cross_k', 'cross_v')} for c in caches]
    return {'source': {'cross_mask': padding_mask(inputs), 'cross': cross},
            'layers': [{k: c[k] for k in ('self_k', 'self_v')} for c in caches]}

  def step(self, cache: dict, tokens: Array, index: Array) -> tuple[Array, dict]:
    """Previous tokens int32 [B] at position `index` -> next-token logits float32 [B, V]
    and the updated cache."""
    y = self.embedder(tokens[:, None], offset=index)  # [B, 1, D]
    source, new_layers = cache['source'], []
    for layer, self_cache, cross in zip(self.layers, cache['layers'], source['cross']):
      y, layer_cache = layer.step(y, {**self_cache, **cross}, index, source['cross_mask'])
      new_layers.append({k: layer_cache[k] for k in ('self_k', 'self_v')})
    return self._to_logits(y)[:, 0], {**cache, 'layers': new_layers}


class Transformer(nn.Module):
  """Encoder-decoder Transformer; `__call__` gives teacher-forced logits, `encode` +
  `init_cache` + `decode_step` decode incrementally."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.source_embedder = Embedder(cfg)
    if not cfg.share_embeddings:
      self.target_embedder = Embedder(cfg)
    self.encoder = Encoder(cfg, self.source_embedder)
    self.decoder = Decoder(
        cfg, self.source_embedder if cfg.share_embeddings else self.target_embedder)

  def encode(self, inputs: Array, deterministic: bool = True,
             segmentation: Array | None = None, positions: Array | None = None) -> Array:
    """inputs int32 [B, S] -> encoded [B, S, D]."""
    return self.encoder(inputs, deterministic, segmentation, positions)

  def decode(self, encoded: Array, inputs: Array, targets: Array,
             deterministic: bool = True, **packing: Array) -> Array:
    """encoded [B, S, D], inputs int32 [B, S], targets int32 [B, T] -> float32 [B, T, V].
    `packing`: inputs_segmentation, targets_segmentation, targets_position."""
    return self.decoder(encoded, inputs, targets, deterministic, **packing)

  def init_cache(self, inputs: Array, max_length: int) -> dict:
    """Encodes inputs int32 [B, S] once and returns the decoding cache for up to
    `max_length` output tokens (cross-attention keys/values included)."""
    return self.decoder.init_cache(self.encode(inputs), inputs, max_length)

  def decode_step(self, cache: dict, tokens: Array, index: Array) -> tuple[Array, dict]:
    """tokens int32 [B] (the previous output, BOS at index 0) -> logits float32 [B, V]
    for position `index`, and the updated cache."""
    return self.decoder.step(cache, tokens, index)

  def __call__(self, inputs: Array, targets: Array, deterministic: bool = True,
               inputs_segmentation: Array | None = None,
               targets_segmentation: Array | None = None,
               inputs_position: Array | None = None,
               targets_position: Array | None = None) -> Array:
    """inputs int32 [B, S], targets int32 [B, T] (0 = pad) -> logits float32 [B, T, V].

    Logits at position t predict targets[:, t] from inputs and targets[:, :t] (of the
    same pair, in packed rows: pass all four segment/position arrays, int32 [B, S] or
    [B, T], or none). `deterministic=False` turns dropout on and needs a 'dropout' rng.
    """
    encoded = self.encode(inputs, deterministic, inputs_segmentation, inputs_position)
    return self.decode(encoded, inputs, targets, deterministic,
                       inputs_segmentation=inputs_segmentation,
                       targets_segmentation=targets_segmentation,
                       targets_position=targets_position)


class _EncoderWithHead(nn.Module):
  """The `Transformer` encoder alone (same submodule names, `source_embedder` and
  `encoder`, so parameter paths line up) and a dropout + dense `head` of `num_labels`."""
  config: TransformerConfig
  num_labels: int

  def setup(self):
    cfg = self.config
    self.source_embedder = Embedder(cfg)
    self.encoder = Encoder(cfg, self.source_embedder)
    self.head_dropout = Dropout(cfg.dropout_rate)
    self.head = nn.Dense(self.num_labels, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                         kernel_init=_named(nn.initializers.lecun_normal(), 'embed', None),
                         bias_init=_named(nn.initializers.zeros_init(), None))

  def encode(self, inputs: Array, deterministic: bool = True,
             token_types: Array | None = None) -> Array:
    """inputs int32 [B, S] (0 = pad), token_types int32 [B, S] or None -> last hidden
    states [B, S, D] in `config.dtype`."""
    return self.encoder(inputs, deterministic, token_types=token_types)

  def _classify(self, hidden: Array, deterministic: bool) -> Array:
    """[..., D] -> float32 logits [..., num_labels]."""
    hidden = self.head_dropout(hidden, deterministic=deterministic)
    return self.head(hidden).astype(jnp.float32)


class SequenceClassifier(_EncoderWithHead):
  """One label distribution per sequence from the encoder's pooled hidden states.

  pooling: 'first' takes the hidden state of position 0 (BERT's [CLS]; BERT's tanh
  pooler is not part of this model), 'mean' averages the hidden states of the real
  (non-pad) tokens.
  """
  pooling: str = 'first'

  def __call__(self, inputs: Array, deterministic: bool = True,
               token_types: Array | None = None) -> Array:
    """inputs int32 [B, S] (0 = pad), token_types int32 [B, S] or None -> logits
    float32 [B, num_labels]. `deterministic=False` needs a 'dropout' rng."""
    hidden = self.encode(inputs, deterministic, token_types)  # [B, S, D]
    if self.pooling == 'first':
      pooled = hidden[:, 0]
    elif self.pooling == 'mean':
      real = (inputs != PAD_ID)[..., None]  # [B, S, 1]
      total = jnp.sum(jnp.where(real, hidden.astype(jnp.float32), 0.0), axis=1)
      pooled = (total / jnp.maximum(jnp.sum(real, axis=1), 1)).astype(hidden.dtype)
    else:
      raise ValueError(f"pooling={self.pooling!r} is not one of ('first', 'mean')")
    return self._classify(pooled, deterministic)  # [B, num_labels]


class TokenClassifier(_EncoderWithHead):
  """One label distribution per token (tagging): dropout + dense head at every position."""

  def __call__(self, inputs: Array, deterministic: bool = True,
               token_types: Array | None = None) -> Array:
    """inputs int32 [B, S] (0 = pad), token_types int32 [B, S] or None -> logits
    float32 [B, S, num_labels] (padding positions hold values the caller ignores).
    `deterministic=False` needs a 'dropout' rng."""
    return self._classify(self.encode(inputs, deterministic, token_types), deterministic)


class MaskedLM(nn.Module):
  """The encoder and BERT's masked-LM head (Devlin et al. 2019, appendix A.1; the
  `cls/predictions` head of the Google BERT code): dense D + activation + LayerNorm, then
  logits with the transposed token embedding table plus a bias. The encoder keeps the
  names `source_embedder` and `encoder`, so its parameters load into the classifiers
  (`init_from`); the head's parameters are `mlm_dense`, `mlm_norm` and `mlm_bias`."""
  config: TransformerConfig

  def setup(self):
    cfg = self.config
    self.source_embedder = Embedder(cfg)
    self.encoder = Encoder(cfg, self.source_embedder)
    self.mlm_dense = nn.Dense(cfg.d_model, dtype=cfg.dtype, param_dtype=cfg.param_dtype,
                              kernel_init=_named(nn.initializers.lecun_normal(), 'embed', None),
                              bias_init=_named(nn.initializers.zeros_init(), None))
    self.mlm_norm = _layer_norm(cfg)
    self.mlm_bias = self.param('mlm_bias', _named(nn.initializers.zeros, 'vocab'),
                               (cfg.vocab_size,), cfg.param_dtype)

  def __call__(self, inputs: Array, deterministic: bool = True,
               positions: Array | None = None) -> Array:
    """inputs int32 [B, S] (0 = pad) -> logits float32 [B, S, V], or with `positions`
    (int32 [B, P], indices into S) the logits at those positions only, [B, P, V] (the
    head and the vocabulary projection then cost P/S as much).
    `deterministic=False` needs a 'dropout' rng."""
    hidden = self.encoder(inputs, deterministic)  # [B, S, D]
    if positions is not None:
      hidden = jnp.take_along_axis(hidden, positions[..., None], axis=1)  # [B, P, D]
    hidden = self.mlm_norm(ACTIVATIONS[self.config.activation](self.mlm_dense(hidden)))
    return self.source_embedder.attend(hidden) + self.mlm_bias.astype(jnp.float32)
