"""Model invariants: masks, padding, causality, positions, dtypes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from transformer_jax import models

CFG = models.TransformerConfig(vocab_size=37, d_model=32, num_heads=4, d_ff=64,
                               num_encoder_layers=2, num_decoder_layers=2)


def _init(cfg=CFG, seed=0):
  model = models.Transformer(cfg)
  x = jnp.ones((1, 5), jnp.int32)
  return model, model.init(jax.random.PRNGKey(seed), x, x)['params']


def _random_tokens(rng, shape):
  return rng.integers(4, CFG.vocab_size, size=shape).astype(np.int32)


def test_sinusoidal_positions_match_formula():
  pe = models.sinusoidal_positions(50, 16)
  p, i = 37, 3
  assert pe.shape == (50, 16) and pe.dtype == np.float32
  np.testing.assert_allclose(pe[p, 2 * i], np.sin(p / 10000 ** (2 * i / 16)), atol=1e-5)
  np.testing.assert_allclose(pe[p, 2 * i + 1], np.cos(p / 10000 ** (2 * i / 16)), atol=1e-5)


@pytest.mark.parametrize('share_embeddings', [True, False])
def test_source_padding_does_not_change_outputs(share_embeddings):
  cfg = models.TransformerConfig(**{**CFG.__dict__, 'share_embeddings': share_embeddings})
  model, params = _init(cfg)
  rng = np.random.default_rng(0)
  inputs = _random_tokens(rng, (3, 9))
  lengths = np.array([9, 4, 6])
  inputs[np.arange(9)[None] >= lengths[:, None]] = 0
  targets = _random_tokens(rng, (3, 7))
  # Same real tokens, but the padding region holds other (non-pad) ids and is longer:
  # only padding masks make the outputs equal.
  longer = np.concatenate([inputs, np.zeros((3, 5), np.int32)], axis=1)
  garbage = _random_tokens(rng, longer.shape)
  pad = np.arange(14)[None] >= lengths[:, None]
  out_ref = model.apply({'params': params}, inputs, targets)
  out_pad = model.apply({'params': params}, longer, targets)
  np.testing.assert_allclose(out_ref, out_pad, atol=1e-5)
  # Sanity check of the check: visible garbage does change the outputs.
  leaky = np.where(pad, garbage, longer)
  assert not np.allclose(out_ref, model.apply({'params': params}, leaky, targets), atol=1e-3)


def test_target_padding_does_not_change_real_positions():
  model, params = _init()
  rng = np.random.default_rng(1)
  inputs = _random_tokens(rng, (2, 6))
  targets = _random_tokens(rng, (2, 5))
  padded = np.concatenate([targets, np.zeros((2, 4), np.int32)], axis=1)
  out = model.apply({'params': params}, inputs, targets)
  out_padded = model.apply({'params': params}, inputs, padded)
  np.testing.assert_allclose(out, out_padded[:, :5], atol=1e-5)


def test_future_target_tokens_do_not_change_earlier_positions():
  model, params = _init()
  rng = np.random.default_rng(2)
  inputs = _random_tokens(rng, (2, 6))
  targets = _random_tokens(rng, (2, 8))
  changed = targets.copy()
  changed[:, 5] = (changed[:, 5] + 1 - 4) % (CFG.vocab_size - 4) + 4
  out = model.apply({'params': params}, inputs, targets)
  out_changed = model.apply({'params': params}, inputs, changed)
  # Logits at t predict targets[t] from targets[:t]: positions <= 5 are unaffected.
  np.testing.assert_allclose(out[:, :6], out_changed[:, :6], atol=1e-6)
  assert not np.allclose(out[:, 6:], out_changed[:, 6:], atol=1e-3)


def test_dropout_only_when_not_deterministic():
  cfg = models.TransformerConfig(**{**CFG.__dict__, 'dropout_rate': 0.5})
  model, params = _init(cfg)
  x = _random_tokens(np.random.default_rng(3), (2, 6))
  a = model.apply({'params': params}, x, x)
  b = model.apply({'params': params}, x, x)
  c = model.apply({'params': params}, x, x, deterministic=False,
                  rngs={'dropout': jax.random.PRNGKey(1)})
  np.testing.assert_array_equal(a, b)
  assert not np.allclose(a, c, atol=1e-3)


@pytest.mark.parametrize('rate', [0.1, 0.3])
def test_dropout_drops_its_rate_and_keeps_the_mean(rate):
  x = jnp.ones((64, 33, 50))  # A last axis that is not a multiple of 4.
  y = models.Dropout(rate).apply({}, x, False, rngs={'dropout': jax.random.PRNGKey(0)})
  effective = round(rate * 256) / 256
  dropped = float(jnp.mean(y == 0))
  assert abs(dropped - effective) < 0.01, dropped  # 105,600 draws: sd ~0.001.
  np.testing.assert_allclose(np.unique(np.asarray(y)), [0.0, 1 / (1 - effective)], rtol=1e-6)
  assert abs(float(jnp.mean(y)) - 1.0) < 0.01
  # Masks differ along every axis (no byte of a random word reused across rows).
  assert (y[0] != y[1]).any() and (y[:, 0] != y[:, 1]).any()
  assert models.Dropout(rate).apply({}, x, True) is x


def test_bfloat16_compute_keeps_float32_params_and_logits():
  cfg = models.TransformerConfig(**{**CFG.__dict__, 'dtype': jnp.bfloat16})
  model, params = _init(cfg)
  assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(params))
  x = _random_tokens(np.random.default_rng(4), (2, 6))
  out = model.apply({'params': params}, x, x)
  out32 = models.Transformer(CFG).apply({'params': params}, x, x)
  assert out.dtype == jnp.float32 and np.isfinite(out).all()
  np.testing.assert_allclose(out, out32, atol=0.15)  # bf16 has ~3 significant digits.


@pytest.mark.parametrize('share_embeddings', [True, False])
def test_cached_decoding_equals_full_forward_pass(share_embeddings):
  cfg = models.TransformerConfig(**{**CFG.__dict__, 'share_embeddings': share_embeddings})
  model, params = _init(cfg)
  rng = np.random.default_rng(5)
  inputs = _random_tokens(rng, (3, 7))
  inputs[1, 4:] = 0
  targets = _random_tokens(rng, (3, 6))
  full = model.apply({'params': params}, inputs, targets)  # [3, 6, V]
  cache = model.apply({'params': params}, inputs, 8, method=models.Transformer.init_cache)
  previous = np.concatenate([np.full((3, 1), models.BOS_ID), targets[:, :-1]], axis=1)
  step = jax.jit(lambda c, t, i: model.apply({'params': params}, c, t, i,
                                             method=models.Transformer.decode_step))
  for i in range(6):
    logits, cache = step(cache, previous[:, i], jnp.int32(i))
    np.testing.assert_allclose(logits, full[:, i], atol=2e-5)
  # Cross-attention keys/values are computed once, in init_cache: [B, S, H, K] per layer.
  assert cache['source']['cross'][0]['cross_k'].shape == (3, 7, 4, 8)
  assert cache['layers'][0]['self_k'].shape == (3, 8, 4, 8)


def test_packed_row_equals_its_pairs_run_alone():
  """Two pairs packed in one row (segment ids, per-pair positions, a BOS per pair) give
  the logits each pair gets alone: attention never crosses pairs."""
  model, params = _init()
  rng = np.random.default_rng(5)
  src = [_random_tokens(rng, (n,)) for n in (4, 6)]
  tgt = [_random_tokens(rng, (n,)) for n in (5, 3)]
  length = 12
  row = {k: np.zeros((1, length), np.int32) for k in (
      'inputs', 'targets', 'inputs_segmentation', 'targets_segmentation',
      'inputs_position', 'targets_position')}
  for side, seqs in (('inputs', src), ('targets', tgt)):
    start = 0
    for segment, seq in enumerate(seqs, 1):
      row[side][0, start:start + len(seq)] = seq
      row[f'{side}_segmentation'][0, start:start + len(seq)] = segment
      row[f'{side}_position'][0, start:start + len(seq)] = np.arange(len(seq))
      start += len(seq)
  packed = model.apply({'params': params}, row.pop('inputs'), row.pop('targets'), **row)
  start = 0
  for s, t in zip(src, tgt):
    alone = model.apply({'params': params}, s[None], t[None])
    np.testing.assert_allclose(packed[0, start:start + len(t)], alone[0], atol=2e-5)
    start += len(t)
  # Without the segment ids the second pair sees the first: outputs differ.
  leaky = model.apply({'params': params}, np.concatenate([*src, np.zeros(2, np.int32)])[None],
                      np.concatenate([*tgt, np.zeros(4, np.int32)])[None])
  assert not np.allclose(leaky[0, 5:8], packed[0, 5:8], atol=1e-3)
