"""Multi30k de→en fine-tuned from the span-corruption run of configs/pretrain_span.py.

configs/multi30k_de_en.py (same model, same budget) with `init_from` = the pretrained
run's workdir: every parameter is loaded (`init_strict`), the optimizer starts fresh,
and the pretrained joint tokenizer replaces a new one. The workdir is
$TRANSFORMER_JAX_PRETRAINED, else runs/pretrain_span. Low-resource runs:
--config.train_fraction=0.1 (the first 2,900 pairs). `:tiny` fine-tunes the
configs/pretrain_span.py:tiny run (pass its workdir with --config.init_from=...).
Results: docs/benchmarks.md.
"""
import os
import sys

try:  # An installed toolkit: this folder is the package transformer_jax.configs.
  from transformer_jax.configs import (  # pylint: disable=g-import-not-at-top
      encoder, mt, multi30k_de_en)
except ImportError:  # A checkout: configs/ beside transformer_jax/.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import (  # pylint: disable=g-import-not-at-top
      encoder, mt, multi30k_de_en)

PRETRAINED_ENV = 'TRANSFORMER_JAX_PRETRAINED'


def get_config(variant: str = ''):
  if variant == 'tiny':
    c = mt.get_config('tiny')
    c.data_dir = encoder.shared_data('multi30k')
    c.train_fraction = 0.02
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'tiny'")
  else:
    c = multi30k_de_en.get_config()
    if not c.data_dir:
      c.data_dir = encoder.shared_data('multi30k')
  c.init_from = os.environ.get(PRETRAINED_ENV, os.path.join('runs', 'pretrain_span'))
  c.init_strict = True
  return c
