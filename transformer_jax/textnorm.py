r"""The first step of text normalization, in pure Python (standard library only).

`clean` is what every sentence goes through before SentencePiece splits it, in training,
evaluation, translate mode and the exported translator (`transformer_jax.serving`); the
second step, Unicode NFKC with spaces collapsed, is SentencePiece's own `nmt_nfkc`
normalizer inside the tokenizer model (`transformer_jax.tokenizer`'s module docstring).
This module imports nothing but the standard library, so that the serving side can use
it without the toolkit's training dependencies; `transformer_jax.tokenizer` re-exports
both functions.
"""
from __future__ import annotations

import functools
import re
import sys
import unicodedata

_SPACE = re.compile(r'\s')  # Exactly the characters str.isspace() accepts.


@functools.lru_cache(maxsize=None)
def _invisible() -> re.Pattern:
  """The control (Cc) and format (Cf) characters that are not whitespace."""
  chars = ''.join(chr(c) for c in range(sys.maxunicode + 1)
                  if unicodedata.category(chr(c)) in ('Cc', 'Cf') and not chr(c).isspace())
  return re.compile(f'[{re.escape(chars)}]')


def clean(text: str) -> str:
  """`text` with every whitespace character made a space and the other control and
  format characters (zero-width, soft hyphen, BOM, bidi marks) removed: the first step
  of the normalization (module docstring). The result never contains a line break."""
  if text.isascii() and text.isprintable():
    return text  # Nothing to do (the common case).
  return _invisible().sub('', _SPACE.sub(' ', text))


def one_line(text: str) -> str:
  """`clean` text with runs of spaces collapsed and no leading or trailing space: a model
  output that is safe to write as one line (byte pieces may spell any character)."""
  return ' '.join(clean(text).split())
