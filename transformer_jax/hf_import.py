"""Import Hugging Face BERT-family checkpoints from a local folder.

`load_bert(folder)` reads `config.json` and `model.safetensors` (as saved by
`transformers`' `save_pretrained`) and returns `TransformerConfig` keyword arguments and
the `params` of `models.SequenceClassifier` / `models.TokenClassifier` without their
'head' (`{'source_embedder': ..., 'encoder': ...}`); `WordPieceTokenizer(folder)` builds
the matching tokenizer from the folder's `vocab.txt` (and `tokenizer_config.json`).
Nothing is downloaded.

    kwargs, params = hf_import.load_bert(folder)
    model = models.SequenceClassifier(models.TransformerConfig(**kwargs), num_labels=2)
    init = model.init(rng, jnp.ones((1, 8), jnp.int32))['params']
    params = {**params, 'head': init['head']}

The attention has no key bias, so BERT's key biases are dropped: for a query q the key
bias b_k adds the same q . b_k to that query's logit over every key, and softmax is
invariant to adding a constant to all its logits, so the outputs do not change.

Every failure raises `HFImportError` with one line naming the folder, file, field or
tensor at fault.
"""
from __future__ import annotations

import json
import os
from typing import Any

import numpy as np

from transformer_jax.tokenizer import PAD_ID, join_words

CONFIG_FILE = 'config.json'
WEIGHTS_FILE = 'model.safetensors'
VOCAB_FILE = 'vocab.txt'
HF_TOKENIZER_CONFIG = 'tokenizer_config.json'
TOKENIZER_OPTIONS_FILE = 'wordpiece_tokenizer.json'  # Written by WordPieceTokenizer.save.

BERT_MODEL_TYPES = ('bert',)
# config.json hidden_act -> TransformerConfig.activation.
_ACTIVATIONS = {'gelu': 'gelu', 'gelu_new': 'gelu_tanh', 'gelu_pytorch_tanh': 'gelu_tanh',
                'relu': 'relu'}


class HFImportError(ValueError):
  """A checkpoint folder is missing a file, or holds a config or tensor this package cannot
  express; the message (one line) names the folder, file, field or tensor."""


def _require_folder(folder: str, *files: str) -> None:
  if not os.path.isdir(folder):
    raise HFImportError(f'{folder}: no such folder')
  for name in files:
    if not os.path.isfile(os.path.join(folder, name)):
      raise HFImportError(f'{folder}: {name} is missing')


