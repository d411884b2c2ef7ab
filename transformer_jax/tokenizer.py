r"""Joint source+target SentencePiece tokenizer (Kudo & Richardson 2018).

Special ids, fixed for every model this toolkit trains (the one place they are defined):

  PAD_ID = 0   padding; weight 0 in losses, masked out of attention
  EOS_ID = 1   end of sentence, appended to every source and target
  BOS_ID = 2   start of the decoder input (targets shifted right)
  UNK_ID = 3   unknown piece

Text normalization (what happens to a sentence before it is split into pieces, in
training, evaluation and translate mode alike):

  1. `clean` (ours, in `transformer_jax.textnorm`): every whitespace character (Python's
     `str.isspace`: tab, NBSP, the line and paragraph separators '\r', '\x0b', '\x0c',
     '\x1c'-'\x1f', '\x85', '\u2028', '\u2029', ...) becomes a space, and the other
     control characters (Unicode Cc) and the invisible format characters (Cf: zero-width
     space, joiner and non-joiner, soft hyphen, byte order mark, bidi marks, word joiner)
     are removed, so 'Hun\u200bd' is 'Hund'.
  2. SentencePiece's own normalizer, `nmt_nfkc`: Unicode NFKC (NFD input such as
     'fa\u0308hrt' composes to 'fährt'; compatibility forms such as 'ﬁ' and '…' become
     'fi' and '...') and runs of spaces collapsed, leading and trailing ones dropped.

`normalize` applies both and returns text: for text without unknown characters it is
`decode(encode(text))`, the form every model output has; `scoring` normalizes
hypotheses and references with it.

Characters the tokenizer never saw in training become UNK_ID, decoded as ' ⁇ ', unless
the model was trained with byte fallback (`spm_byte_fallback=True`: 256 of its
`vocab_size` ids are UTF-8 byte pieces '<0x00>'..'<0xFF>', which spell any unseen
character and decode back to it). `check_unknown` logs the unknown-piece rate of a
corpus and warns above `UNKNOWN_WARNING_RATE`.
"""
from __future__ import annotations

import functools
import os
import re
import tempfile
from typing import Callable, Iterable, Sequence

from absl import logging
import numpy as np
import sentencepiece as spm

from transformer_jax import multihost
from transformer_jax.config_schema import ConfigError
from transformer_jax.textnorm import clean, one_line

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3

# Pretraining symbols (`reserved_symbols`): SentencePiece control symbols, so they get
# ids right after UNK_ID and are never produced by encoding typed text.
MASK = '<mask>'
SENTINEL = '<extra_id_{}>'
# Tagged back-translation (Caswell et al. 2019; `transformer_jax.backtranslation`): the
# first source token of synthetic pairs, a control symbol reserved by a translation
# tokenizer trained with config.synthetic_tag (one id; typed '<BT>' never encodes to it).
BT_TAG = '<BT>'


# A corpus (or translate input) with more unknown pieces than this fraction gets a warning.
UNKNOWN_WARNING_RATE = 0.001


@functools.lru_cache(maxsize=None)
def _nmt_nfkc() -> spm.SentencePieceNormalizer:
  return spm.SentencePieceNormalizer(rule_name='nmt_nfkc', add_dummy_prefix=False,
                                     escape_whitespaces=False, remove_extra_whitespaces=True)


def normalize(texts: list[str]) -> list[str]:
  """The normalization of the tokenizers this toolkit trains (module docstring): `clean`,
  then SentencePiece's `nmt_nfkc` (NFKC, spaces collapsed and stripped). For text
  without unknown characters, `normalize([t])[0] == sp.decode(sp.encode(clean(t)))`."""
  if not texts:
    return []
  return [' '.join(t.split()) for t in _nmt_nfkc().normalize([clean(t) for t in texts])]


def count_unknown(ids: Iterable[Sequence[int]]) -> tuple[int, int]:
  """(unknown pieces, pieces) of encoded sentences; EOS (appended by callers) is not a
  piece. A run of unknown characters is one unknown piece."""
  unknown = pieces = 0
  for seq in ids:
    seq = np.asarray(seq)
    unknown += int(np.count_nonzero(seq == UNK_ID))
    pieces += int(np.count_nonzero(seq != EOS_ID))
  return unknown, pieces


