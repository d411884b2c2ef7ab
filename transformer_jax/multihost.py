"""Several processes (hosts) training one model: starting `jax.distributed`, which process
writes files, barriers, and reading batch-sharded outputs back on every process.

Every process runs the same program on the same inputs (the input pipeline is
deterministic by seed and step): it computes the same global batch, feeds its own rows
(`sharding.put_batch`), calls every jitted function, checkpoint save and restore
(Orbax writes a checkpoint collectively) and evaluation in the same order, and so gets the
same metrics. Only process 0 (`is_primary`) writes the run's other files (run_config.json,
model_config.json, the tokenizer, adapter_config.json, best/score.json, translations,
train.log, TensorBoard events) and shows the progress bar; the workdir is a folder every
process sees (a shared filesystem). Where the others need a file process 0 writes (the
tokenizer trained at the first start), they wait for it (`primary_first`).

With one process every function here is free: no barrier, no copy.

jax is imported inside the functions, so that `config_schema` (read before anything heavy
is imported) can use `is_primary`.
"""
from __future__ import annotations

import contextlib
import os
import sys
from typing import Any, Iterator

# Slurm's variables that jax's Slurm detection (jax._src.clusters.slurm_cluster) reads.
_SLURM_VARS = ('SLURM_JOB_ID', 'SLURM_STEP_NODELIST', 'SLURM_NTASKS', 'SLURM_PROCID',
               'SLURM_LOCALID')
_OPEN_MPI_URI = 'OMPI_MCA_orte_hnp_uri'  # jax._src.clusters.ompi_cluster


def _count(name: str) -> int:
  """The environment variable `name` as an int; 0 when unset or not a number."""
  try:
    return int(os.environ.get(name, ''))
  except ValueError:
    return 0


def _cloud_tpu_cluster() -> bool:
  """Running on a Cloud TPU VM that jax's cluster detection recognizes (GCE or GKE): there
  `jax.distributed.initialize()` finds the coordinator, process count and id itself."""
  try:
    from jax._src import cloud_tpu_init, clusters  # pylint: disable=g-import-not-at-top
    if not getattr(cloud_tpu_init, 'running_in_cloud_tpu_vm', False):
      return False
    return any('tpu' in env.name and not env.opt_in_only_method and env.is_env_present()
               for env in clusters.ClusterEnv._cluster_types)  # pylint: disable=protected-access
  except Exception:  # pylint: disable=broad-except  # A jax without these internals.
    return False


def _jax_started() -> bool:
  """JAX's backends are initialized: `jax.distributed.initialize` would fail."""
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    return xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # A jax without it: assume not started.
    return False


def launcher() -> str:
  """What in the environment asks for a multi-process run whose settings
  `jax.distributed.initialize()` reads itself, or '' (a plain machine: one process).

  Only unambiguous signs count: $JAX_COORDINATOR_ADDRESS; a Slurm job step of more than one
  task (all of SLURM_JOB_ID, SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID, SLURM_LOCALID
  set, SLURM_NTASKS > 1); an Open MPI `mpirun` of more than one process; a Cloud TPU VM
  that jax's TPU cluster detection recognizes. Kubernetes and mpi4py are not detected:
  set the config fields (or $JAX_COORDINATOR_ADDRESS) there.
  """
  if os.environ.get('JAX_COORDINATOR_ADDRESS'):
    return '$JAX_COORDINATOR_ADDRESS'
  if all(name in os.environ for name in _SLURM_VARS) and _count('SLURM_NTASKS') > 1:
    return 'Slurm'
  if _OPEN_MPI_URI in os.environ and _count('OMPI_COMM_WORLD_SIZE') > 1:
    return 'Open MPI'
  if _cloud_tpu_cluster():
    return 'Cloud TPU'
  return ''


