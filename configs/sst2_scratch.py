"""SST-2 sentiment from scratch: our encoder and a SentencePiece vocabulary trained on
the SST-2 training sentences. `:tiny` runs in about a minute. Results: docs/benchmarks.md."""
import os
import sys

try:  # An installed toolkit: this folder is the package transformer_jax.configs.
  from transformer_jax.configs import encoder  # pylint: disable=g-import-not-at-top
except ImportError:  # A checkout: configs/ beside transformer_jax/.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import encoder  # pylint: disable=g-import-not-at-top


def get_config(variant: str = ''):
  return encoder.get_config(variant)