def _read_json(path: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (OSError, ValueError) as e:
    raise HFImportError(f'{path}: cannot read JSON ({str(e).splitlines()[0]})') from None
  if not isinstance(data, dict):
    raise HFImportError(f'{path}: expected a JSON object, got {type(data).__name__}')
  return data


def bert_config_kwargs(hf: dict) -> dict[str, Any]:
  """`TransformerConfig` keyword arguments for a Hugging Face BERT `config.json` dict.

  Raises HFImportError naming the first field the encoder cannot express.
  """
  def field(name, types, default=None, check=None, requirement=''):
    value = hf.get(name, default)
    if value is None or isinstance(value, bool) and bool not in types or not isinstance(
        value, types):
      raise HFImportError(f'{CONFIG_FILE}: {name}={value!r} is missing or not '
                          f'{"/".join(t.__name__ for t in types)}')
    if check is not None and not check(value):
      raise HFImportError(f'{CONFIG_FILE}: {name}={value!r} {requirement}')
    return value

  model_type = hf.get('model_type')
  if model_type not in BERT_MODEL_TYPES:
    raise HFImportError(f'{CONFIG_FILE}: model_type={model_type!r} is not a BERT-family '
                        f'model (supported: {", ".join(BERT_MODEL_TYPES)})')
  positive = dict(check=lambda v: v > 0, requirement='must be > 0')
  d_model = field('hidden_size', (int,), **positive)
  num_heads = field('num_attention_heads', (int,), **positive)
  if d_model % num_heads:
    raise HFImportError(f'{CONFIG_FILE}: hidden_size={d_model} is not divisible by '
                        f'num_attention_heads={num_heads}')
  act = field('hidden_act', (str,), check=lambda v: v in _ACTIVATIONS,
              requirement=f'is not supported (supported: {", ".join(_ACTIVATIONS)})')
  field('position_embedding_type', (str,), 'absolute', check=lambda v: v == 'absolute',
        requirement="is not supported (only 'absolute' positions)")
  for name in ('is_decoder', 'add_cross_attention'):
    field(name, (bool,), False, check=lambda v: not v,
          requirement='is not supported (encoder-only import)')
  if 'pad_token_id' in hf and hf['pad_token_id'] is not None:
    field('pad_token_id', (int,), check=lambda v: v == PAD_ID,
          requirement=f'is not supported (the padding mask assumes id {PAD_ID})')
  probability = dict(check=lambda v: 0 <= v < 1, requirement='must be in [0, 1)')
  return dict(
      vocab_size=field('vocab_size', (int,), **positive),
      d_model=d_model,
      num_heads=num_heads,
      d_ff=field('intermediate_size', (int,), **positive),
      num_encoder_layers=field('num_hidden_layers', (int,), **positive),
      dropout_rate=float(field('hidden_dropout_prob', (int, float), 0.1, **probability)),
      attention_dropout_rate=float(field('attention_probs_dropout_prob', (int, float), 0.1,
                                         **probability)),
      activation=_ACTIVATIONS[act],
      layer_norm_eps=float(field('layer_norm_eps', (int, float), 1e-12, **positive)),
      max_position_embeddings=field('max_position_embeddings', (int,), 512, **positive),
      type_vocab_size=field('type_vocab_size', (int,), 2, check=lambda v: v >= 0,
                            requirement='must be >= 0'),
      norm_position='post',
      position_embedding='learned',
      scale_embeddings=False,
      embedding_norm=True,
  )


def _tensor_map(kwargs: dict) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], Any]]:
  """HF tensor name (no 'bert.' prefix) -> (our param path, HF shape, HF -> ours)."""
  d, h, f = kwargs['d_model'], kwargs['num_heads'], kwargs['d_ff']
  k = d // h
  same = lambda w: w
  linear = lambda w: w.T                                 # [out, in] -> [in, out]
  to_heads = lambda w: w.T.reshape(d, h, k)              # query/key/value [D, H, K]
  from_heads = lambda w: w.T.reshape(h, k, d)            # out [H, K, D]
  bias_heads = lambda b: b.reshape(h, k)
  table = {
      'embeddings.word_embeddings.weight':
          (('source_embedder', 'embed', 'embedding'), (kwargs['vocab_size'], d), same),
      'embeddings.position_embeddings.weight':
          (('source_embedder', 'position_embed', 'embedding'),
           (kwargs['max_position_embeddings'], d), same),
      'embeddings.LayerNorm.weight': (('source_embedder', 'norm', 'scale'), (d,), same),
      'embeddings.LayerNorm.bias': (('source_embedder', 'norm', 'bias'), (d,), same),
  }
  if kwargs['type_vocab_size'] > 0:
    table['embeddings.token_type_embeddings.weight'] = (
        ('source_embedder', 'type_embed', 'embedding'), (kwargs['type_vocab_size'], d), same)
  for i in range(kwargs['num_encoder_layers']):
    hf, ours = f'encoder.layer.{i}.', ('encoder', f'layers_{i}')
    attention, ff = ours + ('self_attention',), ours + ('feed_forward',)
    for name in ('query', 'key', 'value'):
      table[f'{hf}attention.self.{name}.weight'] = (attention + (name, 'kernel'), (d, d),
                                                    to_heads)
    for name in ('query', 'value'):
      table[f'{hf}attention.self.{name}.bias'] = (attention + (name, 'bias'), (d,),
                                                  bias_heads)
    table.update({
        f'{hf}attention.output.dense.weight': (attention + ('out', 'kernel'), (d, d),
                                               from_heads),
        f'{hf}attention.output.dense.bias': (attention + ('out', 'bias'), (d,), same),
        f'{hf}attention.output.LayerNorm.weight':
            (ours + ('self_attention_norm', 'scale'), (d,), same),
        f'{hf}attention.output.LayerNorm.bias':
            (ours + ('self_attention_norm', 'bias'), (d,), same),
        f'{hf}intermediate.dense.weight': (ff + ('wi', 'kernel'), (f, d), linear),
        f'{hf}intermediate.dense.bias': (ff + ('wi', 'bias'), (f,), same),
        f'{hf}output.dense.weight': (ff + ('wo', 'kernel'), (d, f), linear),
        f'{hf}output.dense.bias': (ff + ('wo', 'bias'), (d,), same),
        f'{hf}output.LayerNorm.weight': (ours + ('feed_forward_norm', 'scale'), (d,), same),
        f'{hf}output.LayerNorm.bias': (ours + ('feed_forward_norm', 'bias'), (d,), same),
    })
  return table


