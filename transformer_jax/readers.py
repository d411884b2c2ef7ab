"""Readers for labelled text: TSV classification/regression files and CoNLL-style tagging files.

Written for SST-2 (Socher et al., 2013, in the binary GLUE form of Wang et al., 2019) and
GermEval 2014 NER (Benikova et al., 2014), but both readers work for any file of that shape.
Files ending in `.gz` are read as gzip, others as plain text, always as strict UTF-8. Bad
input raises `multi30k.DataError` with a one-line message `path:line: what is wrong` (1-based
line numbers; `path: ...` where no line applies).
"""
from absl import logging

from transformer_jax.multi30k import DataError, _read_lines

# GermEval 2014 entity types (Benikova et al., 2014), in the order of the data README.
GERMEVAL_TYPES = (
    "PER", "LOC", "ORG", "OTH",
    "PERderiv", "LOCderiv", "ORGderiv", "OTHderiv",
    "PERpart", "LOCpart", "ORGpart", "OTHpart",
)
# The 25 GermEval 2014 IOB2 labels: 'O', then B-/I- per type in GERMEVAL_TYPES order. Build
# the label list from this, not from the training data (train has no I-ORGderiv).
GERMEVAL_LABELS: list[str] = ["O"] + [f"{p}-{t}" for t in GERMEVAL_TYPES for p in ("B", "I")]


def _check_unique(labels: list[str], name: str) -> None:
  if len(set(labels)) != len(labels):
    dupes = sorted({x for x in labels if labels.count(x) > 1})
    raise ValueError(f"{name} has duplicates: {dupes}")


def read_tsv(
    path: str, text_column: str, label_column: str, labels: list[str] | None
) -> tuple[list[str], list, int]:
  """Reads texts and labels from a tab-separated file with a header line.

  Each line is split on tabs (no quoting, as in GLUE's SST-2). The text is stripped of
  surrounding whitespace (SST-2 sentences end with a space); so is the label. Rows whose text
  is empty, and whitespace-only lines, are skipped; their number is returned and logged.
  Columns beyond the header's are ignored.

  Args:
    path: the file, plain or `.gz`.
    text_column: header name of the text column, e.g. 'sentence'.
    label_column: header name of the label column, e.g. 'label'.
    labels: for classification, the allowed label strings (e.g. ['0', '1']); each row's label
      becomes its index in this list. None for regression: labels are parsed as floats.

  Returns:
    (texts, labels, num_skipped): texts (str) and labels (int indices, or floats when `labels`
    is None) in file order, and the number of rows skipped for empty text.

  Raises:
    DataError: the file is missing or unreadable; a line is not valid UTF-8; the file is empty
      (`path: empty file (no header line)`) or has no row with text; the header lacks a named
      column (the message lists the header's columns); a row has too few columns; a label is
      not in `labels` (the message names it and lists the allowed ones); a regression label is
      not a finite number.
    ValueError: `labels` has duplicates.
  """
  if labels is not None:
    _check_unique(list(labels), "labels")
    label_index = {label: i for i, label in enumerate(labels)}
  lines = _read_lines(path, strip=False)
  header_line = next(lines, None)
  if header_line is None:
    raise DataError(f"{path}: empty file (no header line)")
  header = [c.strip() for c in header_line[1].split("\t")]
  columns = {}
  for name in (text_column, label_column):
    if name not in header:
      raise DataError(f"{path}:1: header has no column {name!r}; its columns are {header}")
    columns[name] = header.index(name)
  text_idx, label_idx = columns[text_column], columns[label_column]
  needed = max(text_idx, label_idx) + 1
  texts, targets, num_skipped, lineno = [], [], 0, 1
  for lineno, line in lines:
    fields = line.split("\t")
    if not line.strip():
      num_skipped += 1
      continue
    if len(fields) < needed:
      raise DataError(
          f"{path}:{lineno}: row has {len(fields)} tab-separated columns, needs at least "
          f"{needed} (header: {header})"
      )
    text = fields[text_idx].strip()
    if not text:
      num_skipped += 1
      continue
    label = fields[label_idx].strip()
    if labels is not None:
      if label not in label_index:
        raise DataError(f"{path}:{lineno}: unknown label {label!r}; allowed: {list(labels)}")
      targets.append(label_index[label])
    else:
      try:
        value = float(label)
      except ValueError:
        value = None
      if value is None or value in (float("inf"), float("-inf")) or value != value:
        raise DataError(f"{path}:{lineno}: regression label {label!r} is not a finite number")
      targets.append(value)
    texts.append(text)
  if not texts:
    what = f"all {num_skipped} rows have empty text" if num_skipped else "no data rows"
    raise DataError(f"{path}:{lineno}: {what} after the header")
  logging.info("Read %d rows from %s; skipped %d with empty text", len(texts), path, num_skipped)
  return texts, targets, num_skipped


def _iob_violation(tag: str, prev: str | None) -> str | None:
  """If `tag` is an I-X that starts an entity after `prev`, says where; else None."""
  if not tag.startswith("I-"):
    return None
  if prev is None:
    return "at the start of a sentence"
  if prev[:2] in ("B-", "I-") and prev[2:] == tag[2:]:
    return None
  return f"after {prev}"


