"""Device mesh and shardings by logical axis names (`jax.sharding`, Flax `nn.spmd`).

The mesh has three axes (`MESH_AXES`), as in the Flax LM1B example and MaxText:
  data    pure data parallelism: batch rows split, parameters replicated;
  fsdp    fully sharded data parallelism (ZeRO-3): batch rows split too, and parameters and
          optimizer state split along their 'embed' axis; XLA all-gathers a layer's weights
          when it is used and reduce-scatters its gradient;
  tensor  tensor (Megatron) parallelism: 'heads', 'mlp' and 'vocab' axes split, with the
          activations between them.
Model code names the axes of every parameter (`nn.with_logical_partitioning`, in
`transformer_jax.models`) and of the activations between layers
(`nn.with_logical_constraint`); `config.logical_axis_rules` maps the logical names onto mesh
axes (first rule whose mesh axis is still free in that array wins; unnamed or unmatched axes
are replicated). So parameters, optimizer state and batches are sharded exactly as the rules
say, and a checkpoint restores onto any mesh (Orbax reshards to the target).

With the default mesh (every device on 'data') and rules, fsdp and tensor have size 1 and
everything but the batch is replicated: plain data parallelism.
"""
from __future__ import annotations

import contextlib
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
import numpy as np

from transformer_jax.config_schema import ConfigError, MESH_AXES

DATA_AXIS, FSDP_AXIS, TENSOR_AXIS = MESH_AXES
BATCH_AXES = (DATA_AXIS, FSDP_AXIS)  # Batch rows are split over both.

# The rules of configs/__init__.py `add_parallelism_fields`, for code without a config.
DEFAULT_RULES = (
    ('batch', BATCH_AXES),
    ('embed', FSDP_AXIS),
    ('heads', TENSOR_AXIS),
    ('mlp', TENSOR_AXIS),
    ('vocab', TENSOR_AXIS),
)
Rules = Sequence[tuple[str, Any]]


