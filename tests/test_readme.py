"""The README's "Use it from Python" block runs as it is and does what its comments say."""
import ast
import json
import os
import re
import subprocess
import sys

from tests.conftest import REPO, multi30k_dir


def python_block(section: str) -> str:
  with open(os.path.join(REPO, 'README.md'), encoding='utf-8') as f:
    text = f.read()
  body = text.split(f'## {section}\n', 1)[1].split('\n## ', 1)[0]
  [block] = re.findall(r'```python\n(.*?)```', body, re.S)
  return block


def test_use_it_from_python_block_trains_translates_scores_and_loads_an_adapter(tmp_path):
  script = python_block('Use it from Python') + (
      '\nimport json\n'
      'print(json.dumps({"step": int(state.step), "bleu": scores["bleu"], '
      '"adapter": sorted(os.listdir(f"{RUNS}/lora"))}))\n')
  env = dict(os.environ, RUNS=str(tmp_path), TRANSFORMER_JAX_DATA_DIR=multi30k_dir(),
             TF_CPP_MIN_LOG_LEVEL='3')
  proc = subprocess.run([sys.executable, '-c', script], cwd=REPO, env=env, capture_output=True,
                        text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  lines = proc.stdout.strip().splitlines()  # The trainer's eval lines come first.
  [base] = [line for line in lines if re.match(r'(best-)?step\d+ \[', line)]
  checkpoint, outputs = base.split(' ', 1)
  # Two outputs for two inputs, the empty line kept empty; then one for the adapter.
  assert re.fullmatch(r'(best-)?step\d+', checkpoint)
  assert len(ast.literal_eval(outputs)) == 2 and ast.literal_eval(outputs)[1] == ''
  assert len(ast.literal_eval(lines[-2])) == 1
  result = json.loads(lines[-1])
  assert result['step'] == 30 and 0 <= result['bleu'] <= 100
  assert 'adapter_config.json' in result['adapter']
  # The console showed warnings at most, not the run's INFO lines (they are in train.log).
  assert 'Mesh' not in proc.stderr
  with open(tmp_path / 'base' / 'train.log', encoding='utf-8') as f:
    assert 'Mesh' in f.read()
