r"""Back-translation: synthetic sentence pairs from target-side monolingual text.

Sennrich, Haddow and Birch 2016 ("Improving Neural Machine Translation Models with
Monolingual Data"): a reverse model (target→source) translates monolingual text of the
target language; each (synthetic source, real target) pair is added to the training
pairs of the forward model. Edunov, Ott, Auli and Grangier 2018 ("Understanding
Back-Translation at Scale") found sampled or top-k sampled (k=10) synthetic sources
better than beam search ones; Caswell, Chelba and Grangier 2019 ("Tagged
Back-Translation") prepend a reserved tag to synthetic sources so the model can tell
them apart.

To improve de→en, back-translate ENGLISH text with an en→de model into synthetic German
sources. The three stages, each one resumable command:

  1. the reverse model, an ordinary training run of the opposite direction:
       python -m transformer_jax.main --config=configs/multi30k_en_de.py --workdir=REV
  2. generation (`--mode=backtranslate`, `backtranslate`):
       python -m transformer_jax.main --config=configs/multi30k_en_de.py --workdir=REV \
         --mode=backtranslate --input='mono/train.*.en.gz' --output=synthetic.tsv \
         [--config.decoding=sample --config.top_k=10]
  3. the forward model with the synthetic pairs mixed in (`add_synthetic`):
       python -m transformer_jax.main --config=configs/multi30k_de_en.py --workdir=FWD \
         --config.synthetic_pairs=synthetic.tsv --config.synthetic_ratio=0.5 \
         --config.synthetic_tag=True

Generation output (`backtranslate`): UTF-8 lines `synthetic_source<TAB>target\n`, one per
non-blank monolingual line, in input order (files in the order given, a glob's files
sorted). The target is the monolingual line as the tokenizer sees it
(`textnorm.one_line`: whitespace runs become one space, control and invisible format
characters are removed), so no field holds a tab or a line break. Blank lines (nothing
left after that) are skipped and counted: a pair with an empty side teaches nothing. A
synthetic source can be empty (the model ended at once); training skips such pairs.

Resuming: lines are translated in chunks of `CHUNK_LINES` (1,000) sentences, each written
with one write, flushed and fsynced. A rerun of the same command (after Ctrl-C, SIGKILL
or a crash) drops a torn last line, checks that every complete line's target is the
corresponding input line, and continues after the last complete line: the chunk holding
it is translated again and only its missing lines are written, so nothing is duplicated
or dropped. Chunks are fixed by position in the input, and a chunk's translations depend
on the chunk alone (`translate.Translator`: batching-invariant search; sampling draws each
sentence from a stream seeded by (config.seed, its token ids, its occurrence number among
identical sentences of the chunk)), so a resumed file is byte for byte the file of an
uninterrupted run. Beam search and greedy output equals `--mode=translate`'s for the
same lines; with sampling, identical lines of one chunk get different samples, identical
lines of different chunks the same one. The decoding settings, the model's workdir and
checkpoint, and the input files are kept in `OUTPUT.settings.json`; a rerun with other
ones is an error (delete both files to start over).

Training with synthetic pairs (`add_synthetic`, config fields in configs/mt.py):
`synthetic_pairs` (TSV files: comma-separated paths or globs), `synthetic_ratio` (the
share of synthetic pairs in the training pairs; the smaller side is upsampled, as
fairseq's --upsample-primary upsamples the bitext in Edunov et al. 2018) and
`synthetic_tag` (Caswell et al. 2019: `tokenizer.BT_TAG` as the first source token of
every synthetic pair). The tokenizer is trained on the real pairs only.
"""
from __future__ import annotations

import glob
import json
import math
import os
import sys
import time
from typing import Callable, Sequence

from absl import logging
import numpy as np

from transformer_jax import data
from transformer_jax import multi30k
from transformer_jax import multihost
from transformer_jax import tokenizer
from transformer_jax.config_schema import ConfigError
from transformer_jax.multi30k import DataError

CHUNK_LINES = 1000  # Sentences per chunk: translated, written and fsynced together.
SETTINGS_SUFFIX = '.settings.json'
# Config fields that change the generated text (by config.decoding); a resumed file must
# keep them.
DECODING_FIELDS = {
    'beam': ('decoding', 'beam_size', 'length_penalty'),
    'greedy': ('decoding',),
    'sample': ('decoding', 'temperature', 'top_k', 'top_p', 'seed'),
}
_LENGTH_FIELDS = ('decode_max_length_ratio', 'decode_max_length_offset')


