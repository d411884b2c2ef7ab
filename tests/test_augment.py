"""Noise augmentation (transformer_jax/augment.py: Lample et al. 2018 word noise), its
hook in the training pipelines (data.Batcher.train's transform), a noisy tiny run, and
the typo test set (benchmarks/typos.py)."""
import gzip
import importlib.util
import itertools
import os

import ml_collections
import numpy as np
import pytest

from tests.conftest import REPO, head, tiny_config
from transformer_jax import augment, config_schema, data, tokenizer
from transformer_jax.tokenizer import EOS_ID

# A hand-made vocabulary: ids 10-19 begin a word ('▁x'), 20-29 continue one, 4 is the blank.
BLANK = 4
TABLE = np.zeros(30, bool)
TABLE[10:20] = True


def sentence(*word_lengths, eos=True, start=10):
  """ids of words with the given numbers of pieces: word j is start+j followed by
  continuation pieces 20 + j (so every piece names its word)."""
  ids = []
  for j, n in enumerate(word_lengths):
    ids += [start + j] + [20 + j] * (n - 1)
  return np.array(ids + [EOS_ID] * eos, np.int32)


def words_of(ids):
  """The words of ids (EOS removed) as tuples of pieces, in order."""
  body = [int(i) for i in ids if i != EOS_ID]
  words = []
  for i in body:
    if TABLE[i] or i == BLANK or not words:
      words.append((i,))
    else:
      words[-1] += (i,)
  return words


# --- The noise functions against their definitions ----------------------------------------

def test_dropout_p0_is_identity_and_p1_keeps_exactly_one_whole_word():
  ids = sentence(1, 3, 2, 1, 2)
  for position in range(50):
    np.testing.assert_array_equal(augment.drop_words(ids, TABLE, 0.0, 0, position), ids)
    out = augment.drop_words(ids, TABLE, 1.0, 0, position)
    assert out[-1] == EOS_ID and out.dtype == np.int32
    assert len(words_of(out)) == 1 and words_of(out)[0] in words_of(ids)
  # The kept word is uniform among the five.
  kept = [words_of(augment.drop_words(ids, TABLE, 1.0, 0, j))[0][0] for j in range(2000)]
  counts = np.bincount(kept, minlength=15)[10:15]
  assert counts.min() > 330 and counts.max() < 470, counts


def test_dropout_drops_whole_words_in_order():
  ids = sentence(2, 1, 3, 2, 1, 1, 2)
  for position in range(200):
    out = augment.drop_words(ids, TABLE, 0.4, 3, position)
    kept = words_of(out)
    assert out[-1] == EOS_ID and np.count_nonzero(out == EOS_ID) == 1
    assert kept and all(w in words_of(ids) for w in kept)  # Whole words only.
    assert [w[0] for w in kept] == sorted(w[0] for w in kept)  # Order kept.


def test_blank_replaces_a_whole_word_by_one_blank():
  ids = sentence(1, 3, 2, 1)
  np.testing.assert_array_equal(augment.blank_words(ids, TABLE, 0.0, BLANK, 0, 1), ids)
  np.testing.assert_array_equal(augment.blank_words(ids, TABLE, 1.0, BLANK, 0, 1),
                                [BLANK] * 4 + [EOS_ID])
  for position in range(200):
    out = augment.blank_words(ids, TABLE, 0.5, BLANK, 0, position)
    words = words_of(out)
    assert len(words) == 4 and out[-1] == EOS_ID
    for original, noised in zip(words_of(ids), words):
      assert noised in (original, (BLANK,))


def test_shuffle_moves_no_word_more_than_k_and_keeps_pieces_together():
  ids = sentence(1, 2, 1, 3, 1, 1, 2, 1, 1, 2)  # 10 words.
  np.testing.assert_array_equal(augment.shuffle_words(ids, TABLE, 0, 0, 5), ids)
  previous = 0
  for k in (1, 2, 3):
    largest, moved = 0, 0
    for position in range(300):
      out = augment.shuffle_words(ids, TABLE, k, 0, position)
      assert out[-1] == EOS_ID and len(out) == len(ids)
      words = words_of(out)
      assert sorted(words) == sorted(words_of(ids))  # Same words, pieces together.
      moves = [abs(new - (w[0] - 10)) for new, w in enumerate(words)]
      largest = max(largest, max(moves))
      moved += sum(m > 0 for m in moves)
    assert largest == k  # Reached, never exceeded.
    # k = 1: adjacent words swap with P(U1 - U2 > 1) = 1/8 (U ~ U(0, 2)): ~22% move.
    assert moved > 0.18 * 300 * 10 and moved > previous
    previous = moved


