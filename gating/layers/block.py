"""GatedTransformerBlock: pre-norm, gated self-attention, MLP, residuals, dropout.

    h = x + Dropout(GatedAttention(Norm(x)))
    y = h + Dropout(W2 gelu(W1 Norm(h) + b1) + b2)                (mlp='gelu', the default)
    y = h + Dropout(W2 (silu(W1 Norm(h)) * (W3 Norm(h))))         (mlp='swiglu': Llama, Qwen)

Norm is LayerNorm (norm='layer', the default) or RMSNorm (norm='rms': x / sqrt(mean(x^2)
+ eps) * scale); `mlp_bias` switches the MLP's biases. With `mlp_groups=G` the MLP is a
GatedMLP: its F hidden channels form G groups, of which a router (the same rule, path and
router kind as the attention's) opens Kf per sequence. Without it the MLP is the
nnx.Linear layers `mlp_in` and `mlp_out` (and, for SwiGLU, `mlp_up`), as before.

The groups' router is the MLP's own (group_router='own': it reads LayerNorm(h), after the
attention) or the attention's (group_router='attention'; older spelling mlp_router='shared'):
one router reads the block's input once, and two output layers turn its hidden features
into the heads' and the groups' logits,

    f_BxF      = gelu(W1 LayerNorm(pool(LayerNorm(x))) + b1)    (the attention router)
    logits_BxH = Wh f + bh,    logits_BxG = Wg f + bg    (attention.router.group_logits)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gating.layers import names
from gating.layers.attention import GatedMultiHeadAttention, valid_tokens
from gating.layers.mlp import GATE_KWARGS, GatedMLP, check_groups
from gating.layers.router import HeadRouter, logit_layer

GROUP_ROUTERS = ('own', 'attention')
NORMS = ('layer', 'rms')
MLPS = ('gelu', 'swiglu')


def make_norm(kind: str, features: int, eps: float | None, **dense):
  """nnx.LayerNorm (norm='layer') or nnx.RMSNorm (norm='rms'); eps None: flax's default."""
  if kind not in NORMS:
    raise ValueError(f'norm must be one of {NORMS}, got {kind!r}')
  cls = nnx.LayerNorm if kind == 'layer' else nnx.RMSNorm
  return cls(features, **({} if eps is None else {'epsilon': eps}), **dense)


