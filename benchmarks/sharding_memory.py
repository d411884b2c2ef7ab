"""Per-device memory of the train state and of the compiled train step on each mesh.

Runs on 8 fake CPU devices (it sets XLA_FLAGS itself, before jax is imported) with the
default logical axis rules, for the model of configs/mt.py (or --d_model etc.), and prints
one row per (data, fsdp, tensor) mesh:
  state/dev   parameters + optimizer state held by the most loaded device, summed from
              the arrays' addressable shards (measured, not computed from the rules);
  argument, temp, output, alias   XLA's memory analysis of the compiled train step
              (state donated, as the trainer does), per device;
  peak        argument + temp + output - alias.

  python benchmarks/sharding_memory.py [--d_model=256 --d_ff=1024 --layers=3 --vocab=8000]
"""
import argparse
import functools
import os
import sys

os.environ['XLA_FLAGS'] = (os.environ.get('XLA_FLAGS', '') +
                           ' --xla_force_host_platform_device_count=8')
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position

from configs import mt  # pylint: disable=g-import-not-at-top,wrong-import-position
from transformer_jax import losses, sharding, train  # pylint: disable=g-import-not-at-top,wrong-import-position
from transformer_jax.tasks import translation  # pylint: disable=g-import-not-at-top,wrong-import-position

MESHES = ((1, 1, 1), (8, 1, 1), (4, 2, 1), (2, 4, 1), (1, 8, 1), (2, 2, 2), (1, 4, 2),
          (1, 1, 8))


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--d_model', type=int, default=256)
  parser.add_argument('--num_heads', type=int, default=8)
  parser.add_argument('--d_ff', type=int, default=1024)
  parser.add_argument('--layers', type=int, default=3)
  parser.add_argument('--vocab', type=int, default=8000)
  parser.add_argument('--rows', type=int, default=64)
  parser.add_argument('--length', type=int, default=64)
  args = parser.parse_args()
  config = mt.get_config()
  config.update(d_model=args.d_model, num_heads=args.num_heads, d_ff=args.d_ff,
                num_encoder_layers=args.layers, num_decoder_layers=args.layers)
  rng = np.random.default_rng(0)
  batch = {'inputs': rng.integers(1, args.vocab, (args.rows, args.length)).astype(np.int32),
           'targets': rng.integers(1, args.vocab, (args.rows, args.length)).astype(np.int32)}
  print(f'jax {jax.__version__}, {jax.device_count()} fake CPU devices; d_model {args.d_model}, '
        f'{args.layers}+{args.layers} layers, d_ff {args.d_ff}, vocab {args.vocab}; batch '
        f'{args.rows} x {args.length}; default logical_axis_rules')
  header = ('mesh (d,f,t)', 'state/dev', 'argument', 'temp', 'output', 'alias', 'peak')
  print(f'{header[0]:>13}' + ''.join(f'{h:>11}' for h in header[1:]) + '   (MiB per device)')
  total = None
  for shape in MESHES:
    devices = jax.devices()[:int(np.prod(shape))]
    mesh = sharding.make_mesh(shape, devices)
    model, optimizer, state = translation.create_model_and_state(config, args.vocab, mesh)
    loss_fn = functools.partial(translation.seq2seq_loss, model=model,
                                loss_fn=losses.get_loss(config))
    step = train.jit_train_step(config, loss_fn, optimizer, mesh, state)
    stats = step.lower(state, sharding.put_batch(batch, mesh), None).compile().memory_analysis()
    held = max(sharding.device_bytes((state.params, state.opt_state)).values())
    total = total or held
    values = (held, stats.argument_size_in_bytes, stats.temp_size_in_bytes,
              stats.output_size_in_bytes, stats.alias_size_in_bytes,
              stats.argument_size_in_bytes + stats.temp_size_in_bytes
              + stats.output_size_in_bytes - stats.alias_size_in_bytes)
    print(f'{str(shape):>13}' + ''.join(f'{v / 2**20:>11.2f}' for v in values))
    del state, step
  print(f'whole state (parameters + AdamW moments): {total / 2**20:.2f} MiB')


if __name__ == '__main__':
  main()
