"""Where the trainer's scalars and final results go: TensorBoard ({workdir}/tensorboard), and
a Weights & Biases run too when `config.wandb_project` is set.

The W&B run gets the config (`config.to_dict()`), the name `config.wandb_run_name` (else the
workdir's name) and keeps its files in {workdir}/wandb. Its id is kept in
{workdir}/wandb_run_id.txt, so a resumed training continues the same W&B run
(`resume='allow'`): online it appends to it; offline (`WANDB_MODE=offline`, no network)
each start writes a folder {workdir}/wandb/offline-run-*-ID with that id, for `wandb sync`
to upload. The run's mode, login and server are W&B's own settings (`wandb login`,
`WANDB_MODE`, `WANDB_API_KEY`, ...). `wandb` is imported only when a project is set.

Steps are the trainer's: train and eval scalars of step s go to W&B step s. W&B drops
scalars of a step below one it already has (with a warning): a run resumed from a
checkpoint older than its last log (a crash between a log and the next checkpoint) loses
those steps there, while TensorBoard keeps both.

Only process 0 of a multi-process run writes (`multihost.is_primary`); the others get a
writer that writes nothing.
"""
from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable

from flax.metrics import tensorboard

from transformer_jax import config_schema
from transformer_jax import multihost

RUN_ID_FILE = 'wandb_run_id.txt'  # In the workdir: the W&B run id a resumed run continues.
REPORT_FILE = 'final_report.txt'  # The final report's name among the W&B run's files.


class NullWriter:
  """The writer of a process other than process 0: writes nothing."""

  def scalar(self, tag: str, value: Any, step: int) -> None:
    pass

  def flush(self) -> None:
    pass

  def report(self, summary: dict[str, Any], text: str = '', files: Iterable[str] = ()) -> None:
    pass

  def close(self, exit_code: int = 0) -> None:
    pass

  def __enter__(self):
    return self

  def __exit__(self, exc_type, exc, traceback) -> None:
    self.close(_exit_code(exc_type))


class Writer(NullWriter):
  """Writes scalars to a TensorBoard writer and, if given, a W&B run (`wandb.Run`).

  A context manager: leaving it closes both, the W&B run with exit code 0, or 130
  (KeyboardInterrupt) or 1 (any other exception) when an exception leaves it, which marks
  the run failed.
  """

  def __init__(self, workdir: str, summary_writer: tensorboard.SummaryWriter, run=None):
    self.workdir = workdir
    self.tensorboard = summary_writer
    self.run = run

  def scalar(self, tag: str, value: Any, step: int) -> None:
    """Logs a scalar (a number or 0-d array) under `tag` at train step `step` (TensorBoard
    stores it as float32, W&B as float64)."""
    value = float(value)
    self.tensorboard.scalar(tag, value, step)
    if self.run is not None:
      self.run.log({tag: value}, step=int(step))

  def flush(self) -> None:
    self.tensorboard.flush()

  def report(self, summary: dict[str, Any], text: str = '', files: Iterable[str] = ()) -> None:
    """The run's final results, for W&B (TensorBoard keeps only per-step scalars):
    `summary` (name -> number) into the run's summary, `text` (the report the trainer
    prints at the end; '' = none) as its file REPORT_FILE, and `files` (paths in the
    workdir, e.g. best/score.json) as its files under their paths relative to the workdir.
    Files that do not exist are skipped."""
    if self.run is None:
      return
    self.run.summary.update(summary)
    copies = []  # Copied into the run's folder: W&B keeps them as they are now.
    if text:
      copies.append(os.path.join(self.run.dir, REPORT_FILE))
      with open(copies[-1], 'w', encoding='utf-8') as f:
        f.write(text + '\n')
    for path in files:
      if os.path.exists(path):
        copies.append(os.path.join(self.run.dir, os.path.relpath(path, self.workdir)))
        os.makedirs(os.path.dirname(copies[-1]), exist_ok=True)
        shutil.copyfile(path, copies[-1])
    for path in copies:
      self.run.save(path, base_path=self.run.dir, policy='now', glob=False)

  def close(self, exit_code: int = 0) -> None:
    """Closes TensorBoard's writer and finishes the W&B run with `exit_code` (non-zero:
    failed); closing again does nothing."""
    self.tensorboard.close()
    if self.run is not None:
      run, self.run = self.run, None
      run.finish(exit_code=exit_code)


