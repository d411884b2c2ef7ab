"""`--mode=plot`: scalars read back from TensorBoard events (a resumed run's files merged),
the PNG curves and their labels, the command line."""
import os
import subprocess
import sys

from flax.metrics import tensorboard
import numpy as np
from PIL import Image
import pytest

from tests.conftest import REPO
from transformer_jax import plots

# Run A: one event file. Values are exact in float32, as the events store them.
TRAIN_STEPS = (10, 20, 30, 40, 50)
EVAL_STEPS = (20, 40)
RUN_A = {
    'train/loss': [(s, 4.0 - s / 32) for s in TRAIN_STEPS],
    'train/nll': [(s, 4.5 - s / 32) for s in TRAIN_STEPS],  # Label smoothing: differs.
    'train/accuracy': [(s, s / 64) for s in TRAIN_STEPS],
    'train/learning_rate': [(s, s / 1024) for s in TRAIN_STEPS],
    'train/tokens_per_second': [(s, 1000.0 + s) for s in TRAIN_STEPS],
    'train/examples_per_second': [(s, 50.0 + s) for s in TRAIN_STEPS],
    'eval/loss': [(s, 4.25 - s / 32) for s in EVAL_STEPS],
    'eval/accuracy': [(s, s / 128) for s in EVAL_STEPS],
    'eval/perplexity': [(s, 64.0 - s) for s in EVAL_STEPS],
    'eval/bleu': [(40, 12.5)],
}
# Run B, interrupted and resumed: the first file logs steps 10..50, the second (resumed
# from the checkpoint of step 20) rewrites 30 and 40 and stops there; step 50 of the
# first file is orphaned.
B_FIRST = {'train/loss': [(s, 3.0) for s in TRAIN_STEPS], 'eval/bleu': [(20, 5.0), (40, 6.0)]}
B_SECOND = {'train/loss': [(30, 2.5), (40, 2.25)], 'eval/bleu': [(40, 7.5)]}
B_MERGED = {'train/loss': [(10, 3.0), (20, 3.0), (30, 2.5), (40, 2.25)],
            'eval/bleu': [(20, 5.0), (40, 7.5)]}


def write_events(workdir, scalars: dict) -> None:
  """One event file in {workdir}/tensorboard, written as train.py writes it."""
  writer = tensorboard.SummaryWriter(os.path.join(workdir, 'tensorboard'))
  for step in sorted({s for points in scalars.values() for s, _ in points}):
    for tag, points in scalars.items():
      for s, value in points:
        if s == step:
          writer.scalar(tag, value, step)
  writer.close()


@pytest.fixture(scope='module')
def runs(tmp_path_factory):
  """(workdir of run A, workdir of the resumed run B)."""
  root = tmp_path_factory.mktemp('runs')
  run_a, run_b = root / 'run_a', root / 'run_b'
  write_events(run_a, RUN_A)
  write_events(run_b, B_FIRST)
  write_events(run_b, B_SECOND)
  return str(run_a), str(run_b)


def test_read_scalars_returns_what_was_written(runs):
  run_a, run_b = runs
  assert len(plots.event_files(run_b)) == 2
  assert plots.read_scalars(run_a) == RUN_A
  assert plots.read_scalars(run_b) == B_MERGED


def test_figures_have_labeled_axes_and_the_runs_curves(runs):
  figures = plots.make_figures({'A': plots.read_scalars(runs[0]),
                                'B': plots.read_scalars(runs[1])})
  assert list(figures) == ['loss', 'learning_rate', 'throughput', 'eval_accuracy',
                           'eval_bleu', 'eval_perplexity']
  labels = {stem: [(a.get_xlabel(), a.get_ylabel(), a.get_yscale()) for a in fig.axes]
            for stem, fig in figures.items()}
  assert labels == {
      'loss': [('step', 'loss (nats / token)', 'linear')],
      'learning_rate': [('step', 'learning rate', 'linear')],
      'throughput': [('step', 'tokens / s', 'linear'), ('step', 'examples / s', 'linear')],
      'eval_accuracy': [('step', 'token accuracy (fraction)', 'linear')],
      'eval_bleu': [('step', 'sacreBLEU (0-100)', 'linear')],
      'eval_perplexity': [('step', 'perplexity (log scale)', 'log')],
  }
  loss = figures['loss'].axes[0]
  assert [t.get_text() for t in loss.get_legend().get_texts()] == [
      'A train (smoothed)', 'A train NLL', 'A validation', 'B train (smoothed)']
  curves = [line.get_xydata().tolist() for line in loss.get_lines()]
  assert curves == [[list(p) for p in points] for points in (
      RUN_A['train/loss'], RUN_A['train/nll'], RUN_A['eval/loss'], B_MERGED['train/loss'])]
  # The earlier run is drawn wider: where B's curve covers A's, A's edges still show.
  assert [line.get_linewidth() for line in loss.get_lines()] == [2.5, 2.5, 2.5, 1.5]
  assert [line.get_color() for line in loss.get_lines()] == ['C0', 'C0', 'C0', 'C1']
  assert figures['eval_bleu'].axes[0].get_title() == 'Validation BLEU'
  assert [t.get_text() for t in figures['eval_bleu'].axes[0].get_legend().get_texts()] == [
      'A validation', 'B validation']
  # Train and validation; a perplexity is logged, so the accuracy is of tokens.
  assert figures['eval_accuracy'].axes[0].get_title() == 'Token accuracy'


