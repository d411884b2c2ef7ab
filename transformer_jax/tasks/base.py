"""The interface between a task and the trainer (`transformer_jax.train`).

The trainer owns the loop: train state, jit and sharding, the dropout rng, logging
(progress bar, TensorBoard, throughput and MFU), the evaluation cadence, the best
checkpoint by the task's metric, patience, Ctrl-C and exact resume. A task supplies
everything that depends on what is being learned, through the methods below; none of
them is called inside the loop except `loss` (traced once into the jitted train step),
`batch_stats`, `evaluate`, and the batches of `train_batches`.
"""
from __future__ import annotations

from typing import Any, Iterator

import jax
import numpy as np

from transformer_jax import init_from
from transformer_jax import sharding


class Task:
  """Base class of tasks. Subclasses set the class attributes and implement the methods.

  Class attributes:
    FIELDS: config fields beyond `config_schema.SCHEMA`: {name: (type, (predicate,
      requirement))}, checked by `config_schema.validate`.
    best_metric: the key of `evaluate`'s scalars that picks the best checkpoint (kept in
      {workdir}/best); '' keeps none.
    best_mode: 'max' or 'min': the direction in which `best_metric` improves.
    token_unit: what `batch_stats`'s 'tokens' count, for the logs ('target tok', 'tok').

  Args:
    config: the validated run config (ml_collections.ConfigDict).
    workdir: the run's folder (tokenizer, checkpoints, outputs).
    mesh: the device mesh (`sharding.make_mesh`); batches are split along its 'data' and
      'fsdp' axes (`sharding.batch_shards`), parameters as `config.logical_axis_rules`
      say. Jit the task's functions with `sharding.jit(fn, self.mesh, self.rules)`.
  """
  FIELDS: dict = {}
  best_metric: str = ''
  best_mode: str = 'max'
  token_unit: str = 'tok'

  def __init__(self, config, workdir: str, mesh):
    self.config, self.workdir, self.mesh = config, workdir, mesh
    self.rules = sharding.config_rules(config)
    self.model = None
    self.peft = None  # A PEFT run's `peft.Adapter`, set before `setup`.

  def wrap_model(self, model):
    """The model `setup` keeps in `self.model`: `model` itself, or in a PEFT run the
    `peft.PeftModel` that applies the adapter when given `peft.Params`."""
    return model if self.peft is None else self.peft.wrap(model)

  # --- Setup -------------------------------------------------------------------------
  def setup(self, training: bool) -> None:
    """Loads what the task needs and builds `self.model` (a flax.linen Module).

    Build the model with `self.wrap_model(...)` (PEFT runs).

    training=True: reads the training and evaluation data, trains or reuses the
    tokenizer in the workdir, and records the model's shape there. training=False
    (eval/predict modes): loads the tokenizer and the model's shape from the workdir.

    Raises:
      multi30k.DataError: bad input data, naming the file and line.
      config_schema.ConfigError: a config field at fault.
      FileNotFoundError: (training=False) the workdir lacks what training wrote.
    """
    raise NotImplementedError

  def init_params(self, rng: jax.Array) -> Any:
    """Freshly initialized parameters of `self.model`: a pytree. Inside
    `models.axis_names()` its leaves may carry logical axis names (`nn.LogicallyPartitioned`
    boxes), by which the trainer shards them; leaves without names are replicated."""
    raise NotImplementedError

  def load_pretrained(self, params: Any) -> Any:
    """`init_params`'s parameters with pretrained values put in (a fresh run only, not a
    resumed one; outside jit; the trainer device_puts the result).

    The default loads `config.init_from` (another run's workdir or checkpoint folder)
    through `config.init_rules` and logs what was loaded (`transformer_jax.init_from`);
    with init_from='' it changes nothing.

    Raises:
      init_from.InitError: (a config_schema.ConfigError) a source that cannot be used,
        a bad rule, or with `config.init_strict` parameters that were not all loaded;
        'hf:' sources, which only the encoder tasks can import.
    """
    if self.config.init_from.startswith(init_from.HF_PREFIX):
      raise init_from.InitError(
          f'config.init_from={self.config.init_from!r}: task {self.config.task!r} cannot '
          'import a Hugging Face BERT (the encoder tasks classification and tagging can)')
    return init_from.initialize(self.config, params)

  def describe(self) -> str:
    """One line for the log: the model and its data (e.g. vocabulary, labels)."""
    return type(self).__name__

  # --- Training ----------------------------------------------------------------------
  def train_batches(self, seed: int, skip: int) -> Iterator[dict[str, np.ndarray]]:
    """Endless host batches {name: array [B, ...]}, B divisible by `sharding.batch_shards`,
    deterministic for `seed`, starting after the first `skip` batches (exact resume)."""
    raise NotImplementedError

  def loss(self, params, batch: dict, dropout_rng: jax.Array) -> tuple[jax.Array, dict]:
    """The training objective on one batch with dropout on: (scalar loss, metrics dict
    of scalars). Pure and traceable: it runs inside the jitted train step."""
    raise NotImplementedError

  def batch_stats(self, batch: dict[str, np.ndarray]) -> dict[str, float]:
    """Counts for the throughput log: {'examples', 'tokens' (real ones, `token_unit`),
    'positions' (computed ones, padding included), 'flops' (model FLOPs of the train
    step, `transformer_jax.flops`)}."""
    raise NotImplementedError

  # --- Evaluation and prediction -----------------------------------------------------
  @property
  def metric_every_steps(self) -> int:
    """Steps between evaluations that report `best_metric` (patience counts these);
    0 when it is never computed."""
    return self.config.eval_every_steps

  def evaluate(self, params, step: int, last: bool) -> tuple[dict[str, float], str | None]:
    """Periodic evaluation on the eval split during training: scalars for TensorBoard
    and the eval line (with `best_metric` when computed at this step), and an optional
    multi-line report printed after the eval line."""
    raise NotImplementedError

  def format_eval(self, scalars: dict[str, float]) -> str:
    """The eval-line part for `evaluate`'s scalars, e.g. 'eval loss 1.2 acc 0.91'."""
    return ' '.join(f'{k} {v:.4f}' for k, v in scalars.items())

  def test(self, params, split: str, name: str) -> tuple[dict[str, float], str]:
    """Scores `params` on the whole `split` (end of training, --mode=eval): scalars and a
    report. `name` tags the outputs written to the workdir (e.g. 'test-best-step900').

    Raises:
      multi30k.DataError, config_schema.ConfigError: a bad or unknown split.
    """
    raise NotImplementedError

  def predict(self, params, lines: list[str]) -> list[str]:
    """One output line per input line, in order (--mode=predict)."""
    raise NotImplementedError