def mesh_shape(shape: Sequence[int], num_devices: int) -> tuple[int, int, int]:
  """`shape` (data, fsdp, tensor) with a -1 replaced by what the other sizes leave.

  Raises:
    ConfigError: naming config.mesh_shape, when the sizes do not multiply to `num_devices`.
  """
  shape = tuple(int(n) for n in shape)
  known = math.prod(n for n in shape if n != -1)
  if -1 in shape:
    if num_devices % known:
      raise ConfigError(f'config.mesh_shape={shape}: {num_devices} devices are not divisible '
                       f'by {known}')
    shape = tuple(num_devices // known if n == -1 else n for n in shape)
  if math.prod(shape) != num_devices:
    raise ConfigError(f'config.mesh_shape={shape}: {math.prod(shape)} devices, but there are '
                     f'{num_devices}; use -1 for the axis that takes the rest')
  return shape


def make_mesh(shape: Sequence[int] = (-1, 1, 1), devices=None) -> Mesh:
  """A mesh with axes ('data', 'fsdp', 'tensor') of `shape` (one -1: the rest) over
  `devices` (default: every device of every process, in `jax.devices()` order), reshaped
  in C order: the last axis varies fastest, so it spans consecutive devices (those of one
  process, as far as it is not larger than a process's devices).

  Raises:
    ConfigError: the shape does not fit the number of devices (`mesh_shape`).
  """
  devices = np.asarray(jax.devices() if devices is None else devices)
  return Mesh(devices.reshape(mesh_shape(shape, devices.size)), MESH_AXES)


def config_mesh(config, devices=None) -> Mesh:
  """The mesh `config.mesh_shape` asks for (default (-1, 1, 1): data parallelism)."""
  return make_mesh(tuple(config.get('mesh_shape', (-1, 1, 1))), devices)


def config_rules(config) -> tuple:
  """`config.logical_axis_rules` as a tuple of (str, str | tuple | None), or the defaults."""
  rules = config.get('logical_axis_rules', DEFAULT_RULES)
  return tuple((name, tuple(axes) if isinstance(axes, (list, tuple)) else axes)
               for name, axes in rules)


def replicated(mesh: Mesh) -> NamedSharding:
  """Every device holds the whole array."""
  return NamedSharding(mesh, P())


def batch_shards(mesh: Mesh) -> int:
  """How many parts a batch's rows are split into: data x fsdp."""
  return mesh.shape[DATA_AXIS] * mesh.shape[FSDP_AXIS]


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) axis split over ('data', 'fsdp'); the batch size must divide evenly."""
  return NamedSharding(mesh, P(BATCH_AXES))


def process_rows(batch: dict, mesh: Mesh) -> dict:
  """This process's rows of a global host batch {name: [B, ...]}: the rows its devices hold
  under `batch_sharding` (all of them with one process).

  Every process builds the same global batch (the input pipeline is deterministic by
  seed and step), and keeps only its own contiguous block of rows: together the processes
  hold each row of the global batch exactly once.

  Raises:
    ValueError: B is not divisible by the number of batch shards.
  """
  if jax.process_count() == 1:
    return batch
  sharding = batch_sharding(mesh)
  out = {}
  for name, value in batch.items():
    if value.shape[0] % batch_shards(mesh):
      raise ValueError(f'batch {name!r} has {value.shape[0]} rows, not divisible by the '
                       f'{batch_shards(mesh)} batch shards of the mesh {dict(mesh.shape)}')
    rows = sorted({index[0].indices(value.shape[0])[:2] for index in
                   sharding.addressable_devices_indices_map(value.shape).values()})
    start, stop = rows[0][0], rows[-1][1]
    out[name] = value[start:stop]
  return out


def put_batch(batch: dict, mesh: Mesh) -> dict:
  """Global host NumPy batch {name: [B, ...]} -> global jax.Arrays sharded along the batch
  axis (each process contributes its rows, `process_rows`).

  Raises:
    ValueError: B is not divisible by the number of batch shards (data x fsdp).
  """
  sharding = batch_sharding(mesh)
  local = process_rows(batch, mesh)
  try:
    return {k: jax.make_array_from_process_local_data(sharding, v, batch[k].shape)
            for k, v in local.items()}
  except ValueError as e:
    shapes = {k: v.shape for k, v in batch.items()}
    raise ValueError(f'batch {shapes} does not split into the {batch_shards(mesh)} batch '
                     f'shards of the mesh {dict(mesh.shape)}: {e}') from e


def logical_shardings(boxed: Any, mesh: Mesh, rules: Rules) -> Any:
  """NamedShardings for a tree whose leaves may carry logical axis names (`nn.
  LogicallyPartitioned` boxes, e.g. `jax.eval_shape(model.init, ...)['params']`); leaves
  without names are replicated. The result has the structure of `nn.unbox(boxed)`.

  Raises:
    ConfigError: a parameter's axis would be split into parts of unequal size (its size is
      not divisible by the mesh axes the rules give it), naming the parameter and the fix.
  """
  shardings = nn.logical_to_mesh_sharding(nn.get_partition_spec(boxed), mesh, tuple(rules))
  is_box = lambda x: isinstance(x, nn.LogicallyPartitioned)
  for (path, leaf), sharding in zip(
      jax.tree_util.tree_flatten_with_path(boxed, is_leaf=is_box)[0],
      jax.tree.leaves(shardings)):
    names = leaf.names if is_box(leaf) else (None,) * len(leaf.shape)
    shape = leaf.value.shape if is_box(leaf) else leaf.shape
    for size, name, axes in zip(shape, names, tuple(sharding.spec) + (None,) * len(shape)):
      axes = () if axes is None else (axes,) if isinstance(axes, str) else axes
      parts = math.prod(mesh.shape[a] for a in axes)
      if size % parts:
        where = '/'.join(str(getattr(k, 'key', k)) for k in path)
        raise ConfigError(
            f'config.mesh_shape={tuple(mesh.shape.values())}: parameter {where} {shape} has '
            f'axis {name!r} of size {size}, which does not split into {parts} equal parts '
            f'over mesh axes {axes}; change mesh_shape or map {name!r} to None in '
            'config.logical_axis_rules')
  return shardings


def like_params(tree: Any, params: Any, param_shardings: Any, mesh: Mesh) -> Any:
  """Shardings for a tree that embeds copies of the parameter tree (an Optax state: its
  moments mu, nu have the parameters' structure and shapes): every subtree with the
  parameters' structure gets `param_shardings`, every other leaf (step counts) is
  replicated."""
  structure = jax.tree.structure(params)
  shapes = [x.shape for x in jax.tree.leaves(params)]

  def is_copy(x):
    leaves = jax.tree.leaves(x)
    return (jax.tree.structure(x) == structure
            and [getattr(leaf, 'shape', None) for leaf in leaves] == shapes)

  return jax.tree.map(lambda x: param_shardings if is_copy(x) else replicated(mesh), tree,
                      is_leaf=is_copy)


@contextlib.contextmanager
def rules_context(mesh: Mesh, rules: Rules):
  """Within it, the model's `nn.with_logical_constraint`s map onto `mesh` by `rules`
  (enter it around the calls that trace a jitted function: `jit` does)."""
  with jax.set_mesh(mesh), nn.logical_axis_rules(tuple(rules)):
    yield


def jit(fun, mesh: Mesh, rules: Rules, **jit_kwargs):
  """`jax.jit(fun, **jit_kwargs)`, traced and called under `rules_context(mesh, rules)`,
  so the activations' logical constraints apply. Also has `.lower(*args)`."""
  jitted = jax.jit(fun, **jit_kwargs)

  def call(*args, **kwargs):
    with rules_context(mesh, rules):
      return jitted(*args, **kwargs)

  def lower(*args, **kwargs):
    with rules_context(mesh, rules):
      return jitted.lower(*args, **kwargs)

  call.lower = lower
  return call


def device_bytes(tree: Any) -> dict:
  """{device: bytes of the shards of `tree`'s arrays it holds} (measured from the arrays'
  addressable shards, not computed from the rules)."""
  out = {}
  for leaf in jax.tree.leaves(tree):
    for shard in getattr(leaf, 'addressable_shards', ()):
      out[shard.device] = out.get(shard.device, 0) + shard.data.nbytes
  return out
