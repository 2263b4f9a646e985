"""A minimal NNX attention module of the shape of flax's Gemma example, written for the
tests from its published conventions (flax's code is not used): Einsum layers with one
parameter `w`, q_einsum [N, D, H] with kv_einsum [2, K, D, H], or qkv_einsum [3, N, D, H];
attn_vec_einsum [N, H, D]; optional QK norm (Gemma's RMSNorm, x * (1 + scale)); RoPE in
the half-split form with base 10000 over segment_pos; queries times query_pre_attn_scalar
(default head_dim ** -0.5); optional logit soft-cap c tanh(logits / c); optional sliding
window; a left-aligned cache {'k', 'v', 'end_index'}; the call
(x, segment_pos, cache, attn_mask) -> (cache, out).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

K_MASK = -2.3819763e38


class Einsum(nnx.Module):
  def __init__(self, einsum_str: str, shape, *, rngs: nnx.Rngs):
    self.einsum_str = einsum_str
    self.shape = tuple(shape)
    self.w = nnx.Param(jax.random.normal(rngs.params(), shape) / jnp.sqrt(shape[-2]))

  def __call__(self, x):
    return jnp.einsum(self.einsum_str, x, self.w[...])


class RMSNorm(nnx.Module):
  def __init__(self, dim: int, *, rngs: nnx.Rngs):
    self.scale = nnx.Param(0.1 * jax.random.normal(rngs.params(), (dim,)))

  def __call__(self, x):
    var = jnp.mean(jnp.square(x), axis=-1, keepdims=True)
    scale = self.scale[...].reshape((1,) * (x.ndim - 1) + (-1,))
    return x * jax.lax.rsqrt(var + 1e-6) * (1 + scale)


def apply_rope(inputs, positions, max_wavelength=10_000):
  head_dim = inputs.shape[-1]
  fraction = 2 * jnp.arange(0, head_dim // 2) / head_dim
  timescale = max_wavelength ** fraction
  angle = positions[..., None] / timescale[None, None, :]
  sin, cos = jnp.sin(angle)[..., None, :], jnp.cos(angle)[..., None, :]
  first, second = jnp.split(inputs, 2, axis=-1)
  return jnp.concatenate([first * cos - second * sin, second * cos + first * sin], axis=-1)


class Attention(nnx.Module):
  def __init__(self, num_heads, num_kv_heads, features, head_dim, *, rngs: nnx.Rngs,
               attn_logits_soft_cap=None, sliding_window_size=None, use_qk_norm=False,
               query_pre_attn_scalar=None):
    self.attn_logits_soft_cap = attn_logits_soft_cap
    self.sliding_window_size = sliding_window_size
    self.query_pre_attn_scalar = query_pre_attn_scalar
    self.use_qk_norm = use_qk_norm
    self.attn_vec_einsum = Einsum('BTNH,NHD->BTD', (num_heads, head_dim, features), rngs=rngs)
    if num_heads == num_kv_heads:
      self.qkv_einsum = Einsum('BTD,SNDH->SBTNH', (3, num_heads, features, head_dim), rngs=rngs)
    else:
      self.q_einsum = Einsum('BTD,NDH->BTNH', (num_heads, features, head_dim), rngs=rngs)
      self.kv_einsum = Einsum('BSD,CKDH->CBSKH', (2, num_kv_heads, features, head_dim),
                              rngs=rngs)
    if use_qk_norm:
      self._query_norm = RMSNorm(head_dim, rngs=rngs)
      self._key_norm = RMSNorm(head_dim, rngs=rngs)

  @property
  def head_dim(self):
    return self.attn_vec_einsum.shape[1]

  def __call__(self, x, segment_pos, cache, attn_mask):
    if hasattr(self, 'qkv_einsum'):
      query, key, value = self.qkv_einsum(x)
    else:
      query = self.q_einsum(x)
      key, value = self.kv_einsum(x)
    if self.use_qk_norm:
      query, key = self._query_norm(query), self._key_norm(key)
    query = apply_rope(query, segment_pos)
    key = apply_rope(key, segment_pos)
    scalar = self.query_pre_attn_scalar or self.head_dim ** -0.5
    query = query * scalar
    if cache is not None:
      end = cache['end_index'][0]
      at = (0, end % cache['v'].shape[1], 0, 0)
      value = jax.lax.dynamic_update_slice(cache['v'], value, at)
      key = jax.lax.dynamic_update_slice(cache['k'], key, at)
    N, K = query.shape[2], key.shape[2]
    key_n = jnp.repeat(key, N // K, axis=2)          # query head n reads KV head n // (N/K)
    value_n = jnp.repeat(value, N // K, axis=2)
    logits = jnp.einsum('BTNH,BSNH->BTNS', query, key_n)
    if self.attn_logits_soft_cap is not None:
      logits = jnp.tanh(logits / self.attn_logits_soft_cap) * self.attn_logits_soft_cap
    if self.sliding_window_size is not None:
      ones = jnp.ones_like(attn_mask)
      w = self.sliding_window_size
      attn_mask = attn_mask * jnp.triu(ones, -w + 1) * jnp.tril(ones, w - 1)
    logits = jnp.where(attn_mask[:, :, None, :], logits, K_MASK)
    probs = jax.nn.softmax(logits, axis=-1).astype(key.dtype)
    out = self.attn_vec_einsum(jnp.einsum('BTNS,BSNH->BTNH', probs, value_n))
    new_cache = None if cache is None else {
        'v': value, 'k': key, 'end_index': cache['end_index'] + x.shape[1]}
    return new_cache, out

  def init_cache(self, cache_size, batch_size, dtype=jnp.float32):
    K = (self.qkv_einsum.shape[1] if hasattr(self, 'qkv_einsum') else self.kv_einsum.shape[1])
    return {'v': jnp.zeros((batch_size, cache_size, K, self.head_dim), dtype),
            'k': jnp.zeros((batch_size, cache_size, K, self.head_dim), dtype),
            'end_index': jnp.zeros((batch_size,), jnp.int32)}


class Block(nnx.Module):
  """A pre-norm residual block around the attention (enough to gate a model of them)."""

  def __init__(self, features, **kw):
    rngs = kw.pop('rngs')
    self.attn = Attention(num_heads=kw.pop('num_heads'), num_kv_heads=kw.pop('num_kv_heads'),
                          features=features, head_dim=kw.pop('head_dim'), rngs=rngs, **kw)

  def __call__(self, x, segment_pos, cache, attn_mask):
    cache, y = self.attn(x, segment_pos, cache, attn_mask)
    return cache, x + y
