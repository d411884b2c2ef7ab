"""transformer_jax.hugepages: when the CLI re-executes itself with huge pages for malloc."""
import os
import subprocess
import sys

import pytest

from tests.conftest import REPO
from transformer_jax import hugepages

GLIBC = (2, 36)


@pytest.mark.parametrize('environ, mode, libc, expected', [
    ({}, 'madvise', GLIBC, hugepages.TUNABLE),
    ({'GLIBC_TUNABLES': 'glibc.malloc.arena_max=2'}, 'madvise', GLIBC,
     'glibc.malloc.arena_max=2:' + hugepages.TUNABLE),
    ({'GLIBC_TUNABLES': 'glibc.malloc.hugetlb=0'}, 'madvise', GLIBC, None),  # The user's.
    ({'GLIBC_TUNABLES': hugepages.TUNABLE}, 'madvise', GLIBC, None),  # Already re-executed.
    ({hugepages.OFF_ENV: '0'}, 'madvise', GLIBC, None),
    ({}, 'always', GLIBC, None),
    ({}, 'never', GLIBC, None),
    ({}, '', GLIBC, None),  # No THP (or not Linux).
    ({}, 'madvise', (2, 34), None),  # The tunable is new in glibc 2.35.
    ({}, 'madvise', (), None),  # musl and others.
])
def test_environ_with_tunable(environ, mode, libc, expected):
  result = hugepages.environ_with_tunable({'PATH': '/bin', **environ}, mode, libc)
  if expected is None:
    assert result is None
  else:
    assert result == {'PATH': '/bin', **environ, 'GLIBC_TUNABLES': expected}


def test_thp_mode_reads_the_bracketed_choice(tmp_path):
  path = tmp_path / 'enabled'
  path.write_text('always [madvise] never\n')
  assert hugepages.thp_mode(str(path)) == 'madvise'
  path.write_text('[always] madvise never\n')
  assert hugepages.thp_mode(str(path)) == 'always'
  assert hugepages.thp_mode(str(tmp_path / 'missing')) == ''


@pytest.mark.parametrize('off', [False, True])
def test_reexec_sets_the_tunable_only_where_it_helps(off, tmp_path):
  """A script that calls reexec_with_huge_pages on itself prints its environment after."""
  script = tmp_path / 'script.py'
  script.write_text(
      'import os, sys\n'
      f'sys.path.insert(0, {REPO!r})\n'
      'from transformer_jax import hugepages\n'
      'hugepages.reexec_with_huge_pages([sys.executable, __file__])\n'
      'print(os.environ.get("GLIBC_TUNABLES", ""), hugepages.active())\n')
  environ = {k: v for k, v in os.environ.items() if k != 'GLIBC_TUNABLES'}
  if off:
    environ[hugepages.OFF_ENV] = '0'
  proc = subprocess.run([sys.executable, str(script)], env=environ, capture_output=True,
                        text=True, timeout=60, check=True)
  expected_env = hugepages.cli_environ(environ)
  tunables = expected_env.get('GLIBC_TUNABLES', '')
  assert proc.stdout.split('\n')[0] == f'{tunables} {hugepages.active(expected_env)}'
  if off:
    assert tunables == ''
