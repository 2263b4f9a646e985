"""GatedTransformerBlock: pre-LayerNorm, gated self-attention, MLP, residuals, dropout.

    h = x + Dropout(GatedAttention(LayerNorm(x)))
    y = h + Dropout(W2 gelu(W1 LayerNorm(h) + b1) + b2)
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from gating.layers.attention import GatedMultiHeadAttention


class GatedTransformerBlock(nnx.Module):
  """A pre-LN Transformer block whose self-attention heads are gated per sequence.

  Args:
    features: D, the model width.
    num_heads: H.
    mlp_features: hidden width of the MLP (default 4 D).
    dropout_rate: dropout on both residual branches.
    attention_dropout_rate: dropout on the attention weights.
    dtype, param_dtype: computation and parameter dtypes (as in flax).
    rngs: nnx.Rngs; dropout and gate noise draw from its 'dropout' stream.
    **attention_kwargs: passed to GatedMultiHeadAttention (gate=, active_heads=, path=,
      router=, prefix_len=, noise=, rotary_base=, ...).
  """

  def __init__(self, features: int, num_heads: int, *, mlp_features: int | None = None,
               dropout_rate: float = 0.0, attention_dropout_rate: float = 0.0,
               dtype=None, param_dtype=jnp.float32, rngs: nnx.Rngs, **attention_kwargs):
    mlp_features = mlp_features or 4 * features
    dense = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
    self.attention_norm = nnx.LayerNorm(features, **dense)
    self.attention = GatedMultiHeadAttention(
        num_heads, features, dropout_rate=attention_dropout_rate, **dense, **attention_kwargs)
    self.mlp_norm = nnx.LayerNorm(features, **dense)
    self.mlp_in = nnx.Linear(features, mlp_features, **dense)
    self.mlp_out = nnx.Linear(mlp_features, features, **dense)
    self.dropout = nnx.Dropout(dropout_rate, rngs=rngs)

  def __call__(self, x_BxLxD, *, mask=None, is_causal: bool = False,
               deterministic: bool | None = None, rngs=None, path: str | None = None,
               active_heads: int | None = None, positions=None, return_gate: bool = False):
    """x_BxLxD -> y_BxLxD (and the attention's Gate when return_gate)."""
    y_BxLxD, gate = self.attention(
        self.attention_norm(x_BxLxD), mask=mask, is_causal=is_causal,
        deterministic=deterministic, rngs=rngs, path=path, active_heads=active_heads,
        positions=positions, return_gate=True)
    h_BxLxD = x_BxLxD + self.dropout(y_BxLxD, deterministic=deterministic, rngs=rngs)
    out_BxLxD = self.feed_forward(h_BxLxD, deterministic=deterministic, rngs=rngs)
    return (out_BxLxD, gate) if return_gate else out_BxLxD

  def feed_forward(self, h_BxLxD, *, deterministic: bool | None = None, rngs=None):
    """The MLP half of the block: h + Dropout(W2 gelu(W1 LayerNorm(h) + b1) + b2).

    Also used on its own by `gating.decode`, which runs the attention half from its cache.
    """
    m_BxLxF = jax.nn.gelu(self.mlp_in(self.mlp_norm(h_BxLxD)))
    return h_BxLxD + self.dropout(self.mlp_out(m_BxLxF), deterministic=deterministic,
                                  rngs=rngs)
