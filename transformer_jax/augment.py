"""Word-level noise of training sentences (Lample et al. 2018), vectorized in NumPy.

Lample, Conneau, Denoyer and Ranzato 2018, "Unsupervised Machine Translation Using
Monolingual Corpora Only" (ICLR), section 2.3, corrupt a sentence by

  word dropout   each word is removed with probability p (`drop_words`);
  local shuffle  the words are permuted so that none moves more than k positions: word i
                 gets the key i + U(0, k + 1) and the words are sorted by key
                 (`shuffle_words`; the paper's alpha = k + 1 guarantees |sigma(i) - i| <= k);

and their follow-up (Lample, Ott, Conneau, Denoyer and Ranzato 2018, "Phrase-Based &
Neural Unsupervised Machine Translation", EMNLP; `--word_blank` of their code) adds

  word blanking  each word is replaced by a blank token with probability p (`blank_words`).

`noise` applies them in the order of the authors' code (facebookresearch/UnsupervisedMT,
`Trainer.add_noise`): shuffle, dropout, blanking. Trained on such inputs a model relies
less on every single word being present and in place (a denoising auto-encoder in the
paper; here, noisy sources or targets of a translation run: `WordNoise`).

Words. A word is a whitespace-separated word of the text: a SentencePiece piece starting
with '▁' begins one, and its continuation pieces (the rest of the word, punctuation
attached to it, byte-fallback pieces, unknown pieces) move, drop and blank with it
(`word_start_table`). The first piece of a sentence always begins a word, and so do
control symbols ('<mask>', sentinels). Choices where the sources leave room:
  * A blanked word becomes ONE blank token whatever its number of pieces (the authors'
    code writes one blank per BPE piece, which tells the model the word's length).
  * Dropout keeps at least one word: if every word of a sentence drew "drop", the one
    with the largest draw stays (uniform among them; the authors' code keeps one too).
  * EOS (`tokenizer.EOS_ID`), when it ends a sequence, stays last and is never noised;
    a sequence of EOS only comes back unchanged.
  * Control symbols (`symbol_table`: the tag '<BT>' of tagged back-translation, ...) are
    words never dropped or blanked, and shuffle with their own index as key, so a
    leading tag stays first. They do not count as the word dropout keeps.
  * Each step draws for the words of the sentence as they were before any step, so
    turning one step on or off does not change the draws of the others.

Randomness is stateless: the uniform of word w of the example at stream position j is a
hash (SplitMix64) of (seed, j, side, step, w). The noise of an example therefore depends
only on the seed, its position in the training stream and its ids: not on how examples
are grouped for the computation, nor on the pipeline (bucketed or packed batches,
`data.Batcher.train`), and a run resumed at step k sees the batches an uninterrupted one
does. Later epochs are later positions, so every epoch draws new noise.

Shapes: single sequences are int [n] ids (typically ending in EOS); `noise_many` takes a
list of them and their int64 positions and returns int32 arrays, each no longer than its
input (as long when only shuffling).
"""
from __future__ import annotations

import dataclasses

from absl import logging
import numpy as np

from transformer_jax import tokenizer
from transformer_jax.config_schema import ConfigError
from transformer_jax.tokenizer import EOS_ID

SIDES = ('source', 'target', 'both')
_WORD_START = '\u2581'  # SentencePiece's word-start marker '▁'.
# Steps, numbering the random streams (with the side: 0 source, 1 target).
_SHUFFLE, _DROPOUT, _BLANK = 1, 2, 3
_SALT = 0x6E6F697365  # 'noise': these draws differ from other uses of the seed.
_GOLDEN = 0x9E3779B97F4A7C15


def word_start_table(sp) -> np.ndarray:
  """bool [vocab_size]: True at the ids whose piece begins a word (starts with '▁', or is
  a control symbol such as '<mask>'); PAD, EOS and BOS are False.

  Args:
    sp: a loaded `sentencepiece.SentencePieceProcessor`.
  """
  table = np.array([sp.id_to_piece(i).startswith(_WORD_START) or bool(sp.is_control(i))
                    for i in range(sp.vocab_size())], dtype=bool)
  table[[tokenizer.PAD_ID, tokenizer.EOS_ID, tokenizer.BOS_ID]] = False
  return table


