"""Tiny Hugging Face-format causal LMs for the tests: weights made with numpy, written as
config.json + model.safetensors in the HF naming, and an independent numpy forward pass
written from the published equations (Llama, Qwen2, Qwen3), to check the loader against.

The forward (per layer, pre-norm residual):
  h = x + Attn(RMSNorm(x)),  y = h + W_down (silu(W_gate RMSNorm(h)) * (W_up RMSNorm(h)))
  RMSNorm(x) = x / sqrt(mean(x^2) + eps) * w
  Attn: q = x W_q^T (+ b_q), k, v likewise with G = num_key_value_heads heads; Qwen3 then
  RMSNorms every head of q and k over Dh (q_norm, k_norm); RoPE rotates q and k; query head
  h attends over the keys of KV head h // (H / G), causally, with softmax(q k^T / sqrt(Dh));
  o = concat_h(attention_h) W_o^T.
  RoPE (Hugging Face's `rotate_half` convention): for i < Dh/2, the pair (x_i, x_{i+Dh/2}) is
  rotated by the angle pos * theta^(-2i/Dh); Llama 3's rope_scaling 'llama3' rescales the
  inverse frequencies first (long wavelengths divided by factor, short ones kept, a smooth
  ramp between low_freq_factor and high_freq_factor).
  logits = RMSNorm_final(x_N) W_lm^T (W_lm = the embedding when tie_word_embeddings).
"""

from __future__ import annotations

import json
import math
import os

import numpy as np

FAMILIES = {
    'llama': dict(architectures=['LlamaForCausalLM'], model_type='llama',
                  attention_bias=False, mlp_bias=False),
    'qwen2': dict(architectures=['Qwen2ForCausalLM'], model_type='qwen2'),
    'qwen3': dict(architectures=['Qwen3ForCausalLM'], model_type='qwen3', attention_bias=False),
}


def tiny_config(family: str, *, hidden=32, heads=4, kv_heads=2, layers=2, ffn=48, vocab=64,
                tie=False, rope_scaling=None, head_dim=None, attention_bias=None) -> dict:
  config = {**FAMILIES[family], 'hidden_size': hidden, 'num_attention_heads': heads,
            'num_key_value_heads': kv_heads, 'num_hidden_layers': layers,
            'intermediate_size': ffn, 'vocab_size': vocab, 'rms_norm_eps': 1e-6,
            'rope_theta': 10000.0, 'max_position_embeddings': 128,
            'tie_word_embeddings': tie, 'hidden_act': 'silu', 'torch_dtype': 'float32'}
  if head_dim is not None or family == 'qwen3':
    config['head_dim'] = head_dim or hidden // heads
  if rope_scaling is not None:
    config['rope_scaling'] = rope_scaling
  if attention_bias is not None:
    config['attention_bias'] = attention_bias
  return config