def read_conll(
    path: str, tag_column: int, labels: list[str], repair_iob: bool = False
) -> tuple[list[list[str]], list[list[int]], dict]:
  """Reads sentences of (token, tag) from a token-per-line (CoNLL-style) file.

  A line is split on tabs if it has one, else on whitespace; column 0 is the token. Blank
  lines end sentences (several in a row are fine, and so is a missing blank line at the end).
  Lines starting with `-DOCSTART-` (document markers) and with `# ` (comments) are skipped and
  counted; note that with whitespace-separated columns a token `#` would look like a comment.
  Tags are checked as IOB2: an `I-X` that starts an entity (at a sentence start, after `O`,
  or after a B-/I- tag of another type) is an error, or with `repair_iob` is rewritten to
  `B-X` and counted. Tags without a B-/I- prefix other than 'O' are not checked.

  Args:
    path: the file, plain or `.gz`.
    tag_column: 0-based column of the tag (GermEval 2014: 1 = outer, 2 = inner).
    labels: the allowed tags, e.g. `GERMEVAL_LABELS`; tags become indices into it.
    repair_iob: rewrite entity-starting `I-X` tags to `B-X` instead of failing.

  Returns:
    (words, tags, stats): per sentence, its tokens and its tag indices; stats is a dict with
    'sentences', 'tokens', 'docstart_lines', 'comment_lines' and 'iob_repairs' (ints). The
    repair count is also logged when non-zero.

  Raises:
    DataError: the file is missing or unreadable; a line is not valid UTF-8; the file holds no
      sentence; a line has fewer than `tag_column + 1` columns; a tag is not in `labels`
      (named); an `I-X` tag starts an entity and `repair_iob` is False (the message suggests
      `config.repair_iob=True`), or its repair `B-X` is not in `labels`.
    ValueError: `tag_column` is negative or `labels` has duplicates.
  """
  if tag_column < 0:
    raise ValueError(f"tag_column must be >= 0, got {tag_column}")
  _check_unique(list(labels), "labels")
  label_index = {label: i for i, label in enumerate(labels)}
  stats = {"sentences": 0, "tokens": 0, "docstart_lines": 0, "comment_lines": 0,
           "iob_repairs": 0}
  all_words, all_tags = [], []
  words, tags, prev = [], [], None
  lineno = 0

  def end_sentence():
    nonlocal words, tags, prev
    if words:
      all_words.append(words)
      all_tags.append(tags)
      stats["sentences"] += 1
      stats["tokens"] += len(words)
    words, tags, prev = [], [], None

  for lineno, line in _read_lines(path):  # Lines come stripped.
    if not line:
      end_sentence()
      continue
    if line.startswith("-DOCSTART-"):
      stats["docstart_lines"] += 1
      continue
    if line.startswith("# "):
      stats["comment_lines"] += 1
      continue
    fields = line.split("\t") if "\t" in line else line.split()
    if len(fields) <= tag_column:
      raise DataError(
          f"{path}:{lineno}: line has {len(fields)} columns, needs at least {tag_column + 1} "
          f"for tag_column={tag_column}"
      )
    tag = fields[tag_column].strip()
    if tag not in label_index:
      raise DataError(f"{path}:{lineno}: unknown tag {tag!r} (not among the "
                      f"{len(labels)} labels)")
    where = _iob_violation(tag, prev)
    if where is not None:
      fixed = "B-" + tag[2:]
      if not repair_iob:
        raise DataError(
            f"{path}:{lineno}: IOB2 violation: {tag} starts an entity ({where}), IOB2 needs "
            f"{fixed}; set config.repair_iob=True to rewrite it as {fixed}"
        )
      if fixed not in label_index:
        raise DataError(f"{path}:{lineno}: cannot repair {tag} ({where}): {fixed!r} is not a "
                        "label")
      tag = fixed
      stats["iob_repairs"] += 1
    words.append(fields[0].strip())
    tags.append(label_index[tag])
    prev = tag
  end_sentence()
  if not all_words:
    if lineno == 0:
      raise DataError(f"{path}: empty file (no sentence)")
    raise DataError(f"{path}:{lineno}: no sentence (only blank, comment or -DOCSTART- lines)")
  if stats["iob_repairs"]:
    logging.warning("Repaired %d IOB2 violations (I-X starting an entity -> B-X) in %s",
                    stats["iob_repairs"], path)
  logging.info("Read %d sentences, %d tokens from %s", stats["sentences"], stats["tokens"],
               path)
  return all_words, all_tags, stats


def read_labels_file(path: str) -> list[str]:
  """Reads a label list: one label per line, stripped; blank lines are ignored.

  Args:
    path: the file, plain or `.gz`.

  Returns:
    The labels in file order.

  Raises:
    DataError: the file is missing or unreadable; a line is not valid UTF-8; a label repeats
      (`path:line: duplicate label 'X' (first on line N)`); the file has no label.
  """
  labels, first_line = [], {}
  for lineno, label in _read_lines(path):
    if not label:
      continue
    if label in first_line:
      raise DataError(
          f"{path}:{lineno}: duplicate label {label!r} (first on line {first_line[label]})")
    first_line[label] = lineno
    labels.append(label)
  if not labels:
    raise DataError(f"{path}: no labels (empty file)")
  return labels