def create_writer(config, workdir: str) -> NullWriter:
  """The trainer's writer for `config` in `workdir`: on process 0 a `Writer` to
  {workdir}/tensorboard and, when `config.wandb_project` is set, to a W&B run (started
  here, continuing the run of {workdir}/RUN_ID_FILE if there is one); elsewhere a
  `NullWriter`. Use it as a context manager (or call `close`).

  Raises:
    config_schema.ConfigError: wandb_project set, but the wandb package is not installed
      or W&B refused to start the run (e.g. not logged in).
  """
  if not multihost.is_primary():
    return NullWriter()
  run = _start_wandb(config, workdir) if config.get('wandb_project') else None
  return Writer(workdir, tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard')), run)


def check(config) -> None:
  """Fails early, before a run writes anything, when `config.wandb_project` is set and the
  wandb package is missing.

  Raises:
    config_schema.ConfigError: the package is not installed.
  """
  if config.get('wandb_project') and multihost.is_primary():
    _import_wandb(config)


def _import_wandb(config):
  """The wandb module (imported only by runs that track).

  Raises:
    config_schema.ConfigError: wandb is not installed.
  """
  try:
    import wandb  # pylint: disable=g-import-not-at-top
  except ImportError:
    raise config_schema.ConfigError(
        f'config.wandb_project={config.wandb_project!r}: the wandb package is not installed; '
        "pip install 'transformer_jax[wandb]', or set config.wandb_project=''") from None
  return wandb


def _start_wandb(config, workdir: str):
  """Starts (or resumes) the W&B run of `workdir` and records its id there.

  Raises:
    config_schema.ConfigError: wandb is not installed, or W&B refused to start the run
      (`wandb.errors.Error`: no API key without a terminal to ask for one, ...).
  """
  wandb = _import_wandb(config)
  try:
    run = wandb.init(
        project=config.wandb_project, entity=config.get('wandb_entity') or None,
        name=config.get('wandb_run_name') or os.path.basename(os.path.abspath(workdir)),
        dir=workdir, config=json.loads(json.dumps(config.to_dict(), default=repr)),
        id=read_run_id(workdir), resume='allow',
        reinit='create_new')  # The trainer's own run, even beside a run the caller started.
  except wandb.errors.Error as e:  # No login, a server that refuses, ...
    message = ' '.join(str(e).split())
    raise config_schema.ConfigError(
        f'config.wandb_project={config.wandb_project!r}: W&B could not start the run: '
        f'{message} (WANDB_MODE=offline logs without a network)') from e
  _write_run_id(workdir, run.id)
  return run


def read_run_id(workdir: str) -> str | None:
  """The W&B run id recorded in `workdir` (None if it has none)."""
  path = os.path.join(workdir, RUN_ID_FILE)
  if not os.path.exists(path):
    return None
  with open(path, encoding='utf-8') as f:
    return f.read().strip() or None


def _write_run_id(workdir: str, run_id: str) -> None:
  path = os.path.join(workdir, RUN_ID_FILE)
  with open(path + '.tmp', 'w', encoding='utf-8') as f:
    f.write(run_id + '\n')
  os.replace(path + '.tmp', path)


def _exit_code(exc_type) -> int:
  """The exit code a run left by exception `exc_type` (None: none) finishes with."""
  if exc_type is None:
    return 0
  return 130 if issubclass(exc_type, KeyboardInterrupt) else 1
