r"""Command line: train, score or use a model of any task (translation, classification,
tagging).

  python -m transformer_jax.main --config=configs/mt.py --workdir=DIR            # train
  python -m transformer_jax.main --config=configs/mt.py --workdir=DIR --mode=eval --split=test_2016
  python -m transformer_jax.main --config=configs/mt.py --workdir=DIR --mode=predict \
      [--input=FILE] [--output=FILE]                                             # stdin/stdout
  python -m transformer_jax.main --config=C --workdir=ADAPTER_RUN --mode=merge --output=DIR
  python -m transformer_jax.main --config=configs/multi30k_en_de.py --workdir=REVERSE_RUN \
      --mode=backtranslate --input='mono/train.*.en.gz' --output=synthetic.tsv

A PEFT run's workdir (`config.peft_method`) holds only its adapter; eval, predict and
merge reload the base it records in adapter_config.json and refuse a different one.

`--mode=translate` is `--mode=predict` of a translation model. Input lines end at '\n'
only ('\r', '\x0b', '\x0c', '\x1c'-'\x1e', '\x85', '\u2028' and '\u2029' stay inside
their line, where the tokenizer makes them spaces); input and output are UTF-8.

The console shows what a user acts on: the progress bar, the eval lines, reports and
warnings. TensorFlow's C++ start-up chatter (the absl "All log messages before
absl::InitializeLog()" line and the oneDNN note, each printed twice when TensorFlow is
imported) is filtered out, and `TF_CPP_MIN_LOG_LEVEL` defaults to 2 (C++ errors only).

Any config field can be overridden: `--config.num_train_steps=1000`. Rerunning training
with the same --workdir resumes from its latest checkpoint. A bad flag or config value
stops with one line naming it, before anything heavy is imported or any file is written.
"""
import contextlib
import glob
import io
import os
import re
import sys

# TensorFlow's and XLA's C++ logging: errors only, unless the user chose a level. Set
# before anything imports TensorFlow (and kept across the huge-pages re-execution).
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')

from absl import app  # pylint: disable=g-import-not-at-top,wrong-import-position
from absl import flags
from ml_collections import config_flags

from transformer_jax import config_schema
from transformer_jax import console
from transformer_jax import hugepages
from transformer_jax import multihost  # No jax import until used.

FLAGS = flags.FLAGS
flags.DEFINE_string('workdir', None, 'Folder for everything the run writes (tokenizer, '
                    'checkpoints, TensorBoard events, log). Default: runs/<dataset>_<src>-<tgt> '
                    '(translation), runs/<config file name> (other tasks).')
_DEFAULT_CONFIG = 'configs/mt.py'
config_flags.DEFINE_config_file('config', _DEFAULT_CONFIG, 'Config file (path[:variant]); '
                                'configs/NAME.py is found in the installed package too.',
                                lock_config=True)
flags.DEFINE_enum('mode', 'train',
                  ['train', 'eval', 'predict', 'translate', 'backtranslate', 'merge', 'export',
                   'plot'],
                  'train; eval: score a checkpoint on --split and print the report; predict '
                  '(translate): one output line per line of --input, written to --output; '
                  'merge: fold a LoRA/IA3 run\'s adapter into its base, written as a plain '
                  'run folder to --output; export: write a translation model as a jax.export '
                  '(StableHLO) artifact folder to --output (transformer_jax/serving.py loads '
                  'it); plot: PNG curves of --workdir (and --compare) in --output; '
                  'backtranslate: synthetic pairs "translation<TAB>line" of the monolingual '
                  '--input lines, written (resumably) to --output '
                  '(transformer_jax/backtranslation.py).')
flags.DEFINE_string('split', None, 'eval: the split to score (default: config.test_split).')
flags.DEFINE_string('input', None, 'predict: input lines: sentences to translate or classify, '
                    'or whitespace-separated words to tag (default: stdin); backtranslate: '
                    'monolingual text files, comma-separated paths or globs, plain or .gz.')
flags.DEFINE_string('output', None, 'predict: where the outputs go (default: stdout); '
                    'merge, export: the folder to write (required); plot: the folder of the '
                    'PNG files (default: WORKDIR/plots); backtranslate: the file of synthetic '
                    'pairs (required; a rerun continues it).')
flags.DEFINE_list('compare', [], 'plot: more workdirs drawn on the same figures.')
flags.DEFINE_enum('checkpoint', 'best', ['best', 'latest'],
                  "eval/predict/backtranslate/merge/export: the best checkpoint by the task's "
                  'validation metric, or the latest.')


SHARED_DATA_ENV = 'TRANSFORMER_JAX_SHARED_DATA'  # As configs/encoder.py reads it.

