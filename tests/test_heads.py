"""Encoder-only heads and the BERT-style encoder options of TransformerConfig."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import models

CFG = models.TransformerConfig(vocab_size=37, d_model=32, num_heads=4, d_ff=64,
                               num_encoder_layers=2, num_decoder_layers=1)
BERT_LIKE = dict(norm_position='post', activation='gelu', position_embedding='learned',
                 max_position_embeddings=24, type_vocab_size=2, layer_norm_eps=1e-12,
                 scale_embeddings=False, embedding_norm=True)

# Parameter paths and shapes of the tiny `Transformer(CFG)` (share_embeddings=True), as
# printed by the code before the BERT options were added: the defaults must keep this tree
# (and so existing checkpoints) exactly.
EXPECTED_TRANSFORMER_PARAMS = [
    'decoder/final_norm/bias:32',
    'decoder/final_norm/scale:32',
    'decoder/layers_0/cross_attention/key/kernel:32,4,8',
    'decoder/layers_0/cross_attention/out/bias:32',
    'decoder/layers_0/cross_attention/out/kernel:4,8,32',
    'decoder/layers_0/cross_attention/query/bias:4,8',
    'decoder/layers_0/cross_attention/query/kernel:32,4,8',
    'decoder/layers_0/cross_attention/value/bias:4,8',
    'decoder/layers_0/cross_attention/value/kernel:32,4,8',
    'decoder/layers_0/cross_attention_norm/bias:32',
    'decoder/layers_0/cross_attention_norm/scale:32',
    'decoder/layers_0/feed_forward/wi/bias:64',
    'decoder/layers_0/feed_forward/wi/kernel:32,64',
    'decoder/layers_0/feed_forward/wo/bias:32',
    'decoder/layers_0/feed_forward/wo/kernel:64,32',
    'decoder/layers_0/feed_forward_norm/bias:32',
    'decoder/layers_0/feed_forward_norm/scale:32',
    'decoder/layers_0/self_attention/key/kernel:32,4,8',
    'decoder/layers_0/self_attention/out/bias:32',
    'decoder/layers_0/self_attention/out/kernel:4,8,32',
    'decoder/layers_0/self_attention/query/bias:4,8',
    'decoder/layers_0/self_attention/query/kernel:32,4,8',
    'decoder/layers_0/self_attention/value/bias:4,8',
    'decoder/layers_0/self_attention/value/kernel:32,4,8',
    'decoder/layers_0/self_attention_norm/bias:32',
    'decoder/layers_0/self_attention_norm/scale:32',
    'encoder/final_norm/bias:32',
    'encoder/final_norm/scale:32',
    'encoder/layers_0/feed_forward/wi/bias:64',
    'encoder/layers_0/feed_forward/wi/kernel:32,64',
    'encoder/layers_0/feed_forward/wo/bias:32',
    'encoder/layers_0/feed_forward/wo/kernel:64,32',
    'encoder/layers_0/feed_forward_norm/bias:32',
    'encoder/layers_0/feed_forward_norm/scale:32',
    'encoder/layers_0/self_attention/key/kernel:32,4,8',
    'encoder/layers_0/self_attention/out/bias:32',
    'encoder/layers_0/self_attention/out/kernel:4,8,32',
    'encoder/layers_0/self_attention/query/bias:4,8',
    'encoder/layers_0/self_attention/query/kernel:32,4,8',
    'encoder/layers_0/self_attention/value/bias:4,8',
    'encoder/layers_0/self_attention/value/kernel:32,4,8',
    'encoder/layers_0/self_attention_norm/bias:32',
    'encoder/layers_0/self_attention_norm/scale:32',
    'encoder/layers_1/feed_forward/wi/bias:64',
    'encoder/layers_1/feed_forward/wi/kernel:32,64',
    'encoder/layers_1/feed_forward/wo/bias:32',
    'encoder/layers_1/feed_forward/wo/kernel:64,32',
    'encoder/layers_1/feed_forward_norm/bias:32',
    'encoder/layers_1/feed_forward_norm/scale:32',
    'encoder/layers_1/self_attention/key/kernel:32,4,8',
    'encoder/layers_1/self_attention/out/bias:32',
    'encoder/layers_1/self_attention/out/kernel:4,8,32',
    'encoder/layers_1/self_attention/query/bias:4,8',
    'encoder/layers_1/self_attention/query/kernel:32,4,8',
    'encoder/layers_1/self_attention/value/bias:4,8',
    'encoder/layers_1/self_attention/value/kernel:32,4,8',
    'encoder/layers_1/self_attention_norm/bias:32',
    'encoder/layers_1/self_attention_norm/scale:32',
    'source_embedder/embed/embedding:37,32',
]


def _paths(params) -> list[str]:
  leaves = jax.tree_util.tree_flatten_with_path(params)[0]
  return sorted('/'.join(k.key for k in path) + ':' + ','.join(map(str, leaf.shape))
                for path, leaf in leaves)


def _cfg(**overrides):
  return models.TransformerConfig(**{**CFG.__dict__, **overrides})


def _tokens(rng, lengths, width):
  tokens = rng.integers(4, CFG.vocab_size, size=(len(lengths), width)).astype(np.int32)
  tokens[np.arange(width)[None] >= np.asarray(lengths)[:, None]] = 0
  return tokens


@pytest.mark.parametrize('share_embeddings', [True, False])
def test_default_transformer_param_tree_unchanged(share_embeddings):
  x = jnp.ones((1, 5), jnp.int32)
  params = models.Transformer(_cfg(share_embeddings=share_embeddings)).init(
      jax.random.PRNGKey(0), x, x)['params']
  expected = EXPECTED_TRANSFORMER_PARAMS
  if not share_embeddings:
    expected = sorted(expected + ['decoder/logits/bias:37', 'decoder/logits/kernel:32,37',
                                  'target_embedder/embed/embedding:37,32'])
  assert _paths(params) == expected


def test_from_config_without_new_fields_keeps_defaults():
  import ml_collections  # pylint: disable=g-import-not-at-top
  run = ml_collections.ConfigDict(dict(
      d_model=32, num_heads=4, d_ff=64, num_encoder_layers=2, num_decoder_layers=1,
      dropout_rate=0.1, attention_dropout_rate=0.1, share_embeddings=True,
      dtype='float32', param_dtype='float32'))
  assert models.TransformerConfig.from_config(run, 37) == CFG
  run.norm_position = 'post'
  assert models.TransformerConfig.from_config(run, 37).norm_position == 'post'


def test_classifier_params_line_up_with_transformer():
  x = jnp.ones((1, 5), jnp.int32)
  seq = models.SequenceClassifier(CFG, 3).init(jax.random.PRNGKey(0), x)['params']
  tok = models.TokenClassifier(CFG, 5).init(jax.random.PRNGKey(0), x)['params']
  encoder_side = [p for p in EXPECTED_TRANSFORMER_PARAMS if not p.startswith('decoder/')]
  assert _paths(seq) == sorted(encoder_side + ['head/bias:3', 'head/kernel:32,3'])
  assert _paths(tok) == sorted(encoder_side + ['head/bias:5', 'head/kernel:32,5'])


def test_bert_like_param_tree():
  x = jnp.ones((1, 5), jnp.int32)
  params = models.SequenceClassifier(_cfg(**BERT_LIKE), 2).init(jax.random.PRNGKey(0), x)
  paths = _paths(params['params'])
  assert not any(p.startswith('encoder/final_norm/') for p in paths)
  for p in ('source_embedder/position_embed/embedding:24,32',
            'source_embedder/type_embed/embedding:2,32', 'source_embedder/norm/scale:32'):
    assert p in paths


@pytest.mark.parametrize('overrides', [{}, BERT_LIKE], ids=['pre_ln', 'bert_like'])
@pytest.mark.parametrize('pooling', ['first', 'mean'])
def test_sequence_classifier_padding_invariance(overrides, pooling):
  model = models.SequenceClassifier(_cfg(**overrides), 3, pooling=pooling)
  rng = np.random.default_rng(0)
  inputs = _tokens(rng, [9, 4, 6], 9)
  params = model.init(jax.random.PRNGKey(0), inputs)
  longer = np.concatenate([inputs, np.zeros((3, 7), np.int32)], axis=1)
  logits = model.apply(params, inputs)
  assert logits.shape == (3, 3) and logits.dtype == jnp.float32
  np.testing.assert_allclose(logits, model.apply(params, longer), atol=1e-5)
  # Sanity check of the check: the real tokens do matter.
  changed = inputs.copy()
  changed[:, 1] = (changed[:, 1] - 4 + 1) % (CFG.vocab_size - 4) + 4
  assert not np.allclose(logits, model.apply(params, changed), atol=1e-4)


@pytest.mark.parametrize('overrides', [{}, BERT_LIKE], ids=['pre_ln', 'bert_like'])
def test_token_classifier_padding_invariance(overrides):
  model = models.TokenClassifier(_cfg(**overrides), 5)
  rng = np.random.default_rng(1)
  lengths = np.array([8, 3, 5])
  inputs = _tokens(rng, lengths, 8)
  params = model.init(jax.random.PRNGKey(0), inputs)
  longer = np.concatenate([inputs, np.zeros((3, 6), np.int32)], axis=1)
  logits, logits_long = model.apply(params, inputs), model.apply(params, longer)
  assert logits.shape == (3, 8, 5) and logits_long.shape == (3, 14, 5)
  real = np.arange(8)[None] < lengths[:, None]
  np.testing.assert_allclose(logits[real], logits_long[:, :8][real], atol=1e-5)
  hidden = model.apply(params, inputs, method=models.TokenClassifier.encode)
  assert hidden.shape == (3, 8, CFG.d_model)


def test_mean_pooling_is_mean_of_real_hidden_states():
  model = models.SequenceClassifier(CFG, 2, pooling='mean')
  inputs = _tokens(np.random.default_rng(2), [6, 2], 6)
  params = model.init(jax.random.PRNGKey(0), inputs)['params']
  hidden = model.apply({'params': params}, inputs, method=models.SequenceClassifier.encode)
  pooled = np.stack([hidden[0, :6].mean(0), hidden[1, :2].mean(0)])
  head = params['head']
  np.testing.assert_allclose(model.apply({'params': params}, inputs),
                             pooled @ head['kernel'] + head['bias'], atol=1e-5)


def test_post_ln_encoder_runs_and_differs_from_pre_ln():
  inputs = _tokens(np.random.default_rng(3), [7, 5], 7)
  outputs = {}
  for position in ('pre', 'post'):
    model = models.SequenceClassifier(_cfg(norm_position=position, activation='gelu_tanh'), 4)
    params = model.init(jax.random.PRNGKey(0), inputs)
    hidden = model.apply(params, inputs, method=models.SequenceClassifier.encode)
    assert hidden.shape == (2, 7, CFG.d_model) and np.isfinite(hidden).all()
    # Post-LN: every position leaves a LayerNorm with unit scale and zero bias at init.
    if position == 'post':
      np.testing.assert_allclose(np.asarray(hidden).std(-1), 1.0, atol=1e-3)
    outputs[position] = model.apply(params, inputs, deterministic=False,
                                    rngs={'dropout': jax.random.PRNGKey(1)})
    assert outputs[position].shape == (2, 4)
  assert not np.allclose(outputs['pre'], outputs['post'])


def test_post_ln_transformer_still_trains_end_to_end():
  """The decoder ignores norm_position; a post-LN encoder still feeds it."""
  cfg = _cfg(**BERT_LIKE)
  model = models.Transformer(cfg)
  rng = np.random.default_rng(4)
  inputs, targets = _tokens(rng, [6, 3], 6), _tokens(rng, [5, 5], 5)
  params = model.init(jax.random.PRNGKey(0), inputs, targets)
  logits = model.apply(params, inputs, targets)
  assert logits.shape == (2, 5, CFG.vocab_size) and np.isfinite(logits).all()


def test_token_types_and_learned_position_limits():
  cfg = _cfg(**BERT_LIKE)
  model = models.SequenceClassifier(cfg, 2)
  inputs = _tokens(np.random.default_rng(5), [5, 5], 5)
  params = model.init(jax.random.PRNGKey(0), inputs)
  zeros = model.apply(params, inputs)
  np.testing.assert_array_equal(
      zeros, model.apply(params, inputs, token_types=np.zeros_like(inputs)))
  assert not np.allclose(zeros, model.apply(params, inputs, token_types=np.ones_like(inputs)))
  with pytest.raises(ValueError, match='max_position_embeddings'):
    model.apply(params, np.ones((1, 25), np.int32))
  with pytest.raises(ValueError, match='type_vocab_size'):
    models.SequenceClassifier(CFG, 2).init(jax.random.PRNGKey(0), inputs,
                                           token_types=np.zeros_like(inputs))


def test_activations_and_bad_options():
  x = jnp.linspace(-3, 3, 7)
  np.testing.assert_allclose(models.ACTIVATIONS['gelu'](x),
                             x * 0.5 * (1 + jax.scipy.special.erf(x / np.sqrt(2))), atol=1e-6)
  with pytest.raises(ValueError, match='activation'):
    _cfg(activation='swish')
  with pytest.raises(ValueError, match='norm_position'):
    _cfg(norm_position='sandwich')
  with pytest.raises(ValueError, match='pooling'):
    models.SequenceClassifier(CFG, 2, pooling='max').init(jax.random.PRNGKey(0),
                                                          jnp.ones((1, 3), jnp.int32))
