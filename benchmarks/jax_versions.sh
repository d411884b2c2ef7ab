#!/usr/bin/env bash
# Train-step time of benchmarks/cpu_experiments.py (experiments base and bf16) under each
# jax release that installs on this Python, for docs/performance.md.
#
#   bash benchmarks/jax_versions.sh [VERSION ...]     # default: 0.10.0 0.10.1 0.10.2
#
# Each version goes into an overlay venv under ${JAX_VERSIONS_DIR:-/tmp/jax_versions}: its
# own jax and jaxlib, and everything else from the project's .venv (a .pth file), so only
# jax changes. Needs PyPI the first time. flax 0.12.8 needs jax >= 0.10.0.
set -euo pipefail
cd "$(dirname "$0")/.."
root=${JAX_VERSIONS_DIR:-/tmp/jax_versions}
base_site=$(.venv/bin/python -c 'import site; print(site.getsitepackages()[0])')
versions=("$@")
[ ${#versions[@]} -gt 0 ] || versions=(0.10.0 0.10.1 0.10.2)
for version in "${versions[@]}"; do
  venv="$root/jax-$version"
  if [ ! -x "$venv/bin/python" ]; then
    python3 -m venv "$venv"
    "$venv/bin/pip" install -q --disable-pip-version-check --no-deps \
      "jax==$version" "jaxlib==$version"
    site=$("$venv/bin/python" -c 'import site; print(site.getsitepackages()[0])')
    echo "$base_site" > "$site/project_venv.pth"
  fi
  echo "== jax $("$venv/bin/python" -c 'import jax; print(jax.__version__)')"
  "$venv/bin/python" benchmarks/cpu_experiments.py --only=base,bf16 "--steps=${STEPS:-20}"
done
