"""PyTorch reference model for the speed benchmarks: the same Transformer as transformer_jax.

`TorchTransformer` is `torch.nn.Transformer` (batch_first, pre-LayerNorm (`norm_first=True`),
ReLU, dropout 0.1 on embeddings, sub-layer outputs, the feed-forward hidden layer and the
attention weights) with one embedding table shared by the source, the target and the output
projection, embeddings scaled by sqrt(d_model) plus sinusoidal positions. That is the
architecture of `transformer_jax.models.Transformer` with `share_embeddings=True`; the only
difference in parameters is the key bias that `nn.MultiheadAttention` has and ours does not
(it adds the same number to every logit of a query, so softmax ignores it). `load_flax_params`
copies a transformer_jax parameter tree into the model, so both can start from the same
weights (and give the same logits, see `benchmarks/throughput.py --tiny`).

`TrainStep` is one optimizer update: AdamW (lr 1e-3, betas (0.9, 0.98), eps 1e-9, weight
decay 1e-4 on the matrices of the linear layers only, as `transformer_jax.optim`), the
label-smoothed cross-entropy of `transformer_jax.losses.cross_entropy` (smoothing 0.1,
averaged over non-pad targets), global grad-norm clipping at 1.0. It runs eager or with the
forward pass and loss under `torch.compile` (backward compiled by AOTAutograd), in float32 or
with `torch.autocast(bfloat16)` over float32 master parameters.

`greedy_decode` decodes the way the PyTorch translation tutorial does ("Language Translation
with nn.Transformer and torchtext"): encode once, then at each step re-run the decoder over
the whole prefix generated so far and project the last position.

Token ids as in transformer_jax.tokenizer: PAD 0, EOS 1, BOS 2. Shapes: B batch, S source
length, T target length, D d_model, V vocab.
"""
from __future__ import annotations

import contextlib
import math
import warnings

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

PAD_ID = 0
EOS_ID = 1
BOS_ID = 2


