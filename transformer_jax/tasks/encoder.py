"""What the encoder-only tasks (classification, tagging) share: the tokenizer, the
model's architecture (ours from the run config, or an imported BERT's), label lists,
length-bucketed batches and the pretrained-weights import.

Tokenizer and architecture:
  init_from=''            our pre-LN encoder from the run config (d_model, num_heads,
                          d_ff, num_encoder_layers), a SentencePiece model trained on
                          the training texts ({workdir}/tokenizer/spm.model);
  init_from='hf:FOLDER'   a Hugging Face BERT checkpoint (`transformer_jax.hf_import`):
                          its architecture from FOLDER/config.json, its weights (the head
                          stays freshly initialized), its WordPiece vocabulary (copied to
                          {workdir}/tokenizer/vocab.txt). The run config's dropout rates
                          and dtype apply.
  init_from=WORKDIR       another run (or WORKDIR/checkpoints/STEP, one checkpoint): its
                          encoder architecture from WORKDIR/model_config.json (an encoder
                          task's, or the encoder of an encoder-decoder run), its tokenizer
                          (WORKDIR/tokenizer/ copied into {workdir}/tokenizer/), its
                          parameters by `config.init_rules` (`transformer_jax.init_from`).
                          The run config's dropout rates and dtypes apply.
All are recorded in {workdir}/model_config.json, which the eval and predict modes read.
"""
from __future__ import annotations

import dataclasses
import os

from absl import logging
import jax
import jax.numpy as jnp
import numpy as np

from transformer_jax import config_schema
from transformer_jax import data
from transformer_jax import hf_import
from transformer_jax import init_from
from transformer_jax import losses
from transformer_jax import models
from transformer_jax import multi30k
from transformer_jax import multihost
from transformer_jax import readers
from transformer_jax import sharding
from transformer_jax import tokenizer
from transformer_jax.tasks import base

HF_PREFIX = init_from.HF_PREFIX
# The model_config.json fields of an encoder-decoder run that give its encoder.
_ENCODER_FIELDS = ('vocab_size', 'd_model', 'num_heads', 'd_ff', 'num_encoder_layers')


def architecture_to_json(cfg: models.TransformerConfig) -> dict:
  """A TransformerConfig as JSON-able data (dtypes by name)."""
  record = dataclasses.asdict(cfg)
  record['dtype'], record['param_dtype'] = jnp.dtype(cfg.dtype).name, jnp.dtype(
      cfg.param_dtype).name
  return record


def architecture_from_json(record: dict) -> models.TransformerConfig:
  return models.TransformerConfig(**{**record, 'dtype': jnp.dtype(record['dtype']),
                                     'param_dtype': jnp.dtype(record['param_dtype'])})


def source_architecture(run_dir: str, config) -> models.TransformerConfig:
  """The encoder of the run in `run_dir`, from its model_config.json: an encoder task's
  'architecture' record, or the top-level fields of an encoder-decoder run (translation,
  pretraining: vocab_size, d_model, num_heads, d_ff, num_encoder_layers, and the other
  `TransformerConfig` fields it records; the rest as `TransformerConfig.from_config`
  gives them), with `config`'s dropout rates and dtypes.

  Raises:
    init_from.InitError: naming config.init_from, when the file is missing or records
      no model.
  """
  record = config_schema.load_model_config(run_dir)
  if isinstance(record.get('architecture'), dict):
    architecture = architecture_from_json(record['architecture'])
  elif all(name in record for name in _ENCODER_FIELDS):
    fields = {f.name for f in dataclasses.fields(models.TransformerConfig)} - {
        'dtype', 'param_dtype'}
    architecture = models.TransformerConfig(**{k: v for k, v in record.items() if k in fields})
  else:
    raise init_from.InitError(
        f'config.init_from={config.init_from!r}: {os.path.join(run_dir, "model_config.json")} '
        'is missing or records no model')
  return dataclasses.replace(
      architecture, dropout_rate=config.dropout_rate,
      attention_dropout_rate=config.attention_dropout_rate, dtype=jnp.dtype(config.dtype),
      param_dtype=jnp.dtype(config.param_dtype))


