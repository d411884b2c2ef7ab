"""Masked-LM pretraining of the encoder alone (Devlin et al. 2019, 3.1 and A.1).

`mask_prob` of each sentence's pieces (BOS and EOS excluded; exactly
max(1, round(mask_prob * n)) of them, `noising.masked_lm`) are selected; 80% become
MASK, 10% a random piece, 10% stay; with `whole_word_masking`, all pieces of a word
(a word starts at a piece beginning with '▁') are selected together. The loss
(`config.loss` over logits [B, P, V], targets [B, P], weights [B, P]) counts the selected
positions only: the P = ceil(mask_prob * L) + 1 positions of a row of length L that hold
its selected ones, so the head and the vocabulary projection run on those alone.
Evaluation: loss and accuracy at the selected positions of the noised eval files.

The model (`models.MaskedLM`) keeps the encoder's parameter names, so a classification
or tagging run with `init_from` = this run's workdir loads the encoder and initializes
its head (the MLM head is reported unused). `--mode=predict` fills each '<mask>' of a
typed line with the most probable piece.
"""
from __future__ import annotations

import math

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import config_schema
from transformer_jax import flops
from transformer_jax import losses
from transformer_jax import models
from transformer_jax import multihost
from transformer_jax import noising
from transformer_jax import sharding
from transformer_jax import tokenizer
from transformer_jax.tasks import pretraining
from transformer_jax.tasks import translation
from transformer_jax.tokenizer import BOS_ID, EOS_ID


def max_predictions(length: int, mask_prob: float) -> int:
  """P: an upper bound of the selected positions of a row of `length` tokens."""
  return min(length, math.ceil(mask_prob * length) + 1)


def selected_positions(weights: jax.Array, count: int) -> jax.Array:
  """weights [B, L] -> int32 [B, count]: the positions of the nonzero weights first (in
  order), then positions of zero weight."""
  return jnp.argsort(-weights, axis=1, stable=True)[:, :count].astype(jnp.int32)


def mlm_loss(params, batch: dict, dropout_rng, *, model: models.MaskedLM, loss_fn,
             mask_prob: float, deterministic: bool = False):
  """`loss_fn` over the selected positions of {'inputs': int32 [B, L], 'targets': int32
  [B, L], 'weights': float32 [B, L]} (targets and weights 0 where not selected)."""
  positions = selected_positions(batch['weights'],
                                 max_predictions(batch['inputs'].shape[1], mask_prob))
  take = lambda x: jnp.take_along_axis(x, positions, axis=1)  # [B, P]
  logits = model.apply({'params': params}, batch['inputs'], deterministic=deterministic,
                       positions=positions, rngs=None if deterministic else
                       {'dropout': dropout_rng})  # [B, P, V]
  return loss_fn(logits, take(batch['targets']), take(batch['weights']))


class MaskedLMTask(pretraining.PretrainingTask):
  """`config.task` 'masked_lm' (see the module docstring)."""
  FIELDS = config_schema.MASKED_LM_SCHEMA
  SIGNATURE = {'inputs': pretraining.spec(), 'targets': pretraining.spec(),
               'weights': pretraining.spec(np.float32)}
  token_unit = 'tok'

  def _max_length(self) -> int:
    return self.config.max_length

  def _noise(self, ids, rng):
    cfg = self.config
    ids = np.concatenate([[BOS_ID], ids, [EOS_ID]]).astype(np.int32)
    candidates = ids >= self.first_text_id
    word_ids = None
    if cfg.whole_word_masking:
      word_ids = np.where(candidates, np.cumsum(self.word_start[ids]) - 1, -1)
    inputs, targets, weights = noising.masked_lm(
        ids, rng, mask_id=self.mask_id, random_ids=self.random_ids, candidates=candidates,
        word_ids=word_ids, mask_prob=cfg.mask_prob)
    return {'inputs': inputs, 'targets': targets, 'weights': weights}

  def _max_pieces(self) -> int:
    return self.config.max_length - 2  # BOS and EOS go around them.

  def _make_model(self):
    return models.MaskedLM(models.TransformerConfig.from_config(
        self.config, self.sp.vocab_size()))

  def _setup_model(self):
    cfg = self.config
    vocab = self.sp.vocab_size()
    self.random_ids = np.arange(self.first_text_id, vocab, dtype=np.int32)
    self.word_start = np.asarray([self.sp.id_to_piece(i).startswith('▁')
                                  for i in range(vocab)])
    self._loss_fn = losses.get_loss(cfg)

    def eval_step(params, batch):
      _, metrics = mlm_loss(params, batch, None, model=self.model,
                            loss_fn=losses.cross_entropy, mask_prob=cfg.mask_prob,
                            deterministic=True)
      n = metrics['num_tokens']
      return {'nll': metrics['nll'] * n, 'correct': metrics['accuracy'] * n,
              'num_tokens': n}

    self._eval_step = sharding.jit(eval_step, self.mesh, self.rules,
                                   out_shardings=sharding.replicated(self.mesh))
    self._predict_fn = sharding.jit(
        lambda params, inputs: self.model.apply({'params': params}, inputs), self.mesh,
        self.rules)

  def init_params(self, rng):
    return self.model.init(rng, jnp.ones((1, 8), jnp.int32))['params']

  def loss(self, params, batch, dropout_rng):
    return mlm_loss(params, batch, dropout_rng, model=self.model, loss_fn=self._loss_fn,
                    mask_prob=self.config.mask_prob)

  def batch_stats(self, batch):
    rows, length = batch['inputs'].shape
    head = max_predictions(length, self.config.mask_prob) * (
        self.model.config.d_model + self.model.config.vocab_size)
    return {'examples': int(np.count_nonzero(batch['inputs'][:, 0])),
            'tokens': int(np.count_nonzero(batch['inputs'])),
            'positions': rows * length,
            'flops': 3 * flops.encoder_forward_flops(self.model.config, rows, length, head)}

  def evaluate(self, params, step, last):
    # The eval step returns translation's sums (nll, correct, num_tokens): one reduction.
    return translation.evaluate(self._eval_step, params, self.batcher, self.eval_ds,
                                self.mesh, self.config.num_eval_batches), None

  def format_eval(self, scalars):
    return f"eval MLM loss {scalars['loss']:.4f} acc {scalars['accuracy']:.4f}"

  def predict(self, params, lines):
    """Each line with every '<mask>' replaced by the most probable piece (other reserved
    symbols kept); an empty line gives an empty line."""
    outputs = [''] * len(lines)
    for i, line in enumerate(lines):
      if not line.strip():
        continue
      pieces = tokenizer.encode_with_symbols(self.sp, line)
      limit = self.batcher.lengths[-1]
      if len(pieces) > limit - 2:
        logging.warning('line %d: %d pieces, more than max_length=%d allows: only the first '
                        '%d are read and filled in', i + 1, len(pieces), limit, limit - 2)
        pieces = pieces[:limit - 2]
      ids = np.asarray([BOS_ID] + pieces + [EOS_ID], np.int32)
      padded = np.zeros((sharding.batch_shards(self.mesh), limit), np.int32)
      padded[0, :len(ids)] = ids
      logits = np.array(multihost.to_host(self._predict_fn(params, sharding.put_batch(
          {'inputs': padded}, self.mesh)['inputs'])))[0, :len(ids)]
      logits[:, :self.first_text_id] = -np.inf  # Never a special or reserved piece.
      filled = np.where(ids == self.mask_id, logits.argmax(-1), ids)
      outputs[i] = tokenizer.decode_with_symbols(self.sp, filled[1:-1])
    return outputs