def sinusoid_table(length: int, d_model: int) -> torch.Tensor:
  """float32 [length, D]: PE[p, 2i] = sin(p / 10000^(2i/D)), PE[p, 2i+1] = cos(...), the
  interleaving of `transformer_jax.models.sinusoidal_positions` and the PyTorch tutorial."""
  inv_freq = 1.0 / (10000.0 ** (np.arange(0, d_model, 2, dtype=np.float64) / d_model))
  angles = np.arange(length, dtype=np.float32)[:, None] * inv_freq.astype(np.float32)
  table = np.zeros((length, d_model), np.float32)
  table[:, 0::2] = np.sin(angles)
  table[:, 1::2] = np.cos(angles)[:, :d_model // 2]
  return torch.from_numpy(table)


def shift_right(targets: torch.Tensor) -> torch.Tensor:
  """Decoder inputs: BOS followed by targets[:, :-1]. int64 [B, T] -> int64 [B, T]."""
  return F.pad(targets[:, :-1], (1, 0), value=BOS_ID)


class TorchTransformer(nn.Module):
  """Encoder-decoder Transformer on `torch.nn.Transformer`, tied embeddings.

  Args:
    vocab_size: V.
    d_model, num_heads, d_ff, num_encoder_layers, num_decoder_layers, dropout: the shape and
      dropout rate (attention dropout equals `dropout`, as in `nn.Transformer`).
    max_length: longest sequence the position table covers.
    layer_norm_eps: 1e-6, Flax's LayerNorm default, so the models compute the same thing.
  """

  def __init__(self, vocab_size: int, d_model: int = 512, num_heads: int = 8,
               d_ff: int = 2048, num_encoder_layers: int = 6, num_decoder_layers: int = 6,
               dropout: float = 0.1, max_length: int = 1024, layer_norm_eps: float = 1e-6):
    super().__init__()
    self.d_model = d_model
    self.embed = nn.Embedding(vocab_size, d_model)
    self.register_buffer('positions', sinusoid_table(max_length, d_model), persistent=False)
    self.dropout = nn.Dropout(dropout)
    with warnings.catch_warnings():
      # "enable_nested_tensor is True, but self.use_nested_tensor is False because
      # encoder_layer.norm_first was True": expected for a pre-LN encoder.
      warnings.filterwarnings('ignore', message='enable_nested_tensor')
      # nn.Transformer initializes every matrix with xavier_uniform, as our model does.
      self.transformer = nn.Transformer(
          d_model=d_model, nhead=num_heads, num_encoder_layers=num_encoder_layers,
          num_decoder_layers=num_decoder_layers, dim_feedforward=d_ff, dropout=dropout,
          activation='relu', layer_norm_eps=layer_norm_eps, batch_first=True, norm_first=True)
    nn.init.normal_(self.embed.weight, std=d_model ** -0.5)

  def embed_tokens(self, tokens: torch.Tensor, offset: int = 0) -> torch.Tensor:
    """int64 [B, L] at positions offset..offset+L-1 -> [B, L, D], with dropout."""
    x = self.embed(tokens) * math.sqrt(self.d_model)
    return self.dropout(x + self.positions[offset:offset + tokens.shape[1]])

  def encode(self, inputs: torch.Tensor) -> torch.Tensor:
    """inputs int64 [B, S] (0 = pad) -> memory [B, S, D]."""
    return self.transformer.encoder(self.embed_tokens(inputs),
                                    src_key_padding_mask=inputs == PAD_ID)

  def decode_hidden(self, memory: torch.Tensor, inputs: torch.Tensor,
                    decoder_inputs: torch.Tensor,
                    target_padding: torch.Tensor | None = None) -> torch.Tensor:
    """memory [B, S, D], inputs int64 [B, S] (for the cross-attention mask), decoder inputs
    int64 [B, T] (BOS first), target_padding bool [B, T] or None -> hidden [B, T, D] after
    the decoder's final LayerNorm."""
    length = decoder_inputs.shape[1]
    causal = torch.ones(length, length, dtype=torch.bool,
                        device=decoder_inputs.device).triu(1)  # True = hidden.
    return self.transformer.decoder(
        self.embed_tokens(decoder_inputs), memory, tgt_mask=causal,
        tgt_key_padding_mask=target_padding, memory_key_padding_mask=inputs == PAD_ID,
        tgt_is_causal=True)

  def logits(self, hidden: torch.Tensor) -> torch.Tensor:
    """hidden [..., D] -> float32 logits [..., V] through the transposed embedding table."""
    return F.linear(hidden, self.embed.weight).float()

  def forward(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """inputs int64 [B, S], targets int64 [B, T] (0 = pad) -> float32 logits [B, T, V];
    position t predicts targets[:, t] from inputs and targets[:, :t] (teacher forcing).
    The decoder's self-attention hides keys where the target is padding, as in
    `transformer_jax.models.Decoder`."""
    memory = self.encode(inputs)
    hidden = self.decode_hidden(memory, inputs, shift_right(targets), targets == PAD_ID)
    return self.logits(hidden)


def label_smoothed_cross_entropy(logits: torch.Tensor, targets: torch.Tensor,
                                 label_smoothing: float = 0.1) -> torch.Tensor:
  """The loss of `transformer_jax.losses.cross_entropy`: 1 - eps on the gold token, eps/(V-1)
  on each other token, minus the entropy of that target distribution, averaged over the
  non-pad targets.

  Args:
    logits: float [B, T, V] (computed in float32).
    targets: int64 [B, T], 0 = pad.
    label_smoothing: eps in [0, 1).

  Returns:
    float32 scalar.
  """
  vocab_size = logits.shape[-1]
  logits = logits.float()
  # As transformer_jax: with log p_v = logits_v - lse, every term is a reduction over the
  # logits, and no [B, T, V] log-probabilities are materialized in the forward pass.
  lse = torch.logsumexp(logits, dim=-1)  # [B, T]
  gold_logit = logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1)  # [B, T]
  if label_smoothing > 0:
    confidence, low = 1.0 - label_smoothing, label_smoothing / (vocab_size - 1)
    entropy = -(confidence * math.log(confidence) + (vocab_size - 1) * low * math.log(low))
    token_loss = lse - (confidence - low) * gold_logit - low * logits.sum(-1) - entropy
  else:
    token_loss = lse - gold_logit
  weights = (targets != PAD_ID).float()
  return (token_loss * weights).sum() / weights.sum().clamp_min(1e-8)


def make_optimizer(model: nn.Module, lr: float = 1e-3, betas=(0.9, 0.98), eps: float = 1e-9,
                   weight_decay: float = 1e-4) -> torch.optim.AdamW:
  """AdamW with decoupled weight decay on the linear layers' weight matrices only (not on
  biases, LayerNorm, the embedding), like `transformer_jax.optim.weight_decay_mask`.

  Uses the fused AdamW kernel where the parameters' device supports it (CUDA; CPU since
  torch 2.4), else PyTorch's default implementation.
  """
  decay, no_decay = [], []
  for name, param in model.named_parameters():
    (decay if param.dim() > 1 and not name.startswith('embed') else no_decay).append(param)
  groups = [{'params': decay, 'weight_decay': weight_decay},
            {'params': no_decay, 'weight_decay': 0.0}]
  try:
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, fused=True)
  except (RuntimeError, ValueError):
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps)


