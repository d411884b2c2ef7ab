"""Translation: an encoder-decoder Transformer on sentence pairs, scored with sacreBLEU.

Data: `config.dataset_name` ('multi30k', 'text' or a TFDS name; `transformer_jax.data`),
one joint SentencePiece model for both sides. Training batches are packed or
length-bucketed pairs {'inputs', 'targets'} (+ `data.PACKING_KEYS`); the loss is
`config.loss` over target tokens (logits [B, T, V], targets [B, T], weights [B, T]).
Evaluation: loss, perplexity and token accuracy every `eval_every_steps`; validation
BLEU by beam search every `bleu_every_steps`, which picks the best checkpoint. Scores
compare hypotheses and references normalized alike (`scoring`). The unknown-piece rate
of every split read is logged, with a warning above 0.1% (`tokenizer.check_unknown`).
Prediction: translation of raw lines (`transformer_jax.translate`).
"""
from __future__ import annotations

import functools
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import augment
from transformer_jax import backtranslation
from transformer_jax import config_schema
from transformer_jax import data
from transformer_jax import flops
from transformer_jax import init_from
from transformer_jax import losses
from transformer_jax import models
from transformer_jax import multihost
from transformer_jax import scoring
from transformer_jax import sharding
from transformer_jax import tokenizer
from transformer_jax import translate
from transformer_jax.tasks import base
from transformer_jax.tokenizer import PAD_ID


def seq2seq_loss(params, batch: dict, dropout_rng: jax.Array, *, model: models.Transformer,
                 loss_fn: losses.LossFn) -> tuple[jax.Array, dict]:
  """`loss_fn` of the teacher-forced logits of a batch {'inputs': int32 [B, S],
  'targets': int32 [B, T]} (plus `data.PACKING_KEYS` for packed rows), dropout on.
  Padding targets (id 0) get weight 0."""
  weights = (batch['targets'] != PAD_ID).astype(jnp.float32)
  packing = {k: batch[k] for k in data.PACKING_KEYS if k in batch}
  logits = model.apply({'params': params}, batch['inputs'], batch['targets'],
                       deterministic=False, rngs={'dropout': dropout_rng}, **packing)
  return loss_fn(logits, batch['targets'], weights)


def eval_step(params, batch: dict, *, model: models.Transformer) -> dict:
  """Sums over a batch's real target tokens: 'nll' (unsmoothed), 'correct', 'num_tokens'."""
  weights = (batch['targets'] != PAD_ID).astype(jnp.float32)
  logits = model.apply({'params': params}, batch['inputs'], batch['targets'])
  _, metrics = losses.cross_entropy(logits, batch['targets'], weights)
  n = metrics['num_tokens']
  return {'nll': metrics['nll'] * n, 'correct': metrics['accuracy'] * n, 'num_tokens': n}


def evaluate(eval_fn, params, batcher: data.Batcher, eval_ds, mesh, num_batches: int) -> dict:
  """Validation loss (per real token), perplexity and token accuracy over `eval_ds`."""
  sums = []
  for i, batch in enumerate(eval_ds.as_numpy_iterator()):
    if i == num_batches:
      break
    sums.append(eval_fn(params, sharding.put_batch(batcher.pad_rows(batch), mesh)))
  totals = jax.tree.map(lambda *x: float(np.sum(x)), *jax.device_get(sums))
  n = max(totals['num_tokens'], 1.0)
  return {'loss': totals['nll'] / n, 'perplexity': float(np.exp(totals['nll'] / n)),
          'accuracy': totals['correct'] / n}


def score_split(translator: translate.Translator, sources: list[str], references: list[str],
                workdir: str, name: str, source_name: str = 'sources',
                check_unknown: bool = True) -> dict:
  """Translates `sources`, writes them to {workdir}/translations/{name}.txt (one line per
  source line) and returns `scoring.score` against `references` (both normalized alike).

  `source_name` names the sources in the translator's warnings (unknown pieces, unless
  not `check_unknown`, and over-long lines, once per name). Every process of a
  multi-process run translates and scores; process 0 writes the file."""
  hypotheses = translator.translate(sources, source_name, check_unknown)
  folder = os.path.join(workdir, 'translations')
  path = os.path.join(folder, f'{name}.txt')
  if multihost.is_primary():
    os.makedirs(folder, exist_ok=True)
    with open(path, 'w', encoding='utf-8', newline='\n') as f:
      f.writelines(h + '\n' for h in hypotheses)
  result = scoring.score(hypotheses, references)
  logging.info('%s: BLEU %.2f (%s), chrF %.2f, lowercased BLEU %.2f; hypotheses in %s', name,
               result['bleu'], result['bleu_signature'], result['chrf'],
               result['bleu_lowercase'], path)
  return result


