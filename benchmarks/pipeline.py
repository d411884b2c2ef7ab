"""Full-pipeline benchmark on Multi30k: input pipeline and training, transformer_jax against
the PyTorch reference fed the way the PyTorch translation tutorial feeds it.

  python benchmarks/pipeline.py [--workdir runs/bench_pipeline] [--steps 50] [--no-compile]

Data: the Multi30k train split from $TRANSFORMER_JAX_DATA_DIR (default
../shared/data/multi30k beside the repository), read with `data.load_pairs`, tokenized with
the SentencePiece model in {workdir}/tokenizer/spm.model (trained there first if missing, by
`tokenizer.load_or_train`), `data.tokenize_pairs`. Both frameworks train on these same
token ids (EOS-terminated, pairs over 64 tokens dropped).

(a) Input pipeline alone: `data.Batcher(...).train(...)` called as `train._train` calls it;
    batches/s and real (non-pad) target tokens/s of pulling `--input-batches` batches after
    the first (which fills the shuffle buffer and is timed apart), and the fraction of the
    computed target (and source) positions that are real tokens.
(b) transformer_jax: configs/mt.py (model, optimizer, Batcher: packed rows when
    `pack_examples`, else length buckets; `--pack` overrides), `train.create_state` and
    `train.train_step` (with the translation task's `init_params` and `seq2seq_loss`) jitted
    as `train._train` does, timing the loop that pulls a batch, counts its real target
    tokens, puts it on the devices and dispatches the step (no per-step synchronization, as
    in `_train`). Every batch shape (one when packing, one per bucket otherwise) is compiled
    before timing: one batch of each shape is taken from another pass of the pipeline and
    trained on (reported as "compile s"); a shape first seen during timing would be counted
    and reported.
(c) The PyTorch reference (`benchmarks/torch_reference.py`) with the same model shape
    (d_model, heads, d_ff, layers, dropout, vocabulary of the tokenizer) and the same initial
    weights, fed as in the tutorial: `torch.utils.data.DataLoader` over the pairs, shuffled,
    batches of 128 pairs, `collate_fn` padding with `pad_sequence` to the longest in the
    batch, `loss.item()` read every step. Eager, and `torch.compile(dynamic=True)` (one graph
    for all lengths); the first call (compile) and the warm-up steps are reported apart.

(b) and each row of (c) run in a worker process of their own (`benchmarks/worker.py`), so
that neither framework's allocator or thread pools slow the other; the main process runs
(a) and drives the workers. Timed steps run in rounds (`--round-steps` of each
implementation in turn) after
`--warmup` untimed steps each. Training tokens/s = real target tokens / wall time of the
timed steps. Ratios are transformer_jax / PyTorch (> 1: transformer_jax is faster).

Training settings differ where each framework's own run would differ: transformer_jax uses
configs/mt.py's learning-rate schedule (warmup then rsqrt); the PyTorch reference a constant
learning rate of 1e-3 (both AdamW, same betas, eps, weight decay, clipping, loss). Speed does
not depend on the learning rate.
"""
from __future__ import annotations

import argparse
import functools
import os
import platform
import sys
import time
import warnings

# Inherited by the worker processes: leave GPU memory to torch and the other processes.
os.environ.setdefault('XLA_PYTHON_CLIENT_PREALLOCATE', 'false')
os.environ.setdefault('XLA_PYTHON_CLIENT_MEM_FRACTION', '0.45')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_HERE = os.path.dirname(os.path.abspath(__file__))
_REPO = os.path.dirname(_HERE)
sys.path.insert(0, _REPO)  # transformer_jax, configs.
sys.path.insert(0, _HERE)  # torch_reference.

# pylint: disable=g-import-not-at-top,wrong-import-position
import jax
import numpy as np

from configs import mt
from transformer_jax import data
from transformer_jax import losses
from transformer_jax import optim
from transformer_jax import sharding
from transformer_jax import tokenizer
from transformer_jax import train
from transformer_jax.tasks import translation
from worker import huge_pages_note, jax_environ, Worker
# pylint: enable=g-import-not-at-top,wrong-import-position

try:
  import torch  # pylint: disable=g-import-not-at-top
  from torch.nn.utils.rnn import pad_sequence  # pylint: disable=g-import-not-at-top
  import torch_reference  # pylint: disable=g-import-not-at-top
  TORCH_ERROR = ''
except ImportError as e:
  torch = torch_reference = None
  TORCH_ERROR = str(e)

