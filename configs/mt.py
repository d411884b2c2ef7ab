"""Default config: a Transformer translating German to English on Multi30k.

`python -m transformer_jax.main --config=configs/mt.py` uses `get_config()`;
`--config=configs/mt.py:tiny` gives a model that trains in seconds (tests, smoke runs).
Every field can be overridden on the command line: `--config.num_train_steps=100`.
"""
import os
import sys

import ml_collections

try:  # An installed toolkit: this folder is the package transformer_jax.configs.
  from transformer_jax.configs import (  # pylint: disable=g-import-not-at-top
      SHARED_DATA_ENV, add_parallelism_fields, add_peft_fields, add_regularizer_fields,
      add_tracking_fields, shared_data_root)
except ImportError:  # A checkout: configs/ beside transformer_jax/.
  sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
  from configs import (  # pylint: disable=g-import-not-at-top
      SHARED_DATA_ENV, add_parallelism_fields, add_peft_fields, add_regularizer_fields,
      add_tracking_fields, shared_data_root)

# Environment variable naming the folder with the raw Multi30k files
# (train.de.gz, val.en.gz, ...); unset: $TRANSFORMER_JAX_SHARED_DATA/multi30k when that
# variable is set (the folder of every shared data set, configs/encoder.py); else
# ../shared/data/multi30k beside the checkout when it exists (as the encoder configs);
# else empty: download them (needs internet).
DATA_DIR_ENV = 'TRANSFORMER_JAX_DATA_DIR'


def default_data_dir() -> str:
  """$TRANSFORMER_JAX_DATA_DIR, else $TRANSFORMER_JAX_SHARED_DATA/multi30k, else
  ../shared/data/multi30k beside the checkout if that folder exists, else '' (download)."""
  if os.environ.get(DATA_DIR_ENV):
    return os.environ[DATA_DIR_ENV]
  path = os.path.join(shared_data_root(), 'multi30k')
  return path if os.environ.get(SHARED_DATA_ENV) or os.path.isdir(path) else ''


