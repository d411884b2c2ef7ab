"""The colab/ notebooks: committed without outputs, and run top to bottom on the CPU with
tiny settings (colab/run_notebooks.py: a cell of parameters injected after the one tagged
`parameters`, as papermill does; an ipykernel of this interpreter), each in under 3 minutes,
giving the results they print. A cell that raises fails the test (nbclient's
CellExecutionError names the cell)."""
import base64
import gzip
import importlib.util
import json
import os
import re
import sys

import nbclient
import nbformat
import pytest
import sacrebleu

from configs import mt

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_SPEC = importlib.util.spec_from_file_location(
    'run_notebooks', os.path.join(REPO, 'colab', 'run_notebooks.py'))
run_notebooks = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(run_notebooks)

MAX_SECONDS = 180  # Each notebook, with the tiny settings on this 2-core CPU.
PNG_MAGIC = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def compilation_cache(tmp_path_factory) -> str:
  """JAX's persistent compilation cache, shared by the notebooks of this module: their tiny
  models compile once (`run_notebooks.execute`)."""
  return str(tmp_path_factory.mktemp('jax_cache'))


def _run(name: str, data_dir: str, tmp_path,
         compilation_cache: str) -> tuple[nbformat.NotebookNode, dict]:
  nb, parameters, seconds = run_notebooks.run(name, data_dir, str(tmp_path),
                                              compilation_cache_dir=compilation_cache)
  print(f'{name}: {seconds:.1f} s')
  assert seconds < MAX_SECONDS, f'{name} took {seconds:.0f} s'
  return nb, parameters


def _code_cells(nb) -> list:
  return [cell for cell in nb.cells if cell.cell_type == 'code']


def _text(cell) -> str:
  """Everything a cell printed (stdout and stderr), in order."""
  return ''.join(o.get('text', '') for o in cell.outputs if o.output_type == 'stream')


def _cell(nb, first_line_start: str):
  """The code cell whose source starts with `first_line_start`."""
  cells = [c for c in _code_cells(nb) if c.source.startswith(first_line_start)]
  assert len(cells) == 1, first_line_start
  return cells[0]


def _pngs(cell) -> list[bytes]:
  return [base64.b64decode(o.data['image/png']) for o in cell.outputs
          if o.output_type == 'display_data' and 'image/png' in o.get('data', {})]


def _head(path: str, n: int) -> list[str]:
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    return [next(f).rstrip('\n') for _ in range(n)]


@pytest.mark.parametrize('name', run_notebooks.NOTEBOOKS)
def test_committed_notebook_has_no_outputs_and_declares_the_ci_parameters(name):
  nb = nbformat.read(os.path.join(REPO, 'colab', name), as_version=4)
  nbformat.validate(nb)
  for cell in _code_cells(nb):
    assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]
  assert run_notebooks.strip(nb) == nb  # Nor any execution metadata.
  tagged = [c for c in nb.cells if 'parameters' in c.metadata.get('tags', [])]
  assert len(tagged) == 1
  declared = set(re.findall(r'^([A-Z_]+) = ', tagged[0].source, re.MULTILINE))
  injected = set(run_notebooks.ci_parameters(name, '/data', '/work'))
  assert injected <= declared, injected - declared
  assert {'INSTALL_FROM', 'ACCELERATOR', 'DATA_DIR', 'CONFIG', 'WORKDIR'} <= declared


def test_strip_removes_outputs_counts_and_metadata_but_tags():
  cell = nbformat.v4.new_code_cell('print(1)', execution_count=3, metadata={
      'tags': ['parameters'], 'execution': {'iopub.status.idle': 'x'}, 'outputId': 'y'})
  cell.outputs = [nbformat.v4.new_output('stream', name='stdout', text='1\n')]
  nb = nbformat.v4.new_notebook(cells=[cell, nbformat.v4.new_markdown_cell(
      'x', metadata={'id': 'z'})])
  out = run_notebooks.strip(nb)
  assert out.cells[0].outputs == [] and out.cells[0].execution_count is None
  assert out.cells[0].metadata == {'tags': ['parameters']} and out.cells[1].metadata == {}
  assert out.cells[0].source == 'print(1)' and len(nb.cells[0].outputs) == 1
  nbformat.validate(out)


