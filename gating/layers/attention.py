"""GatedMultiHeadAttention: a drop-in flax.nnx.MultiHeadAttention whose heads are gated.

A router reads each sequence and scores the heads; a selection rule turns the scores into
a Gate; the layer then computes its heads on one of two paths (see compute.py):
'masked' computes all H heads and scales each by its weight (differentiable everywhere,
the training path); 'gathered' gathers the weights of each sequence's K heads and
computes only those (FLOPs and K/V activations scale as K/H).
"""

from __future__ import annotations

from types import MappingProxyType
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from flax.nnx.nn import dtypes, initializers
from flax.nnx.nn.linear import default_kernel_init

from gating.layers import compute, selection
from gating.layers.head_gate import HeadGating, check_active_heads, check_gate, check_kv_units
from gating.layers.router import ROUTERS, get_router, router_kind_of

PATHS = selection.PATHS


def causal_router(kwargs: Mapping[str, Any]) -> dict[str, Any]:
  """Constructor arguments with a router kind that reads no token after the prefix
  (router.ROUTERS[kind].causal): the given one, or by default 'token' for a per-token
  rule and 'prefix' (with prefix_len) / 'first' (token 0) for the others; a kind that is
  not causal-safe ('mean') is refused."""
  kwargs = dict(kwargs)
  rule = selection.get_rule(kwargs.get('gate', 'topk'))
  router = kwargs.get('router')
  if router is not None:
    kind = get_router(router)
    if not kind.causal:
      safe = [name for name, k in ROUTERS.items() if k.causal]
      raise ValueError(f'causal=True: router={kind.name!r} reads {kind.meaning}, so a later '
                       'token would move the gate of earlier positions (a causal leak); '
                       f"use a causal-safe kind: {safe} ('prefix' with prefix_len=P)")
    kwargs['router'] = kind.name
  elif rule.per_token:      # the 'token' router reads each token alone: causal-safe
    kwargs['router'] = 'token'
  elif rule.router == 'input':
    kwargs['router'] = 'prefix' if kwargs.get('prefix_len') else 'first'
  return kwargs



def _batch_shape(inputs_q) -> tuple[int, ...]:
  """The leading batch dimensions of [..., L, D] inputs (() when unbatched)."""
  if jnp.ndim(inputs_q) < 2:
    raise ValueError(f'inputs_q must have rank >= 2 [..., length, features], got shape '
                     f'{jnp.shape(inputs_q)}')
  return tuple(inputs_q.shape[:-2])


def _flatten_batch(x, batch):
  """[*batch, L, D] -> [prod(batch), L, D]; inputs_k/v must share the batch dimensions."""
  if tuple(x.shape[:-2]) != batch:
    raise ValueError(f'inputs of shape {x.shape} do not have the batch dimensions {batch} '
                     'of inputs_q')
  return x.reshape((-1, *x.shape[-2:]))


def _unflatten_batch(y, batch):
  return y.reshape((*batch, *y.shape[1:]))


def _unflatten_gate(gate: selection.Gate, batch) -> selection.Gate:
  return selection.Gate(*(None if a is None else _unflatten_batch(a, batch) for a in gate))


def valid_tokens(mask, batch: int, length: int):
  """valid_BxL from an attention mask [..., 1|H, L, S]: a query row attending to nothing.

  Rows of padding tokens are all False in masks made by nnx.make_attention_mask, so
  padding never moves the router. None stays None (every token valid).
  """
  if mask is None:
    return None
  mask = jnp.asarray(mask).astype(bool)
  mask = mask.reshape((1,) * (4 - mask.ndim) + mask.shape)
  return jnp.broadcast_to(jnp.any(mask, axis=(-3, -1)), (batch, length))


# nnx.MultiHeadAttention's customizations that the gated layer does not support (its
# einsums read the kernels): a from_dense of a layer that sets one is refused.
CUSTOM_MATMULS = ('qkv_dot_general', 'out_dot_general', 'qkv_dot_general_cls',
                  'out_dot_general_cls')
CUSTOM_PROMOTIONS = ('qkv_promote_dtype', 'out_promote_dtype', 'ln_promote_dtype')


