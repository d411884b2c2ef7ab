"""Corpus-level translation metrics with sacreBLEU (Post 2018, "A Call for Clarity in
Reporting BLEU Scores"): BLEU with the default 13a tokenization, cased; chrF (Popović
2015); and lowercased BLEU, which older Multi30k papers report."""
from __future__ import annotations

from sacrebleu.metrics import BLEU, CHRF


def score(hypotheses: list[str], references: list[str]) -> dict:
  """Scores detokenized hypotheses against one reference each.

  Returns:
    {'bleu', 'bleu_lowercase', 'chrf'}: floats in [0, 100]; and {'bleu_signature',
    'bleu_lowercase_signature', 'chrf_signature'}: sacreBLEU signature strings.

  Raises:
    ValueError: the two lists differ in length.
  """
  if len(hypotheses) != len(references):
    raise ValueError(f'{len(hypotheses)} hypotheses but {len(references)} references')
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