def test_inject_parameters_puts_a_tagged_cell_after_the_parameters_cell():
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_markdown_cell('# title'),
      nbformat.v4.new_code_cell('A = 1\nB = None', metadata={'tags': ['parameters']}),
      nbformat.v4.new_code_cell('print(A, B)')])
  out = run_notebooks.inject_parameters(nb, {'A': 2, 'B': {'x': (1, 'y')}})
  assert [c.source for c in out.cells[:2]] == ['# title', 'A = 1\nB = None']
  assert out.cells[2].metadata['tags'] == ['injected-parameters']
  namespace = {}
  exec(out.cells[2].source, namespace)  # pylint: disable=exec-used
  assert namespace['A'] == 2 and namespace['B'] == {'x': (1, 'y')}
  assert len(nb.cells) == 3  # The original is left alone.
  with pytest.raises(ValueError, match='no cell tagged "parameters"'):
    run_notebooks.inject_parameters(nbformat.v4.new_notebook(), {'A': 1})


def test_the_kernel_is_this_python_and_a_failing_cell_fails_the_run(tmp_path):
  nb = nbformat.v4.new_notebook(cells=[
      nbformat.v4.new_code_cell('import os, sys\nprint(sys.executable)\nprint(os.getcwd())\n'
                                'import transformer_jax\nprint(transformer_jax.__file__)'),
      nbformat.v4.new_code_cell('raise ValueError("cell two fails")'),
      nbformat.v4.new_code_cell('print("never")')])
  with pytest.raises(nbclient.exceptions.CellExecutionError, match='cell two fails'):
    run_notebooks.execute(nb, str(tmp_path), timeout_s=60)
  assert _text(nb.cells[0]).splitlines() == [
      sys.executable, str(tmp_path), os.path.join(REPO, 'transformer_jax', '__init__.py')]
  assert nb.cells[2].outputs == []


def test_translation_notebook(data_dir, tmp_path, compilation_cache):
  nb, p = _run('01_translation.ipynb', data_dir, tmp_path, compilation_cache)
  workdir, split = p['WORKDIR'], p['TEST_SPLIT']
  # The last cell: the test score of the best checkpoint, which is step 40 (the only
  # validation BLEU), equal to sacreBLEU on the hypotheses it wrote.
  last = _text(_code_cells(nb)[-1])
  match = re.fullmatch(re.escape(split) + r' BLEU (\d+\.\d\d), chrF (\d+\.\d\d), lowercased '
                       r'BLEU \d+\.\d\d \(best-step40 of 40 steps\)\n', last)
  assert match, last
  with open(os.path.join(workdir, 'translations', f'{split}-best-step40.txt'),
            encoding='utf-8') as f:
    hypotheses = f.read().splitlines()
  references = _head(os.path.join(data_dir, 'test_2016_flickr.en.gz'), 50)
  assert len(hypotheses) == 50
  assert float(match.group(1)) == pytest.approx(
      sacrebleu.corpus_bleu(hypotheses, [references]).score, abs=0.006)
  assert float(match.group(2)) == pytest.approx(
      sacrebleu.corpus_chrf(hypotheses, [references]).score, abs=0.006)
  with open(os.path.join(workdir, 'run_config.json')) as f:
    assert json.load(f)['num_train_steps'] == 40
  assert sorted(os.listdir(os.path.join(workdir, 'checkpoints'))) == ['20', '40']
  translations = _text(_cell(nb, 'SENTENCES = ')).splitlines()
  assert len(translations) == 6 and all(t.startswith('  -> ') for t in translations[1::2])
  pngs = _pngs(_cell(nb, 'from IPython.display import'))
  assert len(pngs) == 2 and all(png.startswith(PNG_MAGIC) for png in pngs)