JAX, EAGER, COMPILED = 'transformer_jax', 'torch eager', 'torch.compile'
TUTORIAL_BATCH_SIZE = 128


def _signature(batch: dict) -> tuple:
  """The shapes and dtypes of a batch: one compiled program each."""
  return tuple(sorted((k, v.shape, str(v.dtype)) for k, v in batch.items()))


def _real_fraction(batches: list[dict], key: str) -> float:
  return (sum(int(np.count_nonzero(b[key])) for b in batches)
          / sum(b[key].size for b in batches))


def _sync(tree) -> None:
  jax.block_until_ready(tree)


# --- Data ------------------------------------------------------------------------------


def load_data(config, workdir: str):
  """The tokenizer and the tokenized train pairs (lists of int32 [<= 64] EOS-terminated)."""
  src, tgt = data.load_pairs(config, config.train_split, workdir)
  sp = tokenizer.load_or_train(config, workdir, src + tgt)
  src, tgt = data.tokenize_pairs(sp, src, tgt, config)
  return sp, src, tgt


def make_batcher(config, mesh):
  """The Batcher exactly as `train._train` builds it."""
  return data.Batcher(max(config.max_source_length, config.max_target_length),
                      config.max_tokens_per_batch, config.length_bucket_step, mesh.size,
                      pack=config.pack_examples)


def train_iterator(batcher, config, src, tgt):
  """Training batches exactly as `train._train` asks for them (from step 0)."""
  return batcher.train({'inputs': src, 'targets': tgt}, config.seed, config.shuffle_buffer_size,
                       skip=0).as_numpy_iterator()


def bench_input_pipeline(batcher, config, src, tgt, num_batches: int) -> dict:
  """(a): batches/s, real target tokens/s, real fractions of the target/source positions."""
  start = time.perf_counter()
  iterator = train_iterator(batcher, config, src, tgt)
  next(iterator)
  first_s = time.perf_counter() - start
  batches = []
  start = time.perf_counter()
  for _ in range(num_batches):
    batches.append(next(iterator))
  seconds = time.perf_counter() - start
  tokens = sum(int(np.count_nonzero(b['targets'])) for b in batches)
  return {'first_batch_s': first_s, 'batches_per_s': num_batches / seconds,
          'tokens_per_s': tokens / seconds, 'tokens_per_batch': tokens / num_batches,
          'target_real_fraction': _real_fraction(batches, 'targets'),
          'source_real_fraction': _real_fraction(batches, 'inputs'),
          'shapes': sorted({b['targets'].shape for b in batches}, key=lambda s: s[1])}


class TutorialLoader:
  """The tutorial's feeding: a shuffled DataLoader of pairs, batches of 128 padded with
  pad_sequence to the longest in the batch; endless (a new epoch when one ends)."""

  def __init__(self, src, tgt, seed: int, device):
    pairs = [(torch.from_numpy(s).long(), torch.from_numpy(t).long()) for s, t in zip(src, tgt)]
    generator = torch.Generator().manual_seed(seed)
    self.loader = torch.utils.data.DataLoader(pairs, batch_size=TUTORIAL_BATCH_SIZE,
                                              shuffle=True, collate_fn=self.collate,
                                              generator=generator)
    self.device = device
    self.iterator = iter(self.loader)
    self.positions = self.real = 0

  @staticmethod
  def collate(batch):
    sources, targets = zip(*batch)
    return (pad_sequence(sources, batch_first=True, padding_value=0),
            pad_sequence(targets, batch_first=True, padding_value=0))

  def __next__(self):
    try:
      inputs, targets = next(self.iterator)
    except StopIteration:
      self.iterator = iter(self.loader)
      inputs, targets = next(self.iterator)
    self.positions += targets.numel()
    return inputs.to(self.device), targets.to(self.device)


# --- Trainers --------------------------------------------------------------------------


