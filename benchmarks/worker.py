"""`Worker`: an object that lives in a Python process of its own, for the benchmarks.

The speed benchmarks run each implementation (transformer_jax, PyTorch eager, torch.compile)
in a worker process and drive them in rounds from the main process, so that neither
framework's allocator or thread pools slow the other, and so that transformer_jax runs with
the environment its command line gives itself (`transformer_jax.hugepages`).
"""
from __future__ import annotations

import multiprocessing
import os
import traceback
import warnings


class Worker:
  """An object built by `factory(*args)` in a fresh (spawned) Python process; method calls
  are forwarded to it and their results returned (both pickled). `environ`: the child's
  environment variables (default: this process's).

  `factory` and the arguments must be picklable: module-level classes or functions (those of
  a script run as `__main__` too). Measured on 2 CPU cores, transformer_jax's base-shape
  train step took 6.9 s after PyTorch steps in the same process and 6.05 s without them,
  hence one process per implementation. `call` raises RuntimeError with the child's
  traceback when the call fails there, or when the child has died.
  """

  def __init__(self, factory, *args, environ: dict | None = None):
    context = multiprocessing.get_context('spawn')
    self._conn, child = context.Pipe()
    self._process = context.Process(target=_serve, args=(child, factory, args), daemon=True)
    saved = dict(os.environ)
    if environ is not None:  # The child's environment (spawn copies this process's).
      os.environ.clear()
      os.environ.update(environ)
    try:
      self._process.start()
    finally:
      if environ is not None:
        os.environ.clear()
        os.environ.update(saved)
    child.close()
    self.name = self.call('__getattribute__', 'name')

  def call(self, method: str, *args):
    self._conn.send((method, args))
    try:
      ok, value = self._conn.recv()
    except EOFError as e:
      raise RuntimeError(f'benchmark worker died (exit code {self._process.exitcode})') from e
    if not ok:
      raise RuntimeError(f'in the benchmark worker:\n{value}')
    return value

  def close(self) -> None:
    if self._process.is_alive():
      self._conn.send(None)
      self._process.join(60)
    if self._process.is_alive():
      self._process.kill()


def jax_environ() -> dict:
  """The environment `python -m transformer_jax.main` re-executes itself with: this one
  plus huge pages for malloc where they help."""
  from transformer_jax import hugepages  # pylint: disable=g-import-not-at-top
  return hugepages.cli_environ()


def huge_pages_note() -> str:
  """Which workers get huge pages for malloc, for the benchmark's header line."""
  from transformer_jax import hugepages  # pylint: disable=g-import-not-at-top
  state = lambda environ: 'on' if hugepages.active(environ) else 'off'
  return (f'malloc huge pages: transformer_jax {state(jax_environ())}, '
          f'PyTorch {state(os.environ)}')


def _serve(conn, factory, args) -> None:
  """The worker process: build the object, then answer calls until told to stop."""
  warnings.filterwarnings('ignore', category=FutureWarning)
  try:
    obj = factory(*args)
  except Exception:  # pylint: disable=broad-except
    conn.recv()
    conn.send((False, traceback.format_exc()))
    return
  while (message := conn.recv()) is not None:
    method, call_args = message
    try:
      conn.send((True, getattr(obj, method)(*call_args)))
    except Exception:  # pylint: disable=broad-except
      conn.send((False, traceback.format_exc()))