def test_the_first_piece_begins_a_word_and_eos_only_is_unchanged():
  ids = np.array([25, 26, 11, 21, EOS_ID], np.int32)  # Continuation pieces first.
  outs = {tuple(augment.drop_words(ids, TABLE, 0.5, 0, j)) for j in range(100)}
  assert outs == {(25, 26, 11, 21, EOS_ID), (25, 26, EOS_ID), (11, 21, EOS_ID)}
  for kwargs in (dict(dropout=1.0), dict(shuffle=3), dict(blank=1.0, blank_id=BLANK)):
    np.testing.assert_array_equal(augment.noise([EOS_ID], TABLE, **kwargs), [EOS_ID])
    assert augment.noise([], TABLE, **kwargs).size == 0
  # Without a final EOS every piece takes part: the sequence may lose its last word.
  np.testing.assert_array_equal(augment.blank_words([10, 20, 11], TABLE, 1.0, BLANK),
                                [BLANK, BLANK])


def test_a_leading_tag_stays_first_and_is_never_dropped_or_blanked():
  table, symbols = TABLE.copy(), np.zeros(30, bool)
  table[5] = symbols[5] = True  # A control symbol such as '<BT>'.
  ids = np.concatenate([[5], sentence(1, 2, 1, 1)])
  for position in range(100):
    out = augment.noise(ids, table, 0, position, dropout=1.0, shuffle=3, symbols=symbols)
    assert out[0] == 5 and out[-1] == EOS_ID and len(out) >= 3  # Tag, one word, EOS.
    out = augment.noise(ids, table, 0, position, blank=1.0, shuffle=3, blank_id=BLANK,
                        symbols=symbols)
    np.testing.assert_array_equal(out, [5, BLANK, BLANK, BLANK, BLANK, EOS_ID])
  np.testing.assert_array_equal(  # Without the table the tag is a word like the others.
      augment.noise(ids, table, 0, 0, blank=1.0, blank_id=BLANK), [BLANK] * 5 + [EOS_ID])


def test_rates_over_ten_thousand_words():
  seqs = [sentence(*np.random.default_rng(i).integers(1, 4, 10)) for i in range(1000)]
  words = sum(len(words_of(s)) for s in seqs)
  assert words == 10_000
  dropped = augment.noise_many(seqs, np.arange(1000), TABLE, 7, dropout=0.1)
  rate = 1 - sum(len(words_of(s)) for s in dropped) / words
  assert abs(rate - 0.1) < 0.01, rate
  blanked = augment.noise_many(seqs, np.arange(1000), TABLE, 7, blank=0.1, blank_id=BLANK)
  rate = sum(np.count_nonzero(s == BLANK) for s in blanked) / words
  assert abs(rate - 0.1) < 0.01, rate
  u = augment.uniform(7, np.arange(10_000), 1, np.zeros(10_000))
  assert 0 <= u.min() and u.max() < 1 and abs(u.mean() - 0.5) < 0.01


def test_noise_depends_on_seed_position_and_side_only_not_on_grouping():
  seqs = [sentence(*np.random.default_rng(i).integers(1, 4, 8)) for i in range(40)]
  kwargs = dict(dropout=0.2, blank=0.2, shuffle=3, blank_id=BLANK)
  together = augment.noise_many(seqs, np.arange(100, 140), TABLE, 5, **kwargs)
  alone = [augment.noise(s, TABLE, 5, 100 + i, **kwargs) for i, s in enumerate(seqs)]
  assert all(np.array_equal(a, b) for a, b in zip(together, alone))
  for changed in (dict(seed=6), dict(position=101), dict(side=1)):
    args = {'seed': 5, 'position': 100, **changed}
    outs = [augment.noise(s, TABLE, args['seed'], args['position'] + i,
                          side=args.get('side', 0), **kwargs) for i, s in enumerate(seqs)]
    assert sum(not np.array_equal(a, b) for a, b in zip(outs, together)) > 30
  assert all(np.array_equal(a, b) for a, b in zip(
      together, augment.noise_many(seqs, np.arange(100, 140), TABLE, 5, **kwargs)))
  with pytest.raises(ValueError, match='blank_id'):
    augment.noise(seqs[0], TABLE, blank=0.1)
  with pytest.raises(ValueError, match='dropout'):
    augment.noise(seqs[0], TABLE, dropout=1.5)


