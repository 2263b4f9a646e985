"""The Gemma adapter: gate_heads on a module of the shape of flax's NNX Gemma example
(tests/gemma_like.py, written from the published conventions)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating.adapters.gemma import GatedGemmaAttention
from tests.gemma_like import Block

B, T, D, DH = 2, 8, 16, 8
# (num_heads, num_kv_heads, extras): GQA with every option, and plain MHA (qkv_einsum).
FAMILIES = {
    'gqa': dict(num_heads=4, num_kv_heads=2, use_qk_norm=True, attn_logits_soft_cap=5.0,
                sliding_window_size=3, query_pre_attn_scalar=0.3),
    'mha': dict(num_heads=4, num_kv_heads=4),
}


def block(family, **changes):
  return Block(D, head_dim=DH, rngs=nnx.Rngs(0), **(FAMILIES[family] | changes))


def inputs(seed=0):
  x = jax.random.normal(jax.random.key(seed), (B, T, D))
  pos = jnp.broadcast_to(jnp.arange(T), (B, T))
  causal = jnp.broadcast_to(jnp.tril(jnp.ones((T, T), bool)), (B, T, T))
  return x, pos, causal


def gated(family, window=True, **kw):
  original = block(family) if window else block(family, sliding_window_size=None)
  return gating.gate_heads(original, rngs=nnx.Rngs(1), causal=True, **kw)


@pytest.mark.parametrize('family', FAMILIES)
def test_dense_gate_leaves_the_outputs_unchanged(family):
  original = block(family)
  model = gated(family, gate='dense')
  assert isinstance(model.attn, GatedGemmaAttention)
  x, pos, mask = inputs()
  _, want = original(x, pos, None, mask)
  _, got = model(x, pos, None, mask)
  np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
  # The original's parameter paths are kept; the gate's are added.
  paths = {p for p, _ in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  assert {p for p, _ in nnx.to_flat_state(nnx.state(original, nnx.Param))} <= paths


@pytest.mark.parametrize('family', FAMILIES)
def test_dense_gate_with_a_cache_decodes_as_the_original(family):
  original, model = block(family), gated(family, gate='dense')
  x, pos, _ = inputs()
  cache_o = original.attn.init_cache(T, B, jnp.float32)
  cache_g = model.attn.init_cache(T, B, jnp.float32)
  for t in range(T):   # one token at a time against the cache
    mask = (jnp.arange(T) <= t)[None, None, :].repeat(B, 0)
    cache_o, want = original(x[:, t:t + 1], pos[:, t:t + 1], cache_o, mask)
    cache_g, got = model(x[:, t:t + 1], pos[:, t:t + 1], cache_g, mask)
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize('family', FAMILIES)
@pytest.mark.parametrize('unit,k,shared', [('kv_group', 2, 0), ('query_head', 3, 1),
                                           ('query_head', 1, 0), ('kv_group', 4, 2)])
def test_masked_equals_gathered(family, unit, k, shared):
  if family == 'mha' and unit == 'kv_group':
    unit = 'query_head'
  model = gated(family, gate='topk', active_heads=k, unit=unit, shared_heads=shared)
  x, pos, mask = inputs()
  _, masked = model.attn(x, pos, None, mask, path='masked')
  _, gathered = model.attn(x, pos, None, mask, path='gathered')
  np.testing.assert_allclose(gathered, masked, atol=1e-5, rtol=1e-5)
  gating.set_path(model, 'gathered')
  assert model.attn.path == 'gathered'
  _, switched = model.attn(x, pos, None, mask)
  np.testing.assert_allclose(switched, masked, atol=1e-5, rtol=1e-5)


def test_the_gate_really_drops_heads():
  """A closed head changes the output: K = 2 of 4 differs from dense."""
  x, pos, mask = inputs()
  _, dense = gated('gqa', gate='dense')(x, pos, None, mask)
  _, two = gated('gqa', gate='topk', active_heads=2)(x, pos, None, mask)
  assert float(jnp.max(jnp.abs(two - dense))) > 1e-3


def test_no_future_token_moves_the_gate_or_earlier_outputs():
  model = gated('gqa', gate='topk', active_heads=2)
  x, pos, mask = inputs()
  later = x.at[:, 5:].set(jax.random.normal(jax.random.key(9), (B, T - 5, D)) * 10)
  _, a = model(x, pos, None, mask)
  _, b = model(later, pos, None, mask)
  np.testing.assert_allclose(a[:, :5], b[:, :5], atol=1e-6)
  with pytest.raises(ValueError, match='causal leak'):
    gated('gqa', gate='topk', active_heads=2, router='mean')


def test_cached_decoding_keeps_the_prompt_gate_and_equals_the_full_forward():
  # Without the sliding window: the example bands its mask on the mask's own indices,
  # which with a cache are not the positions, so there even the original differs.
  model = gated('gqa', window=False, gate='topk', active_heads=2)
  x, pos, mask = inputs()
  _, full = model(x, pos, None, mask)
  cache = model.attn.init_cache(T, B, jnp.float32)
  prompt = 3
  prompt_mask = jnp.arange(T)[None, :] <= jnp.arange(prompt)[:, None]   # [prompt, T]
  cache, head = model(x[:, :prompt], pos[:, :prompt], cache,
                      jnp.broadcast_to(prompt_mask, (B, prompt, T)))
  outs = [head]
  for t in range(prompt, T):
    cache, y = model(x[:, t:t + 1], pos[:, t:t + 1], cache,
                     (jnp.arange(T) <= t)[None, None, :].repeat(B, 0))
    outs.append(y)
  np.testing.assert_allclose(jnp.concatenate(outs, axis=1), full, atol=1e-5, rtol=1e-5)
  assert cache['gate'].shape == (B, 4)
  np.testing.assert_array_equal(cache['gate'].sum(-1), [2, 2])


def test_a_prompt_shorter_than_the_gate_prefix_is_refused_with_a_cache():
  """Under a 'prefix' router with P = 3, a first chunk of 1 token would fix a gate read
  from 1 of the 3 tokens (every later output off the full forward's): refused, eagerly
  and under jit; a 3-token prompt and the 1-token steps after it run."""
  model = gated('gqa', window=False, gate='topk', active_heads=2, prefix_len=3)
  x, pos, _ = inputs()
  step_mask = lambda t, n=1: (jnp.arange(T)[None, :] <= t + jnp.arange(n)[:, None])[None]
  cache = model.attn.init_cache(T, B, jnp.float32)
  with pytest.raises(ValueError, match='prompt of 1 token.s. into an empty cache, shorter '
                                       'than the gate prefix P=3'):
    model(x[:, :1], pos[:, :1], cache, step_mask(0).repeat(B, 0))
  jitted = nnx.jit(lambda m, c, x_t, pos_t, mask_t: m(x_t, pos_t, c, mask_t))
  step = lambda cache, t: jitted(model, cache, x[:, t:t + 1], pos[:, t:t + 1],
                                 step_mask(t).repeat(B, 0))
  with pytest.raises(Exception, match='shorter than the gate prefix P=3'):
    jax.block_until_ready(step(cache, 0))
  cache, _ = model(x[:, :3], pos[:, :3], cache, step_mask(0, 3).repeat(B, 0))
  jax.block_until_ready(step(cache, 3))


def test_bad_uses_are_refused_clearly():
  model = gated('gqa', gate='topk', active_heads=2, path='gathered')
  x, pos, mask = inputs()
  with pytest.raises(ValueError, match='gathered path runs without a cache'):
    model(x, pos, model.attn.init_cache(T, B, jnp.float32), mask)
  with pytest.raises(ValueError, match="no 'gate' entry"):
    model.attn(x, pos, block('gqa').attn.init_cache(T, B, jnp.float32), mask, path='masked')
  with pytest.raises(ValueError, match='multiples of 2'):
    gated('gqa', gate='topk', active_heads=3)
  with pytest.raises(ValueError, match='unit must be one of'):
    gated('gqa', gate='topk', active_heads=2, unit='layer')
