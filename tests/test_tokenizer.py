"""The tokenizer: unknown characters, byte fallback, text normalization."""
import logging
import unicodedata

import pytest

from tests.conftest import tiny_config
from transformer_jax import tokenizer
from transformer_jax.config_schema import ConfigError

UNSEEN = 'Ein Mann ☃ fährt 🚲 nach 東京.'  # A snowman, a bicycle and Kanji: not in Multi30k.


def _sentences(text_dir):
  return [line.rstrip('\n') for lang in ('de', 'en')
          for line in open(f'{text_dir}/train.{lang}', encoding='utf-8')]


@pytest.fixture(scope='module')
def plain(small_text_dir, tmp_path_factory):
  """A SentencePiece model of the 512 small training sentences, without byte fallback."""
  path = tmp_path_factory.mktemp('plain') / 'spm.model'
  return tokenizer.train(_sentences(small_text_dir), str(path), 300)


@pytest.fixture(scope='module')
def byte_fallback(small_text_dir, tmp_path_factory):
  """The same with byte fallback (through the config field, as a run trains it)."""
  workdir = tmp_path_factory.mktemp('bytes')
  config = tiny_config(small_text_dir, vocab_size=400, spm_byte_fallback=True)
  return tokenizer.load_or_train(config, str(workdir), _sentences(small_text_dir))


def _warnings(caplog):
  return [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]


def test_unseen_characters_are_reported_and_warned_about(plain, caplog):
  ids = plain.encode(UNSEEN)
  assert ids.count(tokenizer.UNK_ID) == 3  # One per run of unseen characters.
  assert '⁇' in plain.decode(ids)  # What a user saw, silently, before.
  with caplog.at_level(logging.INFO):
    rate = tokenizer.check_unknown([ids + [tokenizer.EOS_ID]], 'the test sentence')
  assert rate == 3 / len(ids)  # EOS is not a piece.
  [warning] = _warnings(caplog)
  assert warning.startswith(f'the test sentence: {100 * rate:.2f}% of the pieces (3 of '
                            f'{len(ids)}) are unknown')
  assert '--config.spm_byte_fallback=True' in warning
  assert '--config.spm_character_coverage' in warning
  caplog.clear()
  with caplog.at_level(logging.INFO):  # Known text: logged, no warning.
    assert tokenizer.check_unknown([plain.encode('Ein Mann fährt.')], 'known') == 0
  assert not _warnings(caplog)
  assert 'known: 0 of' in caplog.text


def test_byte_fallback_spells_unseen_characters_and_round_trips(byte_fallback, caplog):
  sp = byte_fallback
  assert sp.vocab_size() == 400 and sum(sp.is_byte(i) for i in range(400)) == 256
  ids = sp.encode(UNSEEN)
  assert tokenizer.UNK_ID not in ids
  assert '<0xE2>' in [sp.id_to_piece(i) for i in ids]  # ☃ is E2 98 83 in UTF-8.
  assert sp.decode(ids) == UNSEEN
  with caplog.at_level(logging.INFO):
    assert tokenizer.check_unknown([ids], 'bytes') == 0
  assert not _warnings(caplog)
  # The special ids stay where they were; byte pieces come after them.
  assert (sp.pad_id(), sp.eos_id(), sp.bos_id(), sp.unk_id()) == (0, 1, 2, 3)
  assert sp.id_to_piece(4) == '<0x00>'


def test_byte_fallback_is_off_by_default_and_a_small_vocab_is_a_config_error(small_text_dir,
                                                                             tmp_path):
  config = tiny_config(small_text_dir)
  assert config.spm_byte_fallback is False
  with pytest.raises(ConfigError, match=r'config.vocab_size=300: too small for the characters '
                     r'of the training text and the 256 byte pieces of spm_byte_fallback=True; '
                     r'it needs at least \d+'):
    tokenizer.train(_sentences(small_text_dir), str(tmp_path / 'spm.model'), 300,
                    byte_fallback=True)


