"""Encoder-decoder denoising pretraining: T5 span corruption and BART text infilling.

  span_corruption  (Raffel et al. 2020, 3.1.4) `noise_density` of the pieces, in spans of
                   mean length `mean_noise_span_length`, are each replaced by one sentinel
                   in the inputs; targets are the sentinels, each followed by its span.
  text_infilling   (Lewis et al. 2020, 2.2) `mask_ratio` of the pieces, in spans of
                   Poisson(`poisson_lambda`) length (0 = an inserted mask), are each
                   replaced by one MASK; targets are the whole sentence.

The model, loss (`translation.seq2seq_loss`: logits [B, T, V], targets [B, T], weights
[B, T]) and evaluation (loss, perplexity, token accuracy on the noised eval files) are
translation's, so a fine-tuning run loads every parameter (`init_from`, `init_strict`).
`--mode=predict` decodes typed lines in which '<mask>' and '<extra_id_N>' stand for the
reserved symbols, e.g. 'Ein Hund <extra_id_0> über die Wiese.'
"""
from __future__ import annotations

import functools

import jax
import numpy as np

from transformer_jax import config_schema
from transformer_jax import flops
from transformer_jax import losses
from transformer_jax import models
from transformer_jax import noising
from transformer_jax import sharding
from transformer_jax import tokenizer
from transformer_jax import translate
from transformer_jax.tasks import pretraining
from transformer_jax.tasks import translation
from transformer_jax.tokenizer import EOS_ID, PAD_ID


class DenoisingTask(pretraining.PretrainingTask):
  """`config.task` 'span_corruption' or 'text_infilling' (see the module docstring)."""
  FIELDS = config_schema.DENOISING_SCHEMA
  SIGNATURE = {'inputs': pretraining.spec(), 'targets': pretraining.spec()}
  token_unit = 'target tok'

  def _max_length(self) -> int:
    return self.config.max_source_length

  def _noise(self, ids, rng):
    cfg = self.config
    if cfg.task == 'span_corruption':
      inputs, targets = noising.span_corruption(ids, rng, self.sentinel_ids, cfg.noise_density,
                                                cfg.mean_noise_span_length)
    else:
      inputs, targets = noising.text_infilling(ids, rng, self.mask_id, cfg.mask_ratio,
                                               cfg.poisson_lambda)
    # Inserted masks (text infilling) can lengthen the inputs past the limit: cut.
    inputs = pretraining.with_eos(inputs[:self._max_length() - 1])
    targets = pretraining.with_eos(targets[:cfg.max_target_length - 1])
    return {'inputs': inputs, 'targets': targets}

  def _make_model(self):
    return models.Transformer(models.TransformerConfig.from_config(
        self.config, self.sp.vocab_size()))

  def _setup_model(self):
    self._loss_fn = losses.get_loss(self.config)
    self._eval_step = sharding.jit(
        functools.partial(translation.eval_step, model=self.model), self.mesh, self.rules,
        out_shardings=sharding.replicated(self.mesh))
    self.translator = translate.Translator(self.model, None, self.sp, self.config, self.mesh,
                                           self.rules)

  def init_params(self, rng):
    dummy = jax.numpy.ones((1, 8), jax.numpy.int32)
    return self.model.init(rng, dummy, dummy)['params']

  def loss(self, params, batch, dropout_rng):
    return translation.seq2seq_loss(params, batch, dropout_rng, model=self.model,
                                    loss_fn=self._loss_fn)

  def batch_stats(self, batch):
    (rows, source_length), target_length = batch['inputs'].shape, batch['targets'].shape[1]
    return {'examples': int(np.count_nonzero(batch['targets'][:, 0] != PAD_ID)),
            'tokens': int(np.count_nonzero(batch['targets'])),
            'positions': rows * target_length,
            'flops': flops.train_flops(self.model.config, rows, source_length, target_length)}

  def evaluate(self, params, step, last):
    return translation.evaluate(self._eval_step, params, self.batcher, self.eval_ds,
                                self.mesh, self.config.num_eval_batches), None

  def format_eval(self, scalars):
    return (f"eval loss {scalars['loss']:.4f} ppl {scalars['perplexity']:.2f} "
            f"acc {scalars['accuracy']:.4f}")

  def predict(self, params, lines):
    """Each line (with '<mask>', '<extra_id_N>' written out) -> the decoded output, with
    the reserved symbols written out; an empty line gives an empty line."""
    self.translator.params = params
    todo = [i for i, line in enumerate(lines) if line.strip()]
    sources = [np.asarray(tokenizer.encode_with_symbols(self.sp, lines[i]) + [EOS_ID],
                          np.int32) for i in todo]
    outputs = [''] * len(lines)
    for i, ids in zip(todo, self.translator.translate_ids(sources)):
      outputs[i] = tokenizer.decode_with_symbols(self.sp, ids)
    return outputs
