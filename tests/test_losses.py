"""The loss against a float64 NumPy reference; user losses by import path."""
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from transformer_jax import losses
from transformer_jax.config_schema import ConfigError


def reference_loss(logits, targets, weights, label_smoothing, no_smoothing_ids=()):
  """Brute force in float64: the full smoothed distribution (label_smoothing spread evenly
  over the ids other than the gold one and no_smoothing_ids), minus its entropy."""
  logits = logits.astype(np.float64)
  log_probs = logits - np.log(np.exp(logits).sum(-1, keepdims=True))
  vocab = logits.shape[-1]
  q = np.full(logits.shape, label_smoothing / (vocab - 1 - len(no_smoothing_ids)))
  q[..., list(no_smoothing_ids)] = 0.0
  np.put_along_axis(q, targets[..., None], 1.0 - label_smoothing, axis=-1)
  entropy = -np.sum(np.where(q > 0, q * np.log(np.where(q > 0, q, 1)), 0), axis=-1)
  token_loss = -np.sum(q * log_probs, axis=-1) - entropy
  return np.sum(token_loss * weights) / np.sum(weights)


@pytest.mark.parametrize('no_smoothing_ids', [(), (0, 2)])
@pytest.mark.parametrize('label_smoothing', [0.0, 0.1, 0.3])
def test_cross_entropy_matches_numpy_on_padded_batch(label_smoothing, no_smoothing_ids):
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(3, 5, 11)).astype(np.float32) * 3
  targets = rng.choice([1] + list(range(3, 11)), size=(3, 5))  # Never PAD or BOS.
  lengths = np.array([5, 2, 3])
  weights = (np.arange(5)[None] < lengths[:, None]).astype(np.float32)
  targets = targets * weights.astype(int)  # pad id 0 at padding positions
  loss, metrics = losses.cross_entropy(jnp.asarray(logits), jnp.asarray(targets),
                                       jnp.asarray(weights), label_smoothing, no_smoothing_ids)
  np.testing.assert_allclose(
      loss, reference_loss(logits, targets, weights, label_smoothing, no_smoothing_ids),
      rtol=1e-5)
  np.testing.assert_allclose(metrics['nll'], reference_loss(logits, targets, weights, 0.0),
                             rtol=1e-5)
  assert float(metrics['num_tokens']) == 10.0
  # Padding positions do not count: changing their logits changes nothing.
  logits2 = logits.copy()
  logits2[weights == 0] += 100 * rng.normal(size=logits2[weights == 0].shape)
  np.testing.assert_allclose(loss, losses.cross_entropy(logits2, targets, weights,
                                                        label_smoothing,
                                                        no_smoothing_ids)[0], rtol=1e-6)


def test_translation_smoothing_puts_no_mass_on_pad_or_bos():
  # V = 5 (0 PAD, 1 EOS, 2 BOS, 3 and 4 words), gold 3, label smoothing 0.1: the smoothed
  # target is q = [0, 0.05, 0, 0.9, 0.05] (0.1 over the V - 3 = 2 other possible targets).
  logits = np.array([[[2.0, 0.5, 1.0, -1.0, 0.25]]], np.float32)  # PAD and BOS favoured.
  targets, weights = np.array([[3]]), np.ones((1, 1), np.float32)
  log_p = logits[0, 0].astype(np.float64) - np.log(np.exp(logits[0, 0].astype(np.float64)).sum())
  q = np.array([0.0, 0.05, 0.0, 0.9, 0.05])
  expected = -np.sum(q * log_p) + (0.9 * np.log(0.9) + 2 * 0.05 * np.log(0.05))
  np.testing.assert_allclose(expected, 3.0639511714972985, rtol=1e-12)
  np.testing.assert_allclose(reference_loss(logits, targets, weights, 0.1, (0, 2)), expected,
                             rtol=1e-12)
  config = ml_collections.ConfigDict({'loss': 'cross_entropy', 'label_smoothing': 0.1})
  for task in ('translation', 'span_corruption', 'text_infilling', 'masked_lm'):
    config.task = task
    loss, metrics = losses.get_loss(config)(jnp.asarray(logits), targets, weights)
    np.testing.assert_allclose(float(loss), expected, rtol=1e-6)
    np.testing.assert_allclose(float(metrics['nll']), -log_p[3], rtol=1e-6)
  # Classification labels 0 and 2 are real labels: they get their share (0.1 / 4 each).
  config.task = 'classification'
  loss, _ = losses.get_loss(config)(jnp.asarray(logits), targets, weights)
  np.testing.assert_allclose(float(loss), reference_loss(logits, targets, weights, 0.1),
                             rtol=1e-6)
  assert abs(float(loss) - expected) > 0.1