def autocast(device: torch.device, dtype: str):
  """torch.autocast to bfloat16 for dtype 'bfloat16' (float32 master parameters), else a
  no-op context."""
  if dtype == 'bfloat16':
    return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
  if dtype != 'float32':
    raise ValueError(f"dtype {dtype!r}: use 'float32' or 'bfloat16'")
  return contextlib.nullcontext()


class TrainStep:
  """One training update of `model`: `step(inputs int64 [B, S], targets int64 [B, T]) ->
  loss` (float32 0-d tensor on the device, detached; the step is not synchronized).

  Args:
    model: a TorchTransformer on its device, in train mode.
    dtype: 'float32' or 'bfloat16' (autocast; parameters, gradients and optimizer state
      stay float32).
    compile: run the forward pass and the loss through `torch.compile` (the backward pass is
      compiled with it by AOTAutograd); the optimizer step runs eager (one fused kernel).
    dynamic: `torch.compile(dynamic=...)`; True for batches whose shapes vary.
    max_grad_norm: global-norm clipping threshold; 0 turns clipping off.
    label_smoothing, lr, and the optimizer's other settings: see `make_optimizer`.
  """

  def __init__(self, model: TorchTransformer, *, dtype: str = 'float32', compile: bool = False,
               dynamic: bool | None = None, max_grad_norm: float = 1.0,
               label_smoothing: float = 0.1, lr: float = 1e-3):
    self.model = model
    self.device = next(model.parameters()).device
    self.dtype = dtype
    self.max_grad_norm = max_grad_norm
    self.label_smoothing = label_smoothing
    self.optimizer = make_optimizer(model, lr=lr)
    self.loss_fn = self._loss
    if compile:
      self.loss_fn = torch.compile(self._loss, dynamic=dynamic)

  def _loss(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    with autocast(self.device, self.dtype):
      logits = self.model(inputs, targets)
    return label_smoothed_cross_entropy(logits.float(), targets, self.label_smoothing)

  def __call__(self, inputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    self.optimizer.zero_grad(set_to_none=True)
    loss = self.loss_fn(inputs, targets)
    loss.backward()
    if self.max_grad_norm > 0:
      torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.max_grad_norm)
    self.optimizer.step()
    return loss.detach()


class GreedyDecoder:
  """Greedy decoding as in the PyTorch translation tutorial, batched.

  `decoder(inputs int64 [B, S], max_lengths int64 [B]) -> int64 [B, max(max_lengths)]`:
  encodes once, then for each position re-runs the decoder over the whole prefix (BOS and
  the tokens so far; no key/value cache) and takes the argmax of the last position's logits.
  A sentence ends at EOS or at its maximum length (EOS included; EOS is forced at the last
  allowed position, as `transformer_jax.decode` does); decoding stops when all have ended
  (checked on the host every step, like the tutorial's `if next_word == EOS`). Outputs are
  EOS-terminated and 0-padded.

  Args:
    model: a TorchTransformer (switched to eval mode by the caller).
    dtype: 'float32' or 'bfloat16' (autocast).
    compile: `torch.compile(dynamic=True)` the encoder and the per-step decoder call, so the
      growing prefix does not recompile at every length.
  """

  def __init__(self, model: TorchTransformer, *, dtype: str = 'float32', compile: bool = False):
    self.model, self.dtype = model, dtype
    self.device = next(model.parameters()).device
    self.encode = model.encode
    self.next_logits = self._next_logits
    if compile:
      self.encode = torch.compile(model.encode, dynamic=True)
      self.next_logits = torch.compile(self._next_logits, dynamic=True)

  def _next_logits(self, memory, inputs, prefix):
    return self.model.logits(self.model.decode_hidden(memory, inputs, prefix)[:, -1])

  @torch.inference_mode()
  def __call__(self, inputs: torch.Tensor, max_lengths: torch.Tensor) -> torch.Tensor:
    with autocast(self.device, self.dtype):
      memory = self.encode(inputs)
      batch = inputs.shape[0]
      prefix = torch.full((batch, 1), BOS_ID, dtype=torch.long, device=inputs.device)
      finished = torch.zeros(batch, dtype=torch.bool, device=inputs.device)
      not_eos = torch.arange(self.model.embed.num_embeddings, device=inputs.device) != EOS_ID
      for index in range(int(max_lengths.max())):
        logits = self.next_logits(memory, inputs, prefix)  # float32 [B, V]
        last = (index >= max_lengths - 1)[:, None]
        logits = logits.masked_fill(last & not_eos, -1e9)
        tokens = torch.where(finished, PAD_ID, logits.argmax(-1))
        prefix = torch.cat([prefix, tokens[:, None]], dim=1)
        finished |= tokens == EOS_ID
        if bool(finished.all()):
          break
    return prefix[:, 1:]


def load_flax_params(model: TorchTransformer, params) -> None:
  """Copies a transformer_jax parameter tree (share_embeddings=True, the same shape) into
  `model`; the key biases, which transformer_jax does not have, are set to 0.

  Args:
    model: the TorchTransformer to overwrite.
    params: the 'params' collection of `transformer_jax.models.Transformer` (arrays of any
      float dtype, on any device).

  Raises:
    KeyError / RuntimeError: the tree does not match the model (names or shapes).
  """
  d = model.d_model
  as_tensor = lambda x: torch.from_numpy(np.asarray(x, dtype=np.float32).copy())
  state = {'embed.weight': as_tensor(params['source_embedder']['embed']['embedding'])}

  def attention(prefix, p):
    w = lambda name: as_tensor(p[name]['kernel']).reshape(d, d).T
    bias = lambda name: as_tensor(p[name]['bias']).reshape(d)
    state[prefix + 'in_proj_weight'] = torch.cat([w('query'), w('key'), w('value')])
    state[prefix + 'in_proj_bias'] = torch.cat([bias('query'), torch.zeros(d), bias('value')])
    state[prefix + 'out_proj.weight'] = as_tensor(p['out']['kernel']).reshape(d, d).T
    state[prefix + 'out_proj.bias'] = as_tensor(p['out']['bias'])

  def norm(prefix, p):
    state[prefix + 'weight'] = as_tensor(p['scale'])
    state[prefix + 'bias'] = as_tensor(p['bias'])

  def feed_forward(prefix, p):
    for torch_name, jax_name in (('linear1', 'wi'), ('linear2', 'wo')):
      state[f'{prefix}{torch_name}.weight'] = as_tensor(p[jax_name]['kernel']).T
      state[f'{prefix}{torch_name}.bias'] = as_tensor(p[jax_name]['bias'])

  for i in range(len(model.transformer.encoder.layers)):
    p, prefix = params['encoder'][f'layers_{i}'], f'transformer.encoder.layers.{i}.'
    attention(prefix + 'self_attn.', p['self_attention'])
    norm(prefix + 'norm1.', p['self_attention_norm'])
    norm(prefix + 'norm2.', p['feed_forward_norm'])
    feed_forward(prefix, p['feed_forward'])
  for i in range(len(model.transformer.decoder.layers)):
    p, prefix = params['decoder'][f'layers_{i}'], f'transformer.decoder.layers.{i}.'
    attention(prefix + 'self_attn.', p['self_attention'])
    attention(prefix + 'multihead_attn.', p['cross_attention'])
    norm(prefix + 'norm1.', p['self_attention_norm'])
    norm(prefix + 'norm2.', p['cross_attention_norm'])
    norm(prefix + 'norm3.', p['feed_forward_norm'])
    feed_forward(prefix, p['feed_forward'])
  norm('transformer.encoder.norm.', params['encoder']['final_norm'])
  norm('transformer.decoder.norm.', params['decoder']['final_norm'])
  missing, unexpected = model.load_state_dict(state, strict=False)
  if missing or unexpected:
    raise KeyError(f'load_flax_params: missing {missing}, unexpected {unexpected}')
