"""T5 span corruption (Raffel et al. 2020) of the encoder-decoder of configs/mt.py on the
monolingual Multi30k captions (task 2: 145k German + 145k English, not translations of
each other), with one joint tokenizer that reserves MASK and 16 sentinels.

Fine-tune it with configs/multi30k_de_en_from_span.py (same architecture and tokenizer).
`:tiny` is the configs/mt.py:tiny model on the first file of each language.
`--config.task=text_infilling` switches to BART text infilling (Lewis et al. 2020).
Results: docs/benchmarks.md.
"""
import os
import sys

try:  # An installed toolkit: this folder is the package transformer_jax.configs.
  from transformer_jax.configs import encoder, mt  # pylint: disable=g-import-not-at-top
except ImportError:  # A checkout: configs/ beside transformer_jax/.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import encoder, mt  # pylint: disable=g-import-not-at-top


def get_config(variant: str = ''):
  c = mt.get_config('tiny' if variant == 'tiny' else '')
  c.task = 'span_corruption'
  for name in ('dataset_name', 'tfds_data_dir', 'source_lang', 'target_lang', 'pack_examples',
               'train_fraction', 'bleu_every_steps', 'noise_side', 'word_shuffle',
               'word_dropout', 'word_blank', 'synthetic_pairs', 'synthetic_ratio',
               'synthetic_tag', 'spm_extra_text'):
    del c[name]  # Parallel-data fields; pretraining reads train_files (its tokenizer's text).
  # --- Data: one sentence per line, .gz or plain; globs; mixed by train_weights
  # (() = in proportion to their sizes). eval_files: held-out text (validation only).
  mono = encoder.shared_data('multi30k/mono')
  c.train_files = (os.path.join(mono, 'train.*.de.gz'), os.path.join(mono, 'train.*.en.gz'))
  c.train_weights = (0.5, 0.5)
  c.eval_files = (encoder.shared_data('multi30k/val.de.gz'),
                  encoder.shared_data('multi30k/val.en.gz'))
  c.test_split = ''           # Pretraining has no test split; eval_files is scored.
  c.num_sentinels = 16        # Reserved '<extra_id_N>' ids (spans beyond share none).
  # --- Objectives (span_corruption: T5 defaults; text_infilling: BART's) --------
  c.noise_density = 0.15
  c.mean_noise_span_length = 3.0
  c.mask_ratio = 0.3
  c.poisson_lambda = 3.0
  # --- Loop: about 80 minutes on 2 CPU cores -------------------------------------
  c.label_smoothing = 0.0
  c.num_train_steps = 5000
  c.warmup_steps = 500
  c.eval_every_steps = 500
  c.checkpoint_every_steps = 500
  if variant == 'tiny':
    c.train_files = (os.path.join(mono, 'train.1.de.gz'), os.path.join(mono, 'train.1.en.gz'))
    c.num_train_steps = 30
    c.warmup_steps = 5
    c.eval_every_steps = 15
    c.checkpoint_every_steps = 15
    c.num_eval_batches = 2
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'tiny'")
  return c