def test_lora_notebook(data_dir, tmp_path, compilation_cache):
  nb, p = _run('02_lora_finetune.ipynb', data_dir, tmp_path, compilation_cache)
  base_dir, lora_dir = (os.path.join(p['WORKDIR'], name) for name in ('base', 'lora'))
  last = _text(_code_cells(nb)[-1])
  match = re.search(r"LoRA trains ([\d,]+) parameters: (\d+\.\d\d)% of the base model's "
                    r'([\d,]+)\n' + re.escape(p['TEST_SPLIT']) +
                    r' BLEU: base \d+\.\d\d, base \+ LoRA \d+\.\d\d\n', last)
  assert match, last
  num_lora, num_base = (int(match.group(i).replace(',', '')) for i in (1, 3))
  # A and B ([d, r] and [r, d]) on the query and value projections of the encoder's
  # self-attention and the decoder's self- and cross-attention.
  tiny = mt.get_config('tiny')
  attentions = tiny.num_encoder_layers + 2 * tiny.num_decoder_layers
  assert num_lora == 2 * attentions * 2 * tiny.d_model * p['LORA_RANK'] == 1536
  with open(os.path.join(base_dir, 'train.log')) as f:
    logged = re.search(r'Model: ([\d,]+) parameters', f.read()).group(1)
  assert num_base == int(logged.replace(',', '')) > num_lora
  assert float(match.group(2)) == pytest.approx(100 * num_lora / num_base, abs=0.006)
  with open(os.path.join(lora_dir, 'adapter_config.json')) as f:
    record = json.load(f)
  assert record['base'] == base_dir
  assert record['settings']['lora_rank'] == 4 and record['settings']['lora_targets'] == [
      'query', 'value']
  # The LoRA checkpoint holds the adapter alone: far smaller than the base's.
  assert 'latest checkpoint: base ' in _text(_cell(nb, 'import json'))
  lines = _text(_cell(nb, 'lora_task, lora_params')).splitlines()
  assert sum(line.startswith('  base + LoRA: ') for line in lines) == 2


def test_custom_loss_notebook(data_dir, tmp_path, compilation_cache):
  nb, p = _run('03_custom_loss.ipynb', data_dir, tmp_path, compilation_cache)
  check = _text(_cell(nb, 'import numpy as np'))
  numbers = re.fullmatch(r'cross-entropy (\d\.\d+), focal with gamma 0 (\d\.\d+), with gamma 2 '
                         r'(\d\.\d+)\n', check)
  assert numbers and numbers.group(1) == numbers.group(2) > numbers.group(3), check
  workdirs = {'cross-entropy': os.path.join(p['WORKDIR'], 'cross_entropy'),
              'focal (gamma 2)': os.path.join(p['WORKDIR'], 'focal')}
  for label, loss in (('cross-entropy', 'cross_entropy'), ('focal (gamma 2)',
                                                           '__main__:focal_loss')):
    with open(os.path.join(workdirs[label], 'run_config.json')) as f:
      assert json.load(f)['loss'] == loss
  # The last cell's validation losses are the runs' TensorBoard values; the losses
  # trained different models.
  from transformer_jax import plots  # pylint: disable=g-import-not-at-top (TensorFlow)
  scalars = {label: plots.read_scalars(w) for label, w in workdirs.items()}
  last = _text(_code_cells(nb)[-1]).splitlines()
  assert len(last) == 2
  for line, (label, runs) in zip(last, scalars.items()):
    assert [step for step, _ in runs['eval/loss']] == [20, 40]
    assert line.startswith(f"{label}: step 40, validation loss {runs['eval/loss'][-1][1]:.4f}")
  assert scalars['cross-entropy']['train/loss'] != scalars['focal (gamma 2)']['train/loss']
  assert scalars['cross-entropy']['eval/loss'] != scalars['focal (gamma 2)']['eval/loss']
  # Both runs are drawn on the loss figure, shown inline.
  figure = plots.make_figures(scalars)['loss']
  labels = [line.get_label() for line in figure.axes[0].get_lines()]
  assert {'cross-entropy validation', 'focal (gamma 2) validation'} <= set(labels), labels
  plot_cell = _cell(nb, 'from IPython.display import')
  assert os.path.join(p['WORKDIR'], 'plots', 'loss.png') in _text(plot_cell)
  pngs = _pngs(plot_cell)
  assert len(pngs) >= 2 and all(png.startswith(PNG_MAGIC) for png in pngs)
