"""Token-table rows trained in full beside any PEFT method: the embeddings of a new
language's pieces under a frozen model (Artetxe, Ruder and Yogatama 2020, "On the
Cross-lingual Transferability of Monolingual Representations", ACL: a new language's
embeddings learned under a frozen body; Hugging Face PEFT's `trainable_token_indices`).

A base model's token table E [V, D] holds rows it never trained as inputs: the pieces of
a language it did not read (in a shared source/target table, trained only as outputs
never to predict). A low-rank update of the table (LoRA on 'embed') moves all rows inside
one rank-r subspace; here the chosen rows R (k ids) get a free update instead:

  E'[t] = E[t] + delta[i]   for t = R[i],   E'[t] = E[t] otherwise,    delta: [k, D],

delta = 0 at the start (step 0 equals the base). Every token table (an Embedder's
'embed') uses E', its lookup and, where the output logits reuse it (`Embed.attend`, tied
embeddings), the logits too, so merging (E[R] += delta) computes the same model. The
trainable tree holds delta at the table's path: {..., 'embed': {'token_rows': [k, D]}}.

The rows come from `config.peft_token_rows` (ids) and from text: every piece that occurs
in the files `config.peft_token_rows_from` (the new language's text) and in none of
`config.peft_token_rows_except` (the text the base was trained on), with the run's
tokenizer, UNK excluded (`resolve`).
"""
from __future__ import annotations

import os
from typing import Callable, Iterable

import jax.numpy as jnp
import numpy as np

from transformer_jax import multi30k
from transformer_jax.peft import core

LEAF = 'token_rows'


def read_lines(path: str, option: str) -> list[str]:
  """The lines of a text file (plain or .gz), stripped (`multi30k._read_lines`).

  Raises:
    FileNotFoundError: naming `option` and the file.
    multi30k.DataError: the file cannot be read (naming its line).
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f'config.{option}: {path}: no such file')
  return [line for _, line in multi30k._read_lines(path)]  # pylint: disable=protected-access


def resolve(ids: Iterable[int], from_files: Iterable[str], except_files: Iterable[str],
            encode: Callable[[list[str]], Iterable[Iterable[int]]],
            special: Iterable[int] = ()) -> list[int]:
  """The sorted row ids: `ids`, plus every id that `encode` gives for a line of
  `from_files` and for no line of `except_files`, except the `special` ids (e.g. UNK, which
  text in a new script produces without being a piece of that language).

  Args:
    ids: explicit token ids.
    from_files, except_files: text files, one sentence per line (plain or .gz; relative
      paths count from the current folder).
    encode: lines -> token ids per line (the run's tokenizer).
    special: ids never taken from the text.

  Raises:
    FileNotFoundError: a file is missing (naming the option).
  """
  def pieces(files, option):
    found = set()
    for path in files:
      for line_ids in encode(read_lines(path, option)):
        found.update(int(i) for i in line_ids)
    return found
  new = pieces(from_files, 'peft_token_rows_from') - pieces(
      except_files, 'peft_token_rows_except') - set(special)
  return sorted(set(int(i) for i in ids) | new)


def tables(sites: list[core.Site]) -> list[core.Site]:
  """The token tables among the sites: the 'embed' tables of the Embedders."""
  return [s for s in sites if s.kind == 'embed' and s.path[-1] == 'embed']


def check(rows: list[int], sites: list[core.Site]) -> None:
  """Raises ValueError (naming config.peft_token_rows) for ids outside a table."""
  for site in sites:
    size = site.in_shape[0]
    bad = [i for i in rows if not 0 <= i < size]
    if bad:
      raise ValueError(f'config.peft_token_rows: ids {bad[:5]} are outside the token table '
                       f'{site.name} of {size} rows')


def init(tree: core.Tree, rows: list[int], sites: list[core.Site]) -> None:
  """Adds delta = 0 [k, D] float32 at each table's path of `tree` (in place)."""
  for site in sites:
    node = core.get_path(tree, site.path)
    if node is None:
      node = {}
      core.set_path(tree, site.path, node)
    node[LEAF] = jnp.zeros((len(rows), site.out_shape[0]), jnp.float32)


def intercept(tree: core.Tree, rows: list[int], sites: list[core.Site]) -> Callable:
  """An interceptor that adds delta to the rows R of each table: in its lookup
  (tokens int [...] -> [..., D]) and in `attend` (x [..., D] -> logits [..., V], columns R
  plus x delta^T)."""
  by_path = {s.path: s for s in sites}
  row_ids = jnp.asarray(rows, jnp.int32)
  # slot[t]: i where t = R[i], else k (a zero row appended to delta); one map per size.
  slots = {}
  for site in sites:
    slot = np.full(site.in_shape[0], len(rows), np.int32)
    slot[rows] = np.arange(len(rows))
    slots[site.path] = jnp.asarray(slot)

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    site = by_path.get(tuple(context.module.path))
    if site is None or context.method_name not in ('__call__', 'attend'):
      return out
    delta = core.get_path(tree, site.path)[LEAF].astype(out.dtype)  # [k, D]
    if context.method_name == '__call__':  # tokens int [...] -> [..., D]
      padded = jnp.concatenate([delta, jnp.zeros((1, delta.shape[1]), out.dtype)])
      return out + padded[slots[site.path][args[0]]]
    return out.at[..., row_ids].add(args[0].astype(out.dtype) @ delta.T)  # [..., V]

  return interceptor


def merge(base: core.Tree, tree: core.Tree, rows: list[int], sites: list[core.Site]):
  """`base` (modified in place, and returned) with E[R] += delta in each table."""
  for site in sites:
    layer = core.get_path(base, site.path)
    delta = core.get_path(tree, site.path)[LEAF]
    layer['embedding'] = jnp.asarray(layer['embedding']).at[jnp.asarray(rows)].add(
        delta.astype(layer['embedding'].dtype))
  return base

