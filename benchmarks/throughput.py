"""Training and decoding throughput: transformer_jax against the PyTorch reference model.

  python benchmarks/throughput.py [--quick] [--shapes small,base] [--dtypes float32,bfloat16]
                                  [--steps N] [--mesh-shape D,F,T] [--json FILE]

For each model shape and dtype, each implementation in a Python process of its own (so that
neither framework's allocator or thread pools slow the other), on the default JAX device and
on CUDA for torch when it is available (else the CPU):

- transformer_jax: `train.create_state` and `train.train_step` (with the translation task's
  `init_params` and `seq2seq_loss`) jitted as `train._train` does,
  from `configs/mt.py` with the shape, dtype ('bfloat16' = bfloat16 compute, float32
  parameters), a constant learning rate of 1e-3 and no warmup, on the (data, fsdp, tensor)
  mesh `--mesh-shape` gives (config.mesh_shape; default -1,1,1: data parallel over every JAX
  device) under the config's `logical_axis_rules` ('embed' -> 'fsdp': with 1,-1,1 the
  parameters and optimizer state are sharded FSDP-style over all devices);
- PyTorch eager and PyTorch `torch.compile`: `benchmarks/torch_reference.py` (the same
  architecture, loss, optimizer and clipping), started from the same initial weights.

All three train on the same pre-made batches (on the device before timing): random token ids,
rows padded to the shape's length, source and target lengths drawn uniformly from 1..length
(about half the positions are real tokens), EOS-terminated; a fixed seed. After each
implementation's first call (its compile time) and a few warm-up steps, the timed steps run
in rounds, one implementation after the other (k steps of each per round), so slow drifts of
the machine hit all of them alike. Every step is synchronized (the loss is read on the host).

Reported per row, medians over the timed steps: step time, real (non-pad) target tokens/s,
sequences/s; MFU = `flops.train_flops` of the padded shapes / step time / peak FLOP/s
(`flops.peak_flops_per_device`: datasheet for GPUs/TPUs, a measured JAX matmul for CPUs; the
same peak for both frameworks); peak memory: on GPUs the PyTorch caching allocator's
`max_memory_allocated` during the row's steps, and for JAX the compiled train step's XLA
buffer plan (arguments + outputs + temporaries - donated aliases); on CPUs the process's peak
resident set size (VmHWM, reset before each round of steps) of the implementation's own
process.

Decoding (unless `--no-decode`): the source side of the first batch, with the initial
weights, output capped at 1.5 x source tokens + 10 as `translate.Translator` does;
transformer_jax greedy and beam 4 (length penalty 0.6) through `init_cache` + `decode_step`
and `decode.sample` / `decode.beam_search`, jitted; PyTorch greedy as in the PyTorch
translation tutorial (the decoder re-run over the whole prefix each step), eager and compiled
(dynamic shapes). Sentences/s, median over `--decode-reps` calls, alternating.

Ratios are transformer_jax / PyTorch throughput (> 1: transformer_jax is faster).
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import math
import os
import platform
import resource
import statistics
import sys
import time
import warnings

# Before JAX starts (inherited by the worker processes): leave GPU memory to PyTorch and to
# the other processes (JAX preallocates 75% by default), and keep TensorFlow (imported by
# transformer_jax.data) quiet.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(_HERE))  # The repository: transformer_jax, configs.
sys.path.insert(0, _HERE)                   # torch_reference.

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import jax.numpy as jnp
import numpy as np

from configs import mt
from transformer_jax import decode
from transformer_jax import flops
from transformer_jax import losses
from transformer_jax import models
from transformer_jax import sharding
from transformer_jax import train
from transformer_jax import translate
from transformer_jax.tasks import translation
from transformer_jax.tokenizer import EOS_ID
from worker import huge_pages_note, jax_environ, Worker
# pylint: enable=g-import-not-at-top,wrong-import-position

try:
  import torch  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  TORCH_ERROR = ''
except ImportError as e:  # The JAX rows still run.
  torch = torch_reference = None
  TORCH_ERROR = str(e)

JAX, EAGER, COMPILED = 'transformer_jax', 'torch eager', 'torch.compile'


@dataclasses.dataclass(frozen=True)
class Shape:
  """A model shape and its training batch: `batch_size` rows padded to `length` tokens on
  both sides."""
  name: str
  num_layers: int  # Encoder layers = decoder layers.
  d_model: int
  num_heads: int
  d_ff: int
  vocab_size: int
  batch_size: int
  length: int


NUM_BATCHES = 4  # Training batches per (shape, dtype), used in turn.

SHAPES = {
    'small': Shape('small', 3, 256, 8, 512, 8000, 128, 32),
    # 64 x 32: a batch that steps in seconds on 2 CPU cores.
    'base': Shape('base', 6, 512, 8, 2048, 32000, 64, 32),
    'tiny': Shape('tiny', 1, 32, 2, 64, 100, 8, 8),  # --tiny: a smoke test.
}


# --- Helpers ---------------------------------------------------------------------------


def make_batches(shape: Shape, count: int, seed: int) -> list[dict[str, np.ndarray]]:
  """`count` batches {'inputs', 'targets': int32 [B, L]}: random ids in [4, V), lengths
  uniform in 1..L (EOS included), 0-padded."""
  rng = np.random.default_rng(seed)
  batches = []
  for _ in range(count):
    batch = {}
    for key in ('inputs', 'targets'):
      ids = rng.integers(4, shape.vocab_size, (shape.batch_size, shape.length), dtype=np.int32)
      lengths = rng.integers(1, shape.length + 1, shape.batch_size)
      positions = np.arange(shape.length)[None]
      ids[positions == lengths[:, None] - 1] = EOS_ID
      ids[positions >= lengths[:, None]] = 0
      batch[key] = ids
    batches.append(batch)
  return batches


def reset_peak_rss() -> bool:
  """Resets the process's peak resident set size (Linux: VmHWM); False where it cannot."""
  try:
    with open('/proc/self/clear_refs', 'w') as f:
      f.write('5')
    return True
  except OSError:
    return False


