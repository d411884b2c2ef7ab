"""`--mode=plot`: PNG curves of runs from their TensorBoard events.

  python -m transformer_jax.main --mode=plot --workdir=runs/a [--compare=runs/b,...] \
      [--output=DIR]                                    # default DIR: runs/a/plots

`read_scalars` reads every scalar tag a run's training wrote to {workdir}/tensorboard
(`train/*` each `log_every_steps`, `eval/*` each evaluation: see `train.py`), with
TensorBoard's own event reader. `make_figures` draws them, one matplotlib figure per
quantity, every run a colour, its name in the legend:

  loss.png           train loss (label-smoothed, then also the train NLL) and validation
                     loss, against the step
  learning_rate.png  the learning rate the optimizer used
  throughput.png     real (non-padding) tokens / s, and examples / s when logged
  eval_NAME.png      each other validation metric (eval/NAME: BLEU, accuracy, F1, ...),
                     with the train metric of the same name when there is one

A quantity no run logged is skipped. Figures are drawn with the Agg renderer, off screen,
and no pyplot state is kept.
"""
from __future__ import annotations

import dataclasses
import glob
import os
import sys
from typing import Sequence

from absl import logging
from matplotlib.backends import backend_agg
from matplotlib import figure as mpl_figure

Scalars = dict[str, list[tuple[int, float]]]  # tag -> [(step, value)] by step.

DPI = 100  # PNG resolution: a 6.4 x 4 inch figure is 640 x 400 pixels.
TRAIN, EVAL = 'train/', 'eval/'


@dataclasses.dataclass(frozen=True)
class Series:
  """One curve of a figure: `tag`, named `name` in the legend, drawn with `style`."""
  tag: str
  name: str
  style: str = '-'


@dataclasses.dataclass(frozen=True)
class Panel:
  """One axes: its curves, y-axis label and scale ('linear' or 'log')."""
  title: str
  ylabel: str
  series: tuple[Series, ...]
  yscale: str = 'linear'


# Validation metrics (eval/NAME): (name in titles, y-axis label with the unit); others
# use NAME for both.
METRIC_LABELS = {
    'bleu': ('BLEU', 'sacreBLEU (0-100)'),
    'perplexity': ('perplexity', 'perplexity (log scale)'),
    'accuracy': ('accuracy', 'accuracy (fraction)'),  # Of tokens when `_per_token`.
    'token_accuracy': ('token accuracy', 'token accuracy (fraction)'),
    'macro_f1': ('macro-F1', 'macro-F1 (fraction)'),
    'micro_f1': ('micro-F1', 'micro-F1 (fraction)'),
    'f1': ('F1', 'F1 (fraction)'),
    'precision': ('precision', 'precision (fraction)'),
    'recall': ('recall', 'recall (fraction)'),
    'mse': ('MSE', 'mean squared error'),
    'pearson': ('Pearson r', 'Pearson r'),
    'spearman': ('Spearman rho', 'Spearman rho'),
}
LOG_SCALE_METRICS = frozenset({'perplexity'})
MARKER_MAX_POINTS = 40  # Curves with at most this many points also mark each point.


def event_files(workdir: str) -> list[str]:
  """The TensorBoard event files of `workdir` (in {workdir}/tensorboard).

  Raises:
    FileNotFoundError: `workdir` is not a folder, or holds no event files.
  """
  if not os.path.isdir(workdir):
    raise FileNotFoundError(f'{workdir}: no such folder')
  folder = os.path.join(workdir, 'tensorboard')
  files = sorted(glob.glob(os.path.join(folder, 'events.out.tfevents.*')))
  if not files:
    raise FileNotFoundError(f'{workdir}: no TensorBoard events in {folder} (train a model '
                            'there first)')
  return files


def _read_file(path: str) -> tuple[float, Scalars]:
  """(wall time of the file's first event in s, its scalars in the order written)."""
  # pylint: disable=g-import-not-at-top (TensorBoard's reader imports TensorFlow)
  from tensorboard.backend.event_processing import plugin_event_accumulator as pea
  from tensorboard.plugins.scalar import metadata as scalar_metadata
  from tensorboard.util import tensor_util
  accumulator = pea.EventAccumulator(path, size_guidance=pea.STORE_EVERYTHING_SIZE_GUIDANCE,
                                     purge_orphaned_data=False).Reload()
  try:
    start = accumulator.FirstEventTimestamp()
  except ValueError:  # An empty file (a run that died at once).
    return 0.0, {}
  scalars = {}
  if scalar_metadata.PLUGIN_NAME in accumulator.ActivePlugins():
    for tag in accumulator.PluginTagToContent(scalar_metadata.PLUGIN_NAME):
      scalars[tag] = [(int(event.step), float(tensor_util.make_ndarray(event.tensor_proto)))
                      for event in accumulator.Tensors(tag)]
  return start, scalars


