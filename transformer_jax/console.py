"""What a run shows on the console when it is used from Python (a notebook, a script) as
the command line shows it: TensorFlow's C++ start-up lines filtered out, and absl's handler
showing warnings and errors only, while every INFO line still goes to the run's train.log.

  from transformer_jax import console
  console.setup()   # Once, before training or evaluating in a notebook.

`python -m transformer_jax.main` does the same itself (absl.app installs the handler).
"""
from __future__ import annotations

import importlib
import logging as py_logging
import os
import re
import sys
import tempfile

# Lines TensorFlow's C++ code writes to stderr while it is imported, whatever
# TF_CPP_MIN_LOG_LEVEL says (they are logged before TensorFlow reads it).
_TF_IMPORT_NOISE = re.compile(
    r'WARNING: All log messages before absl::InitializeLog\(\) is called are written to '
    r'STDERR|\] oneDNN custom operations are on|cpu_feature_guard\.cc|To enable the '
    r'following instructions: .* rebuild TensorFlow')


def import_tensorflow_quietly() -> None:
  """Imports TensorFlow with its C++ start-up lines (`_TF_IMPORT_NOISE`) kept off the
  console: file descriptor 2 goes to a temporary file during the import, and everything
  else written there is copied to stderr afterwards. Does nothing if TensorFlow is
  already imported."""
  if 'tensorflow' in sys.modules:
    return
  sys.stderr.flush()
  try:
    saved = os.dup(2)
  except OSError:  # No file descriptor 2.
    importlib.import_module('tensorflow')
    return
  with tempfile.TemporaryFile() as captured:
    os.dup2(captured.fileno(), 2)
    try:
      importlib.import_module('tensorflow')
    finally:
      sys.stderr.flush()
      os.dup2(saved, 2)
      os.close(saved)
      captured.seek(0)
      for line in captured.read().decode('utf-8', 'replace').splitlines(keepends=True):
        if not _TF_IMPORT_NOISE.search(line):
          sys.stderr.write(line)
      sys.stderr.flush()


def setup(level: int = py_logging.WARNING) -> None:
  """Console logging for Python use, as the command line has it: TensorFlow imported
  quietly (`TF_CPP_MIN_LOG_LEVEL` defaults to 2), absl's handler installed with `level`
  (default: warnings and errors; the trainer shows them above its progress bar) and
  'LEVEL: message' lines. Without it, absl falls back to `logging.basicConfig` and every
  INFO line of a run reaches the console. train.log gets every line either way.

  Args:
    level: the lowest `logging` level shown on the console (e.g. logging.INFO).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
  import_tensorflow_quietly()
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()  # No command line: absl's handler then logs as usual.
  handler = logging.get_absl_handler()
  handler.setFormatter(py_logging.Formatter('%(levelname)s: %(message)s'))
  handler.setLevel(level)
  logging.use_absl_handler()