def peak_rss_bytes() -> int:
  """The process's peak resident set size in bytes since the last `reset_peak_rss`."""
  try:
    with open('/proc/self/status') as f:
      for line in f:
        if line.startswith('VmHWM:'):
          return int(line.split()[1]) * 1024
  except OSError:
    pass
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def jax_on_gpu() -> bool:
  return jax.default_backend() in ('gpu', 'cuda', 'rocm')


def median(values) -> float:
  return float(statistics.median(values)) if values else float('nan')


# --- Implementations, each in a process of its own -------------------------------------


class _Timed:
  """Timing shared by both implementations; subclasses define `step` and `decoders`."""
  name = ''
  on_gpu = False
  decoders: dict = {}

  def timed_steps(self, k: int) -> tuple[list[float], list[float], int]:
    """k synchronized steps -> (seconds per step, losses, peak bytes during them)."""
    self._reset_peak()
    times, step_losses = [], []
    for _ in range(k):
      start = time.perf_counter()
      step_losses.append(self.step())
      times.append(time.perf_counter() - start)
    return times, step_losses, self._peak()

  def has_decoder(self, kind: str) -> bool:
    return kind in self.decoders

  def timed_decode(self, kind: str) -> tuple[float, np.ndarray]:
    """One decoding call -> (seconds, int [B, L] outputs)."""
    start = time.perf_counter()
    outputs = self.decoders[kind]()
    return time.perf_counter() - start, outputs

  def _reset_peak(self) -> None:
    if not self.on_gpu:
      reset_peak_rss()

  def _peak(self) -> int:
    return peak_rss_bytes() if not self.on_gpu else -1


DEFAULT_MESH_SHAPE = (-1, 1, 1)  # (data, fsdp, tensor): data parallel, as configs/ default.


def jax_config(shape: Shape, dtype: str, mesh_shape: tuple = DEFAULT_MESH_SHAPE):
  """configs/mt.py with the shape, `dtype` compute over float32 parameters, a constant
  learning rate of 1e-3, on the (data, fsdp, tensor) mesh `mesh_shape`."""
  config = mt.get_config()
  config.mesh_shape = tuple(mesh_shape)
  config.d_model, config.num_heads, config.d_ff = shape.d_model, shape.num_heads, shape.d_ff
  config.num_encoder_layers = config.num_decoder_layers = shape.num_layers
  config.dtype, config.param_dtype = dtype, 'float32'
  config.schedule, config.warmup_steps, config.learning_rate = 'constant', 0, 1e-3
  return config