# --- With a real tokenizer, in the pipelines --------------------------------------------

@pytest.fixture(scope='module')
def corpus(data_dir, tmp_path_factory):
  """(sp with '<mask>', sources, targets): 600 Multi30k pairs, vocabulary 400."""
  src = head(os.path.join(data_dir, 'train.de.gz'), 600)
  tgt = head(os.path.join(data_dir, 'train.en.gz'), 600)
  path = str(tmp_path_factory.mktemp('spm') / 'spm.model')
  sp = tokenizer.train(src + tgt, path, 400, control_symbols=(tokenizer.MASK,))
  config = ml_collections.ConfigDict(dict(max_source_length=32, max_target_length=32,
                                          truncate=False))
  return (sp, *data.tokenize_pairs(sp, src, tgt, config))


def test_word_start_table_and_real_sentences(corpus):
  sp, sources, _ = corpus
  table = augment.word_start_table(sp)
  assert table[sp.piece_to_id(tokenizer.MASK)] and not table[[0, 1, 2]].any()
  assert np.flatnonzero(augment.symbol_table(sp)).tolist() == [sp.piece_to_id(tokenizer.MASK)]
  ids = sources[0]
  text = sp.decode(ids[:-1].tolist())
  assert text == "Zwei junge weiße Männer sind im Freien in der Nähe vieler Büsche."
  blank_id = sp.piece_to_id(tokenizer.MASK)
  out = augment.blank_words(ids, table, 1.0, blank_id)
  np.testing.assert_array_equal(out, [blank_id] * len(text.split()) + [EOS_ID])
  for j in range(20):  # A shuffle keeps the words of the text (pieces together).
    shuffled = sp.decode(augment.shuffle_words(ids, table, 3, 0, j)[:-1].tolist())
    assert sorted(shuffled.split()) == sorted(text.split())


def _noise(sp, side='source', seed=0):
  return augment.WordNoise(augment.word_start_table(sp), seed, side, dropout=0.1, blank=0.1,
                           shuffle=3, blank_id=sp.piece_to_id(tokenizer.MASK))


def _batches(corpus, pack, seed=0, skip=0, n=6, side='source', noise_seed=0):
  sp, sources, targets = corpus
  batcher = data.Batcher(32, 256, 2.0, 1, pack=pack)
  ds = batcher.train({'inputs': sources, 'targets': targets}, seed, 1000, skip=skip,
                     transform=_noise(sp, side, noise_seed))
  return list(itertools.islice(ds.as_numpy_iterator(), n))


def _equal(a, b):
  return len(a) == len(b) and all(x.keys() == y.keys() and all(
      np.array_equal(x[k], y[k]) for k in x) for x, y in zip(a, b))


@pytest.mark.parametrize('pack', [False, True], ids=['bucketed', 'packed'])
def test_noisy_batches_are_deterministic_and_resume_exactly(corpus, pack):
  full = _batches(corpus, pack, n=8)
  assert _equal(full, _batches(corpus, pack, n=8))
  assert _equal(full[5:], _batches(corpus, pack, skip=5, n=3))
  assert not _equal(full, _batches(corpus, pack, noise_seed=1, n=8))
  assert not _equal(full, _batches(corpus, pack, seed=1, n=8))
  sp, sources, targets = corpus
  clean = list(itertools.islice(data.Batcher(32, 256, 2.0, 1, pack=pack).train(
      {'inputs': sources, 'targets': targets}, 0, 1000).as_numpy_iterator(), 8))
  blank_id = sp.piece_to_id(tokenizer.MASK)
  sources_ids = np.concatenate([b['inputs'].ravel() for b in full])
  rate = np.mean(sources_ids[augment.word_start_table(sp)[sources_ids]] == blank_id)
  assert 0.05 < rate < 0.15, rate  # 0.1 of the words left by dropout (~550 of them).
  assert all(np.count_nonzero(b['targets'] == blank_id) == 0 for b in full)  # side='source'
  assert not _equal(full, clean)


