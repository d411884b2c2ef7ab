"""Tests for transformer_jax.multi30k on the real Multi30k files and bad input."""

import gzip
import logging
import os
import pathlib

import pytest
import tensorflow_datasets as tfds

from transformer_jax import multi30k

DATA_DIR = os.environ.get(
    "TRANSFORMER_JAX_DATA_DIR",
    str(pathlib.Path(__file__).resolve().parents[1].parent
        / "shared" / "data" / "multi30k"),
)
RAW_PREFIXES = ("train", "val", "test_2016_flickr")


def _first_line(path):
  with gzip.open(path, "rt", encoding="utf-8") as f:
    return f.readline().strip()


def _count(ds):
  return int(ds.reduce(0, lambda n, _: n + 1))


def _write_raw_dir(directory, lines_by_file):
  """Writes small plain-text de/en raw files; `lines_by_file` overrides some."""
  directory.mkdir(exist_ok=True)
  for prefix in RAW_PREFIXES:
    for lang in ("de", "en"):
      name = f"{prefix}.{lang}"
      content = lines_by_file.get(name, f"{prefix} {lang} 1\n{prefix} {lang} 2\n")
      (directory / name).write_bytes(
          content if isinstance(content, bytes) else content.encode())
  return directory


@pytest.fixture(scope="module")
def real_tfds_dir(tmp_path_factory):
  assert os.path.isdir(DATA_DIR), f"Multi30k data not found at {DATA_DIR}"
  tfds_dir = str(tmp_path_factory.mktemp("tfds"))
  multi30k.load_split(DATA_DIR, "de-en", "validation", tfds_dir)
  return tfds_dir


# Real data.


def test_builder_split_sizes_on_real_data(real_tfds_dir):
  builder = multi30k.Multi30k(config="de-en", data_dir=real_tfds_dir)
  expected = {"train": 29_000, "validation": 1_014, "test_2016": 1_000}
  assert {k: v.num_examples for k, v in builder.info.splits.items()} == expected
  for split, n in expected.items():
    assert _count(builder.as_dataset(split=split)) == n


def test_first_validation_example_matches_raw_files(real_tfds_dir):
  ds = multi30k.load_split(DATA_DIR, "de-en", "validation", real_tfds_dir)
  first = next(iter(ds.as_numpy_iterator()))
  assert first["de"].decode() == _first_line(os.path.join(DATA_DIR, "val.de.gz"))
  assert first["en"].decode() == _first_line(os.path.join(DATA_DIR, "val.en.gz"))
  assert first["en"].decode() == "A group of men are loading cotton onto a truck"


def test_load_split_reuses_prepared_data(real_tfds_dir, tmp_path):
  # Raw files that would fail to prepare: success proves they were not read.
  unused = _write_raw_dir(tmp_path / "raw", {"train.de": b"\xff\n\n"})
  ds = multi30k.load_split(str(unused), "de-en", "test_2016", real_tfds_dir)
  assert _count(ds) == 1_000


def test_read_parallel_real_validation_file():
  stats = {}
  pairs = list(multi30k.read_parallel(
      multi30k.find_file(DATA_DIR, "val", "de"),
      multi30k.find_file(DATA_DIR, "val", "en"), stats))
  assert stats == {"pairs": 1_014, "skipped_empty": 0}
  assert pairs[0][1] == "A group of men are loading cotton onto a truck"


def test_dataset_name_is_multi30k():
  assert multi30k.Multi30k.name == "multi30k"
  assert [c.name for c in multi30k.Multi30k.BUILDER_CONFIGS] == [
      "cs-en", "de-en", "fr-en"]
  assert tfds.builder_cls("multi30k") is multi30k.Multi30k


# find_file and read_parallel on small files.


def test_find_file_prefers_gz_then_plain(tmp_path):
  (tmp_path / "val.de").write_text("x\n")
  assert multi30k.find_file(str(tmp_path), "val", "de") == str(tmp_path / "val.de")
  with gzip.open(tmp_path / "val.de.gz", "wt") as f:
    f.write("x\n")
  assert multi30k.find_file(str(tmp_path), "val", "de") == str(
      tmp_path / "val.de.gz")


def test_find_file_missing_names_both_candidates(tmp_path):
  with pytest.raises(multi30k.DataError) as e:
    multi30k.find_file(str(tmp_path), "val", "fr")
  plain = tmp_path / "val.fr"
  assert str(e.value) == f"no such file: tried {plain}.gz and {plain}"


def test_read_parallel_strips_and_reads_gzip(tmp_path):
  src = tmp_path / "a.de.gz"
  with gzip.open(src, "wb") as f:
    f.write("  Ein Hund.\r\nZwei Männer\n".encode())
  tgt = tmp_path / "a.en"
  tgt.write_text("A dog. \nTwo men\n", encoding="utf-8")
  assert list(multi30k.read_parallel(str(src), str(tgt))) == [
      ("Ein Hund.", "A dog."), ("Zwei Männer", "Two men")]