class JaxLoop:
  """(b): transformer_jax's training loop body, as in `train._train`."""
  name = JAX

  def __init__(self, config, vocab_size: int, mesh, batcher, src, tgt):
    self.config, self.mesh = config, mesh
    self.model, optimizer, self.state = translation.create_model_and_state(
        config, vocab_size, mesh)
    self.initial_params = jax.device_get(self.state.params)  # Buffers get donated.
    replicated = sharding.replicated(mesh)
    self.step_fn = jax.jit(
        functools.partial(train.train_step, optimizer=optimizer,
                          loss_fn=functools.partial(translation.seq2seq_loss, model=self.model,
                                                    loss_fn=losses.get_loss(config)),
                          schedule=optim.learning_rate_schedule(config), seed=config.seed),
        in_shardings=(replicated, sharding.batch_sharding(mesh)),
        out_shardings=(replicated, replicated), donate_argnums=0)
    self.batcher, self.src, self.tgt = batcher, src, tgt
    self.iterator = train_iterator(batcher, config, src, tgt)
    self.seen: set = set()
    self.new_shapes_while_timed = 0
    self.losses: list = []
    self.real = self.positions = 0

  def compile_all(self, max_batches: int) -> dict:
    """Trains once on one batch of every bucket shape found in up to `max_batches` batches
    of another pass over the pipeline (stops when all `batcher.lengths` are seen)."""
    start = time.perf_counter()
    if getattr(self.batcher, 'pack', False):
      expected = 1  # Packed rows: one shape.
    else:
      expected = len(getattr(self.batcher, 'lengths', ())) or None
    scan = train_iterator(self.batcher, self.config, self.src, self.tgt)
    found = {}
    for _ in range(max_batches):
      batch = next(scan)
      found.setdefault(_signature(batch), batch)
      if expected and len(found) >= expected:
        break
    scan_s = time.perf_counter() - start
    start = time.perf_counter()
    for signature, batch in found.items():
      self.state, metrics = self.step_fn(self.state, sharding.put_batch(batch, self.mesh))
      self.losses.append(float(metrics['loss']))
      self.seen.add(signature)
    return {'compile_s': time.perf_counter() - start, 'scan_s': scan_s,
            'shapes_compiled': len(found), 'shapes_expected': expected}

  def run(self, steps: int, timed: bool) -> tuple[float, int]:
    """`steps` loop iterations; returns (seconds, real target tokens)."""
    tokens, metrics = 0, None
    start = time.perf_counter()
    for _ in range(steps):
      batch = next(self.iterator)
      tokens += int(np.count_nonzero(batch['targets']))
      signature = _signature(batch)
      if signature not in self.seen:
        self.seen.add(signature)
        self.new_shapes_while_timed += int(timed)
      self.positions += batch['targets'].size
      self.state, metrics = self.step_fn(self.state, sharding.put_batch(batch, self.mesh))
    _sync(self.state)
    seconds = time.perf_counter() - start
    self.real += tokens
    self.losses.append(float(metrics['loss']))
    return seconds, tokens

  def get_initial_params(self):
    return self.initial_params

  def reset_counts(self) -> None:
    self.real = self.positions = 0

  def stats(self) -> dict:
    return {'losses': self.losses, 'real': self.real, 'positions': self.positions,
            'new_shapes_while_timed': self.new_shapes_while_timed}


def make_jax_loop(config, workdir: str) -> JaxLoop:
  """(b) in a worker process: the data, the mesh and the Batcher as `train._train` makes them."""
  sp, src, tgt = load_data(config, workdir)
  mesh = sharding.make_mesh()
  return JaxLoop(config, sp.vocab_size(), mesh, make_batcher(config, mesh), src, tgt)


class TorchLoop:
  """(c): the PyTorch reference's training loop fed by `TutorialLoader`."""

  def __init__(self, config, vocab_size: int, src, tgt, device, compiled: bool,
               initial_params):
    self.name = COMPILED if compiled else EAGER
    model = torch_reference.TorchTransformer(
        vocab_size, d_model=config.d_model, num_heads=config.num_heads, d_ff=config.d_ff,
        num_encoder_layers=config.num_encoder_layers,
        num_decoder_layers=config.num_decoder_layers, dropout=config.dropout_rate)
    torch_reference.load_flax_params(model, initial_params)
    model.to(device).train()
    self.step_fn = torch_reference.TrainStep(
        model, dtype=config.dtype, compile=compiled, dynamic=True if compiled else None,
        max_grad_norm=config.max_grad_norm, label_smoothing=config.label_smoothing)
    self.loader = TutorialLoader(src, tgt, config.seed, device)
    self.losses: list = []
    self.real = self.positions = 0

  def run(self, steps: int, timed: bool) -> tuple[float, int]:
    del timed
    tokens = 0
    start = time.perf_counter()
    for _ in range(steps):
      inputs, targets = next(self.loader)
      tokens += int((targets != 0).sum())
      self.losses.append(self.step_fn(inputs, targets).item())  # As the tutorial: every step.
    seconds = time.perf_counter() - start
    self.positions = self.loader.positions
    self.real += tokens
    return seconds, tokens

  def reset_counts(self) -> None:
    self.real = self.positions = self.loader.positions = 0

  def stats(self) -> dict:
    return {'losses': self.losses, 'real': self.real, 'positions': self.positions}