def check_unknown(ids: Iterable[Sequence[int]], name: str) -> float:
  """Logs the unknown-piece rate of encoded sentences (INFO, in train.log) and warns
  (absl WARNING, on the console) when it is above UNKNOWN_WARNING_RATE (0.1%).

  Args:
    ids: the pieces of each sentence (EOS may be included; it is not counted).
    name: what the sentences are, for the message ("split 'train' sources (de)",
      "--input=in.txt").

  Returns:
    The rate: unknown pieces / pieces (0 for no pieces).
  """
  unknown, pieces = count_unknown(ids)
  rate = unknown / pieces if pieces else 0.0
  logging.info('%s: %d of %d pieces unknown (%.3f%%)', name, unknown, pieces, 100 * rate)
  if rate > UNKNOWN_WARNING_RATE:
    logging.warning(
        "%s: %.2f%% of the pieces (%d of %d) are unknown: characters the tokenizer never saw "
        "in training, which become ' ⁇ '. A new tokenizer (a new --workdir) trained with "
        '--config.spm_byte_fallback=True spells them as UTF-8 bytes; one trained with '
        '--config.spm_character_coverage below 1.0 drops rare characters (1.0 keeps all).',
        name, 100 * rate, unknown, pieces)
  return rate


def reserved_symbols(num_sentinels: int) -> tuple[str, ...]:
  """The control symbols of a pretraining tokenizer: MASK (BART infilling, BERT masked
  LM) and `num_sentinels` T5 sentinels '<extra_id_0>', '<extra_id_1>', ..."""
  return (MASK,) + tuple(SENTINEL.format(i) for i in range(num_sentinels))


def symbol_ids(sp: spm.SentencePieceProcessor) -> dict[str, int]:
  """{piece: id} of the model's control symbols other than PAD/EOS/BOS (e.g. MASK and
  the sentinels); {} for a model trained without them."""
  return {sp.id_to_piece(i): i for i in range(UNK_ID + 1, sp.vocab_size())
          if sp.is_control(i)}


def train(sentences: Iterable[str], model_path: str, vocab_size: int,
          model_type: str = 'unigram', character_coverage: float = 1.0,
          control_symbols: tuple[str, ...] = (),
          byte_fallback: bool = False) -> spm.SentencePieceProcessor:
  """Trains a SentencePiece model on `sentences` (`clean`ed) and writes it to `model_path`.

  The file appears atomically (written beside it, then renamed), so an interrupted run
  never leaves a half-written model behind.

  Args:
    sentences: raw text, one sentence per item (both languages for a joint model).
    model_path: destination `.model` file; its folder is created.
    vocab_size: pieces including the four special ids; SentencePiece may return fewer
      on a small corpus (`hard_vocab_limit=False`).
    model_type: 'unigram' or 'bpe'.
    character_coverage: fraction of characters covered by the alphabet.
    control_symbols: reserved pieces (`reserved_symbols`), ids UNK_ID + 1, ... in order;
      typed text never encodes to them.
    byte_fallback: add the 256 UTF-8 byte pieces (ids right after the control symbols,
      counted in `vocab_size`): characters outside the alphabet become byte pieces
      instead of UNK_ID and decode back to themselves.

  Returns:
    The loaded processor.

  Raises:
    ConfigError: `vocab_size` is smaller than the alphabet (plus the special, control and
      byte pieces) needs.
  """
  folder = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    prefix = os.path.join(tmp, 'spm')
    try:
      spm.SentencePieceTrainer.train(
          sentence_iterator=(clean(s) for s in sentences), model_prefix=prefix,
          vocab_size=vocab_size, model_type=model_type,
          character_coverage=character_coverage, pad_id=PAD_ID, eos_id=EOS_ID,
          bos_id=BOS_ID, unk_id=UNK_ID, control_symbols=list(control_symbols),
          byte_fallback=byte_fallback, hard_vocab_limit=False, minloglevel=2)
    except RuntimeError as e:
      needed = re.search(r'smaller than required_chars\. \d+ vs (\d+)', str(e))
      if not needed:
        raise
      raise ConfigError(
          f'config.vocab_size={vocab_size}: too small for the characters of the training '
          f'text{" and the 256 byte pieces of spm_byte_fallback=True" if byte_fallback else ""}'
          f'; it needs at least {needed.group(1)}') from None
    os.replace(prefix + '.model', model_path)
  logging.info('Trained SentencePiece model %s (byte fallback %s)', model_path,
               'on' if byte_fallback else 'off')
  return load(model_path)


def load(model_path: str) -> spm.SentencePieceProcessor:
  """Loads a SentencePiece model and checks its special ids.

  Raises:
    ValueError: the model's pad/eos/bos/unk ids differ from this module's.
  """
  sp = spm.SentencePieceProcessor(model_file=model_path)
  ids = (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id())
  if ids != (PAD_ID, EOS_ID, BOS_ID, UNK_ID):
    raise ValueError(f'{model_path}: special ids (pad, eos, bos, unk) are {ids}, expected '
                     f'{(PAD_ID, EOS_ID, BOS_ID, UNK_ID)}')
  return sp


