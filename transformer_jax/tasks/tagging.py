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
Word UNK (`config.word_unk` = p > 0): in training, each word seen at most
`config.word_unk_max_count` times in the training split (0: every word) becomes one UNK
token, with probability p, all its sub-tokens together, its label kept (`WordUnk`): the
model learns to tag from the context the words it has never seen (Lample, Ballesteros,
Subramanian, Kawakami and Dyer 2016, "Neural Architectures for Named Entity Recognition",
NAACL, section 4: singletons, p = 0.5).
Decoding: the most probable tag sequence that is valid IOB2 (no I-X after O or after
another type; Viterbi over the words' label log-probabilities), so every predicted
entity counts in strict evaluation.
Evaluation: entity-level precision, recall and F1 with seqeval (strict IOB2) and its
per-type report; the best checkpoint has the highest F1. Words cut off by `max_length`
are predicted 'O' (counted in the log), so every gold entity counts.
Prediction: one tag per whitespace-separated word of each input line, space-separated.
"""
from __future__ import annotations

import collections
import dataclasses

from absl import logging
import jax.numpy as jnp
import numpy as np

from transformer_jax import augment
from transformer_jax import flops
from transformer_jax import metrics
from transformer_jax import models
from transformer_jax import multi30k
from transformer_jax import readers
from transformer_jax.tasks import encoder


def iob2_allowed(labels: list[str]) -> tuple[np.ndarray, np.ndarray]:
  """IOB2 constraints over `labels`: (start bool [C], transition bool [C, C]). A sentence
  may start with O or B-X; after O or any tag, I-X may follow only B-X or I-X."""
  def inside_of(label):
    return label[2:] if label.startswith('I-') else None
  start = np.array([inside_of(label) is None for label in labels])
  transition = np.ones((len(labels), len(labels)), bool)
  for j, label in enumerate(labels):
    kind = inside_of(label)
    if kind is not None:
      transition[:, j] = [prev in (f'B-{kind}', f'I-{kind}') for prev in labels]
  return start, transition


def constrained_decode(log_probs: np.ndarray, start: np.ndarray,
                       transition: np.ndarray) -> np.ndarray:
  """The highest-scoring label sequence that satisfies the constraints (Viterbi):
  argmax over allowed y of sum_i log_probs[i, y_i]. float [n, C] -> int [n]."""
  n = len(log_probs)
  if n == 0:
    return np.zeros(0, np.int64)
  penalty = np.where(transition, 0.0, -np.inf)  # [C_prev, C]
  score = np.where(start, log_probs[0], -np.inf)
  back = np.zeros((n, log_probs.shape[1]), np.int64)
  for i in range(1, n):
    candidates = score[:, None] + penalty  # [C_prev, C]
    back[i] = candidates.argmax(0)
    score = candidates.max(0) + log_probs[i]
  path = [int(score.argmax())]
  for i in range(n - 1, 0, -1):
    path.append(int(back[i, path[-1]]))
  return np.asarray(path[::-1])


_WORD_UNK_STREAM = 0x756E6B  # 'unk': the random stream of `WordUnk` (augment.uniform).


@dataclasses.dataclass(frozen=True)
class WordUnk:
  """The transform of word-UNK training (`data.Batcher.train`): in each example
  {'inputs': int32 [n], 'targets': int32 [n], 'word_unk_ok': int32 [n]} (targets > 0 at
  the first sub-token of each word; 'word_unk_ok' 1 there for words that may be
  replaced), each such word becomes, with probability `p`, one `unk_id` at its first
  sub-token, with its target; its other sub-tokens go. The draw of word w of the example
  at stream position j is `augment.uniform(seed, j, _WORD_UNK_STREAM, w)`: the same for
  any grouping and on resume, new each epoch. Lengths shrink or stay; the last token
  ([SEP]/EOS) stays.

  Raises:
    ValueError: p outside [0, 1].
  """
  p: float
  unk_id: int
  seed: int

  def __post_init__(self):
    if not 0 <= self.p <= 1:
      raise ValueError(f'p must be in [0, 1], got {self.p}')

  def __call__(self, positions: np.ndarray, examples: dict) -> dict:
    out = {k: [] for k in ('inputs', 'targets', 'word_unk_ok')}
    for position, ids, targets, ok in zip(positions, examples['inputs'],
                                          examples['targets'], examples['word_unk_ok']):
      starts = np.flatnonzero(targets > 0)  # [w] first sub-token of each word.
      draws = augment.uniform(self.seed, np.full(len(starts), position), _WORD_UNK_STREAM,
                              np.arange(len(starts)))
      chosen = (draws < self.p) & (ok[starts] > 0)
      if chosen.any():
        # word[i]: the word position i belongs to (-1 before the first; the last token,
        # [SEP]/EOS, belongs to none).
        word = np.cumsum(targets > 0) - 1
        word[-1] = -1
        replaced = np.zeros(len(starts) + 1, bool)
        replaced[:-1] = chosen  # replaced[-1]: the 'no word' of index -1.
        keep = ~replaced[word] | (targets > 0)
        ids = np.where(replaced[word] & (targets > 0), self.unk_id, ids)[keep]
        targets, ok = targets[keep], ok[keep]
      out['inputs'].append(np.asarray(ids, np.int32))
      out['targets'].append(targets)
      out['word_unk_ok'].append(ok)
    return out


class TaggingTask(encoder.EncoderTask):
  """Token classification (see the module docstring)."""
  best_metric = 'f1'
  best_mode = 'max'
  TRANSFORM_FEATURES = ('word_unk_ok',)

  def _read(self, split: str):
    cfg = self.config
    words, tags, stats = readers.read_conll(multi30k.find_file(cfg.data_dir, split, 'conll'),
                                            cfg.tag_column, self.labels, cfg.repair_iob)
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
    features = {'inputs': [ids[i] for i in keep], 'targets': targets,
                'index': (keep + 1).astype(np.int32)}
    if split == self.config.train_split and self.config.word_unk > 0:
      features['word_unk_ok'] = self._word_unk_ok(words, features['inputs'],
                                                  [word_index[i] for i in keep], keep)
    return features

  def _word_unk_ok(self, words, ids, word_index, keep) -> list[np.ndarray]:
    """int32 [n] per kept sentence: 1 at the first sub-token of each word that `WordUnk`
    may replace (seen at most config.word_unk_max_count times in `words`; 0: any)."""
    limit = self.config.word_unk_max_count
    counts = collections.Counter(w for sentence in words for w in sentence)
    ok = []
    for i, x, w in zip(keep, ids, word_index):
      flags = np.zeros(len(x), np.int32)
      starts = np.flatnonzero(w >= 0)
      flags[starts] = [not limit or counts[words[i][j]] <= limit for j in w[starts]]
      ok.append(flags)
    eligible = sum(int(f.sum()) for f in ok)
    total = sum(int((w >= 0).sum()) for w in word_index)
    logging.info('word_unk: %d of %d training words (%.1f%%; %s) become UNK with '
                 'probability %g', eligible, total, 100 * eligible / max(total, 1),
                 f'seen <= {limit} times' if limit else 'every word', self.config.word_unk)
    return ok

  def _train_transform(self, seed: int):
    if self.config.word_unk <= 0:
      return None
    return WordUnk(self.config.word_unk, self.tokenizer.unk_id, seed)

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
    """Predicted tags, one per word of each sentence: the most probable valid IOB2
    sequence over the words' first sub-tokens (`constrained_decode`); words cut off by
    max_length are 'O'."""
    ids, word_index, _ = self._encode(sentences, split, training=False)
    features = {'inputs': ids, 'index': np.arange(1, len(ids) + 1, dtype=np.int32)}
    predicted = [['O'] * len(words) for words in sentences]
    start, transition = iob2_allowed(list(self.labels))
    for batch in self._eval_batches(features):
      log_probs = encoder.log_softmax(self._logits(params, batch))  # [B, S, C]
      for row, index in enumerate(batch['index']):
        if index == 0:
          continue
        starts = word_index[index - 1]
        positions = np.flatnonzero(starts >= 0)
        best = constrained_decode(log_probs[row, positions], start, transition)
        for position, label in zip(positions, best):
          predicted[index - 1][starts[position]] = self.labels[int(label)]
    cut = sum(len(words) - int((w >= 0).sum()) for words, w in zip(sentences, word_index))
    if cut:
      logging.info('%s: %d words beyond max_length=%d sub-tokens were tagged O', split, cut,
                   self.config.max_length)
    return predicted

  def _score(self, params, examples, split: str):
    words, tags = examples
    gold = [[self.labels[t] for t in sentence] for sentence in tags]
    return metrics.entity_report(gold, self._tag(params, words, split))

  def format_eval(self, scalars):
    return (f"eval precision {scalars['precision']:.4f} recall {scalars['recall']:.4f} "
            f"F1 {scalars['f1']:.4f} token acc {scalars['token_accuracy']:.4f}")

  def predict(self, params, lines):
    sentences = [line.split() for line in lines]
    todo = [i for i, words in enumerate(sentences) if words]
    tagged = self._tag(params, [sentences[i] for i in todo], 'input') if todo else []
    outputs = [''] * len(lines)
    for i, tags in zip(todo, tagged):
      outputs[i] = ' '.join(tags)
    return outputs