def make_torch_loop(config, workdir: str, device: str, compiled: bool,
                    initial_params) -> TorchLoop:
  """(c) in a worker process, from the tokenizer that the main process trained."""
  torch.set_float32_matmul_precision('high')  # TF32 on GPUs, as JAX's default precision.
  torch.manual_seed(config.seed)
  sp, src, tgt = load_data(config, workdir)
  return TorchLoop(config, sp.vocab_size(), src, tgt, torch.device(device), compiled,
                   initial_params)


# --- Main ------------------------------------------------------------------------------


def format_table(headers: list[str], rows: list[list[str]]) -> str:
  widths = [max([len(h)] + [len(r[i]) for r in rows]) for i, h in enumerate(headers)]
  line = lambda cells: '  '.join(c.ljust(w) if i == 0 else c.rjust(w)
                                 for i, (c, w) in enumerate(zip(cells, widths)))
  return '\n'.join([line(headers), line(['-' * w for w in widths])] + [line(r) for r in rows])


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', default='',
                      help='holds tokenizer/spm.model (trained if missing) and tfds/; '
                      'default runs/bench_pipeline')
  parser.add_argument('--steps', type=int, default=50, help='timed steps per implementation')
  parser.add_argument('--round-steps', type=int, default=10)
  parser.add_argument('--warmup', type=int, default=5, help='untimed steps after compiling')
  parser.add_argument('--input-batches', type=int, default=300,
                      help='batches timed for the input pipeline alone')
  parser.add_argument('--compile-scan', type=int, default=3000,
                      help='batches scanned for bucket shapes to compile before timing')
  parser.add_argument('--no-compile', dest='compile', action='store_false',
                      help='skip torch.compile')
  parser.add_argument('--no-torch', dest='torch', action='store_false')
  parser.add_argument('--pack', choices=('config', 'true', 'false'), default='config',
                      help="transformer_jax's batches: configs/mt.py's pack_examples, or packed "
                      '/ length-bucketed')
  parser.add_argument('--tiny', action='store_true', help=argparse.SUPPRESS)  # Smoke test.
  args = parser.parse_args(argv)
  args.workdir = args.workdir or os.path.join(
      _REPO, 'runs', 'bench_pipeline_tiny' if args.tiny else 'bench_pipeline')
  if min(args.steps, args.round_steps, args.input_batches) < 1 or args.warmup < 0:
    parser.error('--steps, --round-steps, --input-batches must be >= 1, --warmup >= 0')
  return args


