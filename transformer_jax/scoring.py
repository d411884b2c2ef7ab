"""Corpus-level translation metrics with sacreBLEU (Post 2018, "A Call for Clarity in
Reporting BLEU Scores"): BLEU with the default 13a tokenization, cased; chrF (Popović
2015); and lowercased BLEU, which older Multi30k papers report.

Hypotheses and references are normalized alike before scoring (`normalize=True`): with
`tokenizer.normalize`, the normalization the tokenizer applies to every input, so a
model's outputs (which can only be in that form) and the references differ in words,
never in encoding: an NFD 'ä' in a reference matches the model's NFC 'ä', a tab or NBSP is
a space, zero-width and control characters are gone, compatibility forms ('ﬁ', '…')
are NFKC'd. The Multi30k validation and test_2016 references are unchanged by it
(beyond runs of spaces, which 13a and chrF ignore), so their scores equal sacreBLEU's on
the raw files.
"""
from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF

from transformer_jax import tokenizer


def score(hypotheses: list[str], references: list[str], normalize: bool = True) -> dict:
  """Scores detokenized hypotheses against one reference each.

  Args:
    hypotheses: one line per sentence.
    references: one line per sentence, as read from the split.
    normalize: pass both through `tokenizer.normalize` first (module docstring).

  Returns:
    {'bleu', 'bleu_lowercase', 'chrf'}: floats in [0, 100]; and {'bleu_signature',
    'bleu_lowercase_signature', 'chrf_signature'}: sacreBLEU signature strings.

  Raises:
    ValueError: the two lists differ in length.
  """
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} references')
  if normalize:
    hypotheses, references = tokenizer.normalize(hypotheses), tokenizer.normalize(references)
  result = {}
  for name, metric in (('bleu', BLEU()), ('bleu_lowercase', BLEU(lowercase=True)),
                       ('chrf', CHRF())):
    result[name] = metric.corpus_score(hypotheses, [references]).score
    result[f'{name}_signature'] = str(metric.get_signature())
  return result


def report(result: dict) -> str:
  """One line per metric with its signature."""
  return '\n'.join(f"{name:15s} {result[name]:6.2f}  {result[name + '_signature']}"
                   for name in ('bleu', 'bleu_lowercase', 'chrf'))
