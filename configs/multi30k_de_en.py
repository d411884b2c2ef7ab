"""Multi30k de→en in about 35 minutes of training on 2 CPU cores.

Reached test_2016 lowercased BLEU 37.34 (cased sacreBLEU 37.12) in 1,400 steps; see
docs/benchmarks.md for the run. It is configs/mt.py with the training length and the
evaluation cadence of that run.
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
  config.source_lang, config.target_lang = 'de', 'en'
  config.num_train_steps = 1400
  config.eval_every_steps = 100
  config.pack_examples = False  # The recorded run used length buckets.
  config.bleu_every_steps = 700
  return config