def symbol_table(sp) -> np.ndarray:
  """bool [vocab_size]: True at the model's control symbols other than PAD, EOS, BOS
  (`tokenizer.symbol_ids`: '<mask>', '<BT>', sentinels), which noise leaves in place."""
  table = np.zeros(sp.vocab_size(), bool)
  table[list(tokenizer.symbol_ids(sp).values())] = True
  return table


def _mix(x: np.ndarray) -> np.ndarray:
  """SplitMix64's finalizer on uint64 (wrapping arithmetic)."""
  x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
  x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
  return x ^ (x >> np.uint64(31))


def uniform(seed: int, positions: np.ndarray, stream: int, words: np.ndarray) -> np.ndarray:
  """float64 [m] in [0, 1): a hash of (seed, positions[i], stream, words[i]) for each i
  (positions, words: int [m]): the counter-based generator of the noise."""
  with np.errstate(over='ignore'):
    h = _mix(np.full(np.shape(words), (seed ^ _SALT) % 2**64, np.uint64))
    h = _mix(h ^ (np.asarray(positions).astype(np.uint64) * np.uint64(_GOLDEN)))
    h = _mix(h + np.uint64(stream) * np.uint64(_GOLDEN)
             + np.asarray(words).astype(np.uint64))
  return (h >> np.uint64(11)).astype(np.float64) * 2.0**-53


def _check(dropout: float, blank: float, shuffle: int, blank_id) -> None:
  for name, p in (('dropout', dropout), ('blank', blank)):
    if not 0.0 <= p <= 1.0:
      raise ValueError(f'{name} must be in [0, 1], got {p}')
  if shuffle < 0:
    raise ValueError(f'shuffle (k) must be >= 0, got {shuffle}')
  if blank and blank_id is None:
    raise ValueError('blank > 0 needs a blank_id')


def noise_many(seqs, positions, word_start: np.ndarray, seed: int, *, side: int = 0,
               dropout: float = 0.0, blank: float = 0.0, shuffle: int = 0,
               blank_id: int | None = None, symbols: np.ndarray | None = None
               ) -> list[np.ndarray]:
  """Local shuffle (k = `shuffle`), then word dropout (p = `dropout`), then word blanking
  (p = `blank`) of each sequence, all sequences at once (see the module docstring).

  Args:
    seqs: n int sequences [n_i] (token ids, EOS last or not).
    positions: int [n]: each sequence's position in the stream (its randomness).
    word_start: `word_start_table` of the vocabulary.
    seed: the run's seed.
    side: 0 (sources) or 1 (targets): the two sides of a pair draw differently.
    dropout, blank: probabilities in [0, 1] (0 = off); shuffle: k >= 0 (0 = off).
    blank_id: the blank token, needed when blank > 0.
    symbols: `symbol_table` of the vocabulary (bool [V]), or None: ids left in place.

  Returns:
    n int32 arrays: the noised sequences, none longer than its input.

  Raises:
    ValueError: a value out of range, blank > 0 without a blank_id, or len(positions)
      != len(seqs).
    IndexError: an id outside `word_start`.
  """
  _check(dropout, blank, shuffle, blank_id)
  seqs = [np.asarray(s, np.int32).reshape(-1) for s in seqs]
  positions = np.asarray(positions, np.int64).reshape(-1)
  if len(positions) != len(seqs):
    raise ValueError(f'{len(seqs)} sequences but {len(positions)} positions')
  if not seqs or not (dropout or blank or shuffle):
    return seqs
  lengths = np.array([len(s) for s in seqs], np.int64)
  flat = np.concatenate(seqs)
  if not flat.size:
    return seqs
  n = len(seqs)
  ex = np.repeat(np.arange(n), lengths)            # Example of each piece.
  offset = np.arange(flat.size) - (np.cumsum(lengths) - lengths)[ex]  # Index in it.
  eos = (flat == EOS_ID) & (offset == lengths[ex] - 1)  # Fixed, a word of its own.
  piece_word = np.cumsum(word_start[flat] | (offset == 0) | eos) - 1  # Word of a piece.
  first = np.flatnonzero(np.diff(piece_word, prepend=-1))  # First piece of each word.
  word_ex, fixed = ex[first], eos[first]  # fixed: never dropped or blanked.
  eos_word = fixed.copy()
  if symbols is not None:
    fixed |= symbols[flat[first]]
  word_local = np.arange(first.size) - np.searchsorted(word_ex, word_ex)  # Word no. in it.
  word_pos = positions[word_ex]
  stream = 8 * side

  if shuffle:  # Sort the words of each example by index + U(0, k + 1); EOS stays last.
    key = word_local + (shuffle + 1) * uniform(seed, word_pos, stream + _SHUFFLE, word_local)
    key[fixed] = word_local[fixed]  # A leading tag stays first.
    key[eos_word] = np.inf
    rank = np.empty(first.size, np.int64)
    rank[np.lexsort((key, word_ex))] = np.arange(first.size)
    order = np.lexsort((offset, rank[piece_word]))
    flat, piece_word = flat[order], rank[piece_word][order]
    for values in (word_ex, fixed, word_local, word_pos):  # Per word, in the new order.
      values[rank] = values.copy()
  keep = np.ones(first.size, bool)
  if dropout:
    u = uniform(seed, word_pos, stream + _DROPOUT, word_local)
    keep = (u >= dropout) | fixed
    # A sentence whose words all drew "drop" keeps the one with the largest draw.
    kept = np.bincount(word_ex[keep & ~fixed], minlength=n)
    candidates = np.flatnonzero(~fixed & (kept[word_ex] == 0))
    if candidates.size:
      by_example = candidates[np.lexsort((u[candidates], word_ex[candidates]))]
      last = np.append(word_ex[by_example][1:] != word_ex[by_example][:-1], True)
      keep[by_example[last]] = True
  blanked = np.zeros(first.size, bool)
  if blank:
    blanked = (uniform(seed, word_pos, stream + _BLANK, word_local) < blank) & ~fixed
  starts = np.diff(piece_word, prepend=-1) != 0  # First pieces, in the current order.
  flat = np.where(blanked[piece_word] & starts, np.int32(blank_id or 0), flat)
  kept_pieces = keep[piece_word] & (starts | ~blanked[piece_word])
  flat, ex = flat[kept_pieces], ex[kept_pieces]  # ex is unchanged by the shuffle.
  return np.split(flat, np.cumsum(np.bincount(ex, minlength=n))[:-1])