def read_scalars(workdir: str) -> Scalars:
  """Every scalar tag a run wrote to {workdir}/tensorboard.

  Flax's SummaryWriter stores a scalar as a float32 tensor; TensorBoard's reader gives
  older simple-value scalars the same form, so both come back. A resumed run writes a
  new event file: the files are merged in the order they were started, and a later file
  replaces every step from its first step on, of all tags: the steps it rewrote, and
  those an interrupted run logged past the checkpoint the resumed run started from.

  Args:
    workdir: a run folder.

  Returns:
    {tag: [(step, value), ...]}: steps (int) increasing, one value (float) per step,
    the latest written.

  Raises:
    FileNotFoundError: `workdir` is not a folder, or holds no event files.
  """
  files = sorted((_read_file(path) for path in event_files(workdir)), key=lambda f: f[0])
  merged: dict[str, dict[int, float]] = {}
  for _, scalars in files:
    steps = [step for points in scalars.values() for step, _ in points]
    if not steps:
      continue
    first = min(steps)
    for points in merged.values():
      for step in [s for s in points if s >= first]:
        del points[step]
    for tag, points in scalars.items():
      merged.setdefault(tag, {}).update(points)
  return {tag: sorted(points.items()) for tag, points in sorted(merged.items()) if points}


def default_labels(workdirs: Sequence[str]) -> list[str]:
  """Each run's folder name, or the paths as given when two folder names are the same."""
  names = [os.path.basename(os.path.normpath(w)) for w in workdirs]
  return names if len(set(names)) == len(names) else [os.path.normpath(w) for w in workdirs]


def _panels(runs: dict[str, Scalars]) -> dict[str, tuple[Panel, ...]]:
  """The figures to draw, by file stem: what at least one run logged, in a fixed order."""
  tags = {tag for scalars in runs.values() for tag in scalars}
  per_token = _per_token(runs)
  loss = [Series(TRAIN + 'loss', 'train'), Series(EVAL + 'loss', 'validation', '--')]
  if any(_differs(scalars, TRAIN + 'loss', TRAIN + 'nll') for scalars in runs.values()):
    loss[0] = Series(TRAIN + 'loss', 'train (smoothed)')  # Label smoothing: KL to the target.
    loss.insert(1, Series(TRAIN + 'nll', 'train NLL', ':'))
  figures = {
      'loss': (Panel('Loss', 'loss (nats / token)' if per_token else 'loss', tuple(loss)),),
      'learning_rate': (Panel('Learning rate', 'learning rate',
                              (Series(TRAIN + 'learning_rate', ''),)),),
      'throughput': (Panel('Training throughput: real tokens', 'tokens / s',
                           (Series(TRAIN + 'tokens_per_second', ''),)),
                     Panel('Training throughput: examples', 'examples / s',
                           (Series(TRAIN + 'examples_per_second', ''),))),
  }
  metrics = sorted(tag[len(EVAL):] for tag in tags if tag.startswith(EVAL) and tag != EVAL +
                   'loss')
  for name in metrics:
    title, ylabel = METRIC_LABELS.get(name, (name, name))
    if name == 'accuracy' and per_token:
      title, ylabel = METRIC_LABELS['token_accuracy']
    series = (Series(TRAIN + name, 'train'),) if TRAIN + name in tags else ()
    series += (Series(EVAL + name, 'validation', '--' if series else '-'),)
    title = title[0].upper() + title[1:] if len(series) > 1 else f'Validation {title}'
    figures[f'eval_{name}'] = (Panel(title, ylabel, series,
                                     'log' if name in LOG_SCALE_METRICS else 'linear'),)
  return {stem: tuple(p for p in panels if any(s.tag in tags for s in p.series))
          for stem, panels in figures.items()}