def test_perfect_smoothed_prediction_without_pad_and_bos_has_zero_loss():
  vocab, ls = 6, 0.1
  q = np.full((1, 1, vocab), ls / (vocab - 3))
  q[0, 0, [0, 2]] = 0.0  # log 0 = -inf logits: still finite.
  q[0, 0, 4] = 1 - ls
  with np.errstate(divide='ignore'):
    logits = np.log(q).astype(np.float32)
  loss, _ = losses.cross_entropy(logits, np.array([[4]]), np.ones((1, 1)), ls, (0, 2))
  assert abs(float(loss)) < 1e-6
  # A padding position (target PAD, weight 0) stays finite and does not count.
  loss, _ = losses.cross_entropy(np.concatenate([logits, logits], 1), np.array([[4, 0]]),
                                 np.array([[1.0, 0.0]]), ls, (0, 2))
  assert abs(float(loss)) < 1e-6


@pytest.mark.parametrize('vocab, ids, message', [(5, (0, 7), 'must be in'),
                                                 (3, (0, 2), 'no token to spread it')])
def test_cross_entropy_rejects_impossible_no_smoothing_ids(vocab, ids, message):
  logits = np.zeros((1, 1, vocab), np.float32)
  with pytest.raises(ValueError, match=message):
    losses.cross_entropy(logits, np.array([[1]]), np.ones((1, 1)), 0.1, ids)


def test_accuracy_counts_only_real_tokens():
  logits = np.zeros((1, 3, 4), np.float32)
  logits[0, 0, 2] = logits[0, 1, 1] = logits[0, 2, 3] = 1.0  # argmax 2, 1, 3
  targets = np.array([[2, 3, 0]])
  weights = np.array([[1.0, 1.0, 0.0]])
  _, metrics = losses.cross_entropy(logits, targets, weights)
  assert float(metrics['accuracy']) == 0.5


def test_perfect_smoothed_prediction_has_zero_loss():
  vocab, ls = 6, 0.1
  q = np.full((1, 1, vocab), ls / (vocab - 1))
  q[0, 0, 4] = 1 - ls
  loss, _ = losses.cross_entropy(np.log(q).astype(np.float32), np.array([[4]]),
                                 np.ones((1, 1)), ls)
  assert abs(float(loss)) < 1e-6


def test_all_padding_batch_is_finite_with_zero_weight():
  logits = np.random.default_rng(1).normal(size=(2, 4, 7)).astype(np.float32)
  targets = np.zeros((2, 4), np.int32)
  loss, metrics = losses.cross_entropy(logits, targets, np.zeros((2, 4)), 0.1)
  assert float(loss) == 0.0 and float(metrics['num_tokens']) == 0.0
  assert all(np.isfinite(float(v)) for v in metrics.values())


def mean_squared_logit(logits, targets, weights):
  """A user loss for the import-path test."""
  loss = jnp.sum(jnp.mean(logits ** 2, axis=-1) * weights) / jnp.sum(weights)
  return loss, {'msl': loss}


def test_get_loss_resolves_builtin_and_import_path():
  config = ml_collections.ConfigDict({'loss': 'cross_entropy', 'label_smoothing': 0.2})
  logits = np.ones((1, 2, 5), np.float32)
  targets, weights = np.array([[1, 2]]), np.ones((1, 2))
  np.testing.assert_allclose(losses.get_loss(config)(logits, targets, weights)[0],
                             losses.cross_entropy(logits, targets, weights, 0.2)[0])
  config.loss = 'tests.test_losses:mean_squared_logit'
  assert float(losses.get_loss(config)(logits, targets, weights)[0]) == 1.0


@pytest.mark.parametrize('name', ['focal', 'no_such_module:focal', 'tests.test_losses:nope'])
def test_get_loss_bad_name_names_the_field(name):
  config = ml_collections.ConfigDict({'loss': name, 'label_smoothing': 0.0})
  with pytest.raises(ConfigError, match='config.loss'):
    losses.get_loss(config)
