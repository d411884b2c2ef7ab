"""Device mesh and shardings (`jax.sharding`): data parallelism over all devices.

The mesh has one axis, 'data'. Batches are split along it (`batch_sharding`);
parameters and optimizer state are replicated (`replicated`). jit-compiled steps take
these as in/out shardings, and XLA inserts the gradient all-reduce.
"""
from __future__ import annotations

import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

DATA_AXIS = 'data'


def make_mesh(devices=None) -> Mesh:
  """A 1-D mesh ('data',) over `devices` (default: all devices of all processes)."""
  return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over 'data'; the batch size must divide evenly."""
  return NamedSharding(mesh, P(DATA_AXIS))


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Host NumPy batch {name: [B, ...]} -> global jax.Arrays sharded along the batch axis.

  Raises:
    ValueError: B is not divisible by the number of devices.
  """
  sharding = batch_sharding(mesh)
  return {k: jax.make_array_from_process_local_data(sharding, v) for k, v in batch.items()}