class JaxTrainer(_Timed):
  """transformer_jax's train step as `train._train` jits it, on pre-placed batches."""
  name = JAX

  def __init__(self, shape: Shape, dtype: str, seed: int,
               mesh_shape: tuple = DEFAULT_MESH_SHAPE):
    config = jax_config(shape, dtype, mesh_shape)
    self.on_gpu = jax_on_gpu()
    self.mesh = sharding.config_mesh(config)
    self.model, optimizer, self.state = translation.create_model_and_state(
        config, shape.vocab_size, self.mesh)
    # A host copy of the initial weights: the state's buffers are donated to the steps.
    self.initial_params = jax.device_get(self.state.params)
    self.step_fn = train.jit_train_step(
        config, functools.partial(translation.seq2seq_loss, model=self.model,
                                  loss_fn=losses.get_loss(config)),
        optimizer, self.mesh, self.state)
    self.batches = [sharding.put_batch(b, self.mesh)
                    for b in make_batches(shape, NUM_BATCHES, seed)]
    self.i = 0

  def get_initial_params(self):
    """The initial parameters as a tree of NumPy arrays."""
    return self.initial_params

  def planned_bytes(self) -> int:
    """The compiled train step's XLA buffer plan: arguments + outputs + temporaries -
    donated aliases (bytes; -1 if the backend does not say)."""
    try:
      stats = self.step_fn.lower(self.state, self.batches[0], None).compile().memory_analysis()
      return int(stats.argument_size_in_bytes + stats.output_size_in_bytes
                 + stats.temp_size_in_bytes - stats.alias_size_in_bytes)
    except Exception:  # pylint: disable=broad-except
      return -1

  def step(self) -> float:
    """One synchronized step; returns the loss."""
    self.state, metrics = self.step_fn(self.state, self.batches[self.i % len(self.batches)],
                                       None)
    self.i += 1
    return float(metrics['loss'])

  def eval_logits(self, batch: dict) -> tuple[np.ndarray, float]:
    """Logits float32 [B, T, V] and label-smoothed loss of the initial weights, no dropout."""
    logits = np.asarray(self.model.apply({'params': self.initial_params}, batch['inputs'],
                                         batch['targets']), np.float32)
    weights = (batch['targets'] != 0).astype(np.float32)
    return logits, float(losses.cross_entropy(logits, batch['targets'], weights, 0.1)[0])

  def prepare_decoding(self, inputs: np.ndarray, caps: np.ndarray, max_length: int,
                       compiled: bool) -> None:
    """Greedy and beam-4 decoders of inputs int32 [B, S] with the initial weights."""
    del compiled  # Always jitted.
    params = jax.device_put(self.initial_params)
    j_inputs, j_caps = jax.device_put(inputs), jax.device_put(caps)
    self.decoders = {}
    for kind, beam in (('greedy', 0), ('beam4', 4)):
      fn = jax.jit(functools.partial(_jax_search, model=self.model, max_length=max_length,
                                     beam_size=beam))
      self.decoders[kind] = functools.partial(
          lambda f: np.asarray(f(params, j_inputs, j_caps)), fn)


class TorchTrainer(_Timed):
  """The PyTorch reference's train step, eager or compiled, on pre-placed batches."""

  def __init__(self, shape: Shape, dtype: str, seed: int, device: str, compiled: bool,
               initial_params, matmul_precision: str):
    self.name = COMPILED if compiled else EAGER
    self.shape, self.dtype, self.initial_params = shape, dtype, initial_params
    self.device = torch.device(device)
    self.on_gpu = self.device.type == 'cuda'
    torch.set_float32_matmul_precision(matmul_precision)
    torch.manual_seed(seed)
    model = make_torch_model(shape, self.device, initial_params)
    model.train()
    self.step_fn = torch_reference.TrainStep(model, dtype=dtype, compile=compiled)
    self.batches = [tuple(torch.from_numpy(b[k]).long().to(self.device)
                          for k in ('inputs', 'targets'))
                    for b in make_batches(shape, NUM_BATCHES, seed)]
    self.i = 0

  def step(self) -> float:
    loss = self.step_fn(*self.batches[self.i % len(self.batches)])
    self.i += 1
    return float(loss)  # Waits for the device.

  def _reset_peak(self) -> None:
    if self.on_gpu:
      torch.cuda.reset_peak_memory_stats()
    else:
      reset_peak_rss()

  def _peak(self) -> int:
    return torch.cuda.max_memory_allocated() if self.on_gpu else peak_rss_bytes()

  def eval_logits(self, batch: dict) -> tuple[np.ndarray, float]:
    """As `JaxTrainer.eval_logits`, with a fresh model from the initial weights."""
    model = make_torch_model(self.shape, self.device, self.initial_params).eval()
    inputs, targets = (torch.from_numpy(batch[k]).long().to(self.device)
                       for k in ('inputs', 'targets'))
    with torch.inference_mode(), torch_reference.autocast(self.device, self.dtype):
      logits = model(inputs, targets)
      loss = float(torch_reference.label_smoothed_cross_entropy(logits, targets))
    return logits.float().cpu().numpy(), loss

  def prepare_decoding(self, inputs: np.ndarray, caps: np.ndarray, max_length: int,
                       compiled: bool) -> None:
    """Greedy decoding as the PyTorch tutorial does it (no beam search there)."""
    del max_length  # GreedyDecoder stops at the caps.
    self.decoders = {}
    if self.name == COMPILED and not compiled:
      return
    model = make_torch_model(self.shape, self.device, self.initial_params).eval()
    greedy = torch_reference.GreedyDecoder(model, dtype=self.dtype,
                                           compile=self.name == COMPILED)
    t_inputs = torch.from_numpy(inputs).long().to(self.device)
    t_caps = torch.from_numpy(caps).long().to(self.device)
    self.decoders['greedy'] = lambda: greedy(t_inputs, t_caps).cpu().numpy()