class GatedTransformerBlock(nnx.Module):
  """A pre-LN Transformer block whose self-attention heads are gated per sequence.

  Args:
    features: D, the model width.
    num_heads: H.
    mlp_features: hidden width of the MLP (default 4 D).
    dropout_rate: dropout on both residual branches.
    attention_dropout_rate: dropout on the attention weights.
    mlp_groups: G, gate the MLP's hidden channels in G groups (a divisor of mlp_features);
      None (the default) keeps the ungated MLP and its parameter names.
    active_groups: Kf, the MLP's budget of open groups (needs mlp_groups).
    group_router: which router scores the MLP's groups: 'own' (default: the MLP has its
      own router) or 'attention' (the groups' logits come from the attention router's
      hidden features; needs mlp_groups and an attention router that reads the input).
      Older spelling: mlp_router='own' | 'shared'.
    shared_groups: Sf, the MLP's always-open groups (Kf counts them; needs mlp_groups).
    norm: 'layer' (LayerNorm, the default) or 'rms' (RMSNorm) for both of the block's norms.
    norm_eps: their epsilon (default: flax's); also the attention's QK norm's, if any.
    mlp: 'gelu' (the default) or 'swiglu' (see the module docstring).
    mlp_bias: biases on the MLP's projections (default True).
    dtype, param_dtype: computation and parameter dtypes (as in flax).
    rngs: nnx.Rngs; dropout and gate noise draw from its 'dropout' stream.
    **attention_kwargs: passed to GatedMultiHeadAttention (gate=, active_heads=, path=,
      router=, prefix_len=, noise=, rotary_base=, ...).
  """

  def __init__(self, features: int, num_heads: int, *, mlp_features: int | None = None,
               dropout_rate: float = 0.0, attention_dropout_rate: float = 0.0,
               mlp_groups: int | None = None, active_groups: int | None = None,
               group_router: str | None = None, shared_groups: int = 0, norm: str = 'layer',
               norm_eps: float | None = None, mlp: str = 'gelu', mlp_bias: bool = True,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs, **attention_kwargs):
    group_router = names.group_router_keyword(group_router,
                                              attention_kwargs.pop('mlp_router', None))
    mlp_features = mlp_features or 4 * features
    if mlp_groups is None and active_groups is not None:
      raise ValueError(f'active_groups={active_groups} needs mlp_groups (the number of '
                       'channel groups G of the MLP)')
    if mlp_groups is not None:
      check_groups(mlp_features, mlp_groups, 'mlp_groups')
    if group_router not in GROUP_ROUTERS:
      raise ValueError(f'group_router must be one of {GROUP_ROUTERS}, got {group_router!r}')
    if shared_groups and mlp_groups is None:
      raise ValueError(f'shared_groups={shared_groups} needs mlp_groups (the number of '
                       'channel groups G of the MLP)')
    if group_router == 'attention' and mlp_groups is None:
      raise ValueError("group_router='attention' needs mlp_groups (the MLP's channel groups)")
    if mlp not in MLPS:
      raise ValueError(f'mlp must be one of {MLPS}, got {mlp!r}')
    dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    if norm_eps is not None:
      attention_kwargs.setdefault('norm_eps', norm_eps)
    self.attention_norm = make_norm(norm, features, norm_eps, **dense)
    self.attention = GatedMultiHeadAttention(
        num_heads, features, dropout_rate=attention_dropout_rate, **dense, **attention_kwargs)
    self.mlp_norm = make_norm(norm, features, norm_eps, **dense)
    self.mlp_kind = mlp
    if mlp_groups is None:
      self.mlp_in = nnx.Linear(features, mlp_features, use_bias=mlp_bias, **dense)
      self.mlp_up = (nnx.Linear(features, mlp_features, use_bias=mlp_bias, **dense)
                     if mlp == 'swiglu' else nnx.data(None))
      self.mlp_out = nnx.Linear(mlp_features, features, use_bias=mlp_bias, **dense)
    else:
      gate_kwargs = {k: v for k, v in attention_kwargs.items() if k in GATE_KWARGS}
      if group_router == 'attention':
        if not isinstance(self.attention.router, HeadRouter):
          raise ValueError("group_router='attention' needs an attention router that reads "
                           f"the input; gate={attention_kwargs.get('gate', 'topk')!r} with "
                           f"router={attention_kwargs.get('router')!r} has none")
        gate_kwargs['router'] = 'attention'
        # Inside the router, so that it counts as a router parameter everywhere (the
        # optimizer's router rate, warm starts, router fitting).
        self.attention.router.group_logits = logit_layer(
            self.attention.router.hidden_features, mlp_groups - shared_groups,
            init_logit=attention_kwargs.get('router_init_logit', 0.0),
            param_dtype=param_dtype, rngs=rngs)
      self.mlp = GatedMLP(features, mlp_features, mlp_groups, active_groups=active_groups,
                          shared_groups=shared_groups, kind=mlp, use_bias=mlp_bias,
                          precision=attention_kwargs.get('precision'), **dense, **gate_kwargs)
      if self.attention.num_slices != self.mlp.num_slices:
        raise ValueError(f"gate='slices': the attention's {self.attention.num_slices} slices "
                         f"and the MLP's {self.mlp.num_slices} must be as many (a sequence's "
                         'slice e runs slice e of both): choose active_groups so that '
                         '(mlp_groups - shared_groups) / (active_groups - shared_groups) = '
                         f'{self.attention.num_slices}')
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def hidden(self, xn_BxLxD):
    """The ungated MLP's hidden channels: gelu(W1 x + b1), or silu(W1 x) * (W3 x)."""
    if self.mlp_up is not None:
      return jax.nn.silu(self.mlp_in(xn_BxLxD)) * self.mlp_up(xn_BxLxD)
    return jax.nn.gelu(self.mlp_in(xn_BxLxD))

  @property
  def gated_mlp(self) -> GatedMLP | None:
    """The GatedMLP when the block was built with mlp_groups, else None."""
    return getattr(self, 'mlp', None)

  @property
  def group_router(self) -> str:
    """'attention' when the groups' logits come from the attention router, else 'own'."""
    mlp = self.gated_mlp
    return 'attention' if mlp is not None and mlp.logits_from_attention else 'own'

  def shared_group_logits(self, xn_BxLxD, valid_BxL=None):
    """logits_BxG of the MLP's groups from the attention router's hidden features of its
    input xn_BxLxD = attention_norm(x), with group_router='attention'; None otherwise."""
    if self.group_router != 'attention':
      return None
    router = self.attention.router
    return router.group_logits(router.features(xn_BxLxD, valid_BxL)).astype(jnp.float32)

  def __call__(self, x_BxLxD, *, mask=None, is_causal: bool = False,
               deterministic: bool | None = None, rngs=None, path: str | None = None,
               active_heads: int | None = None, positions=None, return_gate: bool = False,
               active_groups: int | None = None, return_gates: bool = False, slice_B=None):
    """x_BxLxD -> y_BxLxD; with return_gate, (y, the attention's Gate); with return_gates,
    (y, (the attention's Gate, the MLP's Gate over groups or None)). `active_groups`
    overrides the MLP's budget Kf, as `active_heads` does the attention's K. `slice_B`:
    each sequence's slice, for gate='slices' (both halves run that slice)."""
    xn_BxLxD = self.attention_norm(x_BxLxD)
    y_BxLxD, gate = self.attention(
        xn_BxLxD, mask=mask, is_causal=is_causal,
        deterministic=deterministic, rngs=rngs, path=path, active_heads=active_heads,
        positions=positions, return_gate=True, slice_B=slice_B)
    h_BxLxD = x_BxLxD + self.dropout(y_BxLxD, deterministic=deterministic, rngs=rngs)
    valid_BxL = None if mask is None else valid_tokens(mask, *x_BxLxD.shape[:2])
    out_BxLxD, group_gate = self.feed_forward(
        h_BxLxD, deterministic=deterministic, rngs=rngs, valid_BxL=valid_BxL, path=path,
        active_groups=active_groups, return_gate=True,
        group_logits_BxG=self.shared_group_logits(xn_BxLxD, valid_BxL), slice_B=slice_B)
    if return_gates:
      return out_BxLxD, (gate, group_gate)
    return (out_BxLxD, gate) if return_gate else out_BxLxD

  def feed_forward(self, h_BxLxD, *, deterministic: bool | None = None, rngs=None,
                   valid_BxL=None, path: str | None = None, active_groups: int | None = None,
                   return_gate: bool = False, group_logits_BxG=None, slice_B=None):
    """The MLP half of the block: h + Dropout(W2 gelu(W1 LayerNorm(h) + b1) + b2), its
    channel groups gated when the block has mlp_groups (return_gate: also that Gate, or
    None for the ungated MLP). group_logits_BxG: with group_router='attention', the groups'
    logits (`shared_group_logits` of the block's input).

    Also used on its own by `gating.decode`, which runs the attention half from its cache.
    """
    if self.gated_mlp is None:
      if active_groups is not None:
        raise ValueError('active_groups needs a block built with mlp_groups')
      y_BxLxD = self.mlp_out(self.hidden(self.mlp_norm(h_BxLxD)))
      group_gate = None
    else:
      y_BxLxD, group_gate = self.gated_mlp(
          self.mlp_norm(h_BxLxD), valid_BxL, deterministic=deterministic, rngs=rngs,
          path=path, active_groups=active_groups, return_gate=True,
          logits_BxG=group_logits_BxG, slice_B=slice_B)
    out_BxLxD = h_BxLxD + self.dropout(y_BxLxD, deterministic=deterministic, rngs=rngs)
    return (out_BxLxD, group_gate) if return_gate else out_BxLxD
