"""The adapter of the attention of flax's NNX Gemma example (`examples/gemma/modules.py` in
the flax repository): GatedGemmaAttention.

That module's weights are `Einsum` layers with one parameter `w`:
  q_einsum [N, D, H] with kv_einsum [2, K, D, H] (K < N: grouped-query attention), or
  qkv_einsum [3, N, D, H] (K = N);  attn_vec_einsum [N, H, D];
with N query heads, K KV heads, D features and H the head width (this file keeps the
example's letters in the weights' names, and our own, Dh and G, in the computation's).
Its call, kept here, is (x_BxTxD, segment_pos_BxT, cache | None, attn_mask_BxTxS) ->
(cache | None, y_BxTxD), and it computes, in order:
  q, k, v = x Wq, x Wk, x Wv                     (query head n reads KV head n // (N/K))
  q, k = RMSNorm(q) (1 + s_q), RMSNorm(k) (1 + s_k)   when use_qk_norm (eps 1e-6)
  q, k = RoPE(q, pos), RoPE(k, pos)  half-split, f_i = base^(-2i/H) / rope_scale_factor
  logits = (q c) . k,  c = query_pre_attn_scalar (default H^-1/2)
  logits = cap tanh(logits / cap)                when attn_logits_soft_cap is set
  mask = attn_mask, banded to |t - s| < W        when the layer is local-sliding (W =
                                                 sliding_window_size; on the indices of
                                                 attn_mask, as the example does)
  y = softmax(mask(logits)) v Wo
with a left-aligned cache {'k', 'v' [B, S, K, H], 'end_index' [B]} written at end_index.

GatedGemmaAttention holds the original's Einsum (and QK norm) modules under the same
attribute names, so a gated model's parameter paths are the original's plus the gate's,
and computes the same equations with a per-sequence gate over the heads (HeadGating):
  masked path    every head computed, head n's output times w_bn (training; any cache)
  gathered path  only the K chosen heads (unit='kv_group': only their groups' K/V) are
                 computed; without a cache (prefill-free inference, scoring). With a
                 cache it refuses: switch to masked with `gating.set_path(model,
                 'masked')` for cached decoding.
With a cache the gate is decided once, when the cache is empty (end_index = 0: the
prompt), and kept in the cache under 'gate' [B, N] for the tokens decoded after it; make
caches with this module's `init_cache`, which adds that entry. A router that reads the
first P tokens ('prefix') needs them in that first chunk: a shorter one is refused.
"""

from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
from flax import nnx

from gating.adapters import Adapter, register_adapter
from gating.layers import compute
from gating.layers.attention import causal_router
from gating.layers.head_gate import HeadGating, check_active_heads, check_gate, check_kv_units

NORM_EPS = 1e-6           # the example's RMSNorm epsilon
DEFAULT_ROPE_BASE = 10_000


def _einsum_w(module, name: str):
  """The `w` array of the Einsum sub-module `name`, or None when there is none."""
  einsum = getattr(module, name, None)
  w = getattr(einsum, 'w', None)
  return None if w is None else w[...]


def matches(module) -> bool:
  """A Gemma-example attention: attn_vec_einsum [N, H, D] and either qkv_einsum
  [3, N, D, H] or q_einsum [N, D, H] with kv_einsum [2, K, D, H]."""
  if isinstance(module, HeadGating):
    return False
  out = _einsum_w(module, 'attn_vec_einsum')
  if out is None or out.ndim != 3:
    return False
  qkv = _einsum_w(module, 'qkv_einsum')
  if qkv is not None:
    return qkv.ndim == 4 and qkv.shape[0] == 3
  q, kv = _einsum_w(module, 'q_einsum'), _einsum_w(module, 'kv_einsum')
  return q is not None and kv is not None and q.ndim == 3 and kv.ndim == 4


def _sliding_window(module) -> int | None:
  """The window of a local-sliding layer, None for a global one: the example's
  `attn_type` (an enum whose member is named LOCAL_SLIDING), or, on a module without
  `attn_type`, `sliding_window_size` itself."""
  window = getattr(module, 'sliding_window_size', None)
  attn_type = getattr(module, 'attn_type', None)
  if attn_type is None:
    return window
  if getattr(attn_type, 'name', str(attn_type)) != 'LOCAL_SLIDING':
    return None
  if window is None:
    raise ValueError('the Gemma attention is local-sliding but has no sliding_window_size')
  return int(window)