def test_packed_pairs_get_the_noise_of_their_stream_position(corpus):
  """Pair order[j] of the packed stream is noised as `noise(source, position=j)`: the same
  noise an example at position j of the bucketed stream gets."""
  sp, sources, targets = corpus
  noise = _noise(sp, 'source', seed=3)
  batches = _batches(corpus, True, seed=3, n=4, noise_seed=3)
  order = np.random.default_rng([3, 0]).permutation(len(sources))
  by_target = {}
  for j, i in enumerate(order[:400]):
    by_target.setdefault(targets[i].tobytes(), []).append((j, i))
  checked = 0
  for batch, row in itertools.product(batches, range(batches[0]['targets'].shape[0])):
    for segment in range(1, batch['targets_segmentation'][row].max() + 1):
      target = batch['targets'][row][batch['targets_segmentation'][row] == segment]
      source = batch['inputs'][row][batch['inputs_segmentation'][row] == segment]
      matches = by_target.get(target.tobytes(), [])
      if len(matches) == 1:
        (j, i), = matches
        expected = noise(np.array([j]), {'inputs': [sources[i]], 'targets': [targets[i]]})
        np.testing.assert_array_equal(source, expected['inputs'][0])
        checked += 1
  assert checked > 30, checked


def test_batcher_transform_is_generic_positions_in_order_and_dense_columns_kept():
  """A transform sees every example once per epoch at consecutive positions, and
  per-example values (labels) pass through the bucketed map."""
  seqs = [np.array([5] * (1 + i % 7) + [EOS_ID], np.int32) for i in range(50)]
  labels = np.arange(50, dtype=np.int32)
  calls = []

  def transform(positions, examples):
    calls.append(positions.tolist())
    return {'inputs': [np.append(s[:1], EOS_ID).astype(np.int32) for s in examples['inputs']],
            'labels': [l + 1000 for l in examples['labels']]}

  batcher = data.Batcher(8, 64, 2.0, 1)
  batches = list(itertools.islice(batcher.train({'inputs': seqs, 'labels': labels}, 0, 100,
                                                transform=transform).as_numpy_iterator(), 6))
  # Groups of TRANSFORM_GROUP consecutive positions, each once, the first among them.
  assert any(call[0] == 0 for call in calls)
  for call in calls:
    assert call == list(range(call[0], call[0] + data.TRANSFORM_GROUP))
    assert call[0] % data.TRANSFORM_GROUP == 0
  assert len({c[0] for c in calls}) == len(calls)
  got = np.concatenate([b['labels'] for b in batches])
  assert (got >= 1000).all() and len(set(got[:50].tolist())) == len(got[:50])
  assert all(b['inputs'].shape[1] == 8 and (b['inputs'][:, 2:] == 0).all() for b in batches)


def test_blanking_needs_a_mask_symbol_and_logs_what_is_applied(corpus, data_dir, tmp_path,
                                                              caplog):
  plain = tokenizer.train(head(os.path.join(data_dir, 'train.de.gz'), 300),
                          str(tmp_path / 'spm.model'), 200)
  config = ml_collections.ConfigDict(dict(noise_side='both', word_shuffle=0,
                                          word_dropout=0.0, word_blank=0.0))
  assert augment.WordNoise.from_config(config, plain, 0) is None
  assert augment.reserved_symbols(config) == ()
  config.word_blank = 0.1
  assert augment.reserved_symbols(config) == (tokenizer.MASK,)
  with pytest.raises(config_schema.ConfigError) as error:
    augment.WordNoise.from_config(config, plain, 0)
  assert str(error.value).startswith("config.word_blank=0.1: the tokenizer has no '<mask>'")
  assert '\n' not in str(error.value)
  config.update(word_shuffle=3, word_dropout=0.1)
  caplog.set_level('INFO')
  noise = augment.from_config_logged(config, corpus[0], 0)
  assert noise.blank_id == corpus[0].piece_to_id(tokenizer.MASK) == 4
  assert ('source and target sides: local shuffle k=3, word dropout p=0.1, word blanking '
          'p=0.1 (blank id 4)') in caplog.text


