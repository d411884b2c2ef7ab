"""The exported translator (`--mode=export`, `transformer_jax.serving`) against the in-process
`translate.Translator`: artifact size, sentences/s, identical outputs.

  python benchmarks/export.py [--workdir runs/de_en] [--config configs/multi30k_de_en.py]
                              [--source FILE] [--output DIR] [--reps 2]

Exports the best checkpoint of `--workdir` (default: the Multi30k de→en run in runs/de_en,
trained with configs/multi30k_de_en.py) into `--output` (default: a new folder under /tmp)
and prints:

- the size of each file of the export folder (MiB);
- for greedy and beam search (the config's beam_size 4, length penalty 0.6), the in-process
  Translator and the ExportedTranslator on the lines of `--source` (default: Multi30k's
  test_2016_flickr.de.gz, 1,000 German captions): the first call (compiling every length
  bucket, then translating), the best of `--reps` further calls (warm), sentences/s of
  that, and whether the outputs of every call equal the in-process translator's.

Both run in this process, one after the other, greedy then beam, alternating in each
repetition so that a slow phase of a shared machine hits both alike. About 20 minutes on 2
CPU cores shared with other jobs (10 minutes of CPU time).
"""
from __future__ import annotations

import argparse
import gzip
import importlib.util
import os
import sys
import tempfile
import time

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)

# pylint: disable=g-import-not-at-top,wrong-import-position
from absl import logging
import jax

from transformer_jax import evaluation
from transformer_jax import export
from transformer_jax import serving
from transformer_jax import translate

_DATA_DIR = os.environ.get('TRANSFORMER_JAX_DATA_DIR') or os.path.join(
    _REPO, '..', 'shared', 'data', 'multi30k')


def load_config(path: str):
  """`get_config()` of a config file."""
  spec = importlib.util.spec_from_file_location('bench_config', path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


def read_lines(path: str) -> list[str]:
  opener = gzip.open if path.endswith('.gz') else open
  with opener(path, 'rt', encoding='utf-8', newline='\n') as f:
    return [line.rstrip('\n') for line in f]


def timed(fn) -> tuple[float, list[str]]:
  start = time.perf_counter()
  out = fn()
  return time.perf_counter() - start, out


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n', 1)[0])
  parser.add_argument('--workdir', default=os.path.join(_REPO, 'runs', 'de_en'))
  parser.add_argument('--config', default=os.path.join(_REPO, 'configs', 'multi30k_de_en.py'))
  parser.add_argument('--source', default=os.path.join(_DATA_DIR, 'test_2016_flickr.de.gz'))
  parser.add_argument('--output', default=None, help='export folder (new or empty)')
  parser.add_argument('--reps', type=int, default=2, help='warm calls per implementation')
  args = parser.parse_args()
  logging.set_verbosity(logging.WARNING)
  config = load_config(args.config)
  config.data_dir = _DATA_DIR
  output = args.output or os.path.join(tempfile.mkdtemp(prefix='export_bench_', dir='/tmp'),
                                       'model')
  lines = read_lines(args.source)
  print(f'jax {jax.__version__} on {jax.default_backend()} ({os.cpu_count()} CPUs, load '
        f'average {os.getloadavg()[0]:.1f}); {len(lines)} lines of {args.source}')

  seconds, manifest = timed(lambda: export.run_export(config, args.workdir, output, 'best'))
  print(f'\nexport: {seconds:.1f} s, {manifest["params"]["num_params"]:,} parameters, '
        f'platforms {", ".join(manifest["platforms"])}\n')
  print('| file | MiB |\n| --- | ---: |')
  total = 0
  for name in sorted(os.listdir(output)):
    size = os.path.getsize(os.path.join(output, name))
    total += size
    print(f'| {name} | {size / 2**20:.3f} |')
  print(f'| total | {total / 2**20:.3f} |\n')

  task, params, name = evaluation.load_task(config, args.workdir, 'best')
  served = serving.ExportedTranslator(output)
  rows = []
  for decoding in serving.DECODINGS:
    in_process = translate.Translator(task.model, params, task.sp,
                                      _with_decoding(config, decoding), task.mesh, task.rules)
    impls = {'in-process Translator': lambda t=in_process: t.translate(lines, check_unknown=False),
             'ExportedTranslator': lambda d=decoding: served.translate(lines, d)}
    first, outputs, warm = {}, {}, {k: [] for k in impls}
    for impl, fn in impls.items():
      first[impl], outputs[impl] = timed(fn)
    identical = {impl: out == outputs['in-process Translator'] for impl, out in outputs.items()}
    for _ in range(args.reps):
      for impl, fn in impls.items():
        seconds, out = timed(fn)
        warm[impl].append(seconds)
        identical[impl] &= out == outputs['in-process Translator']
    for impl in impls:
      best = min(warm[impl])
      rows.append((decoding, impl, first[impl], best, len(lines) / best, identical[impl]))
  print(f'checkpoint {name}; decode_batch_tokens {config.decode_batch_tokens}; warm = best of '
        f'{args.reps}\n')
  print('| decoding | implementation | first call s | warm s | sentences/s | outputs identical |')
  print('| --- | --- | ---: | ---: | ---: | --- |')
  for decoding, impl, first_s, warm_s, rate, same in rows:
    label = f'beam {config.beam_size}' if decoding == 'beam' else decoding
    print(f'| {label} | {impl} | {first_s:.1f} | {warm_s:.2f} | {rate:.0f} | '
          f'{"yes" if same else "NO"} |')
  print(f'\nexport folder: {output}')


def _with_decoding(config, decoding: str):
  config = config.copy_and_resolve_references()
  config.decoding = decoding
  return config


if __name__ == '__main__':
  main()