def _per_token(runs: dict[str, Scalars]) -> bool:
  """Whether every run with a validation loss also logs a perplexity: its loss is then a
  cross-entropy in nats per token, its accuracy one of tokens (translation, denoising).
  Otherwise the label names no unit: a classification's are per example, a regression's
  loss is the MSE, a masked LM (no perplexity logged) is per masked token."""
  evaluated = [scalars for scalars in runs.values() if EVAL + 'loss' in scalars]
  return bool(evaluated) and all(EVAL + 'perplexity' in s for s in evaluated)


def _differs(scalars: Scalars, a: str, b: str) -> bool:
  """Whether tags `a` and `b` both exist and differ at some step (label smoothing)."""
  return a in scalars and b in scalars and scalars[a] != scalars[b]


def _draw(axes, panel: Panel, runs: dict[str, Scalars]) -> None:
  """Draws `panel` on `axes`: run i in colour Ci, each earlier run 1 point wider, so that
  a later run's curve on top of an earlier one leaves the earlier one's edges visible."""
  for index, (label, scalars) in enumerate(runs.items()):
    wider = len(runs) - 1 - index
    for series in panel.series:
      points = scalars.get(series.tag)
      if not points:
        continue
      steps, values = zip(*points)
      axes.plot(steps, values, series.style, color=f'C{index % 10}', linewidth=1.5 + wider,
                marker='o' if len(points) <= MARKER_MAX_POINTS else None,
                markersize=3 + 1.5 * wider, label=f'{label} {series.name}'.strip())
  axes.set_title(panel.title)
  axes.set_xlabel('step')
  axes.set_ylabel(panel.ylabel)
  axes.set_yscale(panel.yscale)
  axes.grid(True, alpha=0.3)
  axes.legend(fontsize='small')


def make_figures(runs: dict[str, Scalars]) -> dict[str, mpl_figure.Figure]:
  """One figure per quantity that some run logged.

  Args:
    runs: {label: read_scalars(workdir)}, in legend order.

  Returns:
    {file stem ('loss', 'learning_rate', 'throughput', 'eval_bleu', ...): figure}, each
    with an Agg canvas (`figure.savefig` writes PNG) and one axes per panel (throughput:
    tokens / s, then examples / s when logged).
  """
  figures = {}
  for stem, panels in _panels(runs).items():
    if not panels:
      logging.info('plot: no run logged %s; skipped', stem)
      continue
    fig = mpl_figure.Figure(figsize=(6.4 * len(panels), 4), dpi=DPI, layout='constrained')
    backend_agg.FigureCanvasAgg(fig)
    for axes, panel in zip(fig.subplots(1, len(panels), squeeze=False)[0], panels):
      _draw(axes, panel, runs)
    figures[stem] = fig
  return figures


def plot_runs(workdirs: Sequence[str], output_dir: str,
              labels: Sequence[str] | None = None) -> list[str]:
  """Writes the PNG curves of runs (`make_figures`) into `output_dir` (created).

  Args:
    workdirs: run folders, drawn on the same figures.
    output_dir: where the PNG files go; existing ones of the same name are replaced.
    labels: the runs' names in the legends (default: `default_labels`).

  Returns:
    The paths written: {output_dir}/{stem}.png.

  Raises:
    FileNotFoundError: a workdir is not a folder or holds no event files.
    ValueError: `labels` and `workdirs` differ in length, or two labels are the same.
  """
  labels = list(labels) if labels is not None else default_labels(workdirs)
  if len(labels) != len(workdirs) or len(set(labels)) != len(labels):
    raise ValueError(f'plot_runs: labels={labels}: need {len(workdirs)} different names, '
                     'one per workdir')
  runs = {label: read_scalars(workdir) for label, workdir in zip(labels, workdirs)}
  os.makedirs(output_dir, exist_ok=True)
  paths = []
  for stem, fig in make_figures(runs).items():
    path = os.path.join(output_dir, f'{stem}.png')
    fig.savefig(path, dpi=DPI)
    paths.append(path)
  return paths


def run_plot(workdirs: Sequence[str], output_dir: str) -> list[str]:
  """`--mode=plot`: checks that every workdir has TensorBoard events before writing
  anything, writes the PNGs (`plot_runs`) and prints their paths, one per line.

  Raises:
    FileNotFoundError: a workdir is not a folder or holds no event files (the message
      names it).
  """
  for workdir in workdirs:
    event_files(workdir)
  paths = plot_runs(workdirs, output_dir)
  if not paths:
    print(f'plot: no scalar curves in {", ".join(workdirs)}; nothing written',
          file=sys.stderr)
  for path in paths:
    print(path)
  return paths