def test_read_parallel_missing_file(tmp_path):
  src = tmp_path / "a.de"
  src.write_text("x\n")
  missing = str(tmp_path / "nope.en.gz")
  with pytest.raises(multi30k.DataError, match="no such file") as e:
    list(multi30k.read_parallel(str(src), missing))
  assert missing in str(e.value)


def test_read_parallel_invalid_utf8_names_file_and_line(tmp_path):
  src = tmp_path / "a.de.gz"
  with gzip.open(src, "wb") as f:
    f.write(b"eins\nzwei\ndr\xc3ei\nvier\n")
  tgt = tmp_path / "a.en"
  tgt.write_text("one\ntwo\nthree\nfour\n")
  with pytest.raises(multi30k.DataError) as e:
    list(multi30k.read_parallel(str(src), str(tgt)))
  assert f"{src}:3: invalid UTF-8" in str(e.value)


@pytest.mark.parametrize("n_src,n_tgt", [(3, 5), (5, 3)])
def test_read_parallel_line_count_mismatch(tmp_path, n_src, n_tgt):
  src, tgt = tmp_path / "a.de", tmp_path / "a.en"
  src.write_text("s\n" * n_src)
  tgt.write_text("t\n" * n_tgt)
  with pytest.raises(multi30k.DataError) as e:
    list(multi30k.read_parallel(str(src), str(tgt)))
  message = str(e.value)
  assert f"{src} has {n_src} lines" in message
  assert f"{tgt} has {n_tgt} lines" in message


def test_read_parallel_skips_and_counts_empty_pairs(tmp_path, caplog):
  src, tgt = tmp_path / "a.de", tmp_path / "a.en"
  src.write_text("eins\n\n  \ndrei\nvier\n")
  tgt.write_text("one\ntwo\nthree\n\t\nfour\n")
  stats = {}
  caplog.set_level(logging.INFO)
  pairs = list(multi30k.read_parallel(str(src), str(tgt), stats))
  assert pairs == [("eins", "one"), ("vier", "four")]
  assert stats == {"pairs": 2, "skipped_empty": 3}
  skip_logs = [r.getMessage() for r in caplog.records if "Skipped" in r.getMessage()]
  assert len(skip_logs) == 1
  assert "3" in skip_logs[0] and str(src) in skip_logs[0] and str(tgt) in skip_logs[0]


# The builder on bad raw files.


def test_builder_bad_manual_dir_raises_data_error_with_line(tmp_path):
  raw = _write_raw_dir(tmp_path / "raw", {"train.de": b"ok\nok\nbad \xff\n"})
  with pytest.raises(multi30k.DataError) as e:
    multi30k.load_split(str(raw), "de-en", "train", str(tmp_path / "tfds"))
  assert f"{raw / 'train.de'}:3: invalid UTF-8" in str(e.value)


def test_builder_manual_dir_missing_file(tmp_path):
  raw = _write_raw_dir(tmp_path / "raw", {})
  (raw / "val.en").unlink()
  with pytest.raises(multi30k.DataError) as e:
    multi30k.load_split(str(raw), "de-en", "train", str(tmp_path / "tfds"))
  assert str(raw / "val.en.gz") in str(e.value)


def test_load_split_downloads_when_data_dir_is_empty(tmp_path, monkeypatch):
  """Without raw files, the builder downloads the {prefix}.{lang}.gz urls."""
  requested = []

  def fake_download(self, urls):
    del self
    paths = {}
    for split, split_urls in urls.items():
      paths[split] = []
      for url in split_urls:
        requested.append(url)
        path = tmp_path / url.rsplit("/", 1)[1]
        with gzip.open(path, "wt", encoding="utf-8") as f:
          f.write(f"{path.name} 1\n{path.name} 2\n")
        paths[split].append(path)
    return paths

  monkeypatch.setattr(tfds.download.DownloadManager, "download", fake_download)
  (tmp_path / "empty").mkdir()
  ds = multi30k.load_split(
      str(tmp_path / "empty"), "fr-en", "test_2016", str(tmp_path / "tfds"))
  base = "https://raw.githubusercontent.com/multi30k/dataset/master/data/task1/raw/"
  assert sorted(requested) == sorted(
      f"{base}{prefix}.{lang}.gz" for prefix in RAW_PREFIXES for lang in ("fr", "en"))
  assert list(ds.as_numpy_iterator()) == [
      {"fr": b"test_2016_flickr.fr.gz 1", "en": b"test_2016_flickr.en.gz 1"},
      {"fr": b"test_2016_flickr.fr.gz 2", "en": b"test_2016_flickr.en.gz 2"},
  ]
