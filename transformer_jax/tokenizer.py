"""Joint source+target SentencePiece tokenizer (Kudo & Richardson 2018).

Special ids, fixed for every model this toolkit trains (the one place they are defined):

  PAD_ID = 0   padding; weight 0 in losses, masked out of attention
  EOS_ID = 1   end of sentence, appended to every source and target
  BOS_ID = 2   start of the decoder input (targets shifted right)
  UNK_ID = 3   unknown piece
"""
from __future__ import annotations

import os
import re
import tempfile
from typing import Iterable

from absl import logging
import numpy as np
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3

# Pretraining symbols (`reserved_symbols`): SentencePiece control symbols, so they get
# ids right after UNK_ID and are never produced by encoding typed text.
MASK = '<mask>'
SENTINEL = '<extra_id_{}>'


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
          control_symbols: tuple[str, ...] = ()) -> spm.SentencePieceProcessor:
  """Trains a SentencePiece model on `sentences` and writes it to `model_path`.

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

  Returns:
    The loaded processor.
  """
  folder = os.path.dirname(os.path.abspath(model_path))
  os.makedirs(folder, exist_ok=True)
  with tempfile.TemporaryDirectory(dir=folder) as tmp:
    prefix = os.path.join(tmp, 'spm')
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(sentences), model_prefix=prefix, vocab_size=vocab_size,
        model_type=model_type, character_coverage=character_coverage,
        pad_id=PAD_ID, eos_id=EOS_ID, bos_id=BOS_ID, unk_id=UNK_ID,
        control_symbols=list(control_symbols), hard_vocab_limit=False, minloglevel=2)
    os.replace(prefix + '.model', model_path)
  logging.info('Trained SentencePiece model %s', model_path)
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
  pretrained model to fill in a blank (--mode=predict). Plain `encode` never does this."""
  symbols = symbol_ids(sp)
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
  """Text of `ids`, with control symbols written by name (plain `decode` drops them)."""
  names = {i: piece for piece, i in symbol_ids(sp).items()}
  parts, run = [], []
  for i in map(int, ids):
    if i in names:
      parts.extend([sp.decode(run), names[i]])
      run = []
    else:
      run.append(i)
  parts.append(sp.decode(run))
  return ' '.join(p for p in parts if p)


def load_or_train(config, workdir: str, sentences: list[str],
                  control_symbols: tuple[str, ...] = ()) -> spm.SentencePieceProcessor:
  """The SentencePiece model in {workdir}/tokenizer/spm.model, trained on (at most
  `config.spm_max_sentences`, sampled with `config.seed`) `sentences` the first time and
  reused on restarts."""
  path = os.path.join(workdir, 'tokenizer', 'spm.model')
  if os.path.exists(path):
    logging.info('Reusing tokenizer %s', path)
    return load(path)
  rng = np.random.default_rng(config.seed)
  if len(sentences) > config.spm_max_sentences:
    sentences = [sentences[i] for i in
                 rng.choice(len(sentences), config.spm_max_sentences, replace=False)]
  return train(sentences, path, config.vocab_size, config.spm_model_type,
               config.spm_character_coverage, control_symbols)


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
    """Each text -> int32 [n] ids `BOS pieces EOS`, n <= max_length (pieces past
    max_length - 2 are dropped)."""
    return [np.asarray(self._wrap(ids, max_length), np.int32) for ids in self.sp.encode(texts)]

  def encode_words(self, words: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre-split words -> (ids int32 [n], word_index int32 [n]): word_index[i] = j where
    position i holds the first piece of words[j], else -1. Each word is encoded alone
    (with SentencePiece's word-start marker, as inside a sentence); a word without
    pieces gets UNK; words cut off by `max_length` have no position."""
    pieces, starts = join_words(self.sp.encode(list(words)) if words else [], UNK_ID)
    ids = self._wrap(pieces, max_length)
    word_index = [-1] + starts[:len(ids) - 2] + [-1]
    return np.asarray(ids, np.int32), np.asarray(word_index, np.int32)