def main(argv=None) -> int:
  args = parse_args(argv)
  warnings.filterwarnings('ignore', category=FutureWarning)
  config = mt.get_config('tiny' if args.tiny else '')
  if args.pack != 'config':
    config.pack_examples = args.pack == 'true'
  config.data_dir = os.environ.get(mt.DATA_DIR_ENV) or os.path.join(
      _REPO, '..', 'shared', 'data', 'multi30k')
  mesh = sharding.make_mesh()
  use_torch = torch is not None and args.torch
  device = torch.device('cuda' if torch.cuda.is_available() else 'cpu') if use_torch else None
  print(f'python {platform.python_version()}; jax {jax.__version__} on {len(jax.devices())} x '
        f'{jax.devices()[0].device_kind}; '
        + (f'torch {torch.__version__} on {device}, {torch.get_num_threads()} threads'
           if use_torch else f'torch missing or off ({TORCH_ERROR or "--no-torch"})')
        + f'; {os.cpu_count()} CPUs; {huge_pages_note()}; data '
        f'{os.path.abspath(config.data_dir)}', flush=True)

  start = time.perf_counter()
  sp, src, tgt = load_data(config, args.workdir)
  print(f'data: {len(src)} pairs, vocab {sp.vocab_size()}, loaded and tokenized in '
        f'{time.perf_counter() - start:.1f} s', flush=True)
  batcher = make_batcher(config, mesh)

  pipeline = bench_input_pipeline(batcher, config, src, tgt, args.input_batches)
  print(f"(a) input pipeline: {pipeline['batches_per_s']:.1f} batches/s, "
        f"{pipeline['tokens_per_s']:.0f} real target tokens/s, "
        f"{100 * pipeline['target_real_fraction']:.1f}% of target positions real "
        f"(source {100 * pipeline['source_real_fraction']:.1f}%), first batch "
        f"{pipeline['first_batch_s']:.1f} s; shapes {pipeline['shapes']}", flush=True)

  loops = [Worker(make_jax_loop, config, args.workdir, environ=jax_environ())]
  try:
    compiled = loops[0].call('compile_all', args.compile_scan)
    print(f"(b) transformer_jax: compiled {compiled['shapes_compiled']} of "
          f"{compiled['shapes_expected']} batch shapes in {compiled['compile_s']:.1f} s "
          f"(found in {compiled['scan_s']:.1f} s of scanning the pipeline)", flush=True)
    setup = {JAX: {'first_call_s': compiled['compile_s']}}
    if use_torch:
      initial_params = loops[0].call('get_initial_params')
      for is_compiled in ((False, True) if args.compile else (False,)):
        loop = Worker(make_torch_loop, config, args.workdir, device.type, is_compiled,
                      initial_params)
        first_s, _ = loop.call('run', 1, False)
        setup[loop.name] = {'first_call_s': first_s}
        loops.append(loop)
        print(f'(c) {loop.name}: first call {first_s:.1f} s', flush=True)
      del initial_params
    for loop in loops:
      setup[loop.name]['warmup_s'], _ = loop.call('run', args.warmup, False)
      print(f"  {loop.name}: {args.warmup} warm-up steps {setup[loop.name]['warmup_s']:.1f} s",
            flush=True)
      loop.call('reset_counts')
    totals = {loop.name: [0.0, 0] for loop in loops}
    done = 0
    while done < args.steps:
      k = min(args.round_steps, args.steps - done)
      for loop in loops:
        seconds, tokens = loop.call('run', k, True)
        totals[loop.name][0] += seconds
        totals[loop.name][1] += tokens
      done += k
    stats = {loop.name: loop.call('stats') for loop in loops}
  finally:
    for loop in loops:
      loop.close()

  rate = {name: tokens / seconds for name, (seconds, tokens) in totals.items()}
  ratio = lambda name: f'{rate[JAX] / rate[name]:.2f}x' if name in rate else ''
  batching = 'packed' if config.pack_examples else 'bucketed'
  rows = [[f'(a) Batcher.train alone, {batching}', f"{pipeline['first_batch_s']:.1f}", '',
           f"{pipeline['batches_per_s']:.1f}", f"{pipeline['tokens_per_s']:.0f}",
           f"{100 * pipeline['target_real_fraction']:.1f}", '', '']]
  for name, (seconds, tokens) in totals.items():
    label = {JAX: f'(b) transformer_jax, Batcher {batching}',
             EAGER: '(c) torch eager, DataLoader 128',
             COMPILED: '(c) torch.compile dynamic, DataLoader 128'}[name]
    rows.append([label, f"{setup[name]['first_call_s']:.1f}",
                 f"{setup[name]['warmup_s']:.1f}", f'{args.steps / seconds:.2f}',
                 f'{tokens / seconds:.0f}',
                 f"{100 * stats[name]['real'] / max(stats[name]['positions'], 1):.1f}",
                 ratio(EAGER) if name == JAX else '',
                 ratio(COMPILED) if name == JAX else ''])
  print('\nMulti30k train, configs/mt.py model (d_model %d, %d heads, d_ff %d, %d+%d layers, '
        'vocab %d), %s' % (config.d_model, config.num_heads, config.d_ff,
                           config.num_encoder_layers, config.num_decoder_layers,
                           sp.vocab_size(), config.dtype))
  print(format_table(
      ['', 'compile/first s', 'warm-up s', 'batches|steps/s', 'real tgt tok/s', 'real tgt %',
       'x eager', 'x compile'], rows))
  print(f'compile/first s: (b) compiling every batch shape before timing (one training step '
        f'each); (c) the first step. {args.warmup} warm-up steps each, then {args.steps} timed '
        f'steps in rounds of {args.round_steps}. real tgt %: real tokens among the computed '
        f'target positions. x: transformer_jax / PyTorch real target tokens/s.')
  new_shapes = stats[JAX]['new_shapes_while_timed']
  if new_shapes:
    print(f'WARNING: {new_shapes} batch shapes were first seen (compiled) during the timed '
          'steps; raise --compile-scan')
  for name, stat in stats.items():
    print(f"  loss {name}: {stat['losses'][0]:.3f} -> {stat['losses'][-1]:.3f}")
  bad = [name for name, stat in stats.items() if not np.all(np.isfinite(stat['losses']))]
  if bad:
    print(f'ERROR: non-finite loss in {bad}', file=sys.stderr)
  return 1 if bad else 0


if __name__ == '__main__':
  sys.exit(main())
