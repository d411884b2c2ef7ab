r"""Writes a copy of a text file with typos in a fixed fraction of its words: a test set
for robustness (BLEU of a model on sources with typos against the same clean references).

  python benchmarks/typos.py --input=IN[.gz] --output=OUT[.gz] [--rate=0.1] [--seed=0]

Words are the whitespace-separated tokens that contain a letter (punctuation and numbers
alone are left as they are). Exactly round(rate * words) of them, drawn uniformly with
`--seed`, get one typo, a kind drawn uniformly among those the word allows:

  swap    two adjacent letters that differ are exchanged ('Hund' -> 'Hnud');
  drop    one letter is removed ('Hund' -> 'Hud'), in words of two letters or more;
  repeat  one letter is doubled ('Hund' -> 'Hunnd').

A one-letter word ('a', 'ä') can only get a repeat ('aa'): a drop would delete it and it
has nothing to swap with. Edits touch letters only, so 'Hund.' keeps its final '.'. Every
changed word differs from the original by exactly one such edit; lines, their order and
the whitespace between words are kept. A .gz suffix reads or writes gzip. A summary goes
to stderr.

Robustness of a Multi30k de->en model (workdir RUN) on test_2016 with typos in 10% of the
source words, scored like the clean test set (same split reader, same normalization,
`scoring.score`): the typo'd sources and the clean references form a 'text' dataset split.

  mkdir -p runs/typos
  python benchmarks/typos.py --input=../shared/data/multi30k/test_2016_flickr.de.gz \
      --output=runs/typos/test_typos.de.gz
  cp ../shared/data/multi30k/test_2016_flickr.en.gz runs/typos/test_typos.en.gz
  python -m transformer_jax.main --config=configs/mt.py --workdir=RUN --mode=eval \
      --split=test_2016                                            # clean: BLEU, chrF
  python -m transformer_jax.main --config=configs/mt.py --workdir=RUN --mode=eval \
      --config.dataset_name=text --config.data_dir=runs/typos --split=test_typos

(the eval mode reads the split's pairs `{data_dir}/{split}.{de,en}.gz`, translates the
sources with the best checkpoint and prints BLEU, chrF and their signatures; the
hypotheses go to RUN/translations/test_typos-best-stepN.txt). With plain sacreBLEU instead:

  python benchmarks/typos.py --input=../shared/data/multi30k/test_2016_flickr.de.gz \
      --output=runs/typos/test_typos.de
  python -m transformer_jax.main --config=configs/mt.py --workdir=RUN --mode=translate \
      --input=runs/typos/test_typos.de --output=runs/typos/hyp.en
  zcat ../shared/data/multi30k/test_2016_flickr.en.gz > runs/typos/ref.en
  sacrebleu runs/typos/ref.en -i runs/typos/hyp.en -m bleu chrf

(sacreBLEU on the raw references; the eval mode normalizes hypotheses and references
alike first, `transformer_jax.scoring`, so its BLEU can differ slightly).
"""
from __future__ import annotations

import argparse
import gzip
import re
import sys

import numpy as np

KINDS = ('swap', 'drop', 'repeat')
_WORD = re.compile(r'\S+')


def _open(path: str, mode: str):
  if path.endswith('.gz'):
    return gzip.open(path, mode + 't', encoding='utf-8', newline='\n')
  return open(path, mode, encoding='utf-8', newline='\n')


def is_word(token: str) -> bool:
  """A token that can get a typo: it contains a letter."""
  return any(c.isalpha() for c in token)


def edits(word: str) -> dict[str, list[int]]:
  """{kind: positions} of the typos `word` allows: 'swap' i (letters i, i+1 differ),
  'drop' i (a letter, when the word has two or more), 'repeat' i (a letter). Kinds
  without a position are left out."""
  letters = [i for i, c in enumerate(word) if c.isalpha()]
  options = {
      'swap': [i for i in range(len(word) - 1) if word[i].isalpha() and word[i + 1].isalpha()
               and word[i] != word[i + 1]],
      'drop': letters if len(letters) >= 2 else [],
      'repeat': letters,
  }
  return {kind: positions for kind, positions in options.items() if positions}


def apply_edit(word: str, kind: str, i: int) -> str:
  """`word` with the typo `kind` at position i."""
  if kind == 'swap':
    return word[:i] + word[i + 1] + word[i] + word[i + 2:]
  if kind == 'drop':
    return word[:i] + word[i + 1:]
  if kind == 'repeat':
    return word[:i + 1] + word[i:]
  raise ValueError(f'unknown typo kind {kind!r}; one of {KINDS}')


def add_typos(lines: list[str], rate: float = 0.1, seed: int = 0
              ) -> tuple[list[str], dict[str, int]]:
  """Typos in round(rate * words) of the words of `lines` (see the module docstring).

  Args:
    lines: text lines (without '\n').
    rate: the fraction of the words to change, in [0, 1].
    seed: the seed of the draws (same seed, same output).

  Returns:
    (the lines with typos, counts {'words', 'changed', 'swap', 'drop', 'repeat'}).

  Raises:
    ValueError: rate outside [0, 1].
  """
  if not 0 <= rate <= 1:
    raise ValueError(f'rate must be in [0, 1], got {rate}')
  tokens = [list(_WORD.finditer(line)) for line in lines]
  words = [(l, t) for l, matches in enumerate(tokens) for t, m in enumerate(matches)
           if is_word(m.group())]
  rng = np.random.default_rng(seed)
  chosen = rng.choice(len(words), int(round(rate * len(words))), replace=False)
  counts = dict.fromkeys(KINDS, 0)
  changes: dict[tuple[int, int], str] = {}
  for index in np.sort(chosen):
    l, t = words[index]
    word = tokens[l][t].group()
    options = edits(word)
    kind = sorted(options)[rng.integers(len(options))]
    changes[l, t] = apply_edit(word, kind, options[kind][rng.integers(len(options[kind]))])
    counts[kind] += 1
  out = []
  for l, (line, matches) in enumerate(zip(lines, tokens)):
    parts, end = [], 0
    for t, m in enumerate(matches):
      parts += [line[end:m.start()], changes.get((l, t), m.group())]
      end = m.end()
    out.append(''.join(parts) + line[end:])
  return out, {'words': len(words), 'changed': len(chosen), **counts}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--input', required=True, help='text file, one sentence a line (.gz ok)')
  parser.add_argument('--output', required=True, help='where the copy with typos goes (.gz ok)')
  parser.add_argument('--rate', type=float, default=0.1, help='fraction of words changed')
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args(argv)
  with _open(args.input, 'r') as f:
    lines = [line.rstrip('\n') for line in f]
  noisy, counts = add_typos(lines, args.rate, args.seed)
  with _open(args.output, 'w') as f:
    f.writelines(line + '\n' for line in noisy)
  print(f'{args.output}: {len(noisy)} lines; typos in {counts["changed"]} of {counts["words"]} '
        f'words ({100 * counts["changed"] / max(counts["words"], 1):.1f}%): '
        + ', '.join(f'{kind} {counts[kind]}' for kind in KINDS), file=sys.stderr)


if __name__ == '__main__':
  main()
