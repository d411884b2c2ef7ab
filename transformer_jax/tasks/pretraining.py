"""What the self-supervised pretraining tasks share: monolingual text, a tokenizer with
reserved symbols, and a deterministic stream of noised examples.

  span_corruption, text_infilling   encoder-decoder denoising (tasks/denoising.py)
  masked_lm                         the encoder alone (tasks/masked_lm.py)

Data: `config.train_files` mixed by `config.train_weights` (`transformer_jax.monolingual`);
`config.eval_files` noised once with a fixed seed, so every evaluation scores the same
examples. Example k of the training stream is noised with the generator
`np.random.default_rng([seed, 2, k])`, so the same seed gives the same batches and a
resumed run regenerates exactly the batches it skips. Sentences are cut to
`config.max_length` (masked_lm) or `config.max_source_length` (denoising) tokens, EOS
included.

Tokenizer: one SentencePiece model trained on all training text (at most
`spm_max_sentences`, sampled), with `tokenizer.reserved_symbols(config.num_sentinels)`
as control symbols: ids 4 (MASK) and 5, 6, ... (sentinels), never produced by typed text.
A fine-tuning run with `init_from` = this run's workdir takes this tokenizer.
"""
from __future__ import annotations

import os

from absl import logging
import numpy as np
import tensorflow as tf

from transformer_jax import config_schema
from transformer_jax import data
from transformer_jax import init_from
from transformer_jax import monolingual
from transformer_jax import sharding
from transformer_jax import tokenizer
from transformer_jax.tasks import base
from transformer_jax.tasks import encoder
from transformer_jax.tokenizer import EOS_ID


class PretrainingTask(base.Task):
  """Base of the pretraining tasks. Subclasses set `SIGNATURE` (the example's arrays) and
  implement `_noise` (one sentence -> one example), `_make_model`, `loss`, `evaluate`,
  `batch_stats` and `predict`."""
  best_metric = 'loss'
  best_mode = 'min'
  SIGNATURE: dict = {}

  def setup(self, training: bool) -> None:
    cfg, workdir = self.config, self.workdir
    config_schema.check_model_config(cfg, workdir)
    if training:
      source_run = init_from.source_run_dir(cfg.init_from)
      if source_run:  # Continued pretraining keeps the first run's tokenizer.
        init_from.copy_tokenizer(source_run, workdir)
      corpus = monolingual.read_corpus(cfg.train_files, 'train_files')
      self.sp = tokenizer.load_or_train(cfg, workdir, [s for source in corpus for s in source],
                                        tokenizer.reserved_symbols(cfg.num_sentinels))
      self.train_ids = [self._encode(source) for source in corpus]
      self.probabilities = monolingual.mixing_probabilities(
          [len(source) for source in corpus], cfg.train_weights)
      logging.info('Training sources: %s', ', '.join(
          f'{len(ids)} sentences (p={p:.3f})' for ids, p in zip(self.train_ids,
                                                                   self.probabilities)))
    else:
      path = os.path.join(workdir, 'tokenizer', 'spm.model')
      if not os.path.exists(path):
        raise FileNotFoundError(f'{path}: no tokenizer; is {workdir} a training workdir?')
      self.sp = tokenizer.load(path)
    symbols = tokenizer.symbol_ids(self.sp)
    missing = [s for s in tokenizer.reserved_symbols(cfg.num_sentinels) if s not in symbols]
    if missing:
      raise config_schema.ConfigError(
          f'config.num_sentinels={cfg.num_sentinels}: the tokenizer in {workdir}/tokenizer '
          f'lacks {missing[0]} (trained with {len(symbols)} reserved symbols)')
    self.mask_id = symbols[tokenizer.MASK]
    self.sentinel_ids = np.asarray([symbols[tokenizer.SENTINEL.format(i)]
                                    for i in range(cfg.num_sentinels)], np.int32)
    self.first_text_id = max(symbols.values()) + 1  # Ids below are special or reserved.
    self.model = self.wrap_model(self._make_model())
    if training:  # The architecture, for runs that start from this one (init_from).
      config_schema.save_model_config(cfg, self.sp.vocab_size(), workdir, extra={
          'task': cfg.task, 'architecture': encoder.architecture_to_json(self.model.config)})
    self.batcher = data.Batcher(self._max_length(), cfg.max_tokens_per_batch,
                                cfg.length_bucket_step, sharding.batch_shards(self.mesh))
    self._eval_ds = None
    self._setup_model()
    if training:
      assert self.eval_ds is not None  # Bad eval files stop the run before training.

  @property
  def eval_ds(self):
    """Batches of the eval files, noised once with the seeds (config.seed, 3, i)."""
    if self._eval_ds is None:
      cfg = self.config
      sentences = [s for source in monolingual.read_corpus(cfg.eval_files, 'eval_files')
                   for s in source]
      ids = self._encode(sentences)
      examples = [self._noise(x, np.random.default_rng([cfg.seed, 3, i]))
                  for i, x in enumerate(ids)]
      self._eval_ds = self.batcher.eval({k: [x[k] for x in examples] for k in self.SIGNATURE})
    return self._eval_ds

  def _encode(self, sentences: list[str]) -> list[np.ndarray]:
    """Pieces of each sentence, int32 [<= `_max_pieces()`], no EOS; empty ones dropped."""
    limit = self._max_pieces()
    return [np.asarray(ids[:limit], np.int32) for ids in self.sp.encode([tokenizer.clean(s) for s in sentences]) if ids]

  def describe(self) -> str:
    name = type(getattr(self.model, 'model', self.model)).__name__  # PEFT: the base's.
    return (f'{name} pretrained with {self.config.task}, vocab '
            f'{self.sp.vocab_size()} (MASK id {self.mask_id}, '
            f'{len(self.sentinel_ids)} sentinels)')

  def train_batches(self, seed: int, skip: int):
    sizes = [len(ids) for ids in self.train_ids]

    def examples():
      order = monolingual.example_order(sizes, self.probabilities, seed)
      for k, (source, index) in enumerate(order):
        yield self._noise(self.train_ids[source][index], np.random.default_rng([seed, 2, k]))

    return self.batcher.stream(examples, self.SIGNATURE, skip=skip).as_numpy_iterator()

  def test(self, params, split: str, name: str):
    """Scores `params` on the eval files (the only held-out text a pretraining run has)."""
    del split
    scalars = self.evaluate(params, -1, True)[0]
    return scalars, f'eval_files ({name}): {self.format_eval(scalars)}'

  # --- For subclasses ---------------------------------------------------------------
  def _noise(self, ids: np.ndarray, rng: np.random.Generator) -> dict:
    """One sentence's pieces (int32 [n], no EOS) -> one example {name: array}."""
    raise NotImplementedError

  def _max_length(self) -> int:
    """Tokens of a sentence, EOS included (longer ones are cut), and the longest array
    an example can have (the last bucket's length)."""
    raise NotImplementedError

  def _max_pieces(self) -> int:
    """Pieces kept of a sentence: room for EOS."""
    return self._max_length() - 1

  def _make_model(self):
    raise NotImplementedError

  def _setup_model(self) -> None:
    """Builds what the loss, evaluation and prediction need (jitted functions)."""


def with_eos(ids: np.ndarray) -> np.ndarray:
  return np.append(ids, np.int32(EOS_ID)).astype(np.int32)


def spec(dtype=tf.int32) -> tf.TensorSpec:
  return tf.TensorSpec([None], dtype)