class EncoderTask(base.Task):
  """Base of the encoder-only tasks. Subclasses implement `_read` (a split -> examples)
  and `_features` (examples -> Batcher features), `_make_model`, `loss` and the rest of
  the Task interface."""
  FIELDS = config_schema.ENCODER_SCHEMA
  token_unit = 'tok'
  TRANSFORM_FEATURES: tuple[str, ...] = ()  # Training features only `_train_transform` reads.

  def __init__(self, config, workdir: str, mesh):
    super().__init__(config, workdir, mesh)
    self._loss_fn = losses.get_loss(config)

  # --- Setup ------------------------------------------------------------------------
  def setup(self, training: bool) -> None:
    cfg, workdir = self.config, self.workdir
    self.hf_folder = cfg.init_from[len(HF_PREFIX):] if cfg.init_from.startswith(
        HF_PREFIX) else ''
    config_schema.check_model_config(cfg, workdir)  # A rerun must continue the same model.
    self.test_examples = None
    self.source_run = None  # The workdir of an init_from run.
    if training:
      self.source_run = init_from.source_run_dir(cfg.init_from)
      self.labels = self._labels_from_config()
      self.train_examples = self._read(cfg.train_split)
      self.eval_examples = self._read(cfg.eval_split)
      self.test_examples = self._read(cfg.test_split) if cfg.test_split else None
      self.tokenizer, architecture = self._tokenizer_and_architecture()
      config_schema.save_model_config(
          cfg, self.tokenizer.vocab_size, workdir,
          fields=() if self.hf_folder or self.source_run else config_schema.MODEL_FIELDS,
          extra={'task': cfg.task, 'labels': list(self.labels), 'pooling': cfg.pooling,
                 'architecture': architecture_to_json(architecture)})
    else:
      record = config_schema.load_model_config(workdir)
      if 'architecture' not in record:
        raise FileNotFoundError(f'{workdir}/model_config.json: missing or not written by a '
                                f'{cfg.task} run; is {workdir} a training workdir?')
      self.labels = record['labels']
      architecture = dataclasses.replace(
          architecture_from_json(record['architecture']), dtype=jnp.dtype(cfg.dtype))
      self.tokenizer = self._load_tokenizer()
    self.model = self.wrap_model(self._make_model(architecture))
    self.batcher = data.Batcher(cfg.max_length, cfg.max_tokens_per_batch,
                                cfg.length_bucket_step, sharding.batch_shards(self.mesh))
    self._predict_fn = sharding.jit(
        lambda params, inputs: self.model.apply({'params': params}, inputs), self.mesh,
        self.rules)
    if training:
      self.train_features = self._features(self.train_examples, cfg.train_split)
      logging.info('Buckets (length: rows): %s',
                   dict(zip(self.batcher.lengths, self.batcher.batch_sizes)))

  def _labels_from_config(self) -> list[str]:
    cfg = self.config
    labels = list(cfg.labels)
    if cfg.labels_file:
      try:
        labels = readers.read_labels_file(cfg.labels_file)
      except multi30k.DataError as e:
        raise config_schema.ConfigError(f'config.labels_file: {e}') from None
      if len(labels) != cfg.num_labels:
        raise config_schema.ConfigError(
            f'config.num_labels={cfg.num_labels}: {cfg.labels_file} has {len(labels)} labels')
    return labels

  def _load_tokenizer(self):
    folder = os.path.join(self.workdir, 'tokenizer')
    if os.path.exists(os.path.join(folder, hf_import.VOCAB_FILE)):
      return hf_import.WordPieceTokenizer.load(folder)
    path = os.path.join(folder, 'spm.model')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{folder}: no tokenizer; is {self.workdir} a training workdir?')
    return tokenizer.SentencePieceTokenizer(tokenizer.load(path))

  def _tokenizer_and_architecture(self):
    cfg = self.config
    if self.source_run:
      architecture = source_architecture(self.source_run, cfg)
      ignored = [f'{name}={cfg[name]} (the source has {getattr(architecture, name)})'
                 for name in ('d_model', 'num_heads', 'd_ff', 'num_encoder_layers')
                 if name in cfg and cfg[name] != getattr(architecture, name)]
      if ignored:
        logging.warning('init_from=%s: the model is the source run\'s; config fields ignored: '
                        '%s', cfg.init_from, ', '.join(ignored))
      self._check_positions(architecture)
      init_from.copy_tokenizer(self.source_run, self.workdir)
      return self._load_tokenizer(), architecture
    if self.hf_folder:
      kwargs = hf_import.read_bert_config(self.hf_folder)
      architecture = models.TransformerConfig(**{
          **kwargs, 'dropout_rate': cfg.dropout_rate,
          'attention_dropout_rate': cfg.attention_dropout_rate,
          'dtype': jnp.dtype(cfg.dtype), 'param_dtype': jnp.dtype(cfg.param_dtype)})
      self._check_positions(architecture)
      folder = os.path.join(self.workdir, 'tokenizer')
      wordpiece = hf_import.WordPieceTokenizer(self.hf_folder)
      if multihost.is_primary():  # Process 0 writes the workdir's files.
        wordpiece.save(folder)
      multihost.barrier('tokenizer')  # The others may read them (adapter_config.json).
      return wordpiece, architecture
    sp = tokenizer.load_or_train(cfg, self.workdir, self._texts(self.train_examples))
    return (tokenizer.SentencePieceTokenizer(sp),
            models.TransformerConfig.from_config(cfg, sp.vocab_size()))

  def _check_positions(self, architecture: models.TransformerConfig) -> None:
    if (architecture.position_embedding == 'learned'
        and self.config.max_length > architecture.max_position_embeddings):
      raise config_schema.ConfigError(
          f'config.max_length={self.config.max_length}: the imported model has '
          f'{architecture.max_position_embeddings} positions')

  def init_params(self, rng: jax.Array):
    dummy = jnp.ones((1, 8), jnp.int32)
    return self.model.init(rng, dummy)['params']

  def load_pretrained(self, params):
    """Puts in the parameters of `config.init_from` (a Hugging Face BERT's encoder, or
    another run's), mapped by `config.init_rules`, and logs what was loaded, initialized
    and left unused (`init_from.assign`); a fresh head stays initialized."""
    return init_from.initialize(self.config, params)

  def describe(self) -> str:
    cfg = self.model.config
    source = (f'imported from {self.hf_folder}' if self.hf_folder else
              f'initialized from {self.config.init_from}' if self.config.init_from else
              'from scratch')
    name = type(getattr(self.model, 'model', self.model)).__name__  # PEFT: the base's.
    return (f'{name} ({cfg.num_encoder_layers} layers, d_model '
            f'{cfg.d_model}, {cfg.norm_position}-LN, {source}), vocab '
            f'{self.tokenizer.vocab_size}, {len(self.labels) or 1} labels')

  # --- Batches ----------------------------------------------------------------------
  def train_batches(self, seed: int, skip: int):
    features = {k: v for k, v in self.train_features.items() if k != 'index'}
    transform = self._train_transform(seed)
    ds = self.batcher.train(features, seed, self.config.shuffle_buffer_size, skip=skip,
                            transform=transform)
    if any(k in features for k in self.TRANSFORM_FEATURES):  # Read by the transform only.
      ds = ds.map(lambda batch: {k: v for k, v in batch.items()
                                 if k not in self.TRANSFORM_FEATURES})
    return ds.as_numpy_iterator()

  def _train_transform(self, seed: int) -> data.Transform | None:
    """The transform of the training examples (`data.Batcher.train`), or None; the
    features named in TRANSFORM_FEATURES reach it but not the batches."""
    del seed
    return None

  def _eval_batches(self, features: dict):
    """Host batches of one pass over `features`, padded to full rows; 'index' holds
    1 + the example's position (0 on padding rows)."""
    for batch in self.batcher.eval(features).as_numpy_iterator():
      yield self.batcher.pad_rows(batch)

  def _logits(self, params, batch: dict) -> np.ndarray:
    """float64 [B, ...] logits of a host batch, every row on every process."""
    inputs = sharding.put_batch({'inputs': batch['inputs']}, self.mesh)['inputs']
    return np.asarray(multihost.to_host(self._predict_fn(params, inputs)), np.float64)

  def batch_stats(self, batch):
    rows, length = batch['inputs'].shape
    return {'examples': int(np.count_nonzero(batch['inputs'][:, 0])),
            'tokens': int(np.count_nonzero(batch['inputs'])),
            'positions': rows * length,
            'flops': 3 * self._forward_flops(rows, length)}

  # --- Evaluation -------------------------------------------------------------------
  def evaluate(self, params, step, last):
    scalars, report = self._score(params, self.eval_examples, self.config.eval_split)
    return scalars, f'{self.config.eval_split} at step {step}:\n{report}'

  def test(self, params, split, name):
    examples = (self.test_examples if self.test_examples is not None
                and split == self.config.test_split else self._read(split))
    scalars, report = self._score(params, examples, split)
    return scalars, f'{split} ({name}): {self.format_eval(scalars)}\n{report}'

  # --- For subclasses ---------------------------------------------------------------
  def _score(self, params, examples, split: str) -> tuple[dict, str]:
    """Scalars and the report of `params` on `examples` (as `_read` returns them)."""
    raise NotImplementedError

  def _read(self, split: str):
    """The examples of `split` (labels checked against `self.labels`)."""
    raise NotImplementedError

  def _texts(self, examples) -> list[str]:
    """The training texts the SentencePiece model is trained on."""
    raise NotImplementedError

  def _features(self, examples, split: str) -> dict:
    raise NotImplementedError

  def _make_model(self, architecture: models.TransformerConfig):
    raise NotImplementedError

  def _forward_flops(self, rows: int, length: int) -> float:
    raise NotImplementedError


