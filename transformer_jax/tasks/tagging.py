"""Token classification (tagging, e.g. named entities): an encoder and a token head.

Data: `{data_dir}/{split}.conll[.gz]`, one word per line, the tag in column
`config.tag_column` (0-based: column 0 is the word), a blank line between sentences,
IOB2 tags from `config.labels` (or `labels_file`); `repair_iob=True` turns an `I-X` that
starts an entity into `B-X` (counted). E.g. GermEval 2014 (`configs/germeval.py`).
Words are split into sub-tokens; a word's label is predicted from its first sub-token.
Batches: {'inputs': int32 [B, S], 'targets': int32 [B, S]} where targets = 1 + the
label index at each word's first sub-token and 0 elsewhere (other sub-tokens, [CLS],
[SEP], padding).
Loss: `config.loss` with logits float32 [B, S, C], targets int32 [B, S] (label indices),
weights float32 [B, S] = 1 at first sub-tokens, 0 elsewhere: the other sub-tokens and
padding never count.
Evaluation: entity-level precision, recall and F1 with seqeval (strict IOB2) and its
per-type report; the best checkpoint has the highest F1. Words cut off by `max_length`
are predicted 'O' (counted in the log), so every gold entity counts.
Prediction: one tag per whitespace-separated word of each input line, space-separated.
"""
from __future__ import annotations

from absl import logging
import jax.numpy as jnp
import numpy as np

from transformer_jax import flops
from transformer_jax import losses
from transformer_jax import metrics
from transformer_jax import models
from transformer_jax import readers
from transformer_jax.tasks import encoder


class TaggingTask(encoder.EncoderTask):
  """Token classification (see the module docstring)."""
  best_metric = 'f1'
  best_mode = 'max'

  def __init__(self, config, workdir: str, mesh):
    super().__init__(config, workdir, mesh)
    self._loss_fn = losses.get_loss(config)

  def _read(self, split: str):
    cfg = self.config
    words, tags, stats = readers.read_conll(encoder.data_file(cfg, split, 'conll'),
                                            cfg.tag_column, self._labels_from_config(),
                                            cfg.repair_iob)
    logging.info('%s: %s', split, stats)
    return words, tags

  def _texts(self, examples):
    return [' '.join(words) for words in examples[0]]

  def _encode(self, sentences: list[list[str]], split: str, training: bool):
    """Sub-token ids and word_index per sentence, cut to max_length (see `fit_length`)."""
    encoded = [self.tokenizer.encode_words(words, 1 << 30) for words in sentences]
    ids, keep = encoder.fit_length([e[0] for e in encoded], self.config, split, training)
    word_index = [e[1][:len(x) - 1].tolist() + [-1] for e, x in zip(encoded, ids)]
    return ids, [np.asarray(w, np.int32) for w in word_index], keep

  def _features(self, examples, split: str) -> dict:
    words, tags = examples
    ids, word_index, keep = self._encode(words, split, split == self.config.train_split)
    targets = []
    for i in keep:
      t = np.zeros(len(ids[i]), np.int32)
      starts = word_index[i] >= 0
      t[starts] = np.asarray(tags[i], np.int32)[word_index[i][starts]] + 1
      targets.append(t)
    return {'inputs': [ids[i] for i in keep], 'targets': targets,
            'index': (keep + 1).astype(np.int32)}

  def _make_model(self, architecture):
    return models.TokenClassifier(architecture, self.config.num_labels)

  def _forward_flops(self, rows, length):
    return flops.encoder_forward_flops(self.model.config, rows, length,
                                       length * self.config.num_labels)

  def loss(self, params, batch, dropout_rng):
    logits = self.model.apply({'params': params}, batch['inputs'], deterministic=False,
                              rngs={'dropout': dropout_rng})  # [B, S, C]
    targets = batch['targets']
    weights = (targets > 0).astype(jnp.float32)
    return self._loss_fn(logits, jnp.maximum(targets - 1, 0), weights)

  def _tag(self, params, sentences: list[list[str]], split: str) -> list[list[str]]:
    """Predicted tags, one per word of each sentence (words cut off: 'O')."""
    ids, word_index, _ = self._encode(sentences, split, training=False)
    features = {'inputs': ids, 'index': np.arange(1, len(ids) + 1, dtype=np.int32)}
    predicted = [['O'] * len(words) for words in sentences]
    for batch in self._eval_batches(features):
      labels = self._logits(params, batch).argmax(-1)  # [B, S]
      for row, index in enumerate(batch['index']):
        if index == 0:
          continue
        starts = word_index[index - 1]
        positions = np.flatnonzero(starts >= 0)
        for position in positions:
          predicted[index - 1][starts[position]] = self.labels[int(labels[row, position])]
    cut = sum(len(words) - int((w >= 0).sum()) for words, w in zip(sentences, word_index))
    if cut:
      logging.info('%s: %d words beyond max_length=%d sub-tokens were tagged O', split, cut,
                   self.config.max_length)
    return predicted

  def _score(self, params, examples, split: str):
    words, tags = examples
    gold = [[self.labels[t] for t in sentence] for sentence in tags]
    return metrics.entity_report(gold, self._tag(params, words, split))

  def evaluate(self, params, step, last):
    scalars, report = self._score(params, self.eval_examples, self.config.eval_split)
    return scalars, f'{self.config.eval_split} at step {step}:\n{report}'

  def format_eval(self, scalars):
    return (f"eval precision {scalars['precision']:.4f} recall {scalars['recall']:.4f} "
            f"F1 {scalars['f1']:.4f} token acc {scalars['token_accuracy']:.4f}")

  def test(self, params, split, name):
    examples = (self.test_examples if getattr(self, 'test_examples', None) is not None
                and split == self.config.test_split else self._read(split))
    scalars, report = self._score(params, examples, split)
    return scalars, f'{split} ({name}): {self.format_eval(scalars)}\n{report}'

  def predict(self, params, lines):
    sentences = [line.split() for line in lines]
    todo = [i for i, words in enumerate(sentences) if words]
    tagged = self._tag(params, [sentences[i] for i in todo], 'input') if todo else []
    outputs = [''] * len(lines)
    for i, tags in zip(todo, tagged):
      outputs[i] = ' '.join(tags)
    return outputs