def make_torch_model(shape: Shape, device, initial_params):
  model = torch_reference.TorchTransformer(
      shape.vocab_size, d_model=shape.d_model, num_heads=shape.num_heads, d_ff=shape.d_ff,
      num_encoder_layers=shape.num_layers, num_decoder_layers=shape.num_layers, dropout=0.1)
  torch_reference.load_flax_params(model, initial_params)
  return model.to(device)


def _jax_search(params, inputs, caps, *, model, max_length: int, beam_size: int):
  """As `translate.search`: inputs int32 [B, S], caps int32 [B] -> int32 [B, max_length]
  (greedy when beam_size is 0)."""
  cache = model.apply({'params': params}, inputs, max_length,
                      method=models.Transformer.init_cache)

  def tokens_to_logits(tokens, cache, index):
    return model.apply({'params': params}, cache, tokens, index,
                       method=models.Transformer.decode_step)

  caps = jnp.minimum(caps, max_length)
  if beam_size:
    seqs, _ = decode.beam_search(tokens_to_logits, cache, caps, max_length, beam_size, 0.6)
    return seqs[:, 0]
  return decode.sample(tokens_to_logits, cache, caps, max_length)


def output_lengths(seqs: np.ndarray) -> np.ndarray:
  """int [B, L] EOS-terminated outputs -> lengths without EOS [B]."""
  is_eos = seqs == EOS_ID
  return np.where(is_eos.any(1), is_eos.argmax(1), (seqs != 0).sum(1))


def same_outputs(a: np.ndarray, b: np.ndarray) -> float:
  """Fraction of rows whose outputs (up to and without EOS) are equal."""
  same = 0
  for x, y in zip(a, b):
    nx, ny = output_lengths(x[None])[0], output_lengths(y[None])[0]
    same += int(nx == ny and np.array_equal(x[:nx], y[:ny]))
  return same / len(a)


# --- Benchmark -------------------------------------------------------------------------


def peak_flops(dtype: str, cache: dict = {}) -> float:  # pylint: disable=dangerous-default-value
  """Peak FLOP/s of one JAX device (the first) for `dtype`, measured once on CPUs."""
  if dtype not in cache:
    cache[dtype] = flops.peak_flops_per_device(jax.devices()[0], jnp.dtype(dtype))
  return cache[dtype]


def check_same_model(workers: list[Worker], batch: dict) -> dict:
  """Logits and loss of both models with the initial weights, dropout off."""
  logits_jax, loss_jax = workers[0].call('eval_logits', batch)
  logits_torch, loss_torch = workers[1].call('eval_logits', batch)
  diff = np.abs(logits_jax - logits_torch)[batch['targets'] != 0]
  return {'max_abs_logit_diff': float(diff.max()), 'loss_jax': loss_jax,
          'loss_torch': loss_torch}


def bench_training(workers: list[Worker], args, shape: Shape, batches: list[dict]) -> dict:
  """First call, warm-up, then `args.steps` timed steps per implementation in rounds."""
  results = {w.name: {'losses': [], 'times': [], 'peak_bytes': 0} for w in workers}
  for w in workers:
    r = results[w.name]
    (r['first_call_s'],), r['losses'], _ = w.call('timed_steps', 1)
    r['losses'] += w.call('timed_steps', args.warmup)[1]
    print(f'  {w.name}: first call {r["first_call_s"]:.1f} s', flush=True)
  done = 0
  while done < args.steps:
    k = min(args.round_steps, args.steps - done)
    for w in workers:
      r = results[w.name]
      times, step_losses, peak = w.call('timed_steps', k)
      r['times'] += times
      r['losses'] += step_losses
      r['peak_bytes'] = max(r['peak_bytes'], peak)
    done += k
  if jax_on_gpu():
    results[JAX]['peak_bytes'] = workers[0].call('planned_bytes')
  tokens = [int(np.count_nonzero(b['targets'])) for b in batches]
  for r in results.values():
    # Which batch each timed step used: steps are taken in order, cycling over `batches`.
    first = 1 + args.warmup
    step_tokens = [tokens[(first + i) % len(tokens)] for i in range(len(r['times']))]
    r['step_s'] = median(r['times'])
    r['tokens_per_s'] = median([n / s for n, s in zip(step_tokens, r['times'])])
    r['sequences_per_s'] = shape.batch_size / r['step_s']
  return results


