"""The per-token reference rule token_topk (MoH): each token opens K of H query heads (S
shared always open), every head and K/V computed on the masked path."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating import GatedMultiHeadAttention
from gating.layers import decode

B, L, D, H = 2, 6, 32, 8


def layer(**kw):
  args = dict(gate='token_topk', active_heads=3, shared_heads=1, rngs=nnx.Rngs(0))
  layer = GatedMultiHeadAttention(H, D, **{**args, **kw})
  for _, p in nnx.iter_graph(layer.router):      # logits that differ per token
    if isinstance(p, nnx.Param):
      p[...] = jax.random.normal(jax.random.key(3), p.shape)
  return layer


def x_BxLxD(seed=1):
  return jax.random.normal(jax.random.key(seed), (B, L, D))


def test_each_token_opens_k_heads_with_the_shared_ones():
  gate = layer().gate(x_BxLxD())
  open_BxLxH = np.asarray(gate.weights_BxH) != 0
  assert open_BxLxH.shape == (B, L, H)
  np.testing.assert_array_equal(open_BxLxH.sum(-1), 3)
  assert open_BxLxH[..., 0].all()                          # the shared head
  assert len({tuple(row) for row in open_BxLxH.reshape(-1, H)}) > 1   # per token


def test_a_tokens_output_ignores_the_heads_closed_at_that_token():
  attention = layer()
  x = x_BxLxD()
  open_BxLxH = np.asarray(attention.gate(x).weights_BxH) != 0
  b, t = 0, 2     # a head closed at token t but open at another token of the sequence
  closed = next(h for h in range(H) if not open_BxLxH[b, t, h] and open_BxLxH[b, :, h].any())
  y = attention(x)
  attention.out.kernel[...] = attention.out.kernel[...].at[closed].add(1.0)
  moved = attention(x)
  np.testing.assert_allclose(moved[b, t], y[b, t], atol=1e-6)
  others = [s for s in range(L) if open_BxLxH[b, s, closed]]
  assert others and not np.allclose(moved[b, others], y[b, others], atol=1e-3)


def test_every_head_open_equals_the_dense_gate():
  x = x_BxLxD()
  every = layer(active_heads=H, shared_heads=0)
  dense = GatedMultiHeadAttention(H, D, gate='dense', rngs=nnx.Rngs(0))
  np.testing.assert_allclose(every(x), dense(x), atol=1e-5)


def test_the_returned_gate_is_the_token_mean_and_the_statistics_count_tokens():
  attention = layer()
  x = x_BxLxD()
  per_token = attention.gate(x)
  _, summary = attention(x, return_gate=True)
  np.testing.assert_allclose(summary.weights_BxH, np.asarray(per_token.weights_BxH).mean(1),
                             atol=1e-6)
  np.testing.assert_allclose(attention.head_usage[...],
                             (np.asarray(per_token.weights_BxH) != 0).reshape(-1, H).mean(0))


def test_refused_where_a_per_token_gate_cannot_run():
  with pytest.raises(ValueError, match=r"decides per token: it runs on path='masked' only"):
    layer(path='gathered')
  with pytest.raises(ValueError, match=r"gate='token_topk' with router='mean'"):
    layer(router='mean')
  with pytest.raises(ValueError, match=r"gate='topk' with router='token'"):
    GatedMultiHeadAttention(H, D, gate='topk', active_heads=2, router='token',
                            rngs=nnx.Rngs(0))
  model = gating.GatedLM(40, num_layers=1, features=D, num_heads=H, max_length=L,
                         prefix_len=2, gate='token_topk', active_heads=2, rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match=r"cached decoding .* gate='token_topk' decides per "
                                       r'token'):
    decode.generate(model, jnp.zeros((1, 3), jnp.int32), max_new_tokens=1)


def test_the_config_trains_it_on_the_masked_path_and_evaluates_it_there():
  from gating.training.config import ModelConfig  # pylint: disable=import-outside-toplevel
  with pytest.raises(ValueError, match=r"model.path: gate='token_topk' decides per token"):
    ModelConfig(gate='token_topk', active_heads=2, path='gathered')
  m = ModelConfig(gate='token_topk', active_heads=2, path='masked')
  assert m.effective_eval_path == 'masked'


def test_through_linen():
  import gating.linen  # pylint: disable=import-outside-toplevel
  attention = gating.linen.gated_attention(H, D, gate='token_topk', active_heads=3,
                                           shared_heads=1, name='attn')
  x = x_BxLxD()
  variables = attention.init({'params': jax.random.key(1)}, x)
  y, updates = attention.apply(variables, x, mutable=['gate_stats'])
  usage = np.asarray(updates['gate_stats']['head_usage'])
  assert y.shape == x.shape and usage[0] == 1 and abs(usage.sum() - 3) < 1e-5


def test_a_sweep_reads_its_row_from_the_masked_path():
  from gating.study import results  # pylint: disable=import-outside-toplevel
  assert results.scored_path('token_topk') == 'masked'
  assert results.scored_path('topk') == 'gathered' and results.scored_path('slices') == 'gathered'
