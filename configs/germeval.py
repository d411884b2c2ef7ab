"""GermEval 2014 German NER (outer tags, column 2 of the files) from scratch: our encoder,
a SentencePiece vocabulary trained on the training sentences, entity F1 with seqeval
(strict IOB2). `:tiny` runs in about a minute
(tokenizer, compilation, seconds of training, evaluation). Results: docs/benchmarks.md."""
import os
import sys

try:  # An installed toolkit: this folder is the package transformer_jax.configs.
  from transformer_jax.configs import encoder  # pylint: disable=g-import-not-at-top
except ImportError:  # A checkout: configs/ beside transformer_jax/.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import encoder  # pylint: disable=g-import-not-at-top

TYPES = ('PER', 'LOC', 'ORG', 'OTH', 'PERderiv', 'LOCderiv', 'ORGderiv', 'OTHderiv',
         'PERpart', 'LOCpart', 'ORGpart', 'OTHpart')
LABELS = ('O',) + tuple(f'{p}-{t}' for t in TYPES for p in ('B', 'I'))


def get_config(variant: str = ''):
  c = encoder.get_config()
  c.task = 'tagging'
  c.data_dir = encoder.shared_data('germeval2014')
  c.test_split = 'test'
  c.tag_column = 1            # The outer tags (column 2 of 3).
  c.labels = LABELS
  c.num_labels = len(LABELS)
  c.max_length = 128
  c.max_tokens_per_batch = 4096
  c.vocab_size = 8000
  c.learning_rate = 1e-3
  c.warmup_steps = 200
  # Against overfitting (docs/benchmarks.md, session 14: test F1 50.9 -> 55.6): singletons
  # become UNK half the time (Lample et al. 2016), dropout 0.2, an EMA for evaluation.
  c.word_unk = 0.5
  c.word_unk_max_count = 1
  c.dropout_rate = 0.2
  c.ema_decay = 0.998
  c.num_train_steps = 3500
  c.eval_every_steps = 250
  if variant == 'tiny':
    encoder.tiny(c)
    c.max_length = 64
    # Seconds of training that must fit 300 sentences (tests/test_tasks.py).
    c.word_unk, c.dropout_rate, c.ema_decay = 0.0, 0.1, 0.0
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'tiny'")
  return c
