"""BERT masked-LM pretraining (Devlin et al. 2019) of the encoder of configs/germeval.py
on German text: the 145k monolingual Multi30k captions and the sentences of the GermEval
2014 training split (its words; the tags are not read), mixed half and half.

Fine-tune it with configs/germeval_from_mlm.py (same architecture and tokenizer).
`:tiny` is the configs/encoder.py:tiny model on one caption file. Results:
docs/benchmarks.md.
"""
import os
import sys

try:  # An installed toolkit: this folder is the package transformer_jax.configs.
  from transformer_jax.configs import encoder  # pylint: disable=g-import-not-at-top
except ImportError:  # A checkout: configs/ beside transformer_jax/.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import encoder  # pylint: disable=g-import-not-at-top


def get_config(variant: str = ''):
  c = encoder.get_config()
  c.task = 'masked_lm'
  for name in ('labels', 'labels_file', 'num_labels', 'pooling', 'text_column',
               'label_column', 'tag_column', 'repair_iob', 'word_unk',
               'word_unk_max_count'):
    del c[name]  # Fields of the labelled tasks.
  c.data_dir = ''             # Pretraining reads train_files and eval_files.
  c.test_split = ''           # Pretraining has no test split; eval_files is scored.
  germeval = encoder.shared_data('germeval2014')
  c.train_files = (encoder.shared_data('multi30k/mono/train.*.de.gz'),
                   os.path.join(germeval, 'train.conll.gz'))
  c.train_weights = (0.5, 0.5)
  c.eval_files = (os.path.join(germeval, 'validation.conll.gz'),)
  c.num_sentinels = 0         # MASK only.
  c.max_length = 128
  c.mask_prob = 0.15
  c.whole_word_masking = True
  c.vocab_size = 8000
  c.max_tokens_per_batch = 4096
  c.learning_rate = 1e-3
  c.warmup_steps = 500
  c.num_train_steps = 4000
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  if variant == 'tiny':
    encoder.tiny(c)
    c.train_files = (encoder.shared_data('multi30k/mono/train.1.de.gz'),
                     os.path.join(germeval, 'train.conll.gz'))
    c.num_eval_batches = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'tiny'")
  return c
