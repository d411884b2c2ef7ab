r"""Runs the colab/ notebooks top to bottom with tiny settings, as CI does, and writes
executed copies as markdown for docs/notebooks/; strips a notebook's outputs for git.

  python colab/run_notebooks.py [--data_dir=DIR] [--workdir=DIR] [--markdown=docs/notebooks] \
      [NOTEBOOK ...]                                  # default: the three of colab/
  python colab/run_notebooks.py --strip [NOTEBOOK ...]

Each notebook gets a cell of tiny parameters (`ci_parameters`) right after its cell tagged
`parameters`, tagged `injected-parameters`: papermill's convention, done with nbformat. It
then runs in an ipykernel of this interpreter (`sys.executable`, whatever kernel specs
Jupyter has installed), with the checkout on PYTHONPATH (so `INSTALL_FROM = None` finds
the toolkit without installing it) and its working directory in the workdir. A cell that
raises stops the run with nbclient's `CellExecutionError`, naming the cell and the error.
tests/test_notebooks.py runs them the same way.

`--markdown=DIR` writes each executed notebook as DIR/NAME.md, its images in
DIR/NAME_files/ (nbconvert's markdown exporter, outputs kept).

`--strip` rewrites the notebooks in place as they are committed (`strip`): no outputs, no
execution counts, no cell metadata but the tags (Jupyter's and Colab's timing and ids).
"""
from __future__ import annotations

import argparse
import copy
import os
import sys
import tempfile
import time

from jupyter_client.kernelspec import KernelSpecManager
from jupyter_client.manager import AsyncKernelManager
import nbclient
import nbformat

COLAB_DIR = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(COLAB_DIR)
NOTEBOOKS = ('01_translation.ipynb', '02_lora_finetune.ipynb', '03_custom_loss.ipynb')
DATA_DIR_ENV = 'TRANSFORMER_JAX_DATA_DIR'  # As configs/mt.py reads it.
CELL_TIMEOUT_S = 170  # One cell; CI wants each notebook under 3 minutes.

# Tiny runs: the smoke-test model of configs/mt.py for 40 steps, validation on 64
# sentences, greedy decoding, the test score on 50 sentences.
_TINY = {
    'INSTALL_FROM': None,
    'ACCELERATOR': 'cpu',
    'CONFIG': 'mt.py:tiny',
    'OVERRIDES': {'eval_split': 'validation[:64]', 'decoding': 'greedy', 'bleu_every_steps': 0},
}
_TINY_TEST_SPLIT = 'test_2016[:50]'


def default_data_dir() -> str:
  """$TRANSFORMER_JAX_DATA_DIR, else ../shared/data/multi30k beside the checkout (as
  tests/conftest.py finds it)."""
  return os.environ.get(DATA_DIR_ENV) or os.path.normpath(
      os.path.join(REPO, '..', 'shared', 'data', 'multi30k'))


def ci_parameters(notebook: str, data_dir: str, workdir: str) -> dict:
  """The tiny parameters CI runs `notebook` (a file name of colab/) with.

  Raises:
    ValueError: `notebook` is not one of `NOTEBOOKS`.
  """
  common = {**_TINY, 'DATA_DIR': data_dir}
  if notebook == '01_translation.ipynb':
    # Validation BLEU (the best-checkpoint metric) once, at the end.
    overrides = {**common['OVERRIDES'], 'bleu_every_steps': 40}
    return {**common, 'OVERRIDES': overrides, 'NUM_TRAIN_STEPS': 40,
            'TEST_SPLIT': _TINY_TEST_SPLIT,
            'WORKDIR': os.path.join(workdir, 'de_en')}
  if notebook == '02_lora_finetune.ipynb':
    return {**common, 'BASE_STEPS': 40, 'LORA_STEPS': 20, 'LORA_RANK': 4, 'LORA_ALPHA': 8.0,
            'TEST_SPLIT': _TINY_TEST_SPLIT, 'WORKDIR': os.path.join(workdir, 'lora')}
  if notebook == '03_custom_loss.ipynb':
    return {**common, 'NUM_TRAIN_STEPS': 40, 'WORKDIR': os.path.join(workdir, 'losses')}
  raise ValueError(f'{notebook}: not one of {", ".join(NOTEBOOKS)}')


def inject_parameters(nb: nbformat.NotebookNode, parameters: dict) -> nbformat.NotebookNode:
  """A copy of `nb` with a cell `NAME = repr(value)` per parameter right after its cell
  tagged 'parameters', tagged 'injected-parameters' (papermill's convention).

  Raises:
    ValueError: no cell is tagged 'parameters'.
  """
  nb = copy.deepcopy(nb)
  for index, cell in enumerate(nb.cells):
    if 'parameters' in cell.get('metadata', {}).get('tags', []):
      break
  else:
    raise ValueError('the notebook has no cell tagged "parameters"')
  lines = ['# Parameters injected by colab/run_notebooks.py (tiny CI settings).']
  lines += [f'{name} = {value!r}' for name, value in parameters.items()]
  cell = nbformat.v4.new_code_cell('\n'.join(lines), metadata={'tags': ['injected-parameters']})
  cell.id = 'injected-parameters'
  nb.cells.insert(index + 1, cell)
  return nb


def strip(nb: nbformat.NotebookNode) -> nbformat.NotebookNode:
  """A copy of `nb` as committed: code cells without outputs or execution counts, and every
  cell's metadata reduced to its 'tags' (the papermill parameters tag)."""
  nb = copy.deepcopy(nb)
  for cell in nb.cells:
    if cell.cell_type == 'code':
      cell.outputs, cell.execution_count = [], None
    tags = cell.metadata.get('tags')
    cell.metadata = nbformat.NotebookNode({'tags': tags} if tags else {})
  return nb