def _canonical_name(name: str) -> str:
  """Strips a 'bert.' prefix and renames old TF-style LayerNorm 'gamma'/'beta'."""
  name = name.removeprefix('bert.')
  if '.LayerNorm.' in name:
    name = name.replace('.LayerNorm.gamma', '.LayerNorm.weight')
    name = name.replace('.LayerNorm.beta', '.LayerNorm.bias')
  return name


def read_bert_config(folder: str) -> dict[str, Any]:
  """`bert_config_kwargs` of FOLDER/config.json, after checking that the folder holds a
  whole checkpoint (config.json, model.safetensors, vocab.txt).

  Raises:
    HFImportError: a missing folder or file, or a config the encoder cannot express.
  """
  _require_folder(folder, CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE)
  try:
    return bert_config_kwargs(_read_json(os.path.join(folder, CONFIG_FILE)))
  except HFImportError as e:
    raise HFImportError(f'{folder}/{e}') from None


def load_bert(folder: str, return_unused: bool = False):
  """Reads a Hugging Face BERT checkpoint folder.

  Args:
    folder: holds config.json, model.safetensors and vocab.txt.
    return_unused: also return the checkpoint tensor names that were not imported.

  Returns:
    (kwargs, params), or (kwargs, params, unused) with `return_unused`: kwargs for
    `models.TransformerConfig(**kwargs)` (vocab_size included); params, a nested dict
    of float32 numpy arrays laid out as `models.SequenceClassifier(...).init(...)
    ['params']` without 'head': {'source_embedder': {'embed', 'position_embed',
    'type_embed', 'norm'}, 'encoder': {'layers_0': ..., ...}}; unused, a sorted list of
    the names in the file that are not imported (as stored, with any 'bert.' prefix):
    `embeddings.position_ids`, `pooler.*`, the attention key biases (see the module
    docstring) and any pre-training heads.

  Raises:
    HFImportError: a missing folder or file, a config the encoder cannot express, or a
      tensor that is missing or of the wrong shape.
  """
  from safetensors.numpy import load_file  # pylint: disable=g-import-not-at-top

  _require_folder(folder, CONFIG_FILE, WEIGHTS_FILE, VOCAB_FILE)
  hf_config = _read_json(os.path.join(folder, CONFIG_FILE))
  try:
    kwargs = bert_config_kwargs(hf_config)
  except HFImportError as e:
    raise HFImportError(f'{folder}/{e}') from None
  weights_path = os.path.join(folder, WEIGHTS_FILE)
  try:
    tensors = load_file(weights_path)
  except Exception as e:  # pylint: disable=broad-except
    raise HFImportError(f'{weights_path}: cannot read ({str(e).splitlines()[0]})') from None
  by_name = {}
  for stored in tensors:
    by_name.setdefault(_canonical_name(stored), stored)

  params: dict = {}
  used = set()
  for name, (path, shape, convert) in _tensor_map(kwargs).items():
    if name not in by_name:
      raise HFImportError(f'{weights_path}: tensor {name} is missing')
    stored = by_name[name]
    value = tensors[stored]
    if tuple(value.shape) != shape:
      raise HFImportError(f'{weights_path}: tensor {stored} has shape {tuple(value.shape)}, '
                          f'expected {shape} from {CONFIG_FILE}')
    node = params
    for key in path[:-1]:
      node = node.setdefault(key, {})
    node[path[-1]] = np.ascontiguousarray(convert(value.astype(np.float32)))
    used.add(stored)
  unused = sorted(set(tensors) - used)
  return (kwargs, params, unused) if return_unused else (kwargs, params)