def initialize(config) -> bool:
  """Starts `jax.distributed` when `config` (coordinator_address, num_processes,
  process_id) or the environment (`launcher`) asks for several processes; does nothing
  otherwise, or when it is already started. Call it before anything uses a JAX device.

  Config values left at their defaults ('', 0, -1) are taken from the environment by
  `jax.distributed.initialize`. The combinations `config_schema.check_processes` refuses
  are refused here too. When only the environment asks and JAX has already computed in this
  process (too late to start jax.distributed), nothing is done.

  Returns:
    Whether jax.distributed is running (the run may still have one process).

  Raises:
    config_schema.ConfigError: one line naming the config field at fault: a bad
      combination, no coordinator for the processes asked for, or the config asks for
      processes but JAX already computed in this process.
  """
  from transformer_jax import config_schema  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  config_schema.check_processes(config)
  if jax.distributed.is_initialized():
    return True
  address = config.get('coordinator_address', '')
  num_processes = config.get('num_processes', 0)
  process_id = config.get('process_id', -1)
  asked = bool(address or num_processes or process_id >= 0)
  if not asked and _jax_started():
    # Only the environment asks, and JAX already computed in this process (a notebook on
    # a TPU VM, a test): too late to start jax.distributed; leave JAX as it is.
    return False
  source = launcher()
  if not (asked or source):
    return False
  if address:
    field = f'config.coordinator_address={address!r}'
  elif num_processes:
    field = f'config.num_processes={num_processes}'
  elif process_id >= 0:
    field = f'config.process_id={process_id}'
  else:
    field = f'the environment ({source})'
  if not (address or source):
    raise config_schema.ConfigError(
        f"{field}: needs config.coordinator_address ('host:port' of process 0) or "
        '$JAX_COORDINATOR_ADDRESS')
  try:
    jax.distributed.initialize(coordinator_address=address or None,
                               num_processes=num_processes or None,
                               process_id=process_id if process_id >= 0 else None)
  except (ValueError, TypeError) as e:  # A setting neither the config nor the environment gave.
    raise config_schema.ConfigError(
        f'{field}: jax.distributed cannot start: {str(e).splitlines()[0]} (set '
        'config.coordinator_address, config.num_processes and config.process_id)') from None
  except RuntimeError as e:  # JAX computed something in this process already.
    raise config_schema.ConfigError(
        f'{field}: jax.distributed cannot start: {str(e).splitlines()[0]}') from None
  return True


def process_count() -> int:
  """`jax.process_count()`; 1 when jax is not even imported."""
  if 'jax' not in sys.modules:
    return 1
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_count()


def is_primary() -> bool:
  """This is process 0, the one that writes the run's files (other than checkpoints, which
  every process writes its part of) and shows the progress bar. True with one process."""
  if 'jax' not in sys.modules:
    return True
  import jax  # pylint: disable=g-import-not-at-top
  return jax.process_index() == 0


def barrier(name: str) -> None:
  """Waits until every process has reached `barrier(name)` (the same name everywhere;
  `jax.experimental.multihost_utils.sync_global_devices`). Free with one process."""
  if process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    multihost_utils.sync_global_devices(name)


@contextlib.contextmanager
def primary_first(name: str) -> Iterator[None]:
  """Process 0 runs the body first; the others run it once process 0 is through (a
  `barrier(name)` each): for work that writes a shared file the others then reuse (train
  a tokenizer, prepare a dataset). Every process must enter it, in the same order. With
  one process it is only the body."""
  if process_count() == 1:
    yield
    return
  if not is_primary():
    barrier(name)
  try:
    yield
  finally:  # Also when the body fails: the others then run it and meet the same error.
    if is_primary():
      barrier(name)


def to_host(tree: Any) -> Any:
  """`jax.device_get(tree)`, also for arrays split over several processes (a batch-sharded
  output: rows on other hosts), which every process then gets whole
  (`multihost_utils.process_allgather`; every process must call it, in the same order).
  With one process it is `jax.device_get`."""
  import jax  # pylint: disable=g-import-not-at-top
  if jax.process_count() == 1:
    return jax.device_get(tree)
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top

  def get(x):
    if isinstance(x, jax.Array) and not (x.is_fully_addressable or x.is_fully_replicated):
      return multihost_utils.process_allgather(x, tiled=True)
    return jax.device_get(x)

  return jax.tree.map(get, tree)