def bench_decoding(workers: list[Worker], args, batch: dict) -> dict:
  """Greedy (both frameworks) and beam 4 (transformer_jax) decoding of one batch."""
  inputs = batch['inputs'][:args.decode_batch or None]
  source_lengths = (inputs != 0).sum(1)
  max_length = int(translate.max_output_length(inputs.shape[1], 1.5, 10))
  caps = translate.max_output_length(source_lengths, 1.5, 10).astype(np.int32)
  kinds = {}
  for w in workers:
    w.call('prepare_decoding', inputs, caps, max_length, args.compile_decode)
    kinds[w.name] = [k for k in ('greedy', 'beam4') if w.call('has_decoder', k)]
  results = {}
  for w in workers:
    for kind in kinds[w.name]:
      seconds, outputs = w.call('timed_decode', kind)
      results[(w.name, kind)] = {'first_call_s': seconds, 'outputs': outputs, 'times': []}
      print(f'  decode {w.name} {kind}: first call {seconds:.1f} s', flush=True)
  for _ in range(args.decode_reps):
    for w in workers:
      for kind in kinds[w.name]:
        results[(w.name, kind)]['times'].append(w.call('timed_decode', kind)[0])
  reference = results[(JAX, 'greedy')]['outputs']
  for key, r in results.items():
    r['sentences_per_s'] = len(inputs) / median(r['times'])
    r['mean_output_length'] = float(output_lengths(r['outputs']).mean())
    if key[1] == 'greedy':
      r['same_as_jax_greedy'] = same_outputs(r['outputs'], reference)
    del r['outputs']
  return results


def run(args, torch_device) -> list[dict]:
  """All shapes and dtypes; one result dict per (shape, dtype, implementation).
  `torch_device` None skips PyTorch. With `args.time_budget`, a (shape, dtype) is skipped
  (and listed in `args.skipped`) when the time so far plus the longest one so far would
  exceed the budget."""
  rows, start, longest = [], time.perf_counter(), 0.0
  args.skipped = []
  for shape_name in args.shapes:
    shape = SHAPES[shape_name]
    for dtype in args.dtypes:
      elapsed = time.perf_counter() - start
      if args.time_budget and elapsed + longest > args.time_budget:
        print(f'== {shape_name} {dtype}: skipped, it would not fit in --time-budget '
              f'{args.time_budget:.0f} s ({elapsed:.0f} s spent)', flush=True)
        args.skipped.append(f'{shape_name} {dtype}')
        continue
      combo_start = time.perf_counter()
      print(f'== {shape_name} {dtype}', flush=True)
      batches = make_batches(shape, NUM_BATCHES, args.seed)
      workers = [Worker(JaxTrainer, shape, dtype, args.seed, args.mesh_shape,
                        environ=jax_environ())]
      try:
        check = {}
        if torch_device is not None:
          initial_params = workers[0].call('get_initial_params')
          for compiled in (False, True) if args.compile else (False,):
            workers.append(Worker(TorchTrainer, shape, dtype, args.seed, torch_device.type,
                                  compiled, initial_params, args.torch_matmul_precision))
          del initial_params
          check = check_same_model(workers, batches[0])
          print(f"  same weights, dropout off: max |logit diff| "
                f"{check['max_abs_logit_diff']:.2e}, loss {check['loss_jax']:.4f} (jax) "
                f"{check['loss_torch']:.4f} (torch)", flush=True)
        train_results = bench_training(workers, args, shape, batches)
        decode_results = bench_decoding(workers, args, batches[0]) if args.decode else {}
      finally:
        for w in workers:
          w.close()
      model_config = models.TransformerConfig.from_config(jax_config(shape, dtype),
                                                          shape.vocab_size)
      train_flops = flops.train_flops(model_config, shape.batch_size, shape.length,
                                      shape.length)
      for impl, r in train_results.items():
        line = (f"  -> {impl}: {1e3 * r['step_s']:.1f} ms/step, {r['tokens_per_s']:.0f} tok/s")
        for (d_impl, kind), d in decode_results.items():
          if d_impl == impl:
            line += f", {kind} {d['sentences_per_s']:.1f} sent/s"
        print(line, flush=True)
        row = {'shape': shape_name, 'dtype': dtype, 'impl': impl,
               'batch': f'{shape.batch_size}x{shape.length}',
               'first_call_s': r['first_call_s'], 'step_s': r['step_s'],
               'tokens_per_s': r['tokens_per_s'], 'sequences_per_s': r['sequences_per_s'],
               # transformer_jax steps on all JAX devices (the mesh), torch on one.
               'mfu': train_flops / r['step_s'] / peak_flops(dtype)
                      / (len(jax.devices()) if impl == JAX else 1),
               'peak_bytes': r['peak_bytes'], 'losses': r['losses'], 'check': check}
        for (d_impl, kind), d in decode_results.items():
          if d_impl == impl:
            row[f'{kind}_sentences_per_s'] = d['sentences_per_s']
            row[f'{kind}_first_call_s'] = d['first_call_s']
            row[f'{kind}_mean_output_length'] = d['mean_output_length']
            if 'same_as_jax_greedy' in d:
              row['greedy_same_as_jax'] = d['same_as_jax_greedy']
        rows.append(row)
      longest = max(longest, time.perf_counter() - combo_start)
  return rows


