"""GermEval 2014 NER fine-tuned from the masked-LM run of configs/pretrain_mlm_de.py.

configs/germeval.py with `init_from` = the pretrained run's workdir: the encoder and the
tokenizer are the pretrained ones, the token head starts fresh (the log lists it as
initialized and the MLM head as unused). The workdir is $TRANSFORMER_JAX_PRETRAINED,
else runs/pretrain_mlm_de. `:tiny` fine-tunes the configs/pretrain_mlm_de.py:tiny run
(pass its workdir with --config.init_from=...). Results: docs/benchmarks.md.
"""
import os
import sys

try:  # An installed toolkit: this folder is the package transformer_jax.configs.
  from transformer_jax.configs import germeval  # pylint: disable=g-import-not-at-top
except ImportError:  # A checkout: configs/ beside transformer_jax/.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import germeval  # pylint: disable=g-import-not-at-top

PRETRAINED_ENV = 'TRANSFORMER_JAX_PRETRAINED'


def get_config(variant: str = ''):
  c = germeval.get_config(variant)
  c.init_from = os.environ.get(PRETRAINED_ENV, os.path.join('runs', 'pretrain_mlm_de'))
  c.learning_rate = 5e-4
  c.warmup_steps = 200
  c.num_train_steps = 1500 if not variant else c.num_train_steps
  return c
