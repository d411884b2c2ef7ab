"""Tests for transformer_jax.readers on the real SST-2 and GermEval 2014 files and bad input."""

import gzip
import logging
import os
import pathlib

import pytest

from transformer_jax import readers
from transformer_jax.multi30k import DataError

SHARED_DATA = os.environ.get(
    "TRANSFORMER_JAX_SHARED_DATA",
    str(pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"),
)
SST2 = os.path.join(SHARED_DATA, "sst2")
GERMEVAL = os.path.join(SHARED_DATA, "germeval2014")
L = readers.GERMEVAL_LABELS


def _write(tmp_path, name, content):
  path = tmp_path / name
  data = content if isinstance(content, bytes) else content.encode("utf-8")
  if name.endswith(".gz"):
    data = gzip.compress(data)
  path.write_bytes(data)
  return str(path)


def _raises(fn, *args, match, **kwargs):
  with pytest.raises(DataError) as info:
    fn(*args, **kwargs)
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(match), message
  return message


# Real data.


def test_real_sst2_validation():
  path = os.path.join(SST2, "validation.tsv.gz")
  assert os.path.exists(path), f"SST-2 not found at {path}; set TRANSFORMER_JAX_SHARED_DATA"
  texts, labels, skipped = readers.read_tsv(path, "sentence", "label", ["0", "1"])
  assert (len(texts), len(labels), skipped) == (872, 872, 0)
  assert labels.count(1) == 444 and labels.count(0) == 428
  assert all(isinstance(y, int) for y in labels)
  assert not any(t.endswith(" ") or t.startswith(" ") or not t for t in texts)
  with gzip.open(path, "rt", encoding="utf-8") as f:
    f.readline()
    first_text, first_label = f.readline().rstrip("\n").split("\t")
  assert texts[0] == first_text[:-1] and first_text.endswith(" ")
  assert labels[0] == int(first_label)


def test_real_sst2_as_regression_gives_floats():
  path = os.path.join(SST2, "validation.tsv.gz")
  _, labels, _ = readers.read_tsv(path, "sentence", "label", None)
  assert all(isinstance(y, float) for y in labels) and sum(labels) == 444.0


@pytest.mark.parametrize("split, sentences, tokens, outer, inner", [
    ("validation", 2_200, 41_653, 2_674, 212),
    ("test", 5_100, 96_499, 6_178, 515),
])
def test_real_germeval(split, sentences, tokens, outer, inner):
  path = os.path.join(GERMEVAL, f"{split}.conll.gz")
  assert os.path.exists(path), f"GermEval not found at {path}; set TRANSFORMER_JAX_SHARED_DATA"
  expected_stats = {"sentences": sentences, "tokens": tokens, "docstart_lines": 0,
                    "comment_lines": 0, "iob_repairs": 0}
  for column, entities in ((1, outer), (2, inner)):
    words, tags, stats = readers.read_conll(path, column, L)
    assert stats == expected_stats
    assert len(words) == len(tags) == sentences
    assert sum(map(len, words)) == sum(map(len, tags)) == tokens
    assert [len(w) for w in words] == [len(t) for t in tags]
    # IOB2 without violations: one B- per entity; counts from the data README.
    assert sum(L[i].startswith("B-") for s in tags for i in s) == entities
  with gzip.open(path, "rt", encoding="utf-8") as f:
    token, outer_tag, _ = f.readline().rstrip("\n").split("\t")
  assert words[0][0] == token and L[tags[0][0]] == outer_tag


def test_germeval_labels():
  assert len(L) == len(set(L)) == 25
  assert L[:5] == ["O", "B-PER", "I-PER", "B-LOC", "I-LOC"]
  assert L[-2:] == ["B-OTHpart", "I-OTHpart"]
  assert all(f"{p}-{t}" in L for t in ("PERderiv", "ORGpart") for p in "BI")


# read_tsv on small files.


def test_read_tsv_plain_gz_columns_and_skips(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  content = "id\tlabel\tsentence\n1\tpos\t  good film \n2\tneg\t \n3\tneg\tbad\textra\n\n"
  for name in ("a.tsv", "a.tsv.gz"):
    path = _write(tmp_path, name, content)
    assert readers.read_tsv(path, "sentence", "label", ["neg", "pos"]) == (
        ["good film", "bad"], [1, 0], 2)
    logs = [r.getMessage() for r in caplog.records if "empty text" in r.getMessage()]
    assert logs[-1] == f"Read 2 rows from {path}; skipped 2 with empty text"


def test_read_tsv_leading_empty_text_is_skipped(tmp_path):
  path = _write(tmp_path, "a.tsv", "sentence\tlabel\n\t1\nok \t0\n")
  assert readers.read_tsv(path, "sentence", "label", ["0", "1"]) == (["ok"], [0], 1)


def test_read_tsv_regression(tmp_path):
  path = _write(tmp_path, "a.tsv", "sentence\tscore\na\t0.5\nb\t-2\nc\t3e-1\n")
  assert readers.read_tsv(path, "sentence", "score", None) == (["a", "b", "c"],
                                                               [0.5, -2.0, 0.3], 0)


def test_read_tsv_errors(tmp_path):
  missing = str(tmp_path / "missing.tsv")
  _raises(readers.read_tsv, missing, "s", "l", None, match=f"{missing}: no such file")
  empty = _write(tmp_path, "empty.tsv", "")
  _raises(readers.read_tsv, empty, "s", "l", None, match=f"{empty}: empty file (no header line)")
  header_only = _write(tmp_path, "header.tsv", "sentence\tlabel\n")
  _raises(readers.read_tsv, header_only, "sentence", "label", None,
          match=f"{header_only}:1: no data rows after the header")
  all_empty = _write(tmp_path, "allempty.tsv", "sentence\tlabel\n \t1\n\t0\n")
  _raises(readers.read_tsv, all_empty, "sentence", "label", ["0", "1"],
          match=f"{all_empty}:3: all 2 rows have empty text after the header")
  path = _write(tmp_path, "a.tsv", "sentence\tlabel\ngood\t1\nbad\n")
  message = _raises(readers.read_tsv, path, "text", "label", ["0", "1"],
                    match=f"{path}:1: header has no column 'text'")
  assert "['sentence', 'label']" in message
  _raises(readers.read_tsv, path, "sentence", "label", ["0", "1"],
          match=f"{path}:3: row has 1 tab-separated columns, needs at least 2")
  path = _write(tmp_path, "b.tsv", "sentence\tlabel\ngood\t1\nbad\t2\n")
  message = _raises(readers.read_tsv, path, "sentence", "label", ["0", "1"],
                    match=f"{path}:3: unknown label '2'")
  assert "allowed: ['0', '1']" in message
  path = _write(tmp_path, "c.tsv", "sentence\tlabel\ngood\t1.5\nbad\tx\n")
  _raises(readers.read_tsv, path, "sentence", "label", None,
          match=f"{path}:3: regression label 'x' is not a finite number")
  path = _write(tmp_path, "d.tsv", "sentence\tlabel\ngood\tnan\n")
  _raises(readers.read_tsv, path, "sentence", "label", None,
          match=f"{path}:2: regression label 'nan' is not a finite number")
  path = _write(tmp_path, "e.tsv.gz", b"sentence\tlabel\ngood\t1\nb\xffd\t0\n")
  _raises(readers.read_tsv, path, "sentence", "label", ["0", "1"],
          match=f"{path}:3: invalid UTF-8")
  with pytest.raises(ValueError, match="duplicates"):
    readers.read_tsv(path, "sentence", "label", ["0", "0"])


# read_conll on small files.


def _tag_names(tags):
  return [[L[i] for i in s] for s in tags]


def test_read_conll_separators_blank_lines_and_skips(tmp_path):
  content = ("-DOCSTART- -X- O O\n\n\n# a comment\nHans\tB-PER\tO\nMüller\tI-PER\tO\n"
             "lebt\tO\tO\n\n\n\nin O O\nBerlin  B-LOC O\n# another\n-DOCSTART-\n  \n"
             "sie\tO\tO")  # Whitespace-separated lines; no blank line at the end.
  for name in ("a.conll", "a.conll.gz"):
    path = _write(tmp_path, name, content)
    words, tags, stats = readers.read_conll(path, 1, L)
    assert words == [["Hans", "Müller", "lebt"], ["in", "Berlin"], ["sie"]]
    assert _tag_names(tags) == [["B-PER", "I-PER", "O"], ["O", "B-LOC"], ["O"]]
    assert stats == {"sentences": 3, "tokens": 6, "docstart_lines": 2, "comment_lines": 2,
                     "iob_repairs": 0}


def test_read_conll_other_label_list_and_column(tmp_path):
  path = _write(tmp_path, "a.conll", "a\tx\tB-X\nb\tx\tI-X\n\nc\tx\tO\n")
  words, tags, _ = readers.read_conll(path, 2, ["B-X", "I-X", "O"])
  assert (words, tags) == ([["a", "b"], ["c"]], [[0, 1], [2]])


def test_read_conll_repair_iob(tmp_path, caplog):
  caplog.set_level(logging.INFO)
  content = ("I-PER\tI-PER\nx\tI-PER\ny\tO\nz\tI-LOC\nw\tI-LOC\n\n"
             "a\tB-ORG\nb\tI-PER\nc\tI-PER\nd\tB-PER\ne\tI-PER\n")
  path = _write(tmp_path, "a.conll", content)
  words, tags, stats = readers.read_conll(path, 1, L, repair_iob=True)
  assert words == [["I-PER", "x", "y", "z", "w"], ["a", "b", "c", "d", "e"]]
  assert _tag_names(tags) == [["B-PER", "I-PER", "O", "B-LOC", "I-LOC"],
                              ["B-ORG", "B-PER", "I-PER", "B-PER", "I-PER"]]
  assert stats["iob_repairs"] == 3 and stats["tokens"] == 10
  logs = [r.getMessage() for r in caplog.records if "Repaired" in r.getMessage()]
  assert logs == [f"Repaired 3 IOB2 violations (I-X starting an entity -> B-X) in {path}"]


@pytest.mark.parametrize("content, line, where", [
    ("a\tI-PER\n", 1, "at the start of a sentence"),
    ("a\tB-PER\n\nb\tI-PER\n", 3, "at the start of a sentence"),
    ("a\tO\nb\tI-LOC\n", 2, "after O"),
    ("a\tB-PER\nb\tI-PER\nc\tI-LOC\n", 3, "after I-PER"),
    ("a\tB-PERderiv\nb\tI-PER\n", 2, "after B-PERderiv"),
])
def test_read_conll_iob_violation(tmp_path, content, line, where):
  path = _write(tmp_path, "a.conll", content)
  tag = content.splitlines()[line - 1].split("\t")[1]
  fixed = "B-" + tag[2:]
  message = _raises(readers.read_conll, path, 1, L,
                    match=f"{path}:{line}: IOB2 violation: {tag} starts an entity ({where})")
  assert f"set config.repair_iob=True to rewrite it as {fixed}" in message


def test_read_conll_repair_needs_the_b_label(tmp_path):
  path = _write(tmp_path, "a.conll", "a\tO\nb\tI-X\n")
  _raises(readers.read_conll, path, 1, ["O", "I-X"], repair_iob=True,
          match=f"{path}:2: cannot repair I-X (after O): 'B-X' is not a label")


def test_read_conll_errors(tmp_path):
  missing = str(tmp_path / "missing.conll.gz")
  _raises(readers.read_conll, missing, 1, L, match=f"{missing}: no such file")
  empty = _write(tmp_path, "empty.conll", "")
  _raises(readers.read_conll, empty, 1, L, match=f"{empty}: empty file (no sentence)")
  blank = _write(tmp_path, "blank.conll", "\n-DOCSTART- -X- O\n\n# c\n\n")
  _raises(readers.read_conll, blank, 1, L,
          match=f"{blank}:5: no sentence (only blank, comment or -DOCSTART- lines)")
  path = _write(tmp_path, "a.conll", "a\tO\tO\nb\tO\n")
  _raises(readers.read_conll, path, 2, L,
          match=f"{path}:2: line has 2 columns, needs at least 3 for tag_column=2")
  path = _write(tmp_path, "b.conll", "a\tO\n\nb\tB-MISC\n")
  _raises(readers.read_conll, path, 1, L, match=f"{path}:3: unknown tag 'B-MISC'")
  path = _write(tmp_path, "c.conll.gz", b"a\tO\n\xc3\tO\n")
  _raises(readers.read_conll, path, 1, L, match=f"{path}:2: invalid UTF-8")
  with pytest.raises(ValueError, match="tag_column must be >= 0"):
    readers.read_conll(path, -1, L)


# read_labels_file.


def test_read_labels_file(tmp_path):
  path = _write(tmp_path, "labels.txt", "\n".join(L) + "\n\n")
  assert readers.read_labels_file(path) == L
  path = _write(tmp_path, "small.txt.gz", "O\n\n  B-X \nI-X")
  assert readers.read_labels_file(path) == ["O", "B-X", "I-X"]


def test_read_labels_file_errors(tmp_path):
  path = _write(tmp_path, "dup.txt", "O\nB-X\n\nI-X\nB-X\n")
  _raises(readers.read_labels_file, path,
          match=f"{path}:5: duplicate label 'B-X' (first on line 2)")
  missing = str(tmp_path / "missing.txt")
  _raises(readers.read_labels_file, missing, match=f"{missing}: no such file")
  empty = _write(tmp_path, "empty.txt", "\n\n")
  _raises(readers.read_labels_file, empty, match=f"{empty}: no labels (empty file)")
  bad = _write(tmp_path, "bad.txt", b"O\n\xffX\n")
  _raises(readers.read_labels_file, bad, match=f"{bad}:2: invalid UTF-8")
