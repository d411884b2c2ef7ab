"""Multi30k en→de on 2 CPU cores in under 60 minutes of wall-clock time.

configs/mt.py turned around to English→German, with the training length and the
evaluation cadence used for the run in docs/benchmarks.md.
"""
import os
import sys

try:  # An installed toolkit: this folder is the package transformer_jax.configs.
  from transformer_jax.configs import mt  # pylint: disable=g-import-not-at-top
except ImportError:  # A checkout: configs/ beside transformer_jax/.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import mt  # pylint: disable=g-import-not-at-top


def get_config():
  config = mt.get_config()
  config.source_lang, config.target_lang = 'en', 'de'
  config.num_train_steps = 2100
  config.eval_every_steps = 100
  config.pack_examples = False  # The recorded run used length buckets.
  config.bleu_every_steps = 700
  # Checkpoints every 200 steps, the last 5 kept, for averaging at eval time.
  config.checkpoint_every_steps = 200
  config.keep_checkpoints = 5
  return config
