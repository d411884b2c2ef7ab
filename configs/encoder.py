"""Defaults for the encoder-only tasks (classification, tagging), on SST-2 from scratch.

`configs/sst2.py`, `sst2_scratch.py` and `germeval.py` start from `get_config()` here;
every field has a comment. `--config=configs/encoder.py:tiny` trains for seconds (about a
minute for the whole command).
"""
import os
import sys

import ml_collections

try:  # An installed toolkit: this folder is the package transformer_jax.configs.
  from transformer_jax.configs import (  # pylint: disable=g-import-not-at-top
      add_parallelism_fields, add_peft_fields, add_regularizer_fields,
      add_tracking_fields, shared_data_root)
except ImportError:  # A checkout: configs/ beside transformer_jax/.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import (  # pylint: disable=g-import-not-at-top
      add_parallelism_fields, add_peft_fields, add_regularizer_fields,
      add_tracking_fields, shared_data_root)


def shared_data(name: str) -> str:
  """$TRANSFORMER_JAX_SHARED_DATA/name, else <repo>/../shared/data/name."""
  return os.path.normpath(os.path.join(shared_data_root(), name))


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  """Returns the config; `variant` is '' (default) or 'tiny'."""
  c = ml_collections.ConfigDict()
  c.task = 'classification'   # 'classification' or 'tagging' (transformer_jax/tasks/).

  # --- Data ---------------------------------------------------------------
  # classification: {data_dir}/{split}.tsv[.gz] with a header naming text_column
  # and label_column; tagging: {data_dir}/{split}.conll[.gz], word in column 0 and
  # the tag in tag_column (0-based), a blank line between sentences.
  c.data_dir = shared_data('sst2')
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.test_split = 'validation'  # Scored with the best checkpoint at the end; '' = skip.
  c.text_column = 'sentence'
  c.label_column = 'label'
  c.tag_column = 1
  c.repair_iob = False        # tagging: True turns an I-X starting an entity into B-X.
  # tagging: each training word seen at most word_unk_max_count times in the training
  # split (0: any word) becomes one UNK token with probability word_unk (0 = off), new
  # draws each epoch (Lample et al. 2016: singletons, p = 0.5).
  c.word_unk = 0.0
  c.word_unk_max_count = 0
  # The label names, in the order of the head's outputs; num_labels=1 with no labels
  # is regression (loss 'mse'). Or one label per line in labels_file.
  c.labels = ('0', '1')
  c.labels_file = ''
  c.num_labels = 2
  c.max_length = 128          # Sub-tokens per sentence, [CLS]/[SEP] (BOS/EOS) included.
  c.truncate = True           # Over-long training sentences: True cuts, False drops.
  c.max_tokens_per_batch = 2048  # Padded tokens per global batch.
  c.length_bucket_step = 1.5  # Bucket boundaries grow by this factor.
  c.shuffle_buffer_size = 100_000

  # --- Tokenizer: SentencePiece trained on the training texts (init_from='') --
  c.vocab_size = 8000
  c.spm_model_type = 'unigram'
  c.spm_max_sentences = 1_000_000
  c.spm_character_coverage = 1.0

  # --- Model ----------------------------------------------------------------
  # '' = our pre-LN encoder from the fields below; 'hf:/folder' = a Hugging Face
  # BERT checkpoint (config.json, model.safetensors, vocab.txt) whose architecture
  # and WordPiece vocabulary replace them (the dropout rates and dtype below apply);
  # a run's workdir (its best, else latest checkpoint) or one checkpoint folder
  # (WORKDIR/checkpoints/STEP): that run's parameters, architecture and tokenizer.
  c.init_from = ''
  # (regex, replacement or None) pairs: the first regex that fullmatches a model
  # parameter name ('encoder/layers_0/self_attention/query/kernel') gives the
  # checkpoint name (re.Match.expand); None keeps the initial value; no match: same name.
  c.init_rules = ()
  c.init_strict = False       # True: every parameter loaded and every value used.
  add_peft_fields(c)          # Parameter-efficient fine-tuning: configs/__init__.py.
  add_parallelism_fields(c)   # Mesh, sharding rules, gradient accumulation, processes.
  add_tracking_fields(c)      # wandb_project, wandb_entity, wandb_run_name.
  add_regularizer_fields(c)   # adversarial (fgm, pgd, freelb), r_drop_alpha, ema_decay.
  c.pooling = 'mean'          # classification: 'first' token ([CLS]/BOS) or 'mean'.
  c.d_model = 256
  c.num_heads = 4
  c.d_ff = 1024
  c.num_encoder_layers = 4
  c.dropout_rate = 0.1
  c.attention_dropout_rate = 0.1
  c.dtype = 'float32'
  c.param_dtype = 'float32'

  # --- Loss -----------------------------------------------------------------
  # 'cross_entropy', 'mse' (regression) or 'my_pkg.losses:fn' with signature
  # (logits [B, C] or [B, S, C], targets [B] or [B, S], weights) -> (loss, metrics).
  c.loss = 'cross_entropy'
  c.label_smoothing = 0.0

  # --- Optimizer --------------------------------------------------------------
  c.optimizer = 'adamw'       # 'adamw' or 'sgd'.
  c.learning_rate = 5e-4
  c.warmup_steps = 200
  c.schedule = 'linear'       # 'rsqrt', 'cosine', 'linear' or 'constant' after warmup.
  c.adam_b1 = 0.9
  c.adam_b2 = 0.999
  c.adam_eps = 1e-6
  c.momentum = 0.9            # optimizer='sgd' only.
  c.nesterov = False
  c.weight_decay = 0.01       # Not applied to biases, LayerNorm, embeddings.
  c.max_grad_norm = 1.0
  c.layer_lr_decay = 1.0      # < 1: layer i of L learns at decay**(L - i) of the rate.

  # --- Evaluation and loop ----------------------------------------------------
  c.patience = 0              # Stop after this many evals without gain; 0 = off.
  c.average_checkpoints = 1
  c.seed = 0
  c.num_train_steps = 3000
  c.eval_every_steps = 250
  c.num_eval_batches = -1     # Classification and tagging always score the whole split.
  c.checkpoint_every_steps = 500
  c.keep_checkpoints = 2
  c.log_every_steps = 50
  c.peak_flops_per_device = 0.0

  if variant == 'tiny':
    tiny(c)
  elif variant:
    raise ValueError(f"unknown variant {variant!r}; use '' or 'tiny'")
  return c


def tiny(c: ml_collections.ConfigDict) -> None:
  """A model and a run that take seconds (smoke tests): in place."""
  c.vocab_size = 500
  c.spm_max_sentences = 5000
  c.d_model = 32
  c.num_heads = 2
  c.d_ff = 64
  c.num_encoder_layers = 1
  c.max_length = 32
  c.length_bucket_step = 2.0  # Buckets 8, 16, 32: three compiled shapes.
  c.max_tokens_per_batch = 512
  c.num_train_steps = 30
  c.warmup_steps = 5
  c.eval_every_steps = 15
  c.checkpoint_every_steps = 15
  c.log_every_steps = 5
