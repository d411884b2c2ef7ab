"""Model FLOPs: the documented formula against XLA's own count of the compiled model."""
import jax
import jax.numpy as jnp

from transformer_jax import flops
from transformer_jax import models


def test_forward_flops_match_xla_cost_analysis():
  cfg = models.TransformerConfig(vocab_size=1000, d_model=128, num_heads=4, d_ff=512,
                                 num_encoder_layers=2, num_decoder_layers=2)
  model = models.Transformer(cfg)
  inputs, targets = jnp.ones((4, 16), jnp.int32), jnp.ones((4, 24), jnp.int32)
  params = model.init(jax.random.PRNGKey(0), inputs, targets)['params']
  forward = jax.jit(lambda p, x, y: model.apply({'params': p}, x, y))
  cost = forward.lower(params, inputs, targets).compile().cost_analysis()
  xla_flops = (cost[0] if isinstance(cost, list) else cost)['flops']
  ours = flops.forward_flops(cfg, 4, 16, 24)
  # XLA also counts elementwise work (softmax, LayerNorm, ...): a few percent more.
  assert 0.97 * xla_flops <= ours <= xla_flops, (ours, xla_flops)
  assert flops.train_flops(cfg, 4, 16, 24) == 3 * ours


def test_peak_flops_from_config_table_or_measurement():
  cpu = jax.devices()[0]
  assert flops.peak_flops_per_device(cpu, jnp.float32, configured=5e9) == 5e9
  measured = flops.peak_flops_per_device(cpu, jnp.float32)
  assert 1e8 < measured < 1e14  # A real CPU's matmul rate, in FLOP/s.

  class FakeDevice:
    device_kind = 'NVIDIA H100 80GB HBM3'
  assert flops.peak_flops_per_device(FakeDevice(), jnp.bfloat16) == 989e12