def decoding_settings(config) -> dict:
  """The config fields that fix the output of config.decoding: {name: value}."""
  return {k: config[k] for k in DECODING_FIELDS[config.decoding] + _LENGTH_FIELDS}


def expand(patterns: str | Sequence[str], name: str) -> list[str]:
  """Comma-separated (or listed) paths or globs -> files: each glob's matches sorted, the
  patterns in the order given.

  Raises:
    DataError: naming `name` (e.g. '--input' or 'config.synthetic_pairs') and the
      pattern, when it matches no file or folders only; or when no pattern is given.
  """
  if isinstance(patterns, str):
    patterns = [p.strip() for p in patterns.split(',') if p.strip()]
  files = []
  for pattern in patterns:
    matched = sorted(glob.glob(os.path.expanduser(pattern)))
    if not matched:
      raise DataError(f'{name}: {pattern}: no such file')
    if not any(os.path.isfile(m) for m in matched):  # Folders in a glob's matches are skipped.
      raise DataError(f'{name}: {pattern}: a folder, not a file (use {pattern.rstrip("/")}/*)')
    files.extend(m for m in matched if os.path.isfile(m))
  if not files:
    raise DataError(f'{name}: no file named')
  return files


def read_monolingual(files: Sequence[str]) -> tuple[list[str], list[tuple[str, int]], int]:
  """The non-blank lines of monolingual files (plain or .gz), each `textnorm.one_line`d.

  Returns:
    (lines, where, blank): the lines in order; for each its (path, 1-based line number);
    the number of blank lines skipped.

  Raises:
    DataError: a missing or unreadable file, invalid UTF-8 (naming path:line), or a file
      without any non-blank line.
  """
  lines, where, blank = [], [], 0
  for path in files:
    count = kept = 0
    for lineno, line in multi30k._read_lines(path):  # pylint: disable=protected-access
      count += 1
      line = tokenizer.one_line(line)
      if line:
        lines.append(line)
        where.append((path, lineno))
        kept += 1
    if not kept:
      raise DataError(f'{path}: no sentence in the file'
                      + (f' (its {count} lines are blank)' if count else ' (it is empty)'))
    blank += count - kept
  return lines, where, blank


def _complete_lines(path: str, write: bool) -> list[bytes]:
  """The complete ('\n'-terminated) lines of `path` (without '\n'); a torn last line is
  cut off the file (when `write`) so that appending continues after the last complete
  line. [] if the file does not exist."""
  if not os.path.exists(path):
    return []
  with open(path, 'rb') as f:
    data = f.read()
  end = data.rfind(b'\n') + 1
  if end < len(data) and write:
    with open(path, 'r+b') as f:
      f.truncate(end)
      f.flush()
      os.fsync(f.fileno())
    logging.info('%s: dropped a torn last line of %d bytes', path, len(data) - end)
  return data[:end].split(b'\n')[:-1]


def _check_done(output: str, done: list[bytes], lines: list[str],
                where: list[tuple[str, int]]) -> None:
  """Every complete line of an earlier run must be a pair whose target is its input line.

  Raises:
    DataError: naming output:line and the input file:line it should match.
  """
  if len(done) > len(lines):
    raise DataError(f'--output={output}: has {len(done)} lines, more than the {len(lines)} '
                    'sentences of --input; it was written from other input: delete it (and '
                    f'its {SETTINGS_SUFFIX}) or choose another --output')
  for i, raw in enumerate(done):
    try:
      fields = raw.decode('utf-8').split('\t')
    except UnicodeDecodeError:
      fields = []
    if len(fields) != 2 or fields[1] != lines[i]:
      path, lineno = where[i]
      raise DataError(f'{output}:{i + 1}: is not a pair for {path}:{lineno}; the file was '
                      f'written from other input: delete it (and its {SETTINGS_SUFFIX}) or '
                      'choose another --output')


def _settings_differ(saved: dict, settings: dict) -> str | None:
  """The first setting that differs, as 'name: saved -> now', else None."""
  for key, value in settings.items():
    if key in saved and saved[key] != value:
      return f'{key}: {saved[key]!r} -> {value!r}'
  return None


def _describe(decoding: dict) -> str:
  if decoding['decoding'] == 'beam':
    return f"beam search (beam {decoding['beam_size']})"
  if decoding['decoding'] == 'greedy':
    return 'greedy search'
  return (f"sampling (temperature {decoding['temperature']}, top_k {decoding['top_k']}, "
          f"top_p {decoding['top_p']}, seed {decoding['seed']})")


