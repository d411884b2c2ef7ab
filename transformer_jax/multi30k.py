"""Multi30k task 1 (parallel image captions) as a TensorFlow Datasets builder.

Source: Elliott et al. (2016), "Multi30K: Multilingual English-German Image
Descriptions"; French and Czech from Elliott et al. (2017) and Barrault et al.
(2018). Public repository: https://github.com/multi30k/dataset

Raw files are gzipped (or plain) UTF-8 text, one sentence per line; line i of
`{split}.en.gz` translates line i of `{split}.de.gz`.
"""

import contextlib
import dataclasses
import gzip
import itertools
import os
from collections.abc import Iterator

from absl import logging
from etils import epath
import tensorflow as tf
import tensorflow_datasets as tfds

_BASE_URL = (
    "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
)
# Languages paired with English ('{lang}-en' configs).
LANGUAGES = ("cs", "de", "fr")
# tfds split name -> raw file prefix.
SPLIT_PREFIXES = {
    "train": "train",
    "validation": "val",
    "test_2016": "test_2016_flickr",
}
SPLITS = tuple(SPLIT_PREFIXES)
_CITATION = """\
@inproceedings{elliott-etal-2016-multi30k,
  title = {Multi30K: Multilingual English-German Image Descriptions},
  author = {Elliott, Desmond and Frank, Stella and Sima'an, Khalil and
            Specia, Lucia},
  booktitle = {Proceedings of the 5th Workshop on Vision and Language},
  year = {2016},
  pages = {70--74},
}
"""


class DataError(ValueError):
  """Bad Multi30k input: a missing file, invalid UTF-8, or unaligned files.

  The message always names the file by its full path and, where it applies,
  the 1-based line number (`/path/train.de.gz:17: ...`). Data: Multi30K
  (Elliott et al., 2016).
  """


def find_file(data_dir: str, prefix: str, lang: str) -> str:
  """Returns the path of the raw Multi30K (Elliott et al., 2016) file.

  Args:
    data_dir: directory holding the raw files.
    prefix: file prefix, e.g. 'train', 'val' or 'test_2016_flickr'.
    lang: language code, e.g. 'de'.

  Returns:
    `{data_dir}/{prefix}.{lang}.gz` if it exists, else `{data_dir}/{prefix}.{lang}`.

  Raises:
    DataError: neither file exists; the message names both paths tried.
  """
  plain = os.path.join(data_dir, f"{prefix}.{lang}")
  candidates = (plain + ".gz", plain)
  for path in candidates:
    if os.path.isfile(path):
      return path
  raise DataError(f"no such file: tried {candidates[0]} and {candidates[1]}")


def _read_lines(path: str, strip: bool = True) -> Iterator[tuple[int, str]]:
  """Yields (1-based line number, line) from a text or .gz file: stripped of surrounding
  whitespace, or with `strip=False` only of its line break (TSV rows keep empty fields)."""
  opener = gzip.open if path.endswith(".gz") else open
  try:
    f = opener(path, "rb")
  except FileNotFoundError:
    raise DataError(f"{path}: no such file") from None
  except OSError as e:
    raise DataError(f"{path}: cannot open ({e})") from e
  with f:
    lineno = 0
    try:
      for lineno, raw in enumerate(f, start=1):
        try:
          line = raw.decode("utf-8")
        except UnicodeDecodeError as e:
          raise DataError(f"{path}:{lineno}: invalid UTF-8 ({e})") from e
        yield lineno, line.strip() if strip else line.rstrip('\r\n')
    except (OSError, EOFError) as e:  # e.g. a corrupt or truncated gzip file
      raise DataError(f"{path}:{lineno + 1}: cannot read ({e})") from e