# --- Report ----------------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[str]]) -> str:
  widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h)
            for i, h in enumerate(headers)]
  line = lambda cells: '  '.join(c.rjust(w) if i > 2 else c.ljust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  return '\n'.join([line(headers), line(['-' * w for w in widths])] + [line(r) for r in rows])


def _ratio(rows: list[dict], row: dict, impl: str, key: str) -> str:
  other = next((r for r in rows if r['shape'] == row['shape'] and r['dtype'] == row['dtype']
                and r['impl'] == impl and key in r), None)
  if row['impl'] != JAX or other is None or key not in row:
    return ''
  return f'{row[key] / other[key]:.2f}x'


def _num(value, fmt: str) -> str:
  return '' if value is None or (isinstance(value, float) and math.isnan(value)) else \
      format(value, fmt)


def report(rows: list[dict], args) -> str:
  gpu = jax_on_gpu()
  memory = ('torch: max_memory_allocated during the steps; JAX: XLA buffer plan of the step'
            if gpu else 'peak RSS of the implementation\'s own process during its steps')
  lines = ['', 'Training (medians over the timed steps; tok/s = real target tokens/s; '
           'x = transformer_jax / PyTorch)', f'transformer_jax {mesh_description(args)}']
  lines.append(format_table(
      ['shape', 'dtype', 'impl', 'batch', 'first call s', 'step ms', 'tok/s', 'seq/s',
       'MFU %', 'peak MiB', 'x eager', 'x compile'],
      [[r['shape'], r['dtype'], r['impl'], r['batch'], f"{r['first_call_s']:.1f}",
        f"{1e3 * r['step_s']:.1f}", f"{r['tokens_per_s']:.0f}", f"{r['sequences_per_s']:.1f}",
        f"{100 * r['mfu']:.2f}",
        f"{r['peak_bytes'] / 2**20:.0f}" if r['peak_bytes'] > 0 else 'n/a',
        _ratio(rows, r, EAGER, 'tokens_per_s'), _ratio(rows, r, COMPILED, 'tokens_per_s')]
       for r in rows]))
  lines.append(f'peak MiB: {memory}')
  if args.decode:
    lines += ['', 'Decoding (sentences/s, median over calls; first call includes compiling; '
              'x = transformer_jax greedy / PyTorch greedy)']
    lines.append(format_table(
        ['shape', 'dtype', 'impl', 'rows', 'greedy sent/s', 'first call s', 'out len',
         'same as jax %', 'beam4 sent/s', 'first call s', 'x eager', 'x compile'],
        [[r['shape'], r['dtype'], r['impl'],
          str(min(args.decode_batch or 10**9, int(r['batch'].split('x')[0]))),
          _num(r.get('greedy_sentences_per_s'), '.1f'), _num(r.get('greedy_first_call_s'), '.1f'),
          _num(r.get('greedy_mean_output_length'), '.1f'),
          _num(100 * r['greedy_same_as_jax'] if r['impl'] != JAX and 'greedy_same_as_jax' in r
               else None, '.0f'),
          _num(r.get('beam4_sentences_per_s'), '.1f'), _num(r.get('beam4_first_call_s'), '.1f'),
          _ratio(rows, r, EAGER, 'greedy_sentences_per_s'),
          _ratio(rows, r, COMPILED, 'greedy_sentences_per_s')]
         for r in rows if 'greedy_sentences_per_s' in r]))
  lines += ['', 'Loss (first step -> mean of the last 3 steps; same initial weights, dropout on):']
  for r in rows:
    tail = float(np.mean(r['losses'][-3:]))
    lines.append(f"  {r['shape']} {r['dtype']} {r['impl']}: {r['losses'][0]:.4f} -> {tail:.4f}")
  return '\n'.join(lines)


def mesh_description(args) -> str:
  """The transformer_jax mesh, e.g. "mesh (data, fsdp, tensor) = (1, 1, 1) over 1 device
  (--mesh-shape 1,-1,1); rules embed->fsdp, ..."."""
  resolved = sharding.mesh_shape(args.mesh_shape, len(jax.devices()))
  rules = ', '.join(f"{name}->{'+'.join(axes) if isinstance(axes, tuple) else axes}"
                    for name, axes in sharding.config_rules(mt.get_config()))
  n = math.prod(resolved)
  return (f"mesh ({', '.join(sharding.MESH_AXES)}) = {resolved} over {n} "
          f"device{'s' if n != 1 else ''} (--mesh-shape {','.join(map(str, args.mesh_shape))}); "
          f'logical axis rules {rules}')


def environment(torch_device) -> str:
  device = jax.devices()[0]
  parts = [f'python {platform.python_version()}', f'jax {jax.__version__} on '
           f'{len(jax.devices())} x {device.device_kind} ({jax.default_backend()})']
  if torch is not None and torch_device is not None:
    parts.append(f'torch {torch.__version__} on {torch_device}, '
                 f'{torch.get_num_threads()} intra-op threads, float32 matmul precision '
                 f'{torch.get_float32_matmul_precision()!r}')
  elif torch is not None:
    parts.append('PyTorch rows off (--no-torch)')
  else:
    parts.append(f'torch missing ({TORCH_ERROR}): PyTorch rows skipped; '
                 'pip install -r requirements-bench.txt')
  parts.append(f'{os.cpu_count()} CPUs')
  parts.append(huge_pages_note())
  return '; '.join(parts)


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--quick', action='store_true',
                      help='small shape, float32, few steps, no compiled PyTorch decoding '
                      '(under 3 minutes on 2 idle CPU cores)')
  parser.add_argument('--tiny', action='store_true', help=argparse.SUPPRESS)  # Smoke test.
  parser.add_argument('--shapes', default=None, help='comma-separated: small, base')
  parser.add_argument('--dtypes', default=None, help='comma-separated: float32, bfloat16')
  parser.add_argument('--steps', type=int, default=None, help='timed steps per implementation')
  parser.add_argument('--round-steps', type=int, default=None,
                      help='steps of one implementation before switching to the next')
  parser.add_argument('--warmup', type=int, default=None, help='untimed steps after the first')
  parser.add_argument('--decode-reps', type=int, default=None, help='timed decoding calls')
  parser.add_argument('--decode-batch', type=int, default=0,
                      help='decode this many rows of the batch (0: all)')
  parser.add_argument('--no-decode', dest='decode', action='store_false')
  parser.add_argument('--no-compile', dest='compile', action='store_false',
                      help='skip the torch.compile rows')
  parser.add_argument('--compile-decode', dest='compile_decode', action='store_true',
                      default=None,
                      help='also time compiled PyTorch greedy decoding (default, but not with '
                      '--quick)')
  parser.add_argument('--no-compile-decode', dest='compile_decode', action='store_false',
                      help='skip compiled PyTorch greedy decoding')
  parser.add_argument('--no-torch', dest='torch', action='store_false')
  parser.add_argument('--torch-matmul-precision', default='high',
                      choices=('highest', 'high', 'medium'),
                      help="torch.set_float32_matmul_precision: 'high' (TF32 on GPUs) matches "
                      "JAX's default precision")
  parser.add_argument('--time-budget', type=float, default=0,
                      help='seconds: skip the (shape, dtype) runs that would not fit; 0: none')
  parser.add_argument('--mesh-shape', default=','.join(map(str, DEFAULT_MESH_SHAPE)),
                      help="transformer_jax's (data, fsdp, tensor) mesh, config.mesh_shape, one "
                      "-1 for the rest: '-1,1,1' (default) data parallel, '1,-1,1' FSDP "
                      "('embed' -> 'fsdp' in config.logical_axis_rules) over all devices")
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--json', default='', help='also write the results to this file')
  args = parser.parse_args(argv)
  if args.tiny:
    defaults = dict(shapes='tiny', dtypes='float32', steps=6, round_steps=2, warmup=1,
                    decode_reps=1)
  elif args.quick:
    defaults = dict(shapes='small', dtypes='float32', steps=4, round_steps=2, warmup=1,
                    decode_reps=1, compile_decode=False)
  else:
    defaults = dict(shapes='small,base', dtypes='float32,bfloat16', steps=30, round_steps=5,
                    warmup=3, decode_reps=3)
  defaults.setdefault('compile_decode', True)
  for name, value in defaults.items():
    if getattr(args, name) is None:
      setattr(args, name, value)
  try:
    args.mesh_shape = tuple(int(n) for n in args.mesh_shape.split(','))
  except ValueError:
    args.mesh_shape = ()
  if (len(args.mesh_shape) != 3 or any(n < 1 and n != -1 for n in args.mesh_shape)
      or args.mesh_shape.count(-1) > 1):
    parser.error('--mesh-shape: 3 comma-separated sizes (data, fsdp, tensor), each >= 1 or '
                 'one of them -1 (the rest), e.g. 1,-1,1')
  args.shapes = args.shapes.split(',')
  args.dtypes = args.dtypes.split(',')
  for name in args.shapes:
    if name not in SHAPES:
      parser.error(f'--shapes: unknown shape {name!r}; use small, base')
  for dtype in args.dtypes:
    if dtype not in ('float32', 'bfloat16'):
      parser.error(f'--dtypes: unknown dtype {dtype!r}; use float32, bfloat16')
  if args.steps < 1 or args.round_steps < 1 or args.warmup < 0 or args.decode_reps < 1:
    parser.error('--steps, --round-steps, --decode-reps must be >= 1 and --warmup >= 0')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  warnings.filterwarnings('ignore', category=FutureWarning)
  torch_device = None
  if torch is not None and args.torch:
    torch_device = torch.device('cuda' if torch.cuda.is_available() else 'cpu')
    # JAX computes float32 matmuls on recent GPUs in TF32 at its default precision; torch
    # does that at 'high' (its default, 'highest', is true float32).
    torch.set_float32_matmul_precision(args.torch_matmul_precision)
    torch.manual_seed(args.seed)
  print(environment(torch_device), flush=True)
  try:
    print(f'transformer_jax {mesh_description(args)}', flush=True)
  except sharding.ConfigError as e:
    print(f'benchmarks/throughput.py: --mesh-shape: {e}', file=sys.stderr)
    return 2
  if torch_device is not None and jax_on_gpu() != (torch_device.type == 'cuda'):
    print(f'WARNING: JAX runs on {jax.default_backend()} but torch on {torch_device}: '
          'the ratios compare different hardware', flush=True)
  if len(jax.devices()) > 1:
    print(f'NOTE: transformer_jax trains on {len(jax.devices())} devices, PyTorch '
          'on one; for a per-device comparison run with CUDA_VISIBLE_DEVICES=0', flush=True)
  start = time.perf_counter()
  rows = run(args, torch_device)
  print(report(rows, args))
  print(f'\nbenchmark wall time {time.perf_counter() - start:.0f} s; steps {args.steps} per '
        f'implementation in rounds of {args.round_steps} after {args.warmup} warm-up; '
        f'peak FLOP/s used for MFU: '
        + ', '.join(f'{d} {peak_flops(d) / 1e12:.3g} T' for d in args.dtypes))
  if args.skipped:
    print(f"NOTE: skipped for --time-budget: {', '.join(args.skipped)}")
  if torch is None:
    print(f'PyTorch rows skipped: torch is not installed ({TORCH_ERROR}); '
          'pip install -r requirements-bench.txt')
  if args.json:
    with open(args.json, 'w') as f:
      json.dump({'environment': environment(torch_device), 'mesh': mesh_description(args),
                 'args': vars(args), 'rows': rows}, f, indent=1)
  bad = [r for r in rows if not all(math.isfinite(x) for x in r['losses'])]
  for r in bad:
    print(f"ERROR: non-finite loss in {r['shape']} {r['dtype']} {r['impl']}", file=sys.stderr)
  if args.tiny:
    for r in rows:
      if not np.mean(r['losses'][-3:]) < r['losses'][0]:
        print(f"ERROR: loss did not decrease in {r['impl']}", file=sys.stderr)
        bad.append(r)
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