def fit_length(ids: list[np.ndarray], config, split: str, training: bool
               ) -> tuple[list[np.ndarray], np.ndarray]:
  """Sequences longer than `config.max_length`: in training data, cut (keeping their
  last, [SEP]/EOS, token) with `config.truncate`, else dropped; in other data always cut
  (every example is scored). Logs the counts for `split`. Returns the sequences and the
  indices of the kept ones (int64 [n])."""
  limit = config.max_length
  long = [i for i, x in enumerate(ids) if len(x) > limit]
  keep = np.arange(len(ids))
  if long and training and not config.truncate:
    keep = np.setdiff1d(keep, long)
    logging.info('%s: dropped %d of %d sequences longer than max_length=%d tokens '
                 '(config.truncate=False)', split, len(long), len(ids), limit)
  elif long:
    ids = list(ids)
    for i in long:
      ids[i] = np.concatenate([ids[i][:limit - 1], ids[i][-1:]])
    logging.info('%s: cut %d of %d sequences to max_length=%d tokens', split, len(long),
                 len(ids), limit)
  return ids, keep


def log_softmax(logits: np.ndarray) -> np.ndarray:
  """float64 log-probabilities over the last axis (host-side evaluation)."""
  shifted = logits - logits.max(axis=-1, keepdims=True)
  return shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