def kernel_manager() -> AsyncKernelManager:
  """A manager of ipykernel running this interpreter (`sys.executable`): with no kernel
  spec folders to search, jupyter_client falls back to ipykernel's own spec, which runs
  sys.executable. An installed 'python3' spec could name another Python."""
  return AsyncKernelManager(kernel_name='python3',
                            kernel_spec_manager=KernelSpecManager(kernel_dirs=[]))


def execute(nb: nbformat.NotebookNode, cwd: str, timeout_s: int = CELL_TIMEOUT_S,
            compilation_cache_dir: str | None = None) -> nbformat.NotebookNode:
  """Runs every cell of `nb` in place (outputs kept) in a fresh kernel whose working
  directory is `cwd`, with the checkout first on PYTHONPATH; the kernel is shut down
  afterwards.

  `compilation_cache_dir`: JAX's persistent compilation cache for the kernel: notebooks
  run one after another with the same tiny model then compile its train step and
  decoders once (about half of a notebook's time on 2 CPU cores). None: no cache.

  Raises:
    nbclient.exceptions.CellExecutionError: a cell raised (the message names it).
    nbclient.exceptions.CellTimeoutError: a cell ran longer than `timeout_s` seconds.
  """
  env = dict(os.environ)
  env['PYTHONPATH'] = os.pathsep.join(p for p in (REPO, env.get('PYTHONPATH')) if p)
  if compilation_cache_dir:
    env['JAX_COMPILATION_CACHE_DIR'] = compilation_cache_dir
  client = nbclient.NotebookClient(nb, km=kernel_manager(), timeout=timeout_s,
                                   resources={'metadata': {'path': cwd}})
  client.execute(cleanup_kc=True, env=env)
  return nb


def run(notebook: str, data_dir: str, workdir: str, timeout_s: int = CELL_TIMEOUT_S,
        compilation_cache_dir: str | None = None) -> tuple[nbformat.NotebookNode, dict, float]:
  """Runs colab/`notebook` with `ci_parameters` in `workdir` (created); see `execute`.

  Returns:
    (the executed notebook, the parameters injected, seconds it took).
  """
  os.makedirs(workdir, exist_ok=True)
  parameters = ci_parameters(notebook, data_dir, workdir)
  nb = inject_parameters(nbformat.read(os.path.join(COLAB_DIR, notebook), as_version=4),
                         parameters)
  start = time.perf_counter()
  execute(nb, workdir, timeout_s, compilation_cache_dir)
  return nb, parameters, time.perf_counter() - start


def write_markdown(nb: nbformat.NotebookNode, name: str, output_dir: str) -> str:
  """Writes `nb` as output_dir/name.md with its images in output_dir/name_files/ and
  returns the markdown's path. Consecutive stream outputs are merged and a progress bar's
  carriage-return updates reduced to the last one, as a terminal shows them."""
  # pylint: disable=g-import-not-at-top (nbconvert is only needed here)
  from nbconvert import MarkdownExporter
  from nbconvert.preprocessors import CoalesceStreamsPreprocessor
  from nbconvert.writers import FilesWriter
  exporter = MarkdownExporter()
  exporter.register_preprocessor(CoalesceStreamsPreprocessor(enabled=True), enabled=True)
  body, resources = exporter.from_notebook_node(
      nb, resources={'output_files_dir': f'{name}_files', 'unique_key': name})
  return FilesWriter(build_directory=output_dir).write(body, resources, notebook_name=name)


def main(argv: list[str] | None = None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('notebooks', nargs='*', default=list(NOTEBOOKS),
                      help='file names in colab/ (default: all three)')
  parser.add_argument('--data_dir', default=default_data_dir(),
                      help='the raw Multi30k files (default: $%(env)s or '
                      '../shared/data/multi30k)' % {'env': DATA_DIR_ENV})
  parser.add_argument('--workdir', default=None,
                      help='where the runs go (default: a new temporary folder)')
  parser.add_argument('--markdown', default=None,
                      help='write the executed notebooks as markdown into this folder')
  parser.add_argument('--strip', action='store_true',
                      help='only strip the notebooks\' outputs, in place (nothing runs)')
  args = parser.parse_args(argv)
  if args.strip:
    for notebook in args.notebooks:
      path = os.path.join(COLAB_DIR, os.path.basename(notebook))
      nbformat.write(strip(nbformat.read(path, as_version=4)), path)
      print(f'stripped {path}')
    return
  if not os.path.isdir(args.data_dir):
    sys.exit(f'error: --data_dir={args.data_dir}: no such folder')
  workdir = args.workdir or tempfile.mkdtemp(prefix='colab_notebooks_')
  for notebook in args.notebooks:
    name = os.path.splitext(os.path.basename(notebook))[0]
    try:
      nb, _, seconds = run(os.path.basename(notebook), args.data_dir,
                           os.path.join(workdir, name),
                           compilation_cache_dir=os.path.join(workdir, 'jax_cache'))
    except (ValueError, nbclient.exceptions.CellExecutionError) as e:
      sys.exit(f'error: {notebook}: {e}')
    print(f'{notebook}: ran in {seconds:.0f} s (runs in {os.path.join(workdir, name)})')
    if args.markdown:
      print(f'  wrote {write_markdown(nb, name, args.markdown)}')


if __name__ == '__main__':
  main()