def _read_numbered(
    source_path: str, target_path: str, stats: dict | None
) -> Iterator[tuple[int, str, str]]:
  """Like `read_parallel`, but yields (1-based line number, source, target)."""
  stats = {} if stats is None else stats
  stats["pairs"] = stats["skipped_empty"] = 0
  sources, targets = _read_lines(source_path), _read_lines(target_path)
  for src, tgt in itertools.zip_longest(sources, targets):
    if src is None or tgt is None:
      lineno = (src or tgt)[0]
      total = lineno + sum(1 for _ in (targets if src is None else sources))
      n_src, n_tgt = (lineno - 1, total) if src is None else (total, lineno - 1)
      raise DataError(
          f"line counts differ: {source_path} has {n_src} lines, "
          f"{target_path} has {n_tgt} lines"
      )
    (lineno, src_text), (_, tgt_text) = src, tgt
    if not src_text or not tgt_text:
      stats["skipped_empty"] += 1
      continue
    stats["pairs"] += 1
    yield lineno, src_text, tgt_text
  if stats["skipped_empty"]:
    logging.info(
        "Skipped %d pairs with an empty side in %s / %s",
        stats["skipped_empty"], source_path, target_path,
    )


def read_parallel(
    source_path: str, target_path: str, stats: dict | None = None
) -> Iterator[tuple[str, str]]:
  """Streams aligned (source, target) sentence pairs from two raw files.

  Files ending in `.gz` are read as gzip, others as plain text; lines are
  decoded as strict UTF-8 and stripped of surrounding whitespace. Pairs where
  either side is empty are skipped. Written for Multi30K (Elliott et al.,
  2016) but works for any line-aligned parallel text.

  Args:
    source_path: path of the source-language file.
    target_path: path of the target-language file, line-aligned with it.
    stats: optional dict, filled in as the iterator advances with
      `'pairs'` (pairs yielded) and `'skipped_empty'` (pairs skipped). The
      skipped count is also logged once at the end, when non-zero.

  Yields:
    (source, target) string pairs, in file order.

  Raises:
    DataError: a file is missing or unreadable (message names it), a line is
      not valid UTF-8 (`path:line: invalid UTF-8 (...)`), or the files have
      different line counts (message names both files and both counts).
  """
  for _, src, tgt in _read_numbered(source_path, target_path, stats):
    yield src, tgt


@dataclasses.dataclass(eq=False)
class Multi30kConfig(tfds.core.BuilderConfig):
  """Multi30K (Elliott et al., 2016) language pair, e.g. source='de', target='en'.

  Attributes:
    source: source language code (str).
    target: target language code (str).
  """

  source: str = ""
  target: str = ""


