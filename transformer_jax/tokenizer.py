"""Joint source+target SentencePiece tokenizer (Kudo & Richardson 2018).

Special ids, fixed for every model this toolkit trains (the one place they are defined):

  PAD_ID = 0   padding; weight 0 in losses, masked out of attention
  EOS_ID = 1   end of sentence, appended to every source and target
  BOS_ID = 2   start of the decoder input (targets shifted right)
  UNK_ID = 3   unknown piece
"""
from __future__ import annotations

import os
import tempfile
from typing import Iterable

from absl import logging
import sentencepiece as spm

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2
UNK_ID = 3


def train(sentences: Iterable[str], model_path: str, vocab_size: int,
          model_type: str = 'unigram', character_coverage: float = 1.0
          ) -> spm.SentencePieceProcessor:
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
        hard_vocab_limit=False, minloglevel=2)
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