def noise(ids, word_start: np.ndarray, seed: int = 0, position: int = 0, **kwargs
          ) -> np.ndarray:
  """`noise_many` of one sequence int [n] -> int32 [m], m <= n; `kwargs`: side, dropout,
  blank, shuffle, blank_id, symbols."""
  return noise_many([ids], [position], word_start, seed, **kwargs)[0]


def shuffle_words(ids, word_start: np.ndarray, k: int, seed: int = 0, position: int = 0
                  ) -> np.ndarray:
  """Local shuffle of one sequence: word i gets the key i + U(0, k + 1) and the words
  are sorted by key, each word's pieces together and in order; no word moves more than
  k positions (counted in words). k = 0 returns the ids. int [n] -> int32 [n], EOS (if
  last) still last."""
  return noise(ids, word_start, seed, position, shuffle=k)


def drop_words(ids, word_start: np.ndarray, p: float, seed: int = 0, position: int = 0
               ) -> np.ndarray:
  """Word dropout of one sequence: each word (all its pieces) is removed with
  probability p, at least one word stays. p = 0 returns the ids, p = 1 keeps exactly one
  word. int [n] -> int32 [m], m <= n, EOS (if last) still last."""
  return noise(ids, word_start, seed, position, dropout=p)


def blank_words(ids, word_start: np.ndarray, p: float, blank_id: int, seed: int = 0,
                position: int = 0) -> np.ndarray:
  """Word blanking of one sequence: each word is replaced, with probability p, by ONE
  `blank_id` (all its pieces become one blank). p = 0 returns the ids. int [n] -> int32
  [m], m <= n, as many words, EOS (if last) still last."""
  return noise(ids, word_start, seed, position, blank=p, blank_id=blank_id)