def create_model_and_state(config, vocab_size: int, mesh):
  """The model, optimizer and fresh train state (laid out on `mesh` by the config's rules, seed
  `config.seed`) that a translation run of `config` with `vocab_size` tokens starts from,
  without data or tokenizer (benchmarks, tests)."""
  from transformer_jax import optim, train  # pylint: disable=g-import-not-at-top (cycle)
  task = TranslationTask(config, '', mesh)  # Not set up: no data, no tokenizer.
  task.model = models.Transformer(models.TransformerConfig.from_config(config, vocab_size))
  optimizer = optim.make_optimizer(config)
  return task.model, optimizer, train.create_state(task, optimizer, config.seed, mesh)


def extra_tokenizer_text(config) -> list[str]:
  """The non-blank lines of `config.spm_extra_text` (comma-separated paths or globs of
  plain or .gz text, one sentence a line; [] where unset).

  Text that only a new tokenizer is trained on, beside the training pairs: e.g. French
  for a de→en model that is later fine-tuned on fr→en with the same vocabulary.
  `tokenizer.load_or_train` calls this only when it trains one: a resumed run, and a run
  with `init_from` (which takes the pretrained run's tokenizer), read none.

  Raises:
    DataError: naming config.spm_extra_text and a pattern matching no file, or a file
      naming its line (unreadable, invalid UTF-8, no sentence).
  """
  if not config.get('spm_extra_text'):
    return []
  files = backtranslation.expand(config.spm_extra_text, 'config.spm_extra_text')
  lines = backtranslation.read_monolingual(files)[0]
  logging.info('config.spm_extra_text: %d sentences for the tokenizer from %s', len(lines),
               ', '.join(files))
  return lines