def get_config(variant: str = '') -> ml_collections.ConfigDict:
  """Returns the config; `variant` is '' (default) or 'tiny'."""
  c = ml_collections.ConfigDict()
  # 'translation', 'classification', 'tagging' or a user's Task class by import
  # path ('my_pkg.tasks:MyTask'); see transformer_jax/tasks/.
  c.task = 'translation'

  # --- Data ---------------------------------------------------------------
  # 'multi30k' (our TFDS builder, reads `data_dir`), any TFDS translation
  # dataset by name (e.g. 'wmt14_translate/de-en'), or 'text' (a user's own
  # files `{data_dir}/{split}.{lang}[.gz]`, one sentence per line).
  c.dataset_name = 'multi30k'
  c.data_dir = default_data_dir()
  c.tfds_data_dir = ''        # Where TFDS keeps prepared data; '' = {workdir}/tfds.
  c.source_lang = 'de'
  c.target_lang = 'en'
  c.train_split = 'train'
  c.eval_split = 'validation'
  c.max_source_length = 64    # Tokens, EOS included.
  c.max_target_length = 64
  c.truncate = False          # Over-long pairs: True truncates, False drops them.
  c.max_tokens_per_batch = 2048  # Global batch size in tokens (padded, per side).
  c.length_bucket_step = 1.25    # Bucket boundaries grow by this factor.
  c.shuffle_buffer_size = 32768  # Pairs; >= corpus size gives a full shuffle.
  c.train_fraction = 1.0      # < 1: train on the first fraction of the pairs only.
  # Train batches pack several pairs per row of max(max_source_length,
  # max_target_length) tokens (one compiled shape, ~90% real tokens on Multi30k);
  # False: length buckets (one shape per bucket, ~76% real). Eval is always bucketed.
  c.pack_examples = True

  # --- Tokenizer (SentencePiece, joint source+target) ---------------------
  c.vocab_size = 8000
  c.spm_model_type = 'unigram'   # 'unigram' or 'bpe'.
  c.spm_max_sentences = 1_000_000  # Training sentences sampled for the model.
  c.spm_character_coverage = 1.0
  # True: 256 of the vocab_size ids are UTF-8 byte pieces, so characters never seen in
  # training are spelled as bytes and translated back, instead of becoming ' ⁇ '. Used
  # when a tokenizer is trained (a new workdir). Multi30k de→en test_2016 BLEU 37.30 with
  # it, 36.62 without (docs/benchmarks.md).
  c.spm_byte_fallback = True
  # Comma-separated paths or globs of text (plain or .gz, a sentence a line) the new
  # tokenizer is also trained on, e.g. '.../multi30k/train.fr.gz' so that a de→en model's
  # vocabulary covers French for a later fr→en fine-tuning. '' = the training pairs only.
  c.spm_extra_text = ''

  # --- Model (Vaswani et al. 2017, pre-LayerNorm) -------------------------
  c.d_model = 256
  c.num_heads = 4
  c.d_ff = 1024
  c.num_encoder_layers = 3
  c.num_decoder_layers = 3
  c.dropout_rate = 0.1
  c.attention_dropout_rate = 0.1
  c.share_embeddings = True   # One table for encoder, decoder and logits.
  c.dtype = 'float32'         # Compute dtype: 'float32' or 'bfloat16'.
  c.param_dtype = 'float32'
  # Start from another run's parameters: its workdir (best, else latest checkpoint)
  # or one checkpoint folder (WORKDIR/checkpoints/STEP); '' = from scratch.
  c.init_from = ''
  # (regex, replacement or None) pairs mapping model parameter names to checkpoint
  # names (first fullmatch wins; None keeps the initial value; no match: same name).
  c.init_rules = ()
  c.init_strict = False       # True: every parameter loaded and every value used.
  add_peft_fields(c)          # Parameter-efficient fine-tuning: configs/__init__.py.
  add_parallelism_fields(c)   # Mesh, sharding rules, gradient accumulation, processes.
  add_tracking_fields(c)      # wandb_project, wandb_entity, wandb_run_name.
  add_regularizer_fields(c)   # adversarial (fgm, pgd, freelb), r_drop_alpha, ema_decay.

  # --- Noise augmentation (transformer_jax/augment.py; training pairs only) ----
  # Word noise of Lample et al. 2018 (section 2.3; their code's names), drawn anew for
  # every example of every epoch from `seed`. Words are whitespace words: all pieces of
  # a word move, drop and blank together; EOS stays last; a sentence keeps >= 1 word.
  # Their unsupervised MT runs: shuffle 3, dropout 0.1, blank 0.2 (XLM: 0.1). All 0 = off.
  c.noise_side = 'source'     # Which side is noised: 'source', 'target' or 'both'.
  c.word_shuffle = 0          # Local shuffle: no word moves more than k positions; 0 = off.
  c.word_dropout = 0.0        # Each word is removed with this probability.
  # Each word is replaced by one blank token ('<mask>') with this probability. A new
  # tokenizer then reserves '<mask>'; an existing one without it is an error.
  c.word_blank = 0.0

  # --- Back-translation (transformer_jax/backtranslation.py) ---------------
  # Synthetic pairs 'source<TAB>target' (--mode=backtranslate of target-side text with
  # a reverse model; Sennrich et al. 2016) added to the training pairs: comma-separated
  # paths or globs, plain or .gz; '' = none. The tokenizer is trained on real pairs only.
  c.synthetic_pairs = ''
  # Share of synthetic pairs among the training pairs, in [0, 1): the smaller side is
  # upsampled to it (whole copies plus a seeded sample), e.g. 0.5 = 1:1, real pairs
  # repeated as fairseq's --upsample-primary (Edunov et al. 2018); 0 = each pair once.
  c.synthetic_ratio = 0.0
  # Tagged back-translation (Caswell et al. 2019): synthetic sources start with the
  # reserved token '<BT>'. A new tokenizer reserves it; an existing one without it is
  # an error.
  c.synthetic_tag = False

  # --- Loss ---------------------------------------------------------------
  # 'cross_entropy' or a user's JAX function by import path ('my_pkg.losses:focal')
  # with signature (logits [B,T,V], targets [B,T], weights [B,T]) -> (loss, metrics).
  c.loss = 'cross_entropy'
  c.label_smoothing = 0.1

  # --- Optimizer: AdamW (or SGD) with warmup then decay -------------------
  c.optimizer = 'adamw'       # 'adamw' or 'sgd'.
  c.learning_rate = 1e-3      # Peak, reached after warmup_steps.
  c.warmup_steps = 500
  c.schedule = 'rsqrt'        # 'rsqrt', 'cosine', 'linear' or 'constant' after warmup.
  c.adam_b1 = 0.9
  c.adam_b2 = 0.98
  c.adam_eps = 1e-9
  c.momentum = 0.9            # optimizer='sgd' only; 0 = plain SGD.
  c.nesterov = False          # optimizer='sgd': Nesterov momentum.
  c.weight_decay = 1e-4       # Not applied to biases, LayerNorm, embeddings.
  c.max_grad_norm = 1.0       # Global-norm clipping; 0 turns it off.
  c.layer_lr_decay = 1.0      # < 1: layer i of L learns at decay**(L - i) of the rate.

  # --- Decoding and evaluation -------------------------------------------
  c.test_split = 'test_2016'  # Scored with the best checkpoint after training; '' = skip.
  c.decoding = 'beam'         # 'beam', 'greedy' or 'sample'.
  c.beam_size = 4
  c.length_penalty = 0.6      # GNMT alpha: ((5 + |Y|) / 6)^alpha; 0 = none.
  c.temperature = 1.0         # decoding='sample' only.
  c.top_k = 0                 # decoding='sample': sample among the k best; 0 = all.
  c.top_p = 1.0               # decoding='sample': nucleus, smallest set reaching p; 1 = all.
  c.decode_max_length_ratio = 1.5  # Output cap: ratio * source tokens + offset.
  c.decode_max_length_offset = 10
  c.decode_batch_tokens = 8192     # Padded source tokens x beams per decoding batch.
  c.bleu_every_steps = 1000   # Validation BLEU (keeps the best checkpoint); 0 = off.
  c.patience = 0              # Stop after this many BLEU evals without gain; 0 = off.
  c.average_checkpoints = 1   # eval/translate: average the last k checkpoints.

  # --- Training loop ------------------------------------------------------
  c.seed = 0
  c.num_train_steps = 20_000
  c.eval_every_steps = 500
  c.num_eval_batches = -1     # -1: the whole eval split.
  c.checkpoint_every_steps = 1000
  c.keep_checkpoints = 3      # The last k are kept.
  c.log_every_steps = 50      # Progress bar / TensorBoard train metrics.
  # Peak FLOP/s of one device for the MFU in the logs; 0 = a datasheet table for
  # TPUs/GPUs (transformer_jax/flops.py), a measured matmul peak on CPUs.
  c.peak_flops_per_device = 0.0

  if variant == 'tiny':
    c.vocab_size = 500
    c.spm_byte_fallback = False  # 256 byte pieces would leave too few of 500 for text.
    c.spm_max_sentences = 20_000
    c.d_model = 32
    c.num_heads = 2
    c.d_ff = 64
    c.num_encoder_layers = 1
    c.num_decoder_layers = 1
    c.max_source_length = 32
    c.max_target_length = 32
    c.length_bucket_step = 2.0  # Buckets 8, 16, 32: three compiled shapes.
    c.max_tokens_per_batch = 512
    c.num_train_steps = 40
    c.warmup_steps = 10
    c.eval_every_steps = 20
    c.num_eval_batches = 4
    c.checkpoint_every_steps = 20
    c.log_every_steps = 10
    c.bleu_every_steps = 20
    c.beam_size = 2
  elif variant:
    raise ValueError(f"configs/mt.py: unknown variant {variant!r}; use '' or 'tiny'")
  return c