def _text_streams(files: contextlib.ExitStack, input_path: str | None,
                  output_path: str | None) -> tuple[io.TextIOBase, io.TextIOBase]:
  """(--input or stdin, --output or stdout) as UTF-8 text with lines ending at '\n' only:
  Python's default newline handling would also end an input line at '\r', shifting every
  later output line. Opened files are closed by `files`. In a multi-process run only
  process 0 writes the output; the others write to os.devnull."""
  if not multihost.is_primary():
    output_path = os.devnull
  if input_path:
    source = files.enter_context(open(input_path, encoding='utf-8', newline='\n'))
  else:
    source = sys.stdin
    source.reconfigure(encoding='utf-8', newline='\n')  # Nothing was read yet.
  if output_path:
    target = files.enter_context(open(output_path, 'w', encoding='utf-8', newline='\n'))
  else:
    target = sys.stdout
    target.reconfigure(encoding='utf-8', newline='\n')
  return source, target


def default_workdir(config) -> str:
  """runs/<dataset>_<src>-<tgt> for translation, else runs/<config file name>, relative to
  the current folder."""
  if config.task == 'translation':
    name = config.dataset_name.replace('/', '_')
    return os.path.join('runs', f'{name}_{config.source_lang}-{config.target_lang}')
  path = config_flags.get_config_filename(FLAGS['config'])
  return os.path.join('runs', os.path.splitext(os.path.basename(path))[0] or config.task)


def _find_config(argv: list[str]) -> list[str]:
  """`argv` with a `--config=configs/NAME.py[:variant]` that does not exist relative to
  the working directory pointed at the shipped copy (`config_schema.configs_dir`), so
  that an installed toolkit runs the README's commands from any folder."""
  out = []
  for arg in argv:
    match = re.fullmatch(r'--config=configs/([\w.]+\.py)(:\w*)?', arg)
    if match and not os.path.exists(f'configs/{match.group(1)}'):
      shipped = os.path.join(config_schema.configs_dir(), match.group(1))
      if os.path.exists(shipped):
        arg = f'--config={shipped}{match.group(2) or ""}'
    out.append(arg)
  if not any(a.startswith('--config=') or a == '--config' for a in argv[1:]):
    if not os.path.exists(_DEFAULT_CONFIG):  # The default, from another folder.
      out.append(f'--config={os.path.join(config_schema.configs_dir(), "mt.py")}')
  return out


def parse_flags(argv: list[str]) -> list[str]:
  """absl flag parsing that reports a bad flag in one line instead of a traceback."""
  try:
    return FLAGS(_find_config(argv))
  except flags.Error as e:
    lines = [line.strip() for line in str(e).splitlines() if line.strip()]
    sys.exit(f'error: {lines[0]} {lines[-1]}' if len(lines) > 1 else f'error: {e}')
  except ImportError as e:  # The config file needs a package that is not installed.
    sys.exit(f'error: --config: {e}')
  except (KeyError, AttributeError) as e:  # An override of a field the config lacks.
    names = re.findall(r"([A-Za-z_]\w*)\\*'", str(e))  # The message nests quotes.
    hint = re.search(r'Did you mean "(\w+)"', str(e))
    sys.exit(f'error: --config.{names[0] if names else e}: unknown config field'
             + (f' (did you mean {hint.group(1)}?)' if hint else ''))