class GatedGemmaAttention(HeadGating, nnx.Module):
  """A Gemma-example attention with a learned per-sequence head gate (module docstring).

  Built from the original module (`gating.gate_heads` does this through the adapter
  registry); the gate arguments are GatedMultiHeadAttention's: gate, active_heads, path,
  router, prefix_len, unit ('kv_group', the default under grouped-query attention, or
  'query_head'), shared_heads, router_hidden_features, router_init_logit, temperature,
  noise, noise_scale, scaled_weights, gate_options, threshold, stretch. causal=True: the
  router reads no token after the prefix ('prefix' with prefix_len=P, else 'first'), as
  a decoder LM needs. With gate='dense' its outputs are the original's.
  """

  def __init__(self, original: nnx.Module, *, rngs: nnx.Rngs, causal: bool = False,
               gate: str = 'topk', active_heads: int | None = None, path: str = 'masked',
               router: str | None = None, prefix_len: int | None = None,
               unit: str | None = None, shared_heads: int = 0,
               router_hidden_features: int | None = None, router_init_logit: float = 0.0,
               temperature: float | None = None, noise: str | None = None,
               noise_scale: float = 1.0, scaled_weights: bool = False,
               gate_options: Mapping[str, float] | None = None,
               threshold: float | None = None, stretch: tuple[float, float] | None = None,
               deterministic: bool | None = None):
    if not matches(original):
      raise ValueError(f'GatedGemmaAttention needs a Gemma-example attention module, got '
                       f'{type(original).__name__}')
    if causal:
      kw = causal_router(dict(gate=gate, router=router, prefix_len=prefix_len))
      router = kw['router']
    out_NxHxD = _einsum_w(original, 'attn_vec_einsum')
    self.num_heads, self.head_dim, self.features = (int(n) for n in out_NxHxD.shape)
    if original.__dict__.get('qkv_einsum') is not None:
      self.num_kv_heads = self.num_heads
      self.qkv_einsum = nnx.clone(original.qkv_einsum)
    else:
      self.num_kv_heads = int(_einsum_w(original, 'kv_einsum').shape[1])
      self.q_einsum = nnx.clone(original.q_einsum)
      self.kv_einsum = nnx.clone(original.kv_einsum)
    self.attn_vec_einsum = nnx.clone(original.attn_vec_einsum)
    self.use_qk_norm = bool(getattr(original, 'use_qk_norm', False))
    if self.use_qk_norm:
      self._query_norm = nnx.clone(original._query_norm)   # pylint: disable=protected-access
      self._key_norm = nnx.clone(original._key_norm)       # pylint: disable=protected-access
    self.attn_type = getattr(original, 'attn_type', None)
    self.sliding_window_size = getattr(original, 'sliding_window_size', None)
    self.window = _sliding_window(original)
    self.attn_logits_soft_cap = getattr(original, 'attn_logits_soft_cap', None)
    scalar = getattr(original, 'query_pre_attn_scalar', None)
    self.query_pre_attn_scalar = self.head_dim ** -0.5 if scalar is None else float(scalar)
    self.rope_base_frequency = float(getattr(original, 'rope_base_frequency', None)
                                     or DEFAULT_ROPE_BASE)
    self.rope_scale_factor = float(getattr(original, 'rope_scale_factor', None) or 1.0)
    inv_freq = compute.rope_inv_freq(self.rope_base_frequency, self.head_dim)
    self.rotary_inv_freq = tuple(f / self.rope_scale_factor for f in inv_freq)
    self.dropout_rate = 0.0
    self.deterministic = deterministic

    unit, router, options = check_gate(
        num_heads=self.num_heads, num_kv_heads=self.num_kv_heads, unit=unit, gate=gate,
        active_heads=active_heads, path=path, shared_heads=shared_heads, router=router,
        prefix_len=prefix_len, noise=noise, gate_options=gate_options,
        threshold=threshold, stretch=stretch)
    self.init_gate(
        in_features=self.features, unit=unit, gate=gate, active_heads=active_heads,
        path=path, shared_heads=shared_heads, router=router, prefix_len=prefix_len,
        options=options, router_hidden_features=router_hidden_features,
        router_init_logit=router_init_logit, temperature=temperature, noise=noise,
        noise_scale=noise_scale, scaled_weights=scaled_weights, rngs=rngs)

  # -- the original's interface -------------------------------------------------------------

  @property
  def use_qkv_einsum(self) -> bool:
    return 'qkv_einsum' in vars(self)

  def init_cache(self, cache_size: int, batch_size: int, dtype=jnp.bfloat16) -> dict:
    """The original's cache {'k', 'v' [B, S, K, H], 'end_index' [B]} plus 'gate' [B, N],
    the gate weights decided at the prompt."""
    kv = (batch_size, cache_size, self.num_kv_heads, self.head_dim)
    return {'v': jnp.zeros(kv, dtype), 'k': jnp.zeros(kv, dtype),
            'end_index': jnp.zeros((batch_size,), jnp.int32),
            'gate': jnp.zeros((batch_size, self.num_heads), jnp.float32)}

  def set_view(self, deterministic: bool | None = None, **_):
    """For `nnx.view` / model.train() / model.eval(): sets deterministic."""
    if deterministic is not None:
      self.deterministic = deterministic

  # -- weights ------------------------------------------------------------------------------

  def head_weights(self) -> compute.HeadWeights:
    """The weights in our layout: Wq [D, N, H], Wk/Wv [D, K, H], Wo [N, H, D], and the QK
    norm's effective scales 1 + s (the example's RMSNorm multiplies by 1 + scale)."""
    if self.use_qkv_einsum:
      wq, wk, wv = (w.transpose(1, 0, 2) for w in self.qkv_einsum.w[...])
    else:
      wq = self.q_einsum.w[...].transpose(1, 0, 2)
      wk, wv = (w.transpose(1, 0, 2) for w in self.kv_einsum.w[...])
    norms = ((1 + self._query_norm.scale[...], 1 + self._key_norm.scale[...])
             if self.use_qk_norm else (None, None))
    return compute.HeadWeights(wq, wk, wv, self.attn_vec_einsum.w[...], None, None, None,
                               None, *norms)

  def _options(self, mask_BxTxS, segment_pos_BxT, rotary: bool = True):
    if self.window is not None:
      ones = jnp.ones_like(mask_BxTxS)
      band = jnp.triu(ones, -self.window + 1) * jnp.tril(ones, self.window - 1)
      mask_BxTxS = band * mask_BxTxS
    return compute.AttendOptions(
        mask=jnp.asarray(mask_BxTxS).astype(bool)[:, None],
        rotary_base=self.rope_base_frequency if rotary else None,
        rotary_inv_freq=self.rotary_inv_freq if rotary else None,
        positions_q_BxL=segment_pos_BxT, positions_k_BxS=segment_pos_BxT,
        norm_eps=NORM_EPS, logit_scale=self.query_pre_attn_scalar,
        soft_cap=self.attn_logits_soft_cap)

  # -- the call -----------------------------------------------------------------------------

  def __call__(self, x_BxTxD, segment_pos_BxT, cache, attn_mask_BxTxS, *,
               path: str | None = None, active_heads: int | None = None,
               deterministic: bool | None = None, rngs=None):
    """(cache, y_BxTxD), as the original; `path`, `active_heads`: per-call overrides."""
    path = self.path if path is None else path
    k = self.active_heads if active_heads is None else active_heads
    check_active_heads(k, self.num_heads, self.gate_rule, path)
    check_kv_units(self.num_heads, self.num_kv_heads, self.unit, k)
    if cache is not None and path == 'gathered' and k != self.num_heads:
      raise ValueError('GatedGemmaAttention: the gathered path runs without a cache; for '
                       "cached decoding use the masked path (gating.set_path(model, "
                       "'masked'))")
    if cache is not None and 'gate' not in cache:
      raise ValueError("GatedGemmaAttention: the cache has no 'gate' entry (the gate "
                       'decided at the prompt); make caches with the gated module\'s '
                       'init_cache')
    if cache is not None:
      self._check_prompt_holds_the_prefix(cache['end_index'], x_BxTxD.shape[1])
    deterministic = self._deterministic(deterministic)
    valid_BxT = jnp.any(jnp.asarray(attn_mask_BxTxS).astype(bool), axis=-1)
    logits_BxU, gate = self.decide(x_BxTxD, valid_BxT, k, deterministic, rngs,
                                   record=False)
    if cache is not None:   # the gate decided at the prompt, kept while decoding after it
      first_Bx1 = (cache['end_index'] == 0)[:, None]
      gate = gate._replace(weights_BxH=jnp.where(
          first_Bx1, gate.weights_BxH.astype(jnp.float32), cache['gate']))
    self._record(logits_BxU, gate)
    w = self.head_weights()
    if cache is None:
      options = self._options(attn_mask_BxTxS, segment_pos_BxT)
      if path == 'masked' or k == self.num_heads or self.forced_weights_BxH is not None:
        return None, compute.masked_attention(x_BxTxD, x_BxTxD, x_BxTxD, w,
                                              gate.weights_BxH, options)
      weights_BxK = jnp.take_along_axis(gate.weights_BxH, gate.idx_BxK, axis=1)
      return None, compute.gathered_attention(x_BxTxD, x_BxTxD, x_BxTxD, w, gate.idx_BxK,
                                              weights_BxK, options, unit=self.unit)
    return self._cached(x_BxTxD, segment_pos_BxT, cache, attn_mask_BxTxS, w,
                        gate.weights_BxH)

  def _check_prompt_holds_the_prefix(self, end_index_B, T: int):
    """A ValueError when an empty cache (end_index 0) gets a chunk of T < P tokens
    under a router that reads the first P ('prefix'): the gate kept for the sequence
    would be decided on T of its P tokens, and every later output would differ from the
    full forward's. Checked on the values where they are concrete, else by a host
    callback (under jit; only when T < P, i.e. at decoding steps, not at a prompt of at
    least P tokens)."""
    router = self.router
    P = router.prefix_len if getattr(router, 'pool', None) == 'prefix' else 1
    if T >= P:
      return
    message = (f'GatedGemmaAttention: a prompt of {T} token(s) into an empty cache, shorter '
               f'than the gate prefix P={P}: the gate reads the first P tokens; prefill at '
               'least P at once')
    if not isinstance(end_index_B, jax.core.Tracer):
      if bool(jnp.any(jnp.asarray(end_index_B) == 0)):
        raise ValueError(message)
      return

    def refuse(empty):
      if empty:
        raise ValueError(message)
    jax.debug.callback(refuse, jnp.any(end_index_B == 0))

  def _cached(self, x_BxTxD, segment_pos_BxT, cache, attn_mask_BxTxS, w, weights_BxN):
    """The masked path with the example's left-aligned cache (weights_BxN: the gate
    decided when the sequence's cache was empty)."""
    q_BxTxNxDh = compute.project_all(x_BxTxD, w.wq_DxHxDh, None)
    k_BxTxGxDh = compute.project_all(x_BxTxD, w.wk_DxHxDh, None)
    v_BxTxGxDh = compute.project_all(x_BxTxD, w.wv_DxHxDh, None)
    if w.q_norm_Dh is not None:
      q_BxTxNxDh = compute.rms_norm_heads(q_BxTxNxDh, w.q_norm_Dh, NORM_EPS)
      k_BxTxGxDh = compute.rms_norm_heads(k_BxTxGxDh, w.k_norm_Dh, NORM_EPS)
    rotate = lambda t: compute.rotate(t, segment_pos_BxT, self.rope_base_frequency,
                                      self.rotary_inv_freq)
    q_BxTxNxDh, k_BxTxGxDh = rotate(q_BxTxNxDh), rotate(k_BxTxGxDh)
    end = cache['end_index'][0]
    at = (0, end % cache['v'].shape[1], 0, 0)
    k_BxSxGxDh = jax.lax.dynamic_update_slice(cache['k'], k_BxTxGxDh.astype(cache['k'].dtype), at)
    v_BxSxGxDh = jax.lax.dynamic_update_slice(cache['v'], v_BxTxGxDh.astype(cache['v'].dtype), at)
    options = self._options(attn_mask_BxTxS, segment_pos_BxT, rotary=False)
    o_BxTxNxDh = compute.attend(q_BxTxNxDh, k_BxSxGxDh.astype(q_BxTxNxDh.dtype),
                                v_BxSxGxDh.astype(q_BxTxNxDh.dtype), options)
    y_BxTxD = compute.output_all(o_BxTxNxDh, weights_BxN, w.wo_HxDhxDo, None)
    new_cache = {'v': v_BxSxGxDh, 'k': k_BxSxGxDh,
                 'end_index': cache['end_index'] + x_BxTxD.shape[1], 'gate': weights_BxN}
    return new_cache, y_BxTxD


def gate(module: nnx.Module, *, rngs: nnx.Rngs, causal: bool = False,
         **gate_kwargs: Any) -> GatedGemmaAttention:
  return GatedGemmaAttention(module, rngs=rngs, causal=causal, **gate_kwargs)


register_adapter(Adapter(
    'gemma', matches, gate,
    description="the attention of flax's NNX Gemma example: q_einsum + kv_einsum or "
                'qkv_einsum, attn_vec_einsum; call (x, segment_pos, cache, attn_mask)'))