def reserved_symbols(config) -> tuple[str, ...]:
  """The control symbols a new translation tokenizer reserves for `config`:
  (tokenizer.MASK,), the blank, when word blanking is on (`word_blank` > 0), else ()."""
  return (tokenizer.MASK,) if config.get('word_blank', 0.0) > 0 else ()


@dataclasses.dataclass(frozen=True)
class WordNoise:
  """The transform of noisy translation training (`data.Batcher.train`'s `transform`):
  `noise_many` of the sources, the targets or both (each side its own draws).

  Attributes:
    word_start: `word_start_table` of the tokenizer.
    seed: the run's seed.
    side: 'source', 'target' or 'both'.
    dropout, blank, shuffle: as in `noise_many` (0 = off).
    blank_id: the blank token (the tokenizer's '<mask>'), needed when blank > 0.
    symbols: `symbol_table` of the tokenizer (ids left in place), or None.
  """
  word_start: np.ndarray
  seed: int
  side: str = 'source'
  dropout: float = 0.0
  blank: float = 0.0
  shuffle: int = 0
  blank_id: int | None = None
  symbols: np.ndarray | None = None

  def __post_init__(self):
    if self.side not in SIDES:
      raise ValueError(f'side must be one of {SIDES}, got {self.side!r}')
    _check(self.dropout, self.blank, self.shuffle, self.blank_id)

  def __call__(self, positions: np.ndarray, examples: dict) -> dict:
    """Noises a group of examples: `positions` int64 [n] in the training stream,
    `examples` {'inputs': n int32 arrays, 'targets': n int32 arrays, ...}; returns the
    same dict with the noised side(s) replaced (lists of int32 arrays)."""
    out = dict(examples)
    for side, key in enumerate(('inputs', 'targets')):
      if self.side in (('source', 'both'), ('target', 'both'))[side]:
        out[key] = noise_many(examples[key], positions, self.word_start, self.seed,
                              side=side, dropout=self.dropout, blank=self.blank,
                              shuffle=self.shuffle, blank_id=self.blank_id,
                              symbols=self.symbols)
    return out

  def describe(self) -> str:
    """One line, e.g. 'source side: local shuffle k=3, word dropout p=0.1, word blanking
    p=0.1 (blank id 4)'."""
    parts = []
    if self.shuffle:
      parts.append(f'local shuffle k={self.shuffle}')
    if self.dropout:
      parts.append(f'word dropout p={self.dropout:g}')
    if self.blank:
      parts.append(f'word blanking p={self.blank:g} (blank id {self.blank_id})')
    sides = 'source and target sides' if self.side == 'both' else f'{self.side} side'
    return f'{sides}: {", ".join(parts) or "none"}'

  @classmethod
  def from_config(cls, config, sp, seed: int) -> WordNoise | None:
    """The noise a translation `config` asks for (`noise_side`, `word_shuffle`,
    `word_dropout`, `word_blank`); None when all are 0 (or the config lacks them).

    Raises:
      ConfigError: word_blank > 0 with a tokenizer that has no '<mask>' symbol (one
        trained before blanking was configured, or copied from an `init_from` run).
    """
    dropout = config.get('word_dropout', 0.0)
    blank = config.get('word_blank', 0.0)
    shuffle = config.get('word_shuffle', 0)
    if not (dropout or blank or shuffle):
      return None
    blank_id = None
    if blank:
      blank_id = tokenizer.symbol_ids(sp).get(tokenizer.MASK)
      if blank_id is None:
        raise ConfigError(
            f'config.word_blank={blank}: the tokenizer has no {tokenizer.MASK!r} symbol for '
            'the blank (a tokenizer trained in a new, empty workdir with word_blank > 0 '
            "reserves it, as pretraining ones do; a run started with init_from keeps that run's "
            'tokenizer); or set config.word_blank=0')
    return cls(word_start_table(sp), seed, config.get('noise_side', 'source'),
               float(dropout), float(blank), int(shuffle), blank_id, symbol_table(sp))


def from_config_logged(config, sp, seed: int) -> WordNoise | None:
  """`WordNoise.from_config`, logging (INFO, once per call) what is applied when any
  noise is on."""
  transform = WordNoise.from_config(config, sp, seed)
  if transform is not None:
    logging.info('Noise augmentation of the training pairs (Lample et al. 2018), %s',
                 transform.describe())
  return transform