def _token_content(value, default: str) -> str:
  """A special token of tokenizer_config.json: a string or {'content': ...}."""
  if isinstance(value, dict):
    value = value.get('content')
  return value if isinstance(value, str) and value else default


class WordPieceTokenizer:
  """BERT WordPiece tokenizer (the `tokenizers` library) over a folder's vocab.txt.

  Options come from the folder's `wordpiece_tokenizer.json` (written by `save`), else
  from Hugging Face's `tokenizer_config.json` (do_lower_case, strip_accents,
  tokenize_chinese_chars, special token names), else BertTokenizer's defaults
  (lower-case, accents stripped when lower-casing, CJK characters split).
  """

  def __init__(self, folder: str):
    _require_folder(folder, VOCAB_FILE)
    vocab_path = os.path.join(folder, VOCAB_FILE)
    with open(vocab_path, encoding='utf-8') as f:
      self._vocab_lines = [line.rstrip('\n') for line in f]
    ours = os.path.join(folder, TOKENIZER_OPTIONS_FILE)
    hf_path = os.path.join(folder, HF_TOKENIZER_CONFIG)
    if os.path.isfile(ours):
      self.options = self._checked_options(_read_json(ours), ours)
    elif os.path.isfile(hf_path):
      self.options = self._options_from_hf(_read_json(hf_path), hf_path)
    else:
      self.options = self._checked_options({}, ours)
    vocab = {}
    for i, token in enumerate(self._vocab_lines):
      vocab[token] = i  # A repeated token keeps its last id, as in HF's load_vocab.
    specials = {role: self.options[f'{role}_token'] for role in ('unk', 'sep', 'cls', 'pad')}
    for role, token in specials.items():
      if token not in vocab:
        raise HFImportError(f'{vocab_path}: {role}_token {token!r} is not in the vocabulary')
    if vocab[specials['pad']] != PAD_ID:
      raise HFImportError(f'{vocab_path}: pad_token {specials["pad"]!r} has id '
                          f'{vocab[specials["pad"]]}, expected {PAD_ID} (the padding mask '
                          'assumes it)')
    from tokenizers import BertWordPieceTokenizer  # pylint: disable=g-import-not-at-top
    mask = self.options['mask_token']
    self._tokenizer = BertWordPieceTokenizer(
        vocab, unk_token=specials['unk'], sep_token=specials['sep'],
        cls_token=specials['cls'], pad_token=specials['pad'],
        mask_token=mask if mask in vocab else specials['unk'],
        clean_text=True, handle_chinese_chars=self.options['handle_chinese_chars'],
        strip_accents=self.options['strip_accents'], lowercase=self.options['lowercase'])
    self.pad_id = PAD_ID
    self.unk_id = vocab[specials['unk']]
    self.cls_id = vocab[specials['cls']]
    self.sep_id = vocab[specials['sep']]

  @staticmethod
  def _checked_options(options: dict, path: str) -> dict:
    defaults = {'lowercase': True, 'strip_accents': None, 'handle_chinese_chars': True,
                'unk_token': '[UNK]', 'sep_token': '[SEP]', 'cls_token': '[CLS]',
                'pad_token': '[PAD]', 'mask_token': '[MASK]'}
    unknown = set(options) - set(defaults)
    if unknown:
      raise HFImportError(f'{path}: unknown field {sorted(unknown)[0]!r}')
    options = {**defaults, **options}
    for name in ('lowercase', 'handle_chinese_chars'):
      if not isinstance(options[name], bool):
        raise HFImportError(f'{path}: {name}={options[name]!r} must be true or false')
    if options['strip_accents'] not in (None, True, False):
      raise HFImportError(f'{path}: strip_accents={options["strip_accents"]!r} must be '
                          'true, false or null')
    return options

  @classmethod
  def _options_from_hf(cls, hf: dict, path: str) -> dict:
    if hf.get('do_basic_tokenize', True) is not True:
      raise HFImportError(f'{path}: do_basic_tokenize={hf["do_basic_tokenize"]!r} is not '
                          'supported')
    if hf.get('never_split'):
      raise HFImportError(f'{path}: never_split={hf["never_split"]!r} is not supported')
    options = {'lowercase': hf.get('do_lower_case', True),
               'strip_accents': hf.get('strip_accents'),
               'handle_chinese_chars': hf.get('tokenize_chinese_chars', True)}
    for role, default in (('unk', '[UNK]'), ('sep', '[SEP]'), ('cls', '[CLS]'),
                          ('pad', '[PAD]'), ('mask', '[MASK]')):
      options[f'{role}_token'] = _token_content(hf.get(f'{role}_token'), default)
    return cls._checked_options(options, path)

  @classmethod
  def load(cls, folder: str) -> 'WordPieceTokenizer':
    """Reads a tokenizer written by `save` (or any folder `__init__` accepts)."""
    return cls(folder)

  def save(self, folder: str) -> None:
    """Writes vocab.txt and wordpiece_tokenizer.json (the options) into `folder`."""
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, VOCAB_FILE), 'w', encoding='utf-8') as f:
      f.write(''.join(token + '\n' for token in self._vocab_lines))
    with open(os.path.join(folder, TOKENIZER_OPTIONS_FILE), 'w', encoding='utf-8') as f:
      json.dump(self.options, f, indent=2, sort_keys=True)
      f.write('\n')

  @property
  def vocab_size(self) -> int:
    """Number of ids (rows of the embedding table the vocabulary needs)."""
    return self._tokenizer.get_vocab_size()

  def _wrap(self, pieces: list[int], max_length: int) -> list[int]:
    if max_length < 2:
      raise ValueError(f'max_length={max_length} leaves no room for [CLS] and [SEP]')
    return [self.cls_id] + pieces[:max_length - 2] + [self.sep_id]

  def encode(self, texts: list[str], max_length: int) -> list[np.ndarray]:
    """Each text -> int32 [n] ids `[CLS] pieces [SEP]`, n <= max_length (pieces past
    max_length - 2 are dropped; [SEP] stays last)."""
    encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=False)
    return [np.asarray(self._wrap(e.ids, max_length), np.int32) for e in encodings]

  def encode_words(self, words: list[str], max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Pre-split words (e.g. of a tagging data set) -> (ids int32 [n], word_index int32 [n]).

    ids = `[CLS] pieces [SEP]` as in `encode`; word_index[i] = j where position i holds
    the first piece of words[j], else -1 ([CLS], [SEP] and continuation pieces). A word
    that yields no piece (empty, whitespace or control characters only) gets one [UNK],
    so every word has a first piece; words cut off by `max_length` have no position.
    """
    words = list(words)
    per_word: list[list[int]] = [[] for _ in words]
    if words:
      encoding = self._tokenizer.encode(words, is_pretokenized=True, add_special_tokens=False)
      for piece, word in zip(encoding.ids, encoding.word_ids):
        per_word[word].append(piece)
    pieces, starts = join_words(per_word, self.unk_id)
    ids = self._wrap(pieces, max_length)
    word_index = [-1] + starts[:len(ids) - 2] + [-1]
    return np.asarray(ids, np.int32), np.asarray(word_index, np.int32)


def pad_batch(sequences: list[np.ndarray], length: int | None = None) -> np.ndarray:
  """Right-pads int sequences with PAD_ID to `length` (default: the longest) -> int32
  [B, length]."""
  length = max((len(s) for s in sequences), default=0) if length is None else length
  out = np.full((len(sequences), length), PAD_ID, np.int32)
  for i, s in enumerate(sequences):
    out[i, :len(s)] = s[:length]
  return out
