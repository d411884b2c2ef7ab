"""Memory of the train step with gradient accumulation: XLA's buffer plan for k micro-batches.

  python benchmarks/grad_accum_memory.py [--rows 64] [--length 64] [--ks 1,2,4,8]
                                         [--dtype float32]

Compiles (does not run) `train.train_step` of the translation task, as `train._train` jits
it (state donated), for `grad_accum_steps` = k at the same global batch of ROWS x LENGTH
source and target tokens, with the model of `configs/mt.py` (default size: d_model 256,
3+3 layers, d_ff 1024, 8,000-token vocabulary; AdamW, clipping, label smoothing, dropout
0.1). Inputs are abstract (`jax.ShapeDtypeStruct`), so nothing is initialized or computed
and no mesh is built: one device, the default backend.

Prints, per k, `compiled.memory_analysis()` of `jax.jit(...).lower(...).compile()`:
argument, output, alias (donated inputs reused for outputs) and temp bytes (XLA's
temporaries: activations saved for the backward pass, gradients, the accumulation
buffer), total = argument + output - alias + temp (the step's buffer plan, as
`throughput.py` reports it), and temp in units of one gradient buffer (the sum of the
float32 parameters' nbytes). With k micro-batches the
activations are those of ROWS / k rows, so temp falls with k, towards a floor of a few
parameter-sized buffers (the accumulated gradient, one micro-batch's gradient, the
optimizer's temporaries); if the k gradients were stacked rather than summed, temp would
grow by a gradient buffer per extra micro-batch instead. A last line fits temp = fixed +
per_batch / k over the k > 1 and gives the fixed part in gradient buffers.
"""
from __future__ import annotations

import argparse
import functools
import os
import sys

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '3')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top
import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
import numpy as np  # pylint: disable=g-import-not-at-top

from configs import mt  # pylint: disable=g-import-not-at-top
from transformer_jax import losses, models, optim, train  # pylint: disable=g-import-not-at-top
from transformer_jax.tasks import translation  # pylint: disable=g-import-not-at-top

MIB = 1 << 20


def abstract_state(config, rows: int, length: int):
  """(model, optimizer, abstract float32 TrainState, abstract batch {'inputs', 'targets':
  int32 [rows, length]}), all `jax.ShapeDtypeStruct`s."""
  model = models.Transformer(models.TransformerConfig.from_config(config, config.vocab_size))
  optimizer = optim.make_optimizer(config)
  dummy = jnp.ones((1, 8), jnp.int32)
  params = jax.eval_shape(
      lambda: optim.to_master(model.init(jax.random.PRNGKey(0), dummy, dummy)['params']))
  state = train.TrainState(step=jax.ShapeDtypeStruct((), jnp.int32), params=params,
                           opt_state=jax.eval_shape(optimizer.init, params))
  tokens = jax.ShapeDtypeStruct((rows, length), jnp.int32)
  return model, optimizer, state, {'inputs': tokens, 'targets': tokens}


def memory(config, rows: int, length: int, k: int) -> dict:
  """memory_analysis() of the compiled train step with grad_accum_steps=k, as a dict."""
  model, optimizer, state, batch = abstract_state(config, rows, length)
  step = functools.partial(
      train.train_step, optimizer=optimizer, schedule=optim.learning_rate_schedule(config),
      seed=0, grad_accum_steps=k,
      loss_fn=functools.partial(translation.seq2seq_loss, model=model,
                                loss_fn=losses.get_loss(config)))
  stats = jax.jit(step, donate_argnums=0).lower(state, batch).compile().memory_analysis()
  names = ('argument_size_in_bytes', 'output_size_in_bytes', 'alias_size_in_bytes',
           'temp_size_in_bytes')
  return {name: int(getattr(stats, name)) for name in names}


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--rows', type=int, default=64, help='global batch rows')
  parser.add_argument('--length', type=int, default=64, help='source and target tokens')
  parser.add_argument('--ks', default='1,2,4,8', help='grad_accum_steps values')
  parser.add_argument('--dtype', default='float32', help="compute dtype, e.g. 'bfloat16'")
  args = parser.parse_args()
  config = mt.get_config()
  config.dtype = args.dtype
  ks = [int(k) for k in args.ks.split(',')]
  _, _, state, _ = abstract_state(config, args.rows, args.length)
  grad_bytes = sum(int(np.prod(p.shape)) * np.dtype(p.dtype).itemsize
                   for p in jax.tree.leaves(state.params))
  print(f'backend {jax.default_backend()} ({jax.devices()[0].device_kind}), jax '
        f'{jax.__version__}; configs/mt.py: d_model {config.d_model}, layers '
        f'{config.num_encoder_layers}+{config.num_decoder_layers}, d_ff {config.d_ff}, vocab '
        f'{config.vocab_size}, dtype {config.dtype}; global batch {args.rows} x {args.length}')
  print(f'one gradient buffer (float32 parameters): {grad_bytes / MIB:.2f} MiB')
  header = (f"{'k':>3} {'rows/micro':>10} {'argument':>10} {'output':>10} {'alias':>10} "
            f"{'temp':>10} {'temp/grad':>9} {'total':>10}   (MiB)")
  print(header)
  print('-' * len(header))
  temps = {}
  for k in ks:
    m = memory(config, args.rows, args.length, k)
    total = (m['argument_size_in_bytes'] + m['output_size_in_bytes'] -
             m['alias_size_in_bytes'] + m['temp_size_in_bytes'])
    print(f"{k:>3} {args.rows // k:>10} {m['argument_size_in_bytes'] / MIB:>10.2f} "
          f"{m['output_size_in_bytes'] / MIB:>10.2f} {m['alias_size_in_bytes'] / MIB:>10.2f} "
          f"{m['temp_size_in_bytes'] / MIB:>10.2f} {m['temp_size_in_bytes'] / grad_bytes:>9.2f} "
          f"{total / MIB:>10.2f}", flush=True)
    temps[k] = m['temp_size_in_bytes']
  accumulated = sorted(k for k in temps if k > 1)
  if len(accumulated) >= 2:  # temp = fixed + per_batch / k, least squares over k > 1.
    per_batch, fixed = np.polyfit([1 / k for k in accumulated],
                                  [temps[k] for k in accumulated], 1)
    print(f'k > 1: temp ~ {fixed / MIB:.2f} MiB + {per_batch / MIB:.2f} MiB / k, a part '
          f'independent of k of {fixed / grad_bytes:.2f} gradient buffers (k stacked '
          'gradients would add one buffer per micro-batch)')


if __name__ == '__main__':
  main()