class GatedMultiHeadAttention(HeadGating, nnx.Module):
  """Multi-head attention with a learned per-sequence head gate.

  Arguments shared with `flax.nnx.MultiHeadAttention` keep its names and meaning:
  num_heads, in_features, qkv_features, out_features, num_kv_heads, in_kv_features, dtype,
  param_dtype,
  broadcast_dropout, dropout_rate, deterministic, precision, kernel_init, out_kernel_init,
  bias_init, out_bias_init, use_bias, keep_rngs, kernel_metadata, out_kernel_metadata,
  bias_metadata, out_bias_metadata, rngs. The parameters have the same names and shapes
  (query/key/value/out, each a LinearGeneral), so its weights load from a dense layer.

  Refused with a ValueError, never ignored: attention_fn other than the default, normalize_qk=True, decode=True (one-token cached
  decoding is `gating.decode`'s job, with GatedLM), and the promote_dtype and dot_general
  customizations. At call: sow_weights=True, out_sharding and qkv_sharding.

  Gate arguments:
    gate: selection rule, a name in selection.RULES: 'dense', 'topk', 'hard_concrete',
      'sigmoid', 'static' (hard_concrete on a static router: the Voita baseline), 'top_p',
      or any registered rule (`selection.register`).
    active_heads: static budget K (required by 'topk' and by path='gathered').
    path: 'masked' (all heads computed, each times its weight) or 'gathered' (only the K
      selected heads computed; at K = H, every head with the shared weights, as gathering
      them all would only copy the weights). Also accepted at call time as an override.
    router: the router kind, how the router reads the sequence (router.ROUTERS): 'mean'
      | 'prefix' | 'first' | 'input_free' (older spelling 'static') or a registered kind
      (default 'input_free' for gate='static', else 'mean'). 'prefix' needs prefix_len=P.
    router_hidden_features, router_init_logit: the router MLP's hidden width and the
      initial value of every logit. The router's parameters are float32 whatever
      param_dtype (it computes in float32; a few thousand parameters a layer).
    temperature: the rule's temperature (beta for hard_concrete; default: the literature
      value, selection.RULES[gate].temperature). It is state: `gating.set_temperature`.
    noise, noise_scale: exploration noise on the logits in training ('gumbel', 'jitter').
    scaled_weights: weigh open heads by the rule's value instead of exactly 1.
    shared_heads: S heads (the first S) always on, as in MoH; the router scores the other
      H - S and the rule picks K - S of them, so active_heads=K counts every head that
      runs (S shared + K - S routed), the gathered path computes K and a KV cache holds K.
      Refused: S >= K, S >= H, and S with a rule that has no budget (dense).
    gate_options: the rule's options by name (selection.RULES[gate].options), e.g.
      {'threshold': 0.7} for sigmoid, {'p': 0.8} for top_p, {'gamma': -0.1, 'zeta': 1.1}
      for hard_concrete; an unknown name is refused.
    threshold, stretch: older spellings of the options 'threshold' (sigmoid) and
      ('gamma', 'zeta') (hard_concrete, static); refused for a rule without them.
    rotary_base: rotate queries and keys by position (RoPE) with this base; None (the
      default, as in nnx.MultiHeadAttention) for none. Positions are arange(L) unless the
      call passes `positions`.
    rotary_scaling: Llama 3's long-context RoPE frequency scaling, as in a Hugging Face
      config's `rope_scaling` (rope_type 'llama3'; compute.rope_inv_freq); needs rotary_base.

  Grouped-query attention and the blocks of pretrained families (gating.pretrained):
    num_kv_heads: G K/V heads shared by groups of H/G query heads (default H; G must
      divide H). The key/value kernels are [D, G, Dh].
    unit: what the gate opens. 'kv_group' (the default when G < H): the router scores
      the G groups and a group opens or closes with its H/G query heads, so dropping it
      drops its K/V head too (the KV cache shrinks by K/H); active_heads and shared_heads
      count query heads in multiples of H/G. 'query_head': single query heads (each
      group's K/V head is computed while any of its heads is open).
    qk_norm: RMSNorm over each head's queries and keys before RoPE (Qwen3, OLMo 2), with
      scales `query_norm`/`key_norm` [Dh]; norm_eps is its epsilon.
    out_bias: a bias on the output projection (default use_bias; Qwen2 has q/k/v biases
      and none on the output).

  State: GateStats variables `head_usage` [H] (fraction of the batch's sequences that use
  each head), `head_prob` [H] (mean open probability), `head_weight` [H] (mean gate
  weight) and `router_z_loss` [] (mean squared logsumexp of the logits), written on every
  call and differentiable where they can be (all but head_usage); `gating.gate_stats(model)` collects them. Randomness (attention
  dropout, gate noise, hard-concrete samples) is drawn from the 'dropout' rng stream.
  """

  def __init__(
      self,
      num_heads: int,
      in_features: int,
      qkv_features: int | None = None,
      out_features: int | None = None,
      num_kv_heads: int | None = None,
      in_kv_features: int | None = None,
      *,
      gate: str = 'topk',
      active_heads: int | None = None,
      path: str = 'masked',
      router: str | None = None,
      prefix_len: int | None = None,
      router_hidden_features: int | None = None,
      router_init_logit: float = 0.0,
      temperature: float | None = None,
      noise: str | None = None,
      noise_scale: float = 1.0,
      scaled_weights: bool = False,
      gate_options: Mapping[str, float] | None = None,
      shared_heads: int = 0,
      threshold: float | None = None,
      stretch: tuple[float, float] | None = None,
      rotary_base: float | None = None,
      rotary_scaling: Mapping[str, Any] | None = None,
      unit: str | None = None,
      qk_norm: bool = False,
      norm_eps: float = 1e-6,
      out_bias: bool | None = None,
      dtype: Any = None,
      param_dtype: Any = jnp.float32,
      broadcast_dropout: bool = True,
      dropout_rate: float = 0.0,
      deterministic: bool | None = None,
      precision: jax.lax.PrecisionLike = None,
      kernel_init=default_kernel_init,
      out_kernel_init=None,
      bias_init=initializers.zeros_init(),
      out_bias_init=None,
      use_bias: bool = True,
      attention_fn=None,
      decode: bool | None = None,
      normalize_qk: bool = False,
      keep_rngs: bool = True,
      kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      out_kernel_metadata: Mapping[str, Any] = MappingProxyType({}),
      bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      out_bias_metadata: Mapping[str, Any] = MappingProxyType({}),
      rngs: nnx.Rngs,
      **unsupported,
  ):
    qkv_features = in_features if qkv_features is None else qkv_features
    refused = sorted(unsupported)
    if attention_fn is not None and attention_fn is not nnx.dot_product_attention:
      refused.append('attention_fn')
    if normalize_qk:
      refused.append('normalize_qk=True')
    if decode:
      refused.append('decode=True (cached decoding lives in gating.decode, for GatedLM)')
    if refused:
      raise ValueError(f'GatedMultiHeadAttention does not support: {", ".join(refused)}. '
                       'See its docstring for what is supported.')
    if qkv_features % num_heads:
      raise ValueError(f'qkv_features ({qkv_features}) must be divisible by '
                       f'num_heads ({num_heads})')
    num_kv_heads = num_heads if num_kv_heads is None else num_kv_heads
    unit, router, options = check_gate(
        num_heads=num_heads, num_kv_heads=num_kv_heads, unit=unit, gate=gate,
        active_heads=active_heads, path=path, shared_heads=shared_heads, router=router,
        prefix_len=prefix_len, noise=noise, gate_options=gate_options,
        threshold=threshold, stretch=stretch)
    if not 0.0 <= dropout_rate < 1.0:
      raise ValueError(f'dropout_rate must be in [0, 1), got {dropout_rate}')
    if rotary_base is not None and (qkv_features // num_heads) % 2:
      raise ValueError(f'rotary_base needs an even head width, got '
                       f'{qkv_features // num_heads}')
    if rotary_scaling is not None and rotary_base is None:
      raise ValueError('rotary_scaling needs rotary_base (RoPE)')

    self.num_heads = num_heads
    self.in_features = in_features
    self.qkv_features = qkv_features
    self.out_features = in_features if out_features is None else out_features
    self.in_kv_features = in_features if in_kv_features is None else in_kv_features
    self.num_kv_heads = num_kv_heads
    self.head_dim = qkv_features // num_heads
    self.dtype = dtype
    self.param_dtype = param_dtype
    self.broadcast_dropout = broadcast_dropout
    self.dropout_rate = dropout_rate
    self.deterministic = deterministic
    self.precision = precision
    self.use_bias = use_bias
    self.out_bias = use_bias if out_bias is None else out_bias
    self.rotary_base = rotary_base
    self.rotary_inv_freq = (None if rotary_scaling is None else compute.rope_inv_freq(
        rotary_base, self.head_dim, rotary_scaling))    # a tuple: part of the graphdef
    self.norm_eps = norm_eps

    def linear(in_f, out_f, bias=use_bias, **kw):
      return nnx.LinearGeneral(in_f, out_f, dtype=dtype, param_dtype=param_dtype,
                               use_bias=bias, precision=precision, rngs=rngs, **kw)

    heads = (num_heads, self.head_dim)
    kv_heads = (num_kv_heads, self.head_dim)
    qkv_kw = dict(kernel_init=kernel_init, bias_init=bias_init,
                  kernel_metadata=kernel_metadata, bias_metadata=bias_metadata)
    self.query = linear(in_features, heads, **qkv_kw)
    self.key = linear(self.in_kv_features, kv_heads, **qkv_kw)
    self.value = linear(self.in_kv_features, kv_heads, **qkv_kw)
    self.out = linear(heads, self.out_features, bias=self.out_bias, axis=(-2, -1),
                      kernel_init=out_kernel_init or kernel_init,
                      bias_init=out_bias_init or bias_init,
                      kernel_metadata=out_kernel_metadata or kernel_metadata,
                      bias_metadata=out_bias_metadata or bias_metadata)
    if qk_norm:   # Qwen3's RMSNorm over every head of the queries and keys
      self.query_norm = nnx.RMSNorm(self.head_dim, epsilon=norm_eps, dtype=dtype,
                                    param_dtype=param_dtype, rngs=rngs)
      self.key_norm = nnx.RMSNorm(self.head_dim, epsilon=norm_eps, dtype=dtype,
                                  param_dtype=param_dtype, rngs=rngs)
    else:
      self.query_norm = self.key_norm = nnx.data(None)

    self.init_gate(
        in_features=in_features, unit=unit, gate=gate, active_heads=active_heads, path=path,
        shared_heads=shared_heads, router=router, prefix_len=prefix_len, options=options,
        router_hidden_features=router_hidden_features, router_init_logit=router_init_logit,
        temperature=temperature, noise=noise, noise_scale=noise_scale,
        scaled_weights=scaled_weights, keep_rngs=keep_rngs, rngs=rngs)
    self.unit_mean_UxD = nnx.data(None)   # dropped-head compensation; see `compensate`

  @classmethod
  def from_dense(cls, mha: nnx.MultiHeadAttention, *, rngs: nnx.Rngs, causal: bool = False,
                 **kwargs):
    """A gated layer carrying the weights of a trained `nnx.MultiHeadAttention`.

    Copies its query/key/value/out LinearGeneral modules (weights, and any sharding
    metadata), its configuration (keep_rngs too) and its dropout stream; `kwargs` are
    constructor arguments (gate=, active_heads=, path=, ... or overrides). With
    gate='dense' the output is unchanged, dropout included. A layer with a customized
    dot_general or promote_dtype is refused, as the constructor refuses them.

    causal=True states that the model is causal (it may pass a causal mask, which cannot
    be inspected under jit): the router then reads no token after the prefix. Without a
    `router`, it is 'token' for a per-token rule, else 'prefix' when `prefix_len=P` is
    given, else 'first' (token 0 only);
    router='mean', which reads every token and so lets the future move the gate of
    earlier positions, is refused.
    """
    if not isinstance(mha, nnx.MultiHeadAttention):
      raise ValueError(f'from_dense needs an nnx.MultiHeadAttention, got {type(mha).__name__}')
    kwargs = causal_router(kwargs) if causal else kwargs
    config = dict(
        num_heads=mha.num_heads, in_features=mha.in_features,
        qkv_features=mha.qkv_features, out_features=mha.out_features,
        num_kv_heads=mha.num_kv_heads, in_kv_features=mha.in_kv_features,
        dtype=mha.dtype, param_dtype=mha.param_dtype,
        broadcast_dropout=mha.broadcast_dropout, dropout_rate=mha.dropout_rate,
        deterministic=mha.deterministic, precision=mha.precision, use_bias=mha.use_bias,
        attention_fn=mha.attention_fn, normalize_qk=mha.normalize_qk, decode=mha.decode,
        # keep_rngs=False leaves no stream (flax keeps one only with dropout)
        keep_rngs=not (mha.dropout_rate > 0 and mha.rngs is None),
        # a customized matmul or dtype promotion is passed on, so that it is refused
        # rather than dropped (the gated layer reads the kernels, not the modules)
        **{name: getattr(mha, name) for name in CUSTOM_MATMULS
           if getattr(mha, name) is not None},
        **{name: getattr(mha, name) for name in CUSTOM_PROMOTIONS
           if getattr(mha, name) is not dtypes.promote_dtype})
    gated = cls(**(config | kwargs), rngs=rngs)
    for name in ('query', 'key', 'value', 'out'):
      setattr(gated, name, nnx.clone(getattr(mha, name)))
    if mha.rngs is not None and gated.rngs is not None:
      gated.rngs = nnx.clone(mha.rngs)   # the original's dropout stream, where it is
    return gated

  def set_view(self, deterministic: bool | None = None, decode: bool | None = None):
    """For `nnx.view`: sets deterministic; refuses decode=True (see gating.decode)."""
    if decode:
      raise ValueError('GatedMultiHeadAttention does not support decode=True; use '
                       'gating.decode.generate with a GatedLM for cached decoding')
    if deterministic is not None:
      self.deterministic = deterministic

  # -- the gate -----------------------------------------------------------------------

  def head_weights(self) -> compute.HeadWeights:
    """The projection weights as arrays, in nnx.MultiHeadAttention's layout (K/V with G
    heads under grouped-query attention), with the QK norm's scales if any."""
    b = lambda lin: None if lin.bias is None else lin.bias[...]
    norm = lambda n: None if n is None else n.scale[...]
    return compute.HeadWeights(
        self.query.kernel[...], self.key.kernel[...], self.value.kernel[...],
        self.out.kernel[...], b(self.query), b(self.key), b(self.value), b(self.out),
        norm(self.query_norm), norm(self.key_norm))

  def gate(self, inputs_q, mask=None, *, deterministic: bool | None = None,
           rngs=None, active_heads: int | None = None, slice_B=None) -> selection.Gate:
    """The per-sequence decision: Gate(weights_BxH, idx_BxK | None, probs_BxH).

    Same conventions as the call: `mask` is the attention mask (padding rows are ignored
    by the router), `active_heads` overrides K, and inputs may be [L, D] or [..., L, D].
    Writes no state.
    """
    batch = _batch_shape(inputs_q)
    if len(batch) != 1:
      q = _flatten_batch(inputs_q, batch)
      if mask is not None:
        mask = jnp.asarray(mask)
        heads = mask.shape[-3] if mask.ndim >= 3 else 1
        full = (*batch, heads, q.shape[1], mask.shape[-1])   # S: the keys' length
        mask = jnp.broadcast_to(mask, full).reshape((-1, *full[-3:]))
      if slice_B is not None:
        slice_B = jnp.reshape(slice_B, (-1,))
      return _unflatten_gate(self.gate(q, mask, deterministic=deterministic, rngs=rngs,
                                       active_heads=active_heads, slice_B=slice_B), batch)
    self._check_inputs(inputs_q)
    k = self.active_heads if active_heads is None else active_heads
    check_active_heads(k, self.num_heads, self.gate_rule, 'masked')
    check_kv_units(self.num_heads, self.num_kv_heads, self.unit, k)
    deterministic = self._deterministic(deterministic)
    rng = None
    if self.stochastic_gate and not deterministic:
      rng = self._rng(rngs, deterministic)()
    valid_BxL = valid_tokens(mask, *inputs_q.shape[:2])
    return self._select(self.router_logits(inputs_q, valid_BxL, slice_B, k), k,
                        deterministic, rng)

  def compensate(self, mean_HxDo: jax.Array | None) -> None:
    """Dropped-head compensation (None: off, the default): with m = mean_HxDo, each call
    adds sum_h (1 - w_bh) m_h to the output, so that a dropped head contributes its mean
    output m_h (over the calibration tokens; gating.training.compensation measures it)
    instead of 0, on both paths. A forced gate (analysis) runs without it."""
    if mean_HxDo is not None and mean_HxDo.shape != (self.num_heads, self.out_features):
      raise ValueError(f'compensate: mean of shape {mean_HxDo.shape}, expected '
                       f'{(self.num_heads, self.out_features)} (num_heads, out_features)')
    self.unit_mean_UxD = mean_HxDo

  # -- the call -------------------------------------------------------------------------

  def __call__(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
               positions=None, return_gate: bool = False, **kwargs):
    """y_BxLxDo = gated attention of inputs_q over inputs_k/inputs_v (default inputs_q).

    Call arguments as in nnx.MultiHeadAttention (inputs_q, inputs_k, inputs_v, mask,
    deterministic, rngs, decode=False, is_causal), plus the overrides `path` and
    `active_heads` (the budget knob: evaluate at another K without retraining),
    `positions` (int [B, L] for rotary self-attention; default arange(L)) and
    `return_gate` (return (y, Gate) instead of y, for models that report decisions) and
    `slice_B` (int [...batch], each sequence's slice, for gate='slices' and only then).
    As in nnx.MultiHeadAttention, inputs may be unbatched [L, D] or have any number of
    leading batch dimensions [..., L, D] (the mask then [..., H | 1, L, S]); every
    sequence has its own gate, and the Gate's arrays carry the same leading dimensions.
    """
    batch = _batch_shape(inputs_q)
    if len(batch) == 1:
      return self._attend(inputs_q, inputs_k, inputs_v, mask=mask, positions=positions,
                          return_gate=return_gate, **kwargs)
    q, k, v = (None if x is None else _flatten_batch(x, batch) for x in
               (inputs_q, inputs_k, inputs_v))
    if mask is not None:
      mask = jnp.asarray(mask)
      heads = mask.shape[-3] if mask.ndim >= 3 else 1
      full = (*batch, heads, q.shape[1], (q if k is None else k).shape[1])
      mask = jnp.broadcast_to(mask, full).reshape((-1, *full[-3:]))
    if positions is not None:
      positions = jnp.broadcast_to(positions, (*batch, q.shape[1])).reshape((-1, q.shape[1]))
    if kwargs.get('slice_B') is not None:
      kwargs['slice_B'] = jnp.reshape(kwargs['slice_B'], (-1,))
    out = self._attend(q, k, v, mask=mask, positions=positions, return_gate=return_gate,
                       **kwargs)
    if return_gate:
      y, gate = out
      return _unflatten_batch(y, batch), _unflatten_gate(gate, batch)
    return _unflatten_batch(out, batch)

  def _attend(self, inputs_q, inputs_k=None, inputs_v=None, *, mask=None,
              deterministic: bool | None = None, rngs=None, sow_weights: bool = False,
              decode: bool | None = None, is_causal: bool = False, path: str | None = None,
              active_heads: int | None = None, positions=None, return_gate: bool = False,
              out_sharding=None, qkv_sharding=None, slice_B=None):
    """The call on rank-3 inputs [B, L, D]."""
    if decode:
      raise ValueError('GatedMultiHeadAttention does not support decode=True; use '
                       'gating.decode.generate with a GatedLM for cached decoding')
    if sow_weights:
      raise ValueError('GatedMultiHeadAttention does not support sow_weights=True')
    if out_sharding is not None or qkv_sharding is not None:
      raise ValueError('GatedMultiHeadAttention does not support out_sharding/qkv_sharding')
    if inputs_k is None:
      if inputs_v is not None:
        raise ValueError('inputs_k cannot be None if inputs_v is not None '
                         '(as in nnx.MultiHeadAttention)')
      inputs_k = inputs_q
    if inputs_v is None:
      inputs_v = inputs_k
    self._check_inputs(inputs_q, inputs_k, inputs_v, mask)
    if is_causal and not self.causal_safe:
      kind = router_kind_of(self.router)
      raise ValueError(f'is_causal=True with router={kind.name!r}: the gate reads '
                       f'{kind.meaning}, so a later token would move the outputs at earlier '
                       "positions (a causal leak). Build the layer with router='prefix' and "
                       "prefix_len=P, or router='first' (gating.gate_heads(..., causal=True) "
                       'does this)')
    path = self.path if path is None else path
    k = self.active_heads if active_heads is None else active_heads
    check_active_heads(k, self.num_heads, self.gate_rule, path)
    check_kv_units(self.num_heads, self.num_kv_heads, self.unit, k)

    deterministic = self._deterministic(deterministic)
    dropout_rng = gate_rng = None
    if not deterministic:
      stream = self._rng(rngs, deterministic)
      dropout_rng = stream() if self.dropout_rate > 0 else None
      gate_rng = stream() if self.stochastic_gate else None

    valid_BxL = valid_tokens(mask, *inputs_q.shape[:2])
    logits_BxU, gate = self.decide(inputs_q, valid_BxL, k, deterministic, gate_rng=gate_rng,
                                   slice_B=slice_B)
    forced = self.forced_weights_BxH
    if forced is not None:
      path = 'masked'
      self.sow(nnx.Intermediate, 'router_logits', logits_BxU)

    xq, xk, xv, *weights = dtypes.promote_dtype(
        (inputs_q, inputs_k, inputs_v, *self.head_weights()), dtype=self.dtype)
    w = compute.HeadWeights(*weights)
    options = compute.AttendOptions(
        mask=None if mask is None else jnp.asarray(mask).astype(bool), is_causal=is_causal,
        dropout_rate=self.dropout_rate, dropout_rng=dropout_rng,
        broadcast_dropout=self.broadcast_dropout, deterministic=deterministic,
        precision=self.precision, rotary_base=self.rotary_base,
        positions_q_BxL=positions, positions_k_BxS=positions,
        rotary_inv_freq=self.rotary_inv_freq, norm_eps=self.norm_eps)
    if path == 'masked' or k == self.num_heads:
      # With K = H every head is selected: gathering would copy all the weights only to
      # compute every head, so the gathered path computes them with the shared weights.
      y = compute.masked_attention(xq, xk, xv, w, gate.weights_BxH, options)
    else:
      weights_BxK = jnp.take_along_axis(gate.weights_BxH, gate.idx_BxK, axis=1)
      y = compute.gathered_attention(xq, xk, xv, w, gate.idx_BxK, weights_BxK, options,
                                     unit=self.unit)
    if forced is not None:
      self.sow(nnx.Intermediate, 'output', y)
    elif self.unit_mean_UxD is not None:
      y = y + compute.dropped_mean(gate.weights_BxH, self.unit_mean_UxD).astype(y.dtype)
    # A per-token gate (token_topk) is returned as its mean over the sequence's tokens.
    return (y, selection.per_sequence(gate, valid_BxL)) if return_gate else y

  # -- checks -----------------------------------------------------------------------------

  def _check_inputs(self, inputs_q, inputs_k=None, inputs_v=None, mask=None):
    for name, x, width in (('inputs_q', inputs_q, self.in_features),
                           ('inputs_k', inputs_k, self.in_kv_features),
                           ('inputs_v', inputs_v, self.in_kv_features)):
      if x is None:
        continue
      if x.ndim != 3:
        raise ValueError(f'{name} must have rank 3 [batch, length, features], got shape '
                         f'{x.shape}')
      if x.shape[-1] != width:
        raise ValueError(f'{name} has {x.shape[-1]} features; this layer expects {width}')
    if inputs_k is not None:
      if inputs_k.shape[0] != inputs_q.shape[0]:
        raise ValueError(f'inputs_k batch {inputs_k.shape[0]} != inputs_q batch '
                         f'{inputs_q.shape[0]}')
      if inputs_v.shape[:2] != inputs_k.shape[:2]:
        raise ValueError(f'inputs_v shape {inputs_v.shape} does not match inputs_k '
                         f'{inputs_k.shape} in batch and length')
    if mask is not None:
      B, L = inputs_q.shape[:2]
      S = L if inputs_k is None else inputs_k.shape[1]
      want = (B, self.num_heads, L, S)
      try:
        ok = np.ndim(mask) <= 4 and np.broadcast_shapes(np.shape(mask), want) == want
      except ValueError:
        ok = False
      if not ok:
        raise ValueError(f'mask of shape {np.shape(mask)} does not broadcast to '
                         f'[batch, num_heads, q_length, kv_length] = {list(want)}')