def main(argv):
  if len(argv) > 1:
    sys.exit(f'error: unexpected arguments: {" ".join(argv[1:])}')
  config = FLAGS.config
  try:
    config_schema.validate(config)
  except config_schema.ConfigError as e:
    sys.exit(f'error: {e}')
  except OSError as e:  # ml_collections defers a config file's load error to first use.
    sys.exit(f'error: --config: cannot load the config file: {str(e).splitlines()[-1].strip()}')
  workdir = FLAGS.workdir or default_workdir(config)

  if FLAGS.mode != 'train' and not os.path.isdir(workdir):
    sys.exit(f'error: --workdir={workdir}: no such folder (train a model there first)')
  if FLAGS.mode in ('translate', 'backtranslate') and config.task != 'translation':
    sys.exit(f'error: --mode={FLAGS.mode}: the task is {config.task!r}; it needs a '
             'translation model' + ('; use --mode=predict' if FLAGS.mode == 'translate' else ''))
  if FLAGS.mode == 'backtranslate':
    if not FLAGS.input or not FLAGS.output:
      sys.exit('error: --mode=backtranslate needs --input=FILE[,FILE...] (monolingual text of '
               'the target language, globs allowed) and --output=FILE (the synthetic pairs)')
    for pattern in (p.strip() for p in FLAGS.input.split(',') if p.strip()):
      if not glob.glob(os.path.expanduser(pattern)):
        sys.exit(f'error: --input: {pattern}: no such file')
  if (config.get('dataset_name', 'text') in ('multi30k', 'text') and config.data_dir
      and not os.path.isdir(config.data_dir)):
    hint = (f' (or set ${SHARED_DATA_ENV} to the folder holding sst2/ and germeval2014/)'
            if config.task != 'translation' else
            ' (a relative path counts from the current folder; set $TRANSFORMER_JAX_DATA_DIR '
            f'to the folder of the raw Multi30k files, or ${SHARED_DATA_ENV} to the folder '
            "holding multi30k/; '' downloads them)")
    sys.exit(f'error: config.data_dir={config.data_dir!r}: no such folder{hint}')
  if FLAGS.mode in ('merge', 'export') and not FLAGS.output:
    sys.exit(f'error: --mode={FLAGS.mode} needs --output=DIR, the folder to write')
  print(f'workdir: {os.path.abspath(workdir)}', file=sys.stderr)
  if FLAGS.mode == 'plot':  # Reads event files only: no model, no devices.
    console.import_tensorflow_quietly()  # TensorBoard's event reader uses it when installed.
    from transformer_jax import plots  # pylint: disable=g-import-not-at-top
    try:
      plots.run_plot([workdir, *FLAGS.compare], FLAGS.output or os.path.join(workdir, 'plots'))
    except FileNotFoundError as e:
      sys.exit(f'error: {e}')
    return
  if FLAGS.input and FLAGS.mode != 'backtranslate' and not os.path.isfile(FLAGS.input):
    sys.exit(f'error: --input={FLAGS.input}: no such file')
  # The console shows warnings and errors (train mode sends INFO to train.log), also while
  # JAX looks for its backends (an INFO line per platform it does not find).
  import logging as py_logging  # pylint: disable=g-import-not-at-top
  from absl import logging  # pylint: disable=g-import-not-at-top
  logging.get_absl_handler().setLevel(py_logging.WARNING)
  # Several processes (config.coordinator_address, ..., or a launcher's environment):
  # jax.distributed starts before anything uses a device.
  try:
    multihost.initialize(config)
  except config_schema.ConfigError as e:
    sys.exit(f'error: {e}')

  # pylint: disable=g-import-not-at-top
  console.import_tensorflow_quietly()
  from transformer_jax import evaluation, hf_import, multi30k, train, translate
  if FLAGS.mode != 'train':
    logging.set_verbosity(logging.WARNING)  # Keep stdout/stderr to results and problems.
  try:
    if FLAGS.mode == 'train':
      train.train_and_evaluate(config, workdir)
    elif FLAGS.mode == 'eval':
      evaluation.run_eval(config, workdir, FLAGS.split or config.test_split, FLAGS.checkpoint)
    elif FLAGS.mode == 'merge':
      evaluation.run_merge(config, workdir, FLAGS.output, FLAGS.checkpoint)
    elif FLAGS.mode == 'export':
      from transformer_jax import export
      export.run_export(config, workdir, FLAGS.output, FLAGS.checkpoint)
    elif FLAGS.mode == 'backtranslate':
      from transformer_jax import backtranslation
      backtranslation.run_backtranslate(config, workdir, FLAGS.input, FLAGS.output,
                                        FLAGS.checkpoint)
    else:
      translate.INPUT_NAME = f'--input={FLAGS.input}' if FLAGS.input else 'stdin'
      with contextlib.ExitStack() as files:
        source, target = _text_streams(files, FLAGS.input, FLAGS.output)
        if not evaluation.run_predict(config, workdir, source, target, FLAGS.checkpoint):
          print(f'Note: {translate.INPUT_NAME} holds no lines: nothing to predict',
                file=sys.stderr)
  except UnicodeDecodeError as e:  # Input lines are read as UTF-8.
    source = f'--input={FLAGS.input}' if FLAGS.input else 'stdin'
    sys.exit(f'error: {source if FLAGS.mode in ("predict", "translate") else "a file"}: not '
             f'UTF-8 text ({e.reason} at byte {e.start} of a read block)')
  except (config_schema.ConfigError, multi30k.DataError, hf_import.HFImportError,
          FileNotFoundError, FileExistsError) as e:
    sys.exit(f'error: {e}')
  except KeyboardInterrupt:
    if FLAGS.mode == 'train':
      print(f'interrupted: rerun with --workdir={workdir} to resume from its latest '
            'checkpoint', file=sys.stderr)
    elif FLAGS.mode == 'backtranslate':
      print(f'interrupted: rerun the same command to continue {FLAGS.output} after its last '
            'complete line', file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    # Checkpoints are complete (train waits for them). Skip the interpreter's teardown:
    # tf.data and XLA threads still running can hang or crash it.
    os._exit(130)


def run() -> None:
  """The command line (`python -m transformer_jax.main`, or the `transformer-jax` script
  of an installed package)."""
  # Huge pages for malloc: 10-20% faster CPU train steps (transformer_jax/hugepages.py).
  hugepages.reexec_with_huge_pages([sys.executable, '-m', 'transformer_jax.main', *sys.argv[1:]])
  app.run(main, flags_parser=parse_flags)


if __name__ == '__main__':
  run()
