"""Sentence classification and regression: an encoder and a sequence head.

Data: `{data_dir}/{split}.tsv[.gz]` with a header; `config.text_column` holds the text,
`config.label_column` the label: one of `config.labels` (or `labels_file`), or with
`num_labels=1` a number (regression). E.g. SST-2 (`configs/sst2.py`).
Model: `models.SequenceClassifier` (pooling 'first' or 'mean'), from scratch or from an
imported BERT (`tasks/encoder.py`).
Loss: `config.loss` over the batch's sentences, logits float32 [B, C], targets [B]
(int32 labels, or float32 values for regression), weights float32 [B] (0 on padding
rows): 'cross_entropy' (label smoothing optional), 'mse' (regression), or a user's.
Evaluation: loss, accuracy, macro and micro F1 and scikit-learn's per-class report
(regression: MSE, Pearson and Spearman); the best checkpoint has the highest accuracy
(regression: the lowest MSE).
Prediction: one label per input line (an empty line stays empty).
"""
from __future__ import annotations

import numpy as np

from transformer_jax import config_schema
from transformer_jax import flops
from transformer_jax import metrics
from transformer_jax import models
from transformer_jax import multi30k
from transformer_jax import readers
from transformer_jax.tasks import encoder


class ClassificationTask(encoder.EncoderTask):
  """Sequence classification or regression (see the module docstring)."""

  def __init__(self, config, workdir: str, mesh):
    super().__init__(config, workdir, mesh)
    self.regression = config.num_labels == 1
    self.best_metric, self.best_mode = ('mse', 'min') if self.regression else ('accuracy', 'max')
    if self.regression and config.loss == 'cross_entropy':
      raise config_schema.ConfigError("config.loss='cross_entropy': num_labels=1 is "
                                      "regression; use config.loss='mse'")
    if not self.regression and config.loss == 'mse':
      raise config_schema.ConfigError(f"config.loss='mse': needs num_labels=1 (regression), "
                                      f'not {config.num_labels}')

  def _read(self, split: str):
    cfg = self.config
    texts, labels, _ = readers.read_tsv(
        multi30k.find_file(cfg.data_dir, split, 'tsv'), cfg.text_column, cfg.label_column,
        None if self.regression else self.labels)
    return texts, labels

  def _texts(self, examples):
    return examples[0]

  def _features(self, examples, split: str) -> dict:
    texts, labels = examples
    ids, keep = encoder.fit_length(self.tokenizer.encode(texts, 1 << 30), self.config, split,
                                   training=split == self.config.train_split)
    label_dtype = np.float32 if self.regression else np.int32
    return {'inputs': [ids[i] for i in keep],
            'labels': np.asarray(labels, label_dtype)[keep],
            'weights': np.ones(len(keep), np.float32),
            'index': (keep + 1).astype(np.int32)}

  def _make_model(self, architecture):
    return models.SequenceClassifier(architecture, self.config.num_labels, self.config.pooling)

  def _forward_flops(self, rows, length):
    return flops.encoder_forward_flops(self.model.config, rows, length, self.config.num_labels)

  def loss(self, params, batch, dropout_rng):
    logits = self.model.apply({'params': params}, batch['inputs'], deterministic=False,
                              rngs={'dropout': dropout_rng})  # [B, C]
    return self._loss_fn(logits, batch['labels'], batch['weights'])

  def _predict_features(self, features: dict, params) -> np.ndarray:
    """Logits float64 [N, C] of every example of `features`, in their order."""
    n = len(features['inputs'])
    out = np.zeros((n, self.config.num_labels))
    for batch in self._eval_batches(features):
      logits = self._logits(params, batch)
      real = batch['index'] > 0
      out[batch['index'][real] - 1] = logits[real]
    return out

  def _score(self, params, examples, split: str) -> tuple[dict, str]:
    _, labels = examples
    features = self._features(examples, split)
    logits = self._predict_features(features, params)
    if self.regression:
      predictions = logits[:, 0]
      scalars, report = metrics.regression_report(list(map(float, labels)),
                                                  predictions.tolist())
      scalars['loss'] = scalars['mse']
      return scalars, report
    gold = np.asarray(labels)
    scalars, report = metrics.classification_report(
        gold.tolist(), logits.argmax(-1).tolist(), list(self.labels))
    scalars['loss'] = float(-encoder.log_softmax(logits)[np.arange(len(gold)), gold].mean())
    return scalars, report

  def format_eval(self, scalars):
    if self.regression:
      return (f"eval mse {scalars['mse']:.4f} pearson {scalars['pearson']:.4f} "
              f"spearman {scalars['spearman']:.4f}")
    return (f"eval loss {scalars['loss']:.4f} accuracy {scalars['accuracy']:.4f} "
            f"macro-F1 {scalars['macro_f1']:.4f}")

  def predict(self, params, lines):
    todo = [i for i, line in enumerate(lines) if line.strip()]
    ids = self.tokenizer.encode([lines[i] for i in todo], self.config.max_length)
    features = {'inputs': ids, 'index': np.arange(1, len(ids) + 1, dtype=np.int32)}
    outputs = [''] * len(lines)
    if not ids:
      return outputs
    logits = self._predict_features(features, params)
    for i, row in zip(todo, logits):
      outputs[i] = f'{row[0]:.6g}' if self.regression else self.labels[int(row.argmax())]
    return outputs
