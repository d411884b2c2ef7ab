#!/usr/bin/env bash
# Throughput benchmark on a GPU machine whose packages are installed (no network needed):
# shapes small and base, float32 and bfloat16, transformer_jax against PyTorch eager and
# torch.compile; prints the tables (MFU included). A (shape, dtype) that would not fit in
# ${TIME_BUDGET_S:-240} s is skipped and named (--time-budget); exits nonzero on any failure,
# and after ${LIMIT_S:-295} seconds (timeout). Extra arguments go to benchmarks/throughput.py
# (they come last, so e.g. --json FILE or --mesh-shape replaces the one given here).
#
# transformer_jax runs under the FSDP rules: --mesh-shape ${MESH_SHAPE:-1,-1,1}, i.e. the
# (data, fsdp, tensor) mesh config.mesh_shape with every visible GPU on 'fsdp', so parameters
# and optimizer state are sharded along 'embed' (config.logical_axis_rules). With the default
# CUDA_VISIBLE_DEVICES=0 that is a 1-device mesh (the same program as data parallelism on one
# GPU); MESH_SHAPE=-1,1,1 gives plain data parallelism.
#
#   bash benchmarks/gpu.sh                 # PYTHON=... to choose the interpreter (default:
#                                          # .venv/bin/python if there, else python3)
#   LIMIT_S=420 TIME_BUDGET_S=340 bash benchmarks/gpu.sh --json /tmp/throughput_gpu.json
set -euo pipefail
cd "$(dirname "$0")/.."
if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x .venv/bin/python ]]; then PYTHON=.venv/bin/python; else PYTHON=python3; fi
fi
export PYTHONUNBUFFERED=1 TF_CPP_MIN_LOG_LEVEL=3
# One GPU for both frameworks (transformer_jax would otherwise go data-parallel on all).
export CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"

"$PYTHON" - <<'PY'
import sys
import jax
if jax.default_backend() not in ('gpu', 'cuda', 'rocm'):
  sys.exit(f'benchmarks/gpu.sh: JAX sees no GPU (backend {jax.default_backend()!r}); '
           'install a CUDA build of jax, e.g. jax[cuda12]')
try:
  import torch
except ImportError:
  sys.exit('benchmarks/gpu.sh: torch is missing: pip install -r requirements-bench.txt')
if not torch.cuda.is_available():
  sys.exit(f'benchmarks/gpu.sh: torch {torch.__version__} sees no CUDA GPU (a CPU build?)')
print(f'GPU: {jax.devices()[0].device_kind}; jax {jax.__version__}, torch {torch.__version__}')
PY

mkdir -p runs
# Compiled PyTorch greedy decoding is left out to stay within the time (eager greedy, as the
# tutorial does it, is measured); drop --no-compile-decode to add it.
timeout "${LIMIT_S:-295}" "$PYTHON" benchmarks/throughput.py \
  --shapes small,base --dtypes float32,bfloat16 --steps 40 --round-steps 10 --warmup 5 \
  --decode-reps 3 --no-compile-decode --time-budget "${TIME_BUDGET_S:-240}" \
  --mesh-shape "${MESH_SHAPE:-1,-1,1}" --json runs/throughput_gpu.json "$@"
