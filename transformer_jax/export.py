"""`--mode=export`: a translation model as a `jax.export` (StableHLO) artifact folder.

  python -m transformer_jax.main --config=configs/multi30k_de_en.py --workdir=runs/de_en \
      --mode=export --output=exported/de_en [--checkpoint=latest]

`run_export` loads the model and a checkpoint as `--mode=translate` does
(`evaluation.load_task`) and exports the function the in-process `translate.Translator`
jits, encoder + search, once for greedy and once for beam search (`config.beam_size`,
`config.length_penalty`). The batch size B, the source length S and the output length L
are symbolic dimensions (`jax.export.symbolic_shape`), so one module per decoding serves
every length bucket, over-long sources included; L, which the search needs as a static
size, is the length of an extra argument (`serving`'s module docstring). Each shape is
specialized and compiled by the loader on first use, as the in-process translator
compiles each bucket. The modules are lowered for CPU and CUDA (and the platform
exporting them), so that a model exported on a CPU machine can be served on a GPU (the
CUDA lowering is only produced on a CPU machine, never run there).

The parameters are an argument of the modules, stored once beside them in params.npz
(NumPy's format, no pickle), not baked in as constants: the modules stay small (0.11 and
0.14 MiB for the Multi30k model, whose parameters take 29 MiB, instead of a copy of the
weights in each), and the computation is the in-process one, parameters as jit
arguments, so outputs are equal token for token (tested), where constants could be
folded by XLA into different roundings. The folder layout and the loader are in
`transformer_jax.serving`, which needs neither Flax nor this module.

A PEFT run exports with its adapter as it runs in process (not merged): the parameter
tree is whatever `load_task` returns (base and adapter), flattened to '/'-joined names.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import shutil
import tempfile
from typing import Any, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import config_schema
from transformer_jax import evaluation
from transformer_jax import init_from
from transformer_jax import models
from transformer_jax import multihost
from transformer_jax import serving
from transformer_jax import tokenizer
from transformer_jax import translate


def flatten_params(params: Any) -> tuple[dict[str, np.ndarray], Any, list[str]]:
  """Host arrays of a parameter tree by '/'-joined path ('encoder/layers_0/.../kernel',
  `init_from.flatten`), the tree's structure and the names in leaf order, to rebuild it
  (`jax.tree.unflatten(treedef, [flat[n] for n in names])`).

  Raises:
    ValueError: two leaves get the same name.
  """
  flat, treedef = init_from.flatten(multihost.to_host(params))
  if len(flat) != treedef.num_leaves:
    raise ValueError(f'parameter names are not unique: {sorted(flat)}')
  return {n: np.asarray(v) for n, v in flat.items()}, treedef, list(flat)


def search_function(model, config, decoding: str, treedef, names: Sequence[str]):
  """fn(params {name: array}, inputs int32 [B, S], caps int32 [B], out_positions int32
  [L]) -> int32 [B, L]: the in-process translator's search (`translate.search`) with
  `decoding` ('greedy' or 'beam') and max_length = L."""
  config = config.copy_and_resolve_references()
  config.decoding = decoding

  search = translate.search

  def fn(flat, inputs, caps, out_positions):
    params = jax.tree.unflatten(treedef, [flat[n] for n in names])
    return search(params, inputs, caps, None, model=model, config=config,
                  max_length=out_positions.shape[0])

  return fn


def export_search(fn, flat: dict[str, np.ndarray], platforms: Sequence[str]
                  ) -> jax.export.Exported:
  """`jax.export` of a `search_function` for `platforms`, with symbolic B, S and L."""
  batch, source, output = jax.export.symbolic_shape('B, S, L')
  specs = ({n: jax.ShapeDtypeStruct(v.shape, v.dtype) for n, v in flat.items()},
           jax.ShapeDtypeStruct((batch, source), jnp.int32),
           jax.ShapeDtypeStruct((batch,), jnp.int32),
           jax.ShapeDtypeStruct((output,), jnp.int32))
  return jax.export.export(jax.jit(fn), platforms=tuple(platforms))(*specs)


def _storable(flat: dict[str, np.ndarray]) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """Arrays NumPy's .npz format can hold, and {name: dtype} of those stored as unsigned
  integers of their size because NumPy lacks their dtype (bfloat16, float8 types)."""
  stored, dtypes = {}, {}
  for name, value in flat.items():
    if value.dtype.kind == 'V':  # An ml_dtypes type.
      dtypes[name] = value.dtype.name
      value = value.view(np.dtype(f'uint{8 * value.dtype.itemsize}'))
    stored[name] = value
  return stored, dtypes


def _check_output(output_dir: str) -> None:
  if os.path.exists(output_dir) and (not os.path.isdir(output_dir) or os.listdir(output_dir)):
    raise FileExistsError(f'--output={output_dir}: already exists and is not an empty folder; '
                          'choose a new one')


def manifest(config, vocab_size: int, buckets: Sequence[int], name: str, workdir: str,
             platforms: Sequence[str], stored_dtypes: dict[str, str], num_params: int) -> dict:
  """The manifest.json of an export (`serving`'s module docstring); `buckets` are the
  in-process translator's source lengths, `name` the checkpoint's ('best-step900')."""
  model = dataclasses.asdict(models.TransformerConfig.from_config(config, vocab_size))
  model = {k: (jnp.dtype(v).name if k in ('dtype', 'param_dtype') else v)
           for k, v in model.items()}
  return {
      'format': serving.FORMAT,
      'format_version': serving.FORMAT_VERSION,
      'source_lang': config.source_lang,
      'target_lang': config.target_lang,
      'checkpoint': {'name': name, 'step': int(name.rsplit('step', 1)[1]),
                     'workdir': os.path.abspath(workdir)},
      'model': model,
      'vocab_size': vocab_size,
      'special_ids': {'pad': tokenizer.PAD_ID, 'eos': tokenizer.EOS_ID,
                      'bos': tokenizer.BOS_ID, 'unk': tokenizer.UNK_ID},
      'tokenizer': {'file': serving.TOKENIZER_FILE},
      'params': {'file': serving.PARAMS_FILE, 'num_params': num_params,
                 'stored_dtypes': stored_dtypes},
      'inputs': {'max_source_length': config.max_source_length,
                 'buckets': [int(n) for n in buckets],
                 # pylint: disable-next=protected-access
                 'long_bucket_multiple': translate.LONG_QUANTUM},
      'decoding': {'default': config.decoding if config.decoding in serving.DECODINGS
                              else 'beam',
                   'beam_size': config.beam_size, 'length_penalty': config.length_penalty,
                   'max_length_ratio': config.decode_max_length_ratio,
                   'max_length_offset': config.decode_max_length_offset,
                   'batch_tokens': config.decode_batch_tokens},
      'modules': {d: d + serving.MODULE_SUFFIX for d in serving.DECODINGS},
      'module_signature': 'fn(params {name: array}, inputs int32[B, S], caps int32[B], '
                          'out_positions int32[L]) -> int32[B, L]',
      'platforms': list(platforms),
      'jax_version': jax.__version__,
  }


def _write_folder(output_dir: str, files: dict[str, Any]) -> None:
  """Writes `files` ({name: bytes, a callable(path) that writes it, or a source path to
  copy}) into a temporary folder beside `output_dir`, then renames it `output_dir`: an
  interrupted export leaves no half-written folder."""
  parent = os.path.dirname(os.path.abspath(output_dir))
  os.makedirs(parent, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix='.export-', dir=parent)
  try:
    for name, content in files.items():
      path = os.path.join(tmp, name)
      if isinstance(content, (bytes, bytearray)):
        with open(path, 'wb') as f:
          f.write(content)
      elif callable(content):
        content(path)
      else:
        shutil.copyfile(content, path)
    if os.path.isdir(output_dir):
      os.rmdir(output_dir)  # Empty (`_check_output`).
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o777 & ~umask)  # mkdtemp's 0700 would keep other users out.
    os.rename(tmp, output_dir)
  except BaseException:
    shutil.rmtree(tmp, ignore_errors=True)
    raise


def run_export(config, workdir: str, output_dir: str, checkpoint: str = 'best',
               platforms: Sequence[str] | None = None) -> dict:
  """Exports a translation run's checkpoint to `output_dir` (module docstring).

  Args:
    config: the run config (the model fields must match the trained model's; the
      decoding fields are recorded: beam_size, length_penalty, decode_max_length_ratio,
      decode_max_length_offset, decode_batch_tokens, max_source_length,
      length_bucket_step).
    workdir: the run's folder.
    output_dir: the folder to write; must not exist or be empty.
    checkpoint: 'best' or 'latest' (`evaluation.load_task`).
    platforms: what to lower for; default CPU, CUDA and `jax.export`'s default platform.

  Returns:
    The manifest written.

  Raises:
    config_schema.ConfigError: the task is not translation, or a model field differs
      from the trained model's.
    FileExistsError: `output_dir` exists and is not an empty folder.
    FileNotFoundError: the workdir has no tokenizer or no checkpoint.
  """
  if config.task != 'translation':
    raise config_schema.ConfigError(f'--mode=export: config.task={config.task!r}; only '
                                    'translation models can be exported')
  _check_output(output_dir)
  if platforms is None:
    platforms = sorted({'cpu', 'cuda', jax.export.default_export_platform()})
  task, params, name = evaluation.load_task(config, workdir, checkpoint)
  flat, treedef, names = flatten_params(params)
  modules = {}
  for decoding in serving.DECODINGS:
    fn = search_function(task.model, config, decoding, treedef, names)
    modules[decoding + serving.MODULE_SUFFIX] = export_search(fn, flat, platforms).serialize()
  stored, stored_dtypes = _storable(flat)
  info = manifest(config, task.sp.vocab_size(), task.translator.lengths, name, workdir,
                  platforms, stored_dtypes, sum(int(v.size) for v in flat.values()))
  if multihost.is_primary():
    _write_folder(output_dir, {
        serving.MANIFEST: (json.dumps(info, indent=1) + '\n').encode('utf-8'),
        serving.TOKENIZER_FILE: os.path.join(workdir, 'tokenizer', 'spm.model'),
        serving.PARAMS_FILE: functools.partial(_save_npz, arrays=stored),
        **modules})
    size = sum(os.path.getsize(os.path.join(output_dir, f)) for f in os.listdir(output_dir))
    print(f'exported {name} of {workdir} ({" and ".join(serving.DECODINGS)} search, '
          f'{", ".join(platforms)}) to {output_dir}: {size / 2**20:.1f} MiB')
  multihost.barrier('export')
  return info


def _save_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
  with open(path, 'wb') as f:  # np.savez would append '.npz' to a path without it.
    np.savez(f, **arrays)