def backtranslate(load: Callable[[], tuple], files: Sequence[str], output: str,
                  settings: dict, chunk_lines: int = CHUNK_LINES,
                  after_chunk: Callable[[int], None] | None = None) -> dict:
  """Translates the non-blank lines of `files` into `output`, resuming a partial file.

  See the module docstring for the file format and the resume guarantees.

  Args:
    load: returns (translator, checkpoint name): a `translate.Translator` with its
      parameters, of the reverse direction. Called only if there is work left.
    files: the monolingual files (`expand`), plain or .gz.
    output: the TSV file written (appended to when it exists).
    settings: what fixes the output ({'workdir', 'decoding': {...}}), kept in
      OUTPUT.settings.json with the files, `chunk_lines` and the checkpoint name.
    chunk_lines: sentences per chunk (part of the settings: it changes samples).
    after_chunk: called with each written chunk's index (tests stop a run there).

  Returns:
    {'pairs': lines in the finished file, 'new': lines written now, 'blank': blank input
    lines skipped, 'seconds': translation time, 'checkpoint': the checkpoint name or None
    when nothing was left}.

  Raises:
    DataError: bad input (`read_monolingual`), an `output` written from other input or
      with other settings, or an `output` without its settings file.
  """
  primary = multihost.is_primary()
  lines, where, blank = read_monolingual(files)
  total = len(lines)
  settings = {**settings, 'inputs': [os.path.abspath(f) for f in files],
              'chunk_lines': chunk_lines}
  settings_path = output + SETTINGS_SUFFIX
  saved = None
  if os.path.exists(settings_path):
    with open(settings_path, encoding='utf-8') as f:
      saved = json.load(f)
    differ = _settings_differ(saved, settings)
    if differ:
      raise DataError(f'--output={output}: was begun with other settings ({differ}); rerun '
                      f'with the same ones, or delete it and {settings_path} to start over')
  elif os.path.exists(output) and os.path.getsize(output):
    raise DataError(f'--output={output}: exists and was not written by --mode=backtranslate '
                    f'(no {settings_path}); delete it or choose another --output')
  done_lines = _complete_lines(output, write=primary)
  _check_done(output, done_lines, lines, where)
  done = len(done_lines)
  print(f'backtranslate: {total} sentences from {len(files)} file(s), {blank} blank lines '
        f'skipped; {done} already in {output}', file=sys.stderr)
  if done == total:
    print(f'{output}: complete, {total} pairs', file=sys.stderr)
    return {'pairs': total, 'new': 0, 'blank': blank, 'seconds': 0.0, 'checkpoint': None}

  translator, checkpoint = load()
  settings['checkpoint'] = checkpoint
  if saved is not None and saved.get('checkpoint', checkpoint) != checkpoint:
    raise DataError(f'--output={output}: was begun with checkpoint {saved["checkpoint"]} of '
                    f'{settings["workdir"]}, which now gives {checkpoint}; pass --checkpoint '
                    f'to pick the same one, or delete it and {settings_path} to start over')
  if primary:
    os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
    if saved is None:
      with open(settings_path + '.tmp', 'w', encoding='utf-8') as f:
        json.dump(settings, f, indent=1)
      os.replace(settings_path + '.tmp', settings_path)
  name = ', '.join(files) if len(files) <= 3 else f'{files[0]} and {len(files) - 1} more'
  tokenizer.check_unknown(translator.sp.encode([tokenizer.clean(s) for s in lines[done:]]),
                          f'--input {name}')
  print(f'translating {total - done} sentences with {_describe(settings["decoding"])} of '
        f'{settings["workdir"]} ({checkpoint})', file=sys.stderr)

  import tqdm  # pylint: disable=g-import-not-at-top
  bar = tqdm.tqdm(total=total, initial=done, unit='sent', dynamic_ncols=True,
                  desc='backtranslate', disable=not primary)
  start = time.perf_counter()
  new = 0
  target = open(output, 'ab') if primary else None  # pylint: disable=consider-using-with
  try:
    for chunk in range(done // chunk_lines, math.ceil(total / chunk_lines)):
      a, b = chunk * chunk_lines, min(total, (chunk + 1) * chunk_lines)
      # Line numbers in the translator's warnings count from the chunk's first sentence.
      sources = translator.translate(lines[a:b], f'--input sentences {a + 1}-{b}',
                                     check_unknown=False)
      first = max(a, done)
      text = ''.join(f'{s}\t{t}\n' for s, t in zip(sources[first - a:], lines[first:b]))
      if target is not None:
        target.write(text.encode('utf-8'))
        target.flush()
        os.fsync(target.fileno())
      new += b - first
      bar.update(b - first)
      seconds = time.perf_counter() - start
      logging.info('backtranslate: chunk %d, %d of %d sentences, %.1f sentences/s', chunk,
                   b, total, new / max(seconds, 1e-9))
      if after_chunk is not None:
        after_chunk(chunk)
  finally:
    bar.close()
    if target is not None:
      target.close()
  seconds = time.perf_counter() - start
  print(f'wrote {output}: {total} pairs ({new} new in {seconds:.1f} s, '
        f'{new / max(seconds, 1e-9):.1f} sentences/s)', file=sys.stderr)
  return {'pairs': total, 'new': new, 'blank': blank, 'seconds': seconds,
          'checkpoint': checkpoint}


def run_backtranslate(config, workdir: str, inputs: str, output: str,
                      checkpoint: str = 'best') -> dict:
  """`--mode=backtranslate`: `backtranslate` of the files of `inputs` (comma-separated
  paths or globs) with the translation model of `workdir` (its `checkpoint`, or the
  average of config.average_checkpoints) and `config`'s decoding settings."""
  from transformer_jax import evaluation  # pylint: disable=g-import-not-at-top (heavy)

  def load():
    task, params, name = evaluation.load_task(config, workdir, checkpoint)
    task.translator.params = params
    return task.translator, name

  settings = {'workdir': os.path.abspath(workdir), 'decoding': decoding_settings(config)}
  return backtranslate(load, expand(inputs, '--input'), output, settings)


def read_synthetic(files: Sequence[str]) -> tuple[list[str], list[str], int]:
  """The pairs of synthetic TSV files (`source<TAB>target` per line, UTF-8, plain or .gz),
  in order; pairs with an empty side are skipped.

  Returns:
    (sources, targets, skipped).

  Raises:
    DataError: a missing or unreadable file, invalid UTF-8, a line without exactly one
      tab (naming path:line), or no pair at all.
  """
  sources, targets, skipped = [], [], 0
  for path in files:
    for lineno, line in multi30k._read_lines(path, strip=False):  # pylint: disable=protected-access
      fields = line.split('\t')
      if len(fields) != 2:
        if not line.strip():
          skipped += 1
          continue
        raise DataError(f'{path}:{lineno}: expected source<TAB>target, found '
                        f'{len(fields) - 1} tabs')
      source, target = fields[0].strip(), fields[1].strip()
      if not source or not target:
        skipped += 1
        continue
      sources.append(source)
      targets.append(target)
  if not sources:
    raise DataError(f'config.synthetic_pairs: no sentence pair in {", ".join(files)}')
  return sources, targets, skipped


def mix(num_real: int, num_synthetic: int, ratio: float, seed: int
        ) -> tuple[np.ndarray, np.ndarray]:
  """Which real and synthetic pairs an epoch of training holds, so that synthetic pairs
  are a `ratio` share of it.

  The smaller side (relative to the ratio) is upsampled: whole copies of it, plus a
  sample without replacement (seeded by `seed`) for the fraction; the other side is used
  once. `ratio` = 0: every pair once (plain concatenation). The result is deterministic
  for the arguments.

  Args:
    num_real, num_synthetic: the pairs available (> 0).
    ratio: the share of synthetic pairs, in [0, 1).

  Returns:
    (real indices int64 [R'], synthetic indices int64 [S']), each index repeated as
    often as its pair is used; R' >= num_real, S' >= num_synthetic.
  """
  rng = np.random.default_rng([seed, 0x4254])  # 'BT'

  def upsample(n: int, wanted: int) -> np.ndarray:
    copies, extra = divmod(wanted, n)
    return np.concatenate([np.tile(np.arange(n), copies),
                           np.sort(rng.choice(n, extra, replace=False))]).astype(np.int64)

  real, synthetic = np.arange(num_real), np.arange(num_synthetic)
  if ratio <= 0:
    return real, synthetic
  if num_synthetic / (num_real + num_synthetic) > ratio:  # Too few real pairs.
    return upsample(num_real, max(num_real, round(num_synthetic * (1 - ratio) / ratio))), \
        synthetic
  return real, upsample(num_synthetic, max(num_synthetic, round(num_real * ratio / (1 - ratio))))


def reserved_symbols(config) -> tuple[str, ...]:
  """The control symbols a new translation tokenizer reserves for `config`: (BT_TAG,)
  with config.synthetic_tag, else ()."""
  return (tokenizer.BT_TAG,) if config.get('synthetic_tag', False) else ()


def tag_id(sp) -> int:
  """The id of `tokenizer.BT_TAG` in `sp`.

  Raises:
    ConfigError: naming config.synthetic_tag, when the tokenizer was trained without it.
  """
  tag = tokenizer.symbol_ids(sp).get(tokenizer.BT_TAG)
  if tag is None:
    raise ConfigError(
        f'config.synthetic_tag=True: the tokenizer has no {tokenizer.BT_TAG!r} symbol (it was '
        'trained, or copied from init_from, without synthetic_tag; a run started from another '
        "with init_from keeps that run's tokenizer): train from scratch in a new, empty "
        '--workdir, or set --config.synthetic_tag=False')
  return tag


def add_synthetic(config, sp, real_src: list[np.ndarray], real_tgt: list[np.ndarray]
                  ) -> tuple[list[np.ndarray], list[np.ndarray]]:
  """The training pairs with the synthetic pairs of `config.synthetic_pairs` mixed in.

  Synthetic pairs are tokenized like real ones (`data.tokenize_pairs`; over-long pairs
  dropped or cut by config.truncate), with `config.synthetic_tag` their source starts
  with the BT_TAG id (one token, counted in max_source_length). Real and synthetic pairs
  are combined by `mix` with `config.synthetic_ratio` and put in one order shuffled by
  config.seed, so that a shuffle buffer smaller than the list still sees both kinds (the
  batcher shuffles again every epoch). The counts and the share are logged.

  Args:
    config: the run config (synthetic_pairs, synthetic_ratio, synthetic_tag, seed,
      max_source_length, max_target_length, truncate).
    sp: the run's tokenizer.
    real_src, real_tgt: the tokenized real pairs: int32 [n_i] ids each, EOS-terminated.

  Returns:
    (sources, targets): int32 arrays, real and synthetic pairs; arrays of repeated pairs
    are shared, not copied.

  Raises:
    ConfigError: synthetic_tag with a tokenizer lacking BT_TAG (`tag_id`).
    DataError: bad synthetic files (`read_synthetic`, `expand`).
  """
  tag = tag_id(sp) if config.synthetic_tag else None
  if not config.synthetic_pairs:
    return real_src, real_tgt
  files = expand(config.synthetic_pairs, 'config.synthetic_pairs')
  raw_src, raw_tgt, skipped = read_synthetic(files)
  limits = config
  if tag is not None:  # Room for the tag.
    limits = config.copy_and_resolve_references()
    limits.max_source_length = config.max_source_length - 1
  syn_src, syn_tgt = data.tokenize_pairs(sp, raw_src, raw_tgt, limits, 'synthetic pairs')
  if not syn_src:
    raise DataError(f'config.synthetic_pairs: all {len(raw_src)} pairs of '
                    f'{", ".join(files)} are longer than max_source_length/max_target_length')
  if tag is not None:
    syn_src = [np.concatenate([np.asarray([tag], np.int32), s]) for s in syn_src]
  real_idx, syn_idx = mix(len(real_src), len(syn_src), config.synthetic_ratio, config.seed)
  sources = [real_src[i] for i in real_idx] + [syn_src[i] for i in syn_idx]
  targets = [real_tgt[i] for i in real_idx] + [syn_tgt[i] for i in syn_idx]
  order = np.random.default_rng([config.seed, 0x4254, 1]).permutation(len(sources))
  share = len(syn_idx) / len(sources)
  logging.info(
      'Back-translation: %d real pairs (x%.2f = %d) + %d synthetic pairs from %s (x%.2f = %d; '
      '%d with an empty side skipped) = %d training pairs, %.1f%% synthetic '
      '(synthetic_ratio=%g%s); synthetic sources tagged: %s', len(real_src),
      len(real_idx) / len(real_src), len(real_idx), len(syn_src), ', '.join(files),
      len(syn_idx) / len(syn_src), len(syn_idx), skipped, len(sources), 100 * share,
      config.synthetic_ratio, ': every pair once' if config.synthetic_ratio <= 0 else '',
      f'{tokenizer.BT_TAG} (id {tag})' if tag is not None else 'no')
  dropped = len(raw_src) - skipped - len(syn_src)
  repeats = len(syn_idx) / len(syn_src)
  if dropped > len(syn_src) or repeats > 100:
    logging.warning(
        'config.synthetic_pairs: %d of %d synthetic pairs kept (%d longer than '
        'max_source_length/max_target_length dropped; --config.truncate=True cuts them '
        'instead), each repeated %.1f times on average to reach synthetic_ratio=%g',
        len(syn_src), len(raw_src) - skipped, dropped, repeats, config.synthetic_ratio)
  return [sources[i] for i in order], [targets[i] for i in order]