@pytest.mark.parametrize('text, cleaned', [
    ('Ein\tHund\xa0läuft.\u3000', 'Ein Hund läuft. '),              # Spaces.
    ('a\rb\x0bc\x0cd\x1ce\x1df\x1eg\x85h\u2028i\u2029j', 'a b c d e f g h i j'),  # Breaks.
    ('Hun\u200bd\u200c\u200d l\xadäuft\ufeff\u2060\u200e', 'Hund läuft'),  # Zero-width.
    ('\x00Ein\x07 Hund\x7f\x9b', 'Ein Hund'),                       # Controls.
    ('Ein Mann fa\u0308hrt.', 'Ein Mann fa\u0308hrt.'),              # NFD: left to spm.
])
def test_clean_makes_whitespace_spaces_and_drops_invisible_characters(text, cleaned):
  assert tokenizer.clean(text) == cleaned
  assert tokenizer.clean(text).splitlines() == [cleaned]  # Never a line break.
  ascii_text = 'A plain line.'
  assert tokenizer.clean(ascii_text) is ascii_text


def test_normalize_is_what_the_tokenizer_does(byte_fallback):
  sp = byte_fallback  # No unknown pieces: decode(encode(x)) shows the normalization.
  for text in ['Ein Mann fa\u0308hrt über die Brücke.', '\tEin\xa0Hund  läuft.\u3000',
               'Hun\u200bd l\xadäuft\ufeff', 'ﬁ … Ｈｕｎｄ', 'a\x1cb\x0bc\rd\x85e\u2028f',
               '\x00\x07x\x7f', UNSEEN]:
    assert tokenizer.normalize([text]) == [sp.decode(sp.encode(tokenizer.clean(text)))]
  nfd = unicodedata.normalize('NFD', 'Männer fahren über Brücken.')
  assert tokenizer.normalize([nfd]) == ['Männer fahren über Brücken.']
  assert tokenizer.normalize([]) == []


def test_one_line_keeps_model_outputs_on_one_line():
  assert tokenizer.one_line(' a\nb\r\nc\u2028d  \x00e ') == 'a b c d e'


def test_spm_extra_text_trains_a_new_tokenizer_only_and_names_a_missing_file(
    small_text_dir, data_dir, tmp_path):
  from tests.conftest import head  # pylint: disable=g-import-not-at-top
  from transformer_jax import sharding  # pylint: disable=g-import-not-at-top
  from transformer_jax.multi30k import DataError  # pylint: disable=g-import-not-at-top
  from transformer_jax.tasks import translation  # pylint: disable=g-import-not-at-top
  french = head(f'{data_dir}/train.fr.gz', 2000)
  (tmp_path / 'fr.txt').write_text('\n'.join(french[:1000]) + '\n\n', encoding='utf-8')

  def setup(workdir, **overrides):
    config = tiny_config(small_text_dir, vocab_size=600, **overrides)
    task = translation.TranslationTask(config, str(tmp_path / workdir),
                                       sharding.config_mesh(config))
    task.setup(training=True)
    return task.sp

  held_out = french[1000:]  # French the tokenizers never saw.
  pieces = lambda sp: sum(len(p) for p in sp.encode(held_out))
  plain = setup('plain')
  extra = setup('extra', spm_extra_text=f'{tmp_path}/fr.t?t')  # A glob.
  assert pieces(extra) < 0.8 * pieces(plain), (pieces(extra), pieces(plain))
  # A resumed run keeps its tokenizer and reads no extra text (the file may be gone).
  again = setup('extra', spm_extra_text=f'{tmp_path}/gone.txt')
  assert again.serialized_model_proto() == extra.serialized_model_proto()
  with pytest.raises(DataError, match=r'^config.spm_extra_text: .*nothing\*.txt: no such file$'):
    setup('missing', spm_extra_text=f'{tmp_path}/nothing*.txt, {tmp_path}/fr.txt')
  with pytest.raises(DataError, match=r'^config.spm_extra_text: .*/plain: a folder, not a file'):
    setup('folder', spm_extra_text=f'{tmp_path}/plain')  # The first run's workdir.
  with pytest.raises(DataError, match=r'^config.spm_extra_text: no file named$'):
    setup('commas', spm_extra_text=' , ')