class Multi30k(tfds.core.GeneratorBasedBuilder):
  """TFDS builder for Multi30K task 1 (Elliott et al., 2016).

  Configs 'cs-en', 'de-en', 'fr-en'; splits 'train' (29,000 pairs),
  'validation' (1,014) and 'test_2016' (1,000, the Flickr 2016 test set).
  Examples are `{source: str, target: str}` in file order; keys are 0-based
  line indices.

  Raw files come from `DownloadConfig(manual_dir=...)` when that directory is
  non-empty, else they are downloaded from the public Multi30k repository.
  `download_and_prepare` raises `DataError` on bad raw input (see
  `read_parallel`) or when a file is missing from a non-empty manual_dir.
  """

  # tfds 4.9.10 infers this path via `importlib_resources`, a package it does
  # not install on Python >= 3.9; giving the path directly avoids the import.
  code_path = epath.Path(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Initial release."}
  BUILDER_CONFIGS = [
      Multi30kConfig(
          name=f"{lang}-en",
          description=f"Multi30k task 1, {lang} to en.",
          source=lang,
          target="en",
      )
      for lang in LANGUAGES
  ]
  MANUAL_DOWNLOAD_INSTRUCTIONS = """\
  Optional: put the raw files {train,val,test_2016_flickr}.{en,de,fr,cs}.gz
  (or uncompressed, without .gz) in manual_dir to avoid downloading them.
  """

  def _info(self) -> tfds.core.DatasetInfo:
    languages = (self.builder_config.source, self.builder_config.target)
    return tfds.core.DatasetInfo(
        builder=self,
        description="Multi30k task 1: parallel Flickr30k image captions.",
        features=tfds.features.Translation(languages=languages),
        supervised_keys=languages,
        homepage="https://github.com/multi30k/dataset",
        citation=_CITATION,
        # Keep file order (and so line order) in the prepared data.
        disable_shuffling=True,
    )

  # TFDS prints these two to stdout ("Downloading and preparing dataset Unknown size
  # ...", "Dataset multi30k downloaded and prepared to ..."); they go to the log instead.
  def _log_download_bytes(self) -> None:
    logging.info("Preparing Multi30k %s in %s", self.builder_config.name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("Prepared Multi30k %s in %s", self.builder_config.name, self.data_dir)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    languages = (self.builder_config.source, self.builder_config.target)
    try:
      manual_dir = os.fspath(dl_manager.manual_dir)
    except AssertionError:  # tfds: manual_dir is missing or empty.
      manual_dir = None
    if manual_dir:
      paths = {
          split: [find_file(manual_dir, prefix, lang) for lang in languages]
          for split, prefix in SPLIT_PREFIXES.items()
      }
    else:
      urls = {
          split: [f"{_BASE_URL}{prefix}.{lang}.gz" for lang in languages]
          for split, prefix in SPLIT_PREFIXES.items()
      }
      paths = {
          split: [os.fspath(p) for p in split_paths]
          for split, split_paths in dl_manager.download(urls).items()
      }
    return {
        split: self._generate_examples(source_path, target_path)
        for split, (source_path, target_path) in paths.items()
    }

  def _generate_examples(self, source_path: str, target_path: str):
    source, target = self.builder_config.source, self.builder_config.target
    for lineno, src, tgt in _read_numbered(source_path, target_path, None):
      yield lineno - 1, {source: src, target: tgt}


@contextlib.contextmanager
def _no_progress_bars():
  """TFDS's progress bars off for the block, then as they were."""
  tqdm_utils = tfds.core.utils.tqdm_utils
  shown = getattr(tqdm_utils, "_active", True)
  tfds.disable_progress_bar()
  try:
    yield
  finally:
    tfds.display_progress_bar(shown)


def load_split(
    data_dir: str, pair: str, split: str, tfds_dir: str
) -> tf.data.Dataset:
  """Prepares (once) and loads one split of Multi30K (Elliott et al., 2016).

  Builds `Multi30k(config=pair, data_dir=tfds_dir)` from the raw files in
  `data_dir` (downloaded instead when `data_dir` is missing or empty) and
  writes the prepared data under `{tfds_dir}/multi30k/{pair}/1.0.0/`; later
  calls with the same `tfds_dir` reuse it without reading `data_dir`.

  Args:
    data_dir: directory with the raw files, e.g. `train.de.gz`.
    pair: 'cs-en', 'de-en' or 'fr-en'.
    split: 'train', 'validation', 'test_2016' or a tfds sub-split such as
      'train[:10%]'.
    tfds_dir: directory for the prepared TFDS data.

  Returns:
    A `tf.data.Dataset` of `{source: tf.string, target: tf.string}` dicts, in
    file order.

  Raises:
    DataError: `data_dir` is not a folder, a raw file is missing from a
      non-empty `data_dir`, a raw file is bad (see `read_parallel`; the original
      exception, unwrapped), or the download failed.
  """
  if data_dir and not os.path.isdir(data_dir):
    raise DataError(f'{data_dir}: no such folder (the Multi30k data_dir)')
  builder = Multi30k(config=pair, data_dir=tfds_dir)
  try:
    with _no_progress_bars():  # Seconds of work: TFDS's bars would be console noise.
      builder.download_and_prepare(
          download_config=tfds.download.DownloadConfig(manual_dir=data_dir)
      )
  except (OSError, tfds.download.DownloadError) as e:
    if data_dir:
      raise
    raise DataError(
        f'could not download Multi30k from {_BASE_URL} ({type(e).__name__}); put the raw '
        'files in a folder and set TRANSFORMER_JAX_DATA_DIR or --config.data_dir'
    ) from e
  return builder.as_dataset(split=split)