def tiny_weights(config: dict, seed: int = 0) -> dict[str, np.ndarray]:
  """Random weights in the HF naming ([out, in] matrices), small enough to stay finite."""
  rng = np.random.default_rng(seed)
  D, H, G = config['hidden_size'], config['num_attention_heads'], config['num_key_value_heads']
  Dh = config.get('head_dim', D // H)
  F, V = config['intermediate_size'], config['vocab_size']
  qkv_bias = config['model_type'] == 'qwen2' or config.get('attention_bias', False)

  def mat(out, inp):
    return (rng.standard_normal((out, inp)) / math.sqrt(inp)).astype(np.float32)

  def norm(n):
    return (1.0 + 0.1 * rng.standard_normal(n)).astype(np.float32)
  w = {'model.embed_tokens.weight': rng.standard_normal((V, D)).astype(np.float32),
       'model.norm.weight': norm(D)}
  if not config['tie_word_embeddings']:
    w['lm_head.weight'] = mat(V, D)
  for i in range(config['num_hidden_layers']):
    p = f'model.layers.{i}.'
    w.update({p + 'input_layernorm.weight': norm(D), p + 'post_attention_layernorm.weight': norm(D),
              p + 'self_attn.q_proj.weight': mat(H * Dh, D),
              p + 'self_attn.k_proj.weight': mat(G * Dh, D),
              p + 'self_attn.v_proj.weight': mat(G * Dh, D),
              p + 'self_attn.o_proj.weight': mat(D, H * Dh),
              p + 'mlp.gate_proj.weight': mat(F, D), p + 'mlp.up_proj.weight': mat(F, D),
              p + 'mlp.down_proj.weight': mat(D, F)})
    if qkv_bias:
      for name, n in (('q', H * Dh), ('k', G * Dh), ('v', G * Dh)):
        w[p + f'self_attn.{name}_proj.bias'] = (0.1 * rng.standard_normal(n)).astype(np.float32)
    if config.get('attention_bias', False) and config['model_type'] != 'qwen2':
      w[p + 'self_attn.o_proj.bias'] = (0.1 * rng.standard_normal(D)).astype(np.float32)
    if config['model_type'] == 'qwen3':
      w[p + 'self_attn.q_norm.weight'] = norm(Dh)
      w[p + 'self_attn.k_norm.weight'] = norm(Dh)
  return w


def write(folder, config: dict, weights: dict[str, np.ndarray], shards: int = 1) -> str:
  """config.json and the weights as safetensors (with an index when sharded)."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  os.makedirs(folder, exist_ok=True)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  names = sorted(weights)
  if shards == 1:
    save_file({n: weights[n] for n in names}, os.path.join(folder, 'model.safetensors'))
    return str(folder)
  index = {}
  for s in range(shards):
    file = f'model-{s + 1:05d}-of-{shards:05d}.safetensors'
    part = names[s::shards]
    save_file({n: weights[n] for n in part}, os.path.join(folder, file))
    index.update({n: file for n in part})
  with open(os.path.join(folder, 'model.safetensors.index.json'), 'w') as f:
    json.dump({'metadata': {}, 'weight_map': index}, f)
  return str(folder)


def rms_norm(x, w, eps):
  x = x.astype(np.float64)
  return x / np.sqrt((x ** 2).mean(-1, keepdims=True) + eps) * w


def inverse_frequencies(config: dict, Dh: int) -> np.ndarray:
  inv = 1.0 / config['rope_theta'] ** (np.arange(0, Dh, 2, dtype=np.float64) / Dh)
  scaling = config.get('rope_scaling')
  if scaling and scaling.get('rope_type', scaling.get('type')) == 'llama3':
    factor, low, high = scaling['factor'], scaling['low_freq_factor'], scaling['high_freq_factor']
    old = scaling['original_max_position_embeddings']
    wavelen = 2 * math.pi / inv
    smooth = (old / wavelen - low) / (high - low)
    scaled = np.where(wavelen > old / low, inv / factor, inv)
    middle = (wavelen >= old / high) & (wavelen <= old / low)
    inv = np.where(middle, (1 - smooth) * inv / factor + smooth * inv, scaled)
  return inv


def rope(x_LxNxDh, inv_F):
  L, _, Dh = x_LxNxDh.shape
  angle = np.arange(L)[:, None] * inv_F[None, :]                 # [L, Dh/2]
  cos = np.concatenate([np.cos(angle)] * 2, -1)[:, None, :]
  sin = np.concatenate([np.sin(angle)] * 2, -1)[:, None, :]
  half = Dh // 2
  rotated = np.concatenate([-x_LxNxDh[..., half:], x_LxNxDh[..., :half]], -1)
  return x_LxNxDh * cos + rotated * sin


def forward(config: dict, weights: dict[str, np.ndarray], tokens_L) -> np.ndarray:
  """Logits [L, V] of one sequence, in float64 numpy, from the equations above."""
  D, H, G = config['hidden_size'], config['num_attention_heads'], config['num_key_value_heads']
  Dh = config.get('head_dim', D // H)
  eps = config['rms_norm_eps']
  w = {k: v.astype(np.float64) for k, v in weights.items()}
  inv = inverse_frequencies(config, Dh)
  x = w['model.embed_tokens.weight'][np.asarray(tokens_L)]
  L = x.shape[0]
  causal = np.tril(np.ones((L, L), bool))
  for i in range(config['num_hidden_layers']):
    p = f'model.layers.{i}.'
    a = rms_norm(x, w[p + 'input_layernorm.weight'], eps)
    proj = {}
    for name, n in (('q', H), ('k', G), ('v', G)):
      y = a @ w[p + f'self_attn.{name}_proj.weight'].T
      if p + f'self_attn.{name}_proj.bias' in w:
        y = y + w[p + f'self_attn.{name}_proj.bias']
      proj[name] = y.reshape(L, n, Dh)
    if config['model_type'] == 'qwen3':
      proj['q'] = rms_norm(proj['q'], w[p + 'self_attn.q_norm.weight'], eps)
      proj['k'] = rms_norm(proj['k'], w[p + 'self_attn.k_norm.weight'], eps)
    q, k, v = rope(proj['q'], inv), rope(proj['k'], inv), proj['v']
    heads = []
    for h in range(H):
      g = h // (H // G)
      s = q[:, h] @ k[:, g].T / math.sqrt(Dh)
      s = np.where(causal, s, -np.inf)
      s = np.exp(s - s.max(-1, keepdims=True))
      heads.append((s / s.sum(-1, keepdims=True)) @ v[:, g])
    x = x + np.concatenate(heads, -1) @ w[p + 'self_attn.o_proj.weight'].T
    if p + 'self_attn.o_proj.bias' in w:
      x = x + w[p + 'self_attn.o_proj.bias']
    m = rms_norm(x, w[p + 'post_attention_layernorm.weight'], eps)
    gate = m @ w[p + 'mlp.gate_proj.weight'].T
    x = x + ((gate / (1 + np.exp(-gate))) * (m @ w[p + 'mlp.up_proj.weight'].T)) @ w[
        p + 'mlp.down_proj.weight'].T
  x = rms_norm(x, w['model.norm.weight'], eps)
  lm = w['model.embed_tokens.weight'] if config['tie_word_embeddings'] else w['lm_head.weight']
  return x @ lm.T
