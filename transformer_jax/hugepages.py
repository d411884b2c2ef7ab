"""Transparent huge pages for the process's malloc'd memory (Linux, glibc >= 2.35).

XLA:CPU allocates the temporary buffers of every step afresh, and glibc serves buffers over
32 MiB with a new mmap each time, so every step page-faults its working set in again: about
486,000 4-KiB faults per step for the issue-4 base shape. With transparent huge pages in
`madvise` mode (the common default), glibc asks for 2-MiB pages when the tunable
`glibc.malloc.hugetlb=1` is set (glibc >= 2.35): 2,100 faults per step, and train steps
10-20% faster on a 2-core CPU (docs/performance.md).

Tunables are read when the process starts, so `python -m transformer_jax.main` re-executes
itself once with the tunable added, before importing anything heavy. Set
TRANSFORMER_JAX_HUGEPAGES=0 to turn this off.
"""
from __future__ import annotations

import os
import platform
import sys

TUNABLE = 'glibc.malloc.hugetlb=1'
OFF_ENV = 'TRANSFORMER_JAX_HUGEPAGES'
THP_MODE_FILE = '/sys/kernel/mm/transparent_hugepage/enabled'


def thp_mode(path: str = THP_MODE_FILE) -> str:
  """The kernel's transparent-huge-page mode: 'always', 'madvise', 'never', or '' if the
  file is missing or unreadable (not Linux, or no THP support)."""
  try:
    with open(path) as f:
      text = f.read()
  except OSError:
    return ''
  start, end = text.find('['), text.find(']')
  return text[start + 1:end] if 0 <= start < end else ''


def glibc_version() -> tuple[int, ...]:
  """(major, minor) of the C library this Python runs on; () if it is not glibc."""
  name, version = platform.libc_ver()
  if name != 'glibc' or not version:
    return ()
  return tuple(int(part) for part in version.split('.')[:2])


def environ_with_tunable(environ: dict, mode: str, libc: tuple[int, ...]) -> dict | None:
  """The environment to re-execute with, or None when nothing would change.

  Args:
    environ: the current environment.
    mode: `thp_mode()`. Only 'madvise' needs the tunable ('always' already gives huge
      pages, 'never' none).
    libc: `glibc_version()`; the tunable exists from glibc 2.35.
  """
  if environ.get(OFF_ENV, '1') == '0' or mode != 'madvise' or libc < (2, 35):
    return None
  tunables = environ.get('GLIBC_TUNABLES', '')
  if 'glibc.malloc.hugetlb=' in tunables:
    return None  # Already set, by us or by the user: keep their choice.
  return {**environ, 'GLIBC_TUNABLES': f'{tunables}:{TUNABLE}' if tunables else TUNABLE}


def cli_environ(environ=None) -> dict:
  """The environment `python -m transformer_jax.main` runs with when started with `environ`
  (default: this process's): the same, plus the tunable where it helps."""
  environ = dict(os.environ if environ is None else environ)
  return environ_with_tunable(environ, thp_mode(), glibc_version()) or environ


def reexec_with_huge_pages(command: list[str]) -> None:
  """Replaces this process by `command` (an argv, e.g. [sys.executable, '-m', module, ...])
  with the tunable in its environment, when that would change anything; otherwise returns.
  Call it before anything heavy is imported or any file is written."""
  environ = environ_with_tunable(dict(os.environ), thp_mode(), glibc_version())
  if environ is None:
    return
  sys.stdout.flush()
  sys.stderr.flush()
  os.execve(command[0], command, environ)


def active(environ=None) -> bool:
  """Whether a process with `environ` (default: this one's) gets huge pages for its malloc'd
  memory: THP mode 'always', or 'madvise' with the tunable set and glibc >= 2.35."""
  environ = os.environ if environ is None else environ
  mode = thp_mode()
  return mode == 'always' or (mode == 'madvise' and glibc_version() >= (2, 35) and
                              TUNABLE in environ.get('GLIBC_TUNABLES', '').split(':'))