def test_config_fields_are_validated():
  from configs import mt  # pylint: disable=g-import-not-at-top
  config = mt.get_config('tiny')
  config_schema.validate(config)
  assert (config.noise_side, config.word_shuffle, config.word_dropout,
          config.word_blank) == ('source', 0, 0.0, 0.0)
  for field, value, message in (('noise_side', 'src', 'must be one of'),
                                ('word_dropout', 1.0, 'must be in [0, 1)'),
                                ('word_shuffle', -1, 'must be >= 0')):
    bad = mt.get_config('tiny')
    bad[field] = value
    with pytest.raises(config_schema.ConfigError, match=f'config.{field}='):
      config_schema.validate(bad)


def test_tiny_run_with_noise_on_both_sides_trains(small_text_dir, tmp_path):
  from transformer_jax import train  # pylint: disable=g-import-not-at-top
  config = tiny_config(small_text_dir, num_train_steps=8, eval_every_steps=8,
                       checkpoint_every_steps=8, log_every_steps=4, noise_side='both',
                       word_shuffle=3, word_dropout=0.1, word_blank=0.1)
  state = train.train_and_evaluate(config, str(tmp_path))
  assert int(state.step) == 8
  log = (tmp_path / 'train.log').read_text()
  assert ('Noise augmentation of the training pairs (Lample et al. 2018), source and target '
          'sides: local shuffle k=3, word dropout p=0.1, word blanking p=0.1') in log
  line = next(line for line in log.splitlines() if 'step 8: train loss' in line)
  loss = float(line.split('train loss ')[1].split()[0])
  assert np.isfinite(loss) and 0 < loss < 10, line
  sp = tokenizer.load(str(tmp_path / 'tokenizer' / 'spm.model'))
  assert tokenizer.MASK in tokenizer.symbol_ids(sp)  # Reserved for the blank.


# --- The typo test set (benchmarks/typos.py) ----------------------------------------------

def _typos():
  spec = importlib.util.spec_from_file_location('typos', os.path.join(REPO, 'benchmarks',
                                                                      'typos.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def _one_edit(a: str, b: str) -> str | None:
  """The kind of the one typo turning a into b, or None."""
  if len(b) == len(a) - 1 and any(a[:i] + a[i + 1:] == b for i in range(len(a))):
    return 'drop'
  if len(b) == len(a) + 1 and any(a[:i + 1] + a[i:] == b for i in range(len(a))):
    return 'repeat'
  if len(a) == len(b) and any(a[:i] + a[i + 1] + a[i] + a[i + 2:] == b and a[i] != a[i + 1]
                              for i in range(len(a) - 1)):
    return 'swap'
  return None


def test_typos_change_ten_percent_of_the_words_by_one_edit(data_dir, tmp_path):
  typos = _typos()
  path = os.path.join(data_dir, 'test_2016_flickr.de.gz')
  out = str(tmp_path / 'typos.de.gz')
  typos.main(['--input', path, '--output', out])
  with gzip.open(path, 'rt', encoding='utf-8') as f:
    clean = f.read().splitlines()
  with gzip.open(out, 'rt', encoding='utf-8') as f:
    noisy = f.read().splitlines()
  assert len(noisy) == len(clean) == 1000
  changed, words, kinds = 0, 0, []
  for a, b in zip(clean, noisy):
    assert len(a.split()) == len(b.split())
    for x, y in zip(a.split(), b.split()):
      words += typos.is_word(x)
      if x != y:
        changed += 1
        kinds.append(_one_edit(x, y))
  assert abs(changed / words - 0.1) < 0.002, (changed, words)
  assert None not in kinds
  assert min(kinds.count(k) for k in typos.KINDS) > 0.25 * changed
  # Same seed, same output; another seed, other typos.
  assert typos.add_typos(clean, 0.1, 0)[0] == noisy
  assert typos.add_typos(clean, 0.1, 1)[0] != noisy
  assert typos.add_typos(['a b', 'I'], 1.0, 0)[0] == ['aa bb', 'II']
  assert typos.add_typos(['.', '', '  x  '], 1.0, 0)[0] == ['.', '', '  xx  ']