class TranslationTask(base.Task):
  """Sentence-pair translation (see the module docstring)."""
  FIELDS = config_schema.TRANSLATION_SCHEMA
  best_metric = 'bleu'
  best_mode = 'max'
  token_unit = 'target tok'

  def setup(self, training: bool) -> None:
    cfg, workdir = self.config, self.workdir
    config_schema.check_model_config(cfg, workdir)  # A rerun must continue the same model.
    self.test_text = None
    if training:
      source_run = init_from.source_run_dir(cfg.init_from)
      if source_run:  # Fine-tuning takes the pretrained run's tokenizer.
        init_from.copy_tokenizer(source_run, workdir)
        if cfg.get('spm_extra_text'):
          logging.warning('config.spm_extra_text is not read: the tokenizer of init_from '
                          'is used')
      train_src, train_tgt = data.load_pairs(cfg, cfg.train_split, workdir)
      if cfg.train_fraction < 1:  # Low-resource runs: the first pairs of the split.
        keep = max(1, round(cfg.train_fraction * len(train_src)))
        logging.info('train_fraction=%g: the first %d of %d training pairs',
                     cfg.train_fraction, keep, len(train_src))
        train_src, train_tgt = train_src[:keep], train_tgt[:keep]
      self.eval_text = data.load_pairs(cfg, cfg.eval_split, workdir)
      # Read up front: a bad test split stops the run before training, not after it.
      self.test_text = (data.load_pairs(cfg, cfg.test_split, workdir)
                        if cfg.test_split else None)
      # Word blanking (augment) needs a '<mask>' symbol, tagged back-translation '<BT>': a
      # new tokenizer reserves them then. It is trained on the real pairs (not the synthetic
      # ones) and on config.spm_extra_text.
      self.sp = tokenizer.load_or_train(cfg, workdir, train_src + train_tgt,
                                        augment.reserved_symbols(cfg)
                                        + backtranslation.reserved_symbols(cfg),
                                        extra_sentences=lambda: extra_tokenizer_text(cfg))
      # A tokenizer without '<mask>' for word_blank stops the run here, not after the model.
      augment.WordNoise.from_config(cfg, self.sp, cfg.seed)
      self.train_src, self.train_tgt = data.tokenize_pairs(self.sp, train_src, train_tgt, cfg,
                                                           f'split {cfg.train_split!r}')
      # Back-translated pairs (config.synthetic_pairs, synthetic_ratio, synthetic_tag).
      self.train_src, self.train_tgt = backtranslation.add_synthetic(
          cfg, self.sp, self.train_src, self.train_tgt)
      eval_src, eval_tgt = data.tokenize_pairs(self.sp, *self.eval_text, cfg,
                                               f'split {cfg.eval_split!r}')
    else:
      spm_path = os.path.join(workdir, 'tokenizer', 'spm.model')
      if not os.path.exists(spm_path):
        raise FileNotFoundError(f'{spm_path}: no tokenizer; is {workdir} a training workdir?')
      self.sp = tokenizer.load(spm_path)
    self.model = self.wrap_model(models.Transformer(models.TransformerConfig.from_config(
        cfg, self.sp.vocab_size())))
    self.batcher = data.Batcher(max(cfg.max_source_length, cfg.max_target_length),
                                cfg.max_tokens_per_batch, cfg.length_bucket_step,
                                sharding.batch_shards(self.mesh),
                                pack=cfg.pack_examples)
    self.translator = translate.Translator(self.model, None, self.sp, cfg, self.mesh,
                                           self.rules)
    if training:
      config_schema.save_model_config(cfg, self.sp.vocab_size(), workdir)
      if cfg.pack_examples:
        logging.info('Packed train batches: %d rows x %d tokens', self.batcher.packed_rows,
                     self.batcher.max_length)
      logging.info('Buckets (length: rows): %s',
                   dict(zip(self.batcher.lengths, self.batcher.batch_sizes)))
      self.eval_ds = self.batcher.eval({'inputs': eval_src, 'targets': eval_tgt})
      self._loss_fn = losses.get_loss(cfg)
      self._eval_step = sharding.jit(functools.partial(eval_step, model=self.model),
                                     self.mesh, self.rules,
                                     out_shardings=sharding.replicated(self.mesh))

  def init_params(self, rng: jax.Array):
    dummy = jnp.ones((1, 8), jnp.int32)
    return self.model.init(rng, dummy, dummy)['params']

  def describe(self) -> str:
    return f'Transformer encoder-decoder, vocab {self.sp.vocab_size()}'

  def train_batches(self, seed: int, skip: int):
    # Noise augmentation (config.word_shuffle, word_dropout, word_blank; None when off).
    noise = augment.from_config_logged(self.config, self.sp, seed)
    return self.batcher.train({'inputs': self.train_src, 'targets': self.train_tgt}, seed,
                              self.config.shuffle_buffer_size, skip=skip,
                              transform=noise).as_numpy_iterator()

  def loss(self, params, batch, dropout_rng):
    return seq2seq_loss(params, batch, dropout_rng, model=self.model, loss_fn=self._loss_fn)

  def batch_stats(self, batch):
    (rows, source_length), target_length = batch['inputs'].shape, batch['targets'].shape[1]
    starts = (batch['targets_position'] == 0 if 'targets_position' in batch
              else np.arange(target_length) == 0)  # The first token of each pair.
    return {'examples': int(np.count_nonzero(starts & (batch['targets'] != PAD_ID))),
            'tokens': int(np.count_nonzero(batch['targets'])),
            'positions': rows * target_length,
            'flops': flops.train_flops(self.model.config, rows, source_length, target_length)}

  @property
  def metric_every_steps(self) -> int:
    return self.config.bleu_every_steps

  def evaluate(self, params, step: int, last: bool):
    cfg = self.config
    result = evaluate(self._eval_step, params, self.batcher, self.eval_ds, self.mesh,
                      cfg.num_eval_batches)
    if cfg.bleu_every_steps and (step % cfg.bleu_every_steps == 0 or last):
      self.translator.params = params
      # Its unknown pieces were reported when the split was tokenized (setup).
      source_name = self._source_name(cfg.eval_split)
      result['bleu'] = score_split(self.translator, *self.eval_text, self.workdir,
                                   f'{cfg.eval_split}-step{step}', source_name,
                                   check_unknown=False)['bleu']
    return result, None

  def format_eval(self, scalars):
    line = (f"eval loss {scalars['loss']:.4f} ppl {scalars['perplexity']:.2f} "
            f"acc {scalars['accuracy']:.4f}")
    if 'bleu' in scalars:
      line += f" | {self.config.eval_split} BLEU {scalars['bleu']:.2f}"
    return line

  def test(self, params, split: str, name: str):
    text = (self.test_text if split == self.config.test_split and self.test_text
            else data.load_pairs(self.config, split, self.workdir))
    self.translator.params = params
    result = score_split(self.translator, *text, self.workdir, f'{split}-{name}',
                         self._source_name(split))
    cfg = self.config
    decoding = f'beam {cfg.beam_size}' if cfg.decoding == 'beam' else cfg.decoding
    report = (f'{split} ({name}, {decoding}):\n' + scoring.report(result)
              + '\nhypotheses: '
              + os.path.join(self.workdir, 'translations', f'{split}-{name}.txt'))
    return {k: v for k, v in result.items() if isinstance(v, float)}, report

  def _source_name(self, split: str) -> str:
    return f'split {split!r} sources ({self.config.source_lang})'

  def predict(self, params, lines):
    self.translator.params = params
    return self.translator.translate(lines, translate.INPUT_NAME)