def encode_with_symbols(sp: spm.SentencePieceProcessor, text: str) -> list[int]:
  """The ids of `text`, where the written names of the model's control symbols
  (`symbol_ids`: '<mask>', '<extra_id_0>', ...) become those ids: how a user asks a
  pretrained model to fill in a blank (--mode=predict). Plain `encode` never does this.
  The text is `clean`ed first."""
  symbols = symbol_ids(sp)
  text = clean(text)
  if not symbols:
    return sp.encode(text)
  ids = []
  for i, part in enumerate(re.split('(' + '|'.join(map(re.escape, symbols)) + ')', text)):
    if i % 2:
      ids.append(symbols[part])
    elif part.strip():
      ids.extend(sp.encode(part.strip()))
  return ids


def decode_with_symbols(sp: spm.SentencePieceProcessor, ids) -> str:
  """Text of `ids`, with control symbols written by name (plain `decode` drops them), on
  one line (`one_line`)."""
  names = {i: piece for piece, i in symbol_ids(sp).items()}
  parts, run = [], []
  for i in map(int, ids):
    if i in names:
      parts.extend([sp.decode(run), names[i]])
      run = []
    else:
      run.append(i)
  parts.append(sp.decode(run))
  return one_line(' '.join(p for p in parts if p))


def load_or_train(config, workdir: str, sentences: list[str],
                  control_symbols: tuple[str, ...] = (),
                  extra_sentences: Callable[[], list[str]] | None = None
                  ) -> spm.SentencePieceProcessor:
  """The SentencePiece model in {workdir}/tokenizer/spm.model, trained on (at most
  `config.spm_max_sentences`, sampled with `config.seed`) `sentences` plus
  `extra_sentences()` the first time and reused on restarts (`extra_sentences` is called
  only to train a new model: text read for the tokenizer alone, which a restart need not
  find again). `config.spm_byte_fallback` (False where the config lacks it) applies to a
  new model only: a reused one keeps what it was trained with.

  In a multi-process run process 0 trains and writes the model; the others wait for it
  and load it (`multihost.primary_first`): every process must call this."""
  path = os.path.join(workdir, 'tokenizer', 'spm.model')
  with multihost.primary_first('tokenizer'):
    if os.path.exists(path):
      logging.info('Reusing tokenizer %s', path)
      return load(path)
    if extra_sentences is not None:
      sentences = sentences + extra_sentences()
    rng = np.random.default_rng(config.seed)
    if len(sentences) > config.spm_max_sentences:
      sentences = [sentences[i] for i in
                   rng.choice(len(sentences), config.spm_max_sentences, replace=False)]
    return train(sentences, path, config.vocab_size, config.spm_model_type,
                 config.spm_character_coverage, control_symbols,
                 byte_fallback=config.get('spm_byte_fallback', False))


def join_words(per_word: list[list[int]], unk_id: int) -> tuple[list[int], list[int]]:
  """Concatenates the pieces of each word -> (pieces, starts): starts[i] = j where piece i
  is the first piece of word j, else -1. A word without pieces gets one `unk_id`, so every
  word has a first piece. Shared by both tokenizers' `encode_words`."""
  pieces, starts = [], []
  for j, word_pieces in enumerate(per_word):
    word_pieces = word_pieces or [unk_id]
    starts.extend([j] + [-1] * (len(word_pieces) - 1))
    pieces.extend(word_pieces)
  return pieces, starts


class SentencePieceTokenizer:
  """A SentencePiece model with the interface the encoder tasks use (the same as
  `hf_import.WordPieceTokenizer`): each text becomes `BOS pieces EOS`, BOS playing the
  part of BERT's [CLS] (the position 'first' pooling reads) and EOS that of [SEP].

  Args:
    sp: a loaded processor (`load` or `train`).
  """

  def __init__(self, sp: spm.SentencePieceProcessor):
    self.sp = sp
    self.pad_id, self.unk_id = PAD_ID, UNK_ID

  @property
  def vocab_size(self) -> int:
    return self.sp.vocab_size()

  def _wrap(self, pieces: list[int], max_length: int) -> list[int]:
    return [BOS_ID] + pieces[:max_length - 2] + [EOS_ID]

  def encode(self, texts: list[str], max_length: int) -> list[np.ndarray]:
    """Each text (`clean`ed) -> int32 [n] ids `BOS pieces EOS`, n <= max_length (pieces
    past max_length - 2 are dropped)."""
    return [np.asarray(self._wrap(ids, max_length), np.int32)
            for ids in self.sp.encode([clean(t) for t in texts])]

  def encode_words(self, words: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre-split words -> (ids int32 [n], word_index int32 [n]): word_index[i] = j where
    position i holds the first piece of words[j], else -1. Each word is encoded alone
    (`clean`ed, with SentencePiece's word-start marker, as inside a sentence); a word
    without pieces gets UNK; words cut off by `max_length` have no position."""
    pieces, starts = join_words(self.sp.encode([clean(w) for w in words]) if words else [],
                                UNK_ID)
    ids = self._wrap(pieces, max_length)
    word_index = [-1] + starts[:len(ids) - 2] + [-1]
    return np.asarray(ids, np.int32), np.asarray(word_index, np.int32)