def test_a_quantity_no_run_logged_is_skipped():
  figures = plots.make_figures({'A': {'train/loss': [(1, 2.0)], 'eval/loss': [(1, 3.0)],
                                      'eval/accuracy': [(1, 0.5)], 'eval/f1': [(1, 0.25)]}})
  assert list(figures) == ['loss', 'eval_accuracy', 'eval_f1']
  # No perplexity (a classification or tagging run): nothing is said to be per token.
  assert figures['loss'].axes[0].get_ylabel() == 'loss'
  assert figures['eval_accuracy'].axes[0].get_ylabel() == 'accuracy (fraction)'
  assert figures['eval_f1'].axes[0].get_ylabel() == 'F1 (fraction)'


def test_default_labels_are_folder_names_unless_they_clash():
  assert plots.default_labels(['runs/a/', 'x/b']) == ['a', 'b']
  assert plots.default_labels(['x/a', 'y/a']) == ['x/a', 'y/a']


RUN_COLORS = [(0x1f, 0x77, 0xb4), (0xff, 0x7f, 0x0e)]  # matplotlib's C0 and C1, RGB.


def assert_png(path: str, size: tuple[int, int], num_runs: int) -> None:
  """A valid PNG of `size` pixels, with curves in the colours of the first `num_runs` runs
  (and not of the next)."""
  assert os.path.getsize(path) > 10_000
  with Image.open(path) as image:
    assert image.format == 'PNG' and image.size == size
    pixels = {tuple(p) for p in np.asarray(image.convert('RGB')).reshape(-1, 3).tolist()}
  assert [color in pixels for color in RUN_COLORS] == [i < num_runs for i in range(2)], path


def test_command_line_writes_the_pngs(runs, tmp_path):
  env = {k: v for k, v in os.environ.items() if k != 'TF_CPP_MIN_LOG_LEVEL'}
  out = tmp_path / 'plots'
  proc = subprocess.run([sys.executable, '-m', 'transformer_jax.main', '--mode=plot',
                         f'--workdir={runs[0]}', f'--compare={runs[1]}',
                         f'--output={out}'], cwd=REPO, capture_output=True, text=True,
                        timeout=300, env=env)
  assert proc.returncode == 0, proc.stderr
  assert proc.stderr.splitlines() == [f'workdir: {runs[0]}']  # No library chatter.
  runs_drawn = {'loss': 2, 'learning_rate': 1, 'throughput': 1, 'eval_accuracy': 1,
                'eval_bleu': 2, 'eval_perplexity': 1}  # Run B logs train/loss and eval/bleu.
  assert proc.stdout.splitlines() == [str(out / f'{stem}.png') for stem in runs_drawn]
  for stem, num_runs in runs_drawn.items():
    assert_png(str(out / f'{stem}.png'), (1280, 400) if stem == 'throughput' else (640, 400),
               num_runs)


def test_a_workdir_without_events_is_named_before_anything_is_written(runs, tmp_path):
  # main.py prints the FileNotFoundError as its one line `error: ...`.
  empty = tmp_path / 'empty'
  empty.mkdir()
  for workdir, message in (
      (empty, f'{empty}: no TensorBoard events in {empty}/tensorboard (train a model there '
              'first)'),
      (tmp_path / 'missing', f'{tmp_path / "missing"}: no such folder')):
    with pytest.raises(FileNotFoundError) as error:
      plots.run_plot([runs[0], str(workdir)], str(tmp_path / 'out'))
    assert str(error.value) == message
  assert not (tmp_path / 'out').exists()
