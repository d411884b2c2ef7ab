"""Model FLOPs per training step, per-device peak FLOP/s and MFU.

Counted FLOPs are the matrix multiplies of the computed (padded) shapes, 2 FLOPs per
multiply-add, as in Kaplan et al. 2020 ("Scaling Laws", section 2.1) and the MFU of
Chowdhery et al. 2022 ("PaLM", appendix B); embeddings lookups, softmax, LayerNorm and
the optimizer are left out. For B rows, S source and T target positions, D d_model,
F d_ff, V vocab, per layer:

  encoder    Q,K,V,O projections  4 * 2BSD^2    scores + context  2 * 2BS^2D
             feed-forward          2 * 2BSDF
  decoder    self-attention        4 * 2BTD^2 + 2 * 2BT^2D  (the full T x T is computed)
             cross-attention       2 * 2BTD^2 (Q, O) + 2 * 2BSD^2 (K, V) + 2 * 2BTSD
             feed-forward          2 * 2BTDF
  logits     2BTDV once

Encoder-only models (classification, tagging) count the encoder layers and the head
(`encoder_forward_flops`). A training step costs 3x the forward pass (the backward pass is
two matmuls per forward matmul). MFU = achieved FLOP/s / peak FLOP/s of the devices.
"""
from __future__ import annotations

import time

import jax
import jax.numpy as jnp

# Dense peak FLOP/s per device from the datasheets, by a substring of
# `jax.Device.device_kind` (lowercased): (bfloat16, float32). GPU float32 is the TF32
# tensor-core rate, which XLA uses for float32 matmuls at the default precision.
DATASHEET_PEAK_FLOPS = {
    'tpu v6': (918e12, 918e12),
    'tpu v5p': (459e12, 459e12),
    'tpu v5': (197e12, 197e12),   # v5e ("TPU v5 lite").
    'tpu v4': (275e12, 275e12),
    'tpu v3': (123e12, 123e12),
    'tpu v2': (45e12, 45e12),
    'h200': (989e12, 495e12),
    'h100': (989e12, 495e12),     # SXM; the PCIe card is about 25% lower.
    'a100': (312e12, 156e12),
    'l4': (121e12, 60e12),
    'a10g': (70e12, 35e12),
    't4': (65e12, 8e12),
}


def forward_flops(cfg, batch_size: int, source_length: int, target_length: int) -> float:
  """Matmul FLOPs of one forward pass of `cfg` (a models.TransformerConfig) over a batch
  of `batch_size` rows padded to `source_length` / `target_length` positions."""
  b, s, t = batch_size, source_length, target_length
  d, f, v = cfg.d_model, cfg.d_ff, cfg.vocab_size
  encoder = 2 * b * (4 * s * d * d + 2 * s * s * d + 2 * s * d * f)
  decoder = 2 * b * (4 * t * d * d + 2 * t * t * d       # self-attention
                     + 2 * t * d * d + 2 * s * d * d + 2 * t * s * d  # cross-attention
                     + 2 * t * d * f)                    # feed-forward
  logits = 2 * b * t * d * v
  return float(cfg.num_encoder_layers * encoder + cfg.num_decoder_layers * decoder + logits)


def encoder_forward_flops(cfg, batch_size: int, length: int, head_outputs: int) -> float:
  """Matmul FLOPs of one forward pass of an encoder-only model (`num_encoder_layers`
  layers as above) over `batch_size` rows of `length` positions, plus a dense head of
  `head_outputs` outputs per row (classification) or per position (tagging: pass
  length * num_labels)."""
  b, s, d, f = batch_size, length, cfg.d_model, cfg.d_ff
  encoder = 2 * b * (4 * s * d * d + 2 * s * s * d + 2 * s * d * f)
  return float(cfg.num_encoder_layers * encoder + 2 * b * d * head_outputs)


def train_flops(cfg, batch_size: int, source_length: int, target_length: int) -> float:
  """FLOPs of one training step (forward + backward = 3x forward)."""
  return 3.0 * forward_flops(cfg, batch_size, source_length, target_length)


def measure_matmul_peak(dtype=jnp.float32, size: int = 1024, seconds: float = 0.5) -> float:
  """FLOP/s of a jitted size x size matmul on the default device, best of repeated
  calls for about `seconds` (the measured peak used for CPUs)."""
  x = jnp.ones((size, size), dtype)
  matmul = jax.jit(lambda a: a @ a)
  matmul(x).block_until_ready()
  best, deadline = float('inf'), time.perf_counter() + seconds
  while time.perf_counter() < deadline:
    start = time.perf_counter()
    matmul(x).block_until_ready()
    best = min(best, time.perf_counter() - start)
  return 2.0 * size ** 3 / best


def peak_flops_per_device(device: jax.Device, dtype, configured: float = 0.0) -> float:
  """Peak FLOP/s of one device for matmuls in `dtype`.

  `configured` > 0 wins; otherwise the datasheet table above for TPUs and GPUs, and a
  measured matmul peak (`measure_matmul_peak`) for CPUs and unknown devices.
  """
  if configured > 0:
    return float(configured)
  kind = device.device_kind.lower()
  for name, (bf16, fp32) in DATASHEET_PEAK_FLOPS.items():
    if name in kind:
      return bf16 if jnp.dtype(dtype) == jnp.bfloat16 else fp32
  return measure_matmul_peak(dtype) / max(1, len(jax.local_devices()))
