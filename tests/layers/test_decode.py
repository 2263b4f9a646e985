import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from gating.layers import decode

V, L, D, H, P = 40, 16, 32, 4, 4


def lm(gate='topk', k=2, path='gathered', **kw):
  k = None if gate == 'dense' else k
  return gating.GatedLM(V, num_layers=2, features=D, num_heads=H, max_length=L, prefix_len=P,
                        gate=gate, active_heads=k, path=path, rngs=nnx.Rngs(0), **kw)


def tokens(b=2, length=L, seed=1):
  return jax.random.randint(jax.random.key(seed), (b, length), 0, V)


@nnx.jit
def full_forward(model, tokens_BxL, valid_BxL=None):
  return model(tokens_BxL, valid_BxL=valid_BxL).logits_BxLxV


jit_prefill = nnx.jit(decode.prefill, static_argnames=('cache_length', 'path', 'projection'))


@nnx.jit(static_argnames=('prompt_len', 'projection'))
def teacher_forced(model, tokens_BxL, prompt_len, projection):
  """Prefill the first prompt_len tokens, then feed the rest one at a time: every logit."""
  logits_BxLxV, state = decode.prefill(model, tokens_BxL[:, :prompt_len],
                                       cache_length=tokens_BxL.shape[1], projection=projection)

  def step(state, token_B):
    logits_BxV, state = decode.decode_step(model, state, token_B)
    return state, logits_BxV
  _, step_logits_TxBxV = jax.lax.scan(step, state, tokens_BxL[:, prompt_len:].T)
  return jnp.concatenate([logits_BxLxV, step_logits_TxBxV.transpose(1, 0, 2)], axis=1)


@pytest.mark.parametrize('gate,path,positions,projection', [
    ('dense', 'masked', 'learned', 'auto'),
    ('topk', 'masked', 'rotary', 'auto'),
    ('topk', 'gathered', 'learned', 'weights'),
    ('topk', 'gathered', 'rotary', 'activations'),
    ('hard_concrete', 'gathered', 'rotary', 'weights'),
    ('sigmoid', 'gathered', 'learned', 'activations'),
])
def test_cached_decoding_equals_the_full_forward(gate, path, positions, projection):
  model = lm(gate, path=path, positions=positions, deterministic=True)
  x = tokens()
  want = full_forward(model, x)  # the full causal forward
  got = teacher_forced(model, x, 6, projection)
  np.testing.assert_allclose(got, want, atol=2e-5, rtol=2e-5)


def test_the_cache_holds_only_the_selected_heads():
  model = lm('topk', k=[1, 3], path='gathered')
  _, state = jit_prefill(model, tokens(b=3, length=8), cache_length=12, projection='weights')
  assert [c.k_BxNxSxDh.shape for c in state.layers] == [(3, 1, 12, D // H), (3, 3, 12, D // H)]
  assert [c.v_BxNxSxDh.shape for c in state.layers] == [(3, 1, 12, D // H), (3, 3, 12, D // H)]
  assert state.layers[0].gathered.wq_BxDxKxDh.shape == (3, D, 1, D // H)
  _, dense_state = jit_prefill(lm('dense', path='masked'), tokens(b=3, length=8),
                               cache_length=12)
  assert dense_state.layers[0].k_BxNxSxDh.shape == (3, H, 12, D // H)
  assert state.kv_bytes * H == dense_state.kv_bytes * (1 + 3) // 2
  _, masked = jit_prefill(model, tokens(b=3, length=8), cache_length=12, path='masked')
  assert masked.projections == ('masked', 'masked') and masked.kv_bytes == dense_state.kv_bytes


def test_projection_rule_and_override():
  assert decode.choose_projection(batch=1, active_heads=2, num_heads=8) == 'grouped'  # CPU
  assert decode.choose_projection(batch=1, active_heads=2, num_heads=8,
                                  groupable=False) == 'weights'
  assert decode.choose_projection(batch=2, active_heads=2, num_heads=8) == 'weights'
  assert decode.choose_projection(batch=4, active_heads=2, num_heads=8) == 'activations'
  assert decode.choose_projection(batch=3, active_heads=2, num_heads=8) == 'weights'
  model = lm('topk', k=1)  # H = 4: gathering weights pays for B K < 4
  assert decode.layer_plan(model, 3) == [(1, 'weights'), (1, 'weights')]
  assert decode.layer_plan(model, 4) == [(1, 'activations'), (1, 'activations')]
  assert decode.layer_plan(model, 4, projection='weights') == [(1, 'weights')] * 2
  assert decode.layer_plan(model, 1, active_heads=H) == [(H, 'masked')] * 2
  out = decode.generate(model, tokens(b=4, length=6), max_new_tokens=2)
  assert out.projections == ('activations', 'activations')


def test_batched_prompts_of_different_lengths_match_single_prompts():
  model = lm('topk', path='gathered', positions='rotary')
  x = tokens(b=3, length=10)
  lengths = jnp.array([5, 10, 7])
  batched = decode.generate(model, x, lengths, max_new_tokens=5)
  np.testing.assert_array_equal(batched.lengths_B, lengths + 5)
  for b, n in enumerate(lengths.tolist()):
    alone = decode.generate(model, x[b:b + 1], [n], max_new_tokens=5)
    np.testing.assert_array_equal(batched.tokens_BxT[b], alone.tokens_BxT[0])
    assert (np.asarray(batched.tokens_BxT[b, n + 5:]) == 0).all()
  # Greedy: every generated token is the argmax of the full forward over what came before.
  valid_BxT = jnp.arange(15)[None, :] < batched.lengths_B[:, None]
  full_BxTxV = full_forward(model, batched.tokens_BxT[:, :-1], valid_BxT[:, :-1])
  for b, n in enumerate(lengths.tolist()):
    np.testing.assert_array_equal(jnp.argmax(full_BxTxV[b, n - 1:n + 4], -1),
                                  batched.tokens_BxT[b, n:n + 5])


def test_generate_compiles_once_not_once_per_token(monkeypatch):
  traced = []
  step = decode.decode_step

  def counting_step(*args, **kwargs):
    traced.append(1)
    return step(*args, **kwargs)
  monkeypatch.setattr(decode, 'decode_step', counting_step)
  model = lm('topk', k=3, path='gathered')
  out = decode.generate(model, tokens(b=3, length=5), max_new_tokens=9)
  assert out.tokens_BxT.shape == (3, 14) and len(traced) == 1
  # New prompts, sampling settings and lengths of the same shapes reuse the compilation.
  decode.generate(model, tokens(b=3, length=5, seed=4), [5, 4, 5], max_new_tokens=9,
                  temperature=0.8, top_p=0.9, rng=jax.random.key(0))
  assert len(traced) == 1


def test_sample_greedy_temperature_and_nucleus():
  logits_1xV = jnp.log(jnp.array([[0.05, 0.5, 0.15, 0.3]]))
  rng = jax.random.key(0)
  assert int(decode.sample(logits_1xV, rng)[0]) == 1  # temperature 0: argmax
  draws = jax.vmap(lambda r: decode.sample(logits_1xV, r, 1.0, 0.7)[0])(
      jax.random.split(rng, 2000))
  counts = np.bincount(np.asarray(draws), minlength=4)
  assert counts[0] == counts[2] == 0                     # outside the nucleus {1, 3}
  np.testing.assert_allclose(counts[1] / 2000, 0.5 / 0.8, atol=0.05)
  draws = jax.vmap(lambda r: decode.sample(logits_1xV, r, 1.0, 1.0)[0])(
      jax.random.split(rng, 2000))
  assert (np.bincount(np.asarray(draws), minlength=4) > 0).all()


def test_generate_sampling_options_and_eos():
  model = lm('topk', path='gathered')
  x = tokens(b=2, length=6)
  greedy = decode.generate(model, x, max_new_tokens=8)
  tiny_p = decode.generate(model, x, max_new_tokens=8, temperature=1.0, top_p=1e-6,
                           rng=jax.random.key(3))
  np.testing.assert_array_equal(tiny_p.tokens_BxT, greedy.tokens_BxT)
  a, b, c = (decode.generate(model, x, max_new_tokens=8, temperature=2.0,
                             rng=jax.random.key(s)) for s in (1, 1, 2))
  np.testing.assert_array_equal(a.tokens_BxT, b.tokens_BxT)
  assert (np.asarray(a.tokens_BxT) != np.asarray(c.tokens_BxT)).any()
  eos = int(greedy.tokens_BxT[0, 7])  # sequence 0's second generated token
  stopped = decode.generate(model, x, max_new_tokens=8, eos_id=eos)
  first_eos = [int(np.argmax(np.asarray(greedy.tokens_BxT[i, 6:]) == eos)) if
               (np.asarray(greedy.tokens_BxT[i, 6:]) == eos).any() else 7 for i in range(2)]
  np.testing.assert_array_equal(stopped.lengths_B, [6 + n + 1 for n in first_eos])
  n0 = int(stopped.lengths_B[0])
  np.testing.assert_array_equal(stopped.tokens_BxT[0, :n0], greedy.tokens_BxT[0, :n0])
  assert (np.asarray(stopped.tokens_BxT[0, n0:]) == 0).all()


def test_bad_decoding_arguments():
  model = lm('topk', path='gathered')
  x = tokens(b=2, length=6)
  with pytest.raises(ValueError, match='shorter than the gate prefix P=4'):
    decode.generate(model, x[:, :P - 1], max_new_tokens=2)
  with pytest.raises(ValueError, match=r'every prompt length must be in \[P=4'):
    decode.generate(model, x, [6, 3], max_new_tokens=2)
  with pytest.raises(ValueError, match='longer than the cache'):
    decode.generate(model, x, max_new_tokens=2, cache_length=5)
  with pytest.raises(ValueError, match='longer than the cache'):
    decode.prefill(model, x, cache_length=5)
  with pytest.raises(ValueError, match='do not fit in cache_length 8'):
    decode.generate(model, x, max_new_tokens=4, cache_length=8)
  with pytest.raises(ValueError, match='exceed the model max_length 16'):
    decode.generate(model, x, max_new_tokens=12)
  with pytest.raises(ValueError, match=r'vocabulary \[0, 40\)'):
    decode.generate(model, x.at[1, 2].set(V), max_new_tokens=2)
  with pytest.raises(ValueError, match=r'eos_id must be in the vocabulary \[0, 40\)'):
    decode.generate(model, x, max_new_tokens=2, eos_id=V)
  with pytest.raises(ValueError, match='needs rng'):
    decode.generate(model, x, max_new_tokens=2, temperature=1.0)
  with pytest.raises(ValueError, match='top_p must be in'):
    decode.generate(model, x, max_new_tokens=2, top_p=0.0)
  with pytest.raises(ValueError, match='projection must be one of'):
    decode.generate(model, x, max_new_tokens=2, projection='both')
  with pytest.raises(ValueError, match="path='gathered' needs a static budget"):
    decode.generate(lm('sigmoid', k=None, path='masked'), x, max_new_tokens=2, path='gathered')
  with pytest.raises(ValueError, match='decoding needs a GatedLM'):
    decode.generate(gating.GatedEncoder(V, num_layers=1, features=D, num_heads=H, max_length=L,
                                        num_classes=2, active_heads=2, rngs=nnx.Rngs(0)),
                    x, max_new_tokens=2)
  with pytest.raises(ValueError, match=r'prompts hold ids in \[.*, 40\], outside the '
                                       r'vocabulary \[0, 40\)'):
    decode.prefill(model, x.at[0, 1].set(V), cache_length=8)
  decode.prefill(model, x.at[0, 5].set(V + 7), jnp.array([5, 6]), cache_length=8)  # padding
  _, state = jit_prefill(model, x, cache_length=6)
  with pytest.raises(ValueError, match='the cache is full'):
    decode.decode_step(model, state, x[:, 0])
  _, state = jit_prefill(model, x[:, :5], cache_length=8)
  with pytest.raises(ValueError, match=r'tokens hold ids in \[-1, .*\], outside'):
    decode.decode_step(model, state, jnp.array([-1, 3]))
  # The drop-in layer itself has no decode mode: it points here.
  with pytest.raises(ValueError, match='gating.decode'):
    model.blocks[0].attention(jnp.ones((1, 4, D)), decode=True)


# -- gated MLP channel groups ---------------------------------------------------------------

G = 8  # MLP groups of F = 4 D = 128 channels: 16 each


def grouped_lm(k=2, kf=2, path='gathered', **kw):
  """Heads gated (K=k of H; k=H: no head skipped) and MLP groups gated (Kf=kf of G)."""
  return lm('topk', k=k, path=path, mlp_groups=G, active_groups=kf, **kw)


@nnx.jit
def group_weights(model, tokens_BxL):
  return model(tokens_BxL).group_weights_BxNxG


def assert_greedy(model, out, prompt_len):
  """Every generated token is the argmax of the full forward (no cache) over the tokens
  before it: what re-running the model on the growing sequence gives (it is causal)."""
  logits_BxTxV = full_forward(model, out.tokens_BxT)
  np.testing.assert_array_equal(jnp.argmax(logits_BxTxV[:, prompt_len - 1:-1], -1),
                                out.tokens_BxT[:, prompt_len:])


@pytest.mark.parametrize('k,kf,path,batch,positions,mlp_projections', [
    (2, 2, 'gathered', 2, 'rotary', ('weights', 'weights')),          # B Kf = 4 < G
    (2, 2, 'gathered', 4, 'learned', ('activations', 'activations')),  # B Kf = 8 >= G
    (H, 2, 'gathered', 3, 'rotary', ('weights', 'weights')),           # heads dense (K = H)
    (H, 3, 'gathered', 3, 'learned', ('activations', 'activations')),
    (2, (1, 5), 'gathered', 2, 'rotary', ('weights', 'activations')),  # Kf per layer
    (2, 2, 'masked', 2, 'learned', ('masked', 'masked')),
])
def test_cached_decoding_with_mlp_groups_equals_the_full_forward(k, kf, path, batch,
                                                                 positions, mlp_projections):
  model = grouped_lm(k, list(kf) if isinstance(kf, tuple) else kf, path, positions=positions)
  x = tokens(b=batch, length=10)
  np.testing.assert_allclose(teacher_forced(model, x, 6, 'auto'), full_forward(model, x),
                             atol=2e-5, rtol=2e-5)
  out = decode.generate(model, x[:, :6], max_new_tokens=4)
  assert out.mlp_projections == mlp_projections
  assert_greedy(model, out, 6)


@pytest.mark.parametrize('batch,mlp_projection', [(2, 'weights'), (4, 'activations')])
def test_cached_decoding_with_a_shared_group_router_equals_the_full_forward(batch,
                                                                             mlp_projection):
  model = grouped_lm(2, 2, 'gathered', group_router='attention')
  for block in model.blocks:  # logits far from ties, so the decision is a clear one
    p = block.attention.router.group_logits.kernel
    p[...] = jax.random.normal(jax.random.key(5), p.shape)
  x = tokens(b=batch, length=10)
  np.testing.assert_allclose(teacher_forced(model, x, 6, 'auto'), full_forward(model, x),
                             atol=2e-5, rtol=2e-5)
  out = decode.generate(model, x[:, :6], max_new_tokens=4)
  assert out.mlp_projections == (mlp_projection,) * 2
  assert_greedy(model, out, 6)


@pytest.mark.parametrize('projection', ['weights', 'activations'])
def test_mlp_group_projection_override_and_other_rules(projection):
  for gate in ('sigmoid', 'hard_concrete'):
    model = lm(gate, path='gathered', mlp_groups=G, active_groups=3, deterministic=True)
    x = tokens(b=2, length=10)
    np.testing.assert_allclose(teacher_forced(model, x, 6, projection),
                               full_forward(model, x), atol=2e-5, rtol=2e-5)


def test_mlp_groups_are_decided_once_at_prefill():
  model = grouped_lm(kf=2)
  x = tokens(b=3, length=8)
  _, state = jit_prefill(model, x[:, :4], cache_length=L, projection='activations')
  # The decision is the full forward's, which reads the prefix: its weights on the G groups,
  # whatever tokens follow the prompt.
  want_BxNxG = group_weights(model, x)
  np.testing.assert_array_equal(jnp.stack([m.weights_BxN for m in state.mlps], axis=1),
                                want_BxNxG)
  _, after = nnx.jit(decode.decode_step)(model, state, x[:, 4])
  for m, m_after in zip(state.mlps, after.mlps):
    np.testing.assert_array_equal(m_after.idx_BxK, m.idx_BxK)
    np.testing.assert_array_equal(m_after.weights_BxN, m.weights_BxN)


def test_the_gathered_mlp_state_holds_only_the_selected_groups():
  model = grouped_lm(kf=[1, 3])
  _, state = jit_prefill(model, tokens(b=2, length=8), cache_length=12, projection='weights')
  Fg = 4 * D // G
  g0, g1 = (m.gathered for m in state.mlps)
  assert g0.w1_BxDxKxFg.shape == (2, D, 1, Fg) and g1.w1_BxDxKxFg.shape == (2, D, 3, Fg)
  assert g0.b1_BxKxFg.shape == (2, 1, Fg) and g1.w2_BxKxFgxD.shape == (2, 3, Fg, D)
  assert [m.weights_BxN.shape for m in state.mlps] == [(2, 1), (2, 3)]
  # Kf = G, or the masked path: every group with the full weights, nothing gathered.
  _, full = jit_prefill(grouped_lm(kf=G), tokens(b=2, length=8), cache_length=12)
  assert full.mlp_projections == ('masked', 'masked') and full.mlps[0].gathered is None
  # Without mlp_groups there is no MLP gate to keep.
  _, plain = jit_prefill(lm(), tokens(b=2, length=8), cache_length=12)
  assert plain.mlp_projections == (None, None)


def test_group_plan_rule_and_bad_arguments():
  model = grouped_lm(kf=2)
  assert decode.group_plan(model, 3) == [(2, 'weights')] * 2        # B Kf = 6 < 8
  assert decode.group_plan(model, 4) == [(2, 'activations')] * 2    # B Kf = 8
  assert decode.group_plan(model, 4, projection='weights') == [(2, 'weights')] * 2
  assert decode.group_plan(model, 1, active_groups=[G, 1]) == [(G, 'masked'), (1, 'grouped')]  # CPU
  assert decode.group_plan(model, 2, active_groups=[G, 1]) == [(G, 'masked'), (1, 'weights')]
  assert decode.group_plan(model, 1, path='masked') == [(2, 'masked')] * 2
  assert decode.group_plan(lm(), 1) == [None, None]
  x = tokens(b=2, length=6)
  with pytest.raises(ValueError, match='active_groups needs a model built with mlp_groups'):
    decode.generate(lm(), x, max_new_tokens=2, active_groups=2)
  with pytest.raises(ValueError, match='active_groups'):
    decode.generate(model, x, max_new_tokens=2, active_groups=G + 1)
  out = decode.generate(model, x, max_new_tokens=1, active_groups=[1, 4])
  assert out.mlp_projections == ('weights', 'activations')
  want = nnx.jit(lambda m, x: m(x, active_groups=[1, 4]).logits_BxLxV)(model, x)
  np.testing.assert_array_equal(out.tokens_BxT[:, 6], want[:, -1].argmax(-1))


# -- projection='grouped': one ragged matmul per head (or group) over its pairs ----------------

def test_grouped_compute_equals_the_gathered_path():
  """project/output_grouped, grouped_attention and mlp_grouped against the gathered path,
  with biases, a per-head mask, unsorted indices and a unit that no sequence chose."""
  from gating.layers import compute
  keys = jax.random.split(jax.random.key(7), 12)
  B, Lq, E = 3, 5, D // H
  w = compute.HeadWeights(*(jax.random.normal(k, s) for k, s in zip(
      keys, [(D, H, E), (D, H, E), (D, H, E), (H, E, D), (H, E), (H, E), (H, E), (D,)])))
  idx_BxK = jnp.array([[2, 0], [0, 2], [3, 0]])          # head 1 chosen by nobody
  weights_BxK = jax.random.uniform(keys[8], (B, 2))
  x_BxLxD = jax.random.normal(keys[9], (B, Lq, D))
  groups = compute.group_pairs(idx_BxK, H)
  np.testing.assert_array_equal(groups.sizes_U, [3, 0, 2, 1])
  np.testing.assert_array_equal(groups.units_M, [0, 0, 0, 2, 2, 3])
  np.testing.assert_allclose(
      compute.project_grouped(x_BxLxD, w.wq_DxHxDh, w.bq_HxDh, groups),
      compute.project_gathered(x_BxLxD, compute.gather_heads(w.wq_DxHxDh, idx_BxK),
                               compute.take_heads(w.bq_HxDh, idx_BxK)), atol=1e-5, rtol=1e-5)
  mask_BxHxLxL = (jax.random.bernoulli(keys[10], 0.7, (B, H, Lq, Lq))
                  | jnp.eye(Lq, dtype=bool)[None, None])
  options = compute.AttendOptions(mask=mask_BxHxLxL)
  np.testing.assert_allclose(
      compute.grouped_attention(x_BxLxD, x_BxLxD, x_BxLxD, w, idx_BxK, weights_BxK, options),
      compute.gathered_attention(x_BxLxD, x_BxLxD, x_BxLxD, w, idx_BxK, weights_BxK, options),
      atol=1e-4, rtol=1e-4)
  mw = compute.MLPWeights(jax.random.normal(keys[0], (D, 4 * D)),
                          jax.random.normal(keys[1], (4 * D, D)),
                          jax.random.normal(keys[2], (4 * D,)), jax.random.normal(keys[3], (D,)))
  np.testing.assert_allclose(
      compute.mlp_grouped(x_BxLxD, mw, compute.group_pairs(idx_BxK, 4, 'group'), weights_BxK, 4),
      compute.gathered_mlp(x_BxLxD, mw, idx_BxK, weights_BxK, 4), atol=1e-3, rtol=1e-4)
  with pytest.raises(ValueError, match='indices 0..3'):
    compute.group_pairs(idx_BxK.at[0, 0].set(H), H)
  gqa = w._replace(wk_DxHxDh=w.wk_DxHxDh[:, :2], wv_DxHxDh=w.wv_DxHxDh[:, :2],
                   bk_HxDh=w.bk_HxDh[:2], bv_HxDh=w.bv_HxDh[:2])
  with pytest.raises(ValueError, match='one K/V head per query head; .* 4 query and 2 K/V'):
    compute.grouped_attention(x_BxLxD, x_BxLxD, x_BxLxD, gqa, idx_BxK, weights_BxK)


@pytest.mark.slow
def test_grouped_decoding_equals_the_other_projections_and_the_full_forward():
  model = grouped_lm(2, [1, 5], 'gathered', positions='rotary')  # heads 2/4, groups 1 and 5/8
  x = tokens(b=3, length=10)
  want = full_forward(model, x)
  got = {p: teacher_forced(model, x, 6, p) for p in ('weights', 'activations', 'grouped')}
  np.testing.assert_allclose(got['grouped'], want, atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(got['grouped'], got['weights'], atol=2e-5, rtol=2e-5)
  np.testing.assert_allclose(got['grouped'], got['activations'], atol=2e-5, rtol=2e-5)
  _, state = jit_prefill(model, x[:, :6], cache_length=L, projection='grouped')
  assert state.projections == ('grouped', 'grouped')
  assert state.mlp_projections == ('grouped', 'grouped')
  assert state.layers[0].gathered is None and state.layers[0].k_BxNxSxDh.shape[1] == 2
  np.testing.assert_array_equal(state.layers[0].groups.sizes_U.sum(), 3 * 2)
  out = decode.generate(model, x[:, :6], max_new_tokens=3, projection='grouped')
  assert out.projections == ('grouped', 'grouped')
  assert_greedy(model, out, 6)


def test_grouped_projection_needs_the_gathered_path_and_auto_picks_it_only_at_b1(
    monkeypatch):
  x = tokens(b=2, length=6)
  with pytest.raises(ValueError, match=r"projection='grouped' needs the gathered path .* "
                                       r"path='masked'"):
    decode.generate(lm('topk', path='masked'), x, max_new_tokens=2, projection='grouped')
  with pytest.raises(ValueError, match=r"projection='grouped' needs the gathered path"):
    decode.prefill(lm('topk', path='gathered'), x, cache_length=8, path='masked',
                   projection='grouped')
  with pytest.raises(ValueError, match=r"group's weights .* path='masked'"):
    decode.group_plan(grouped_lm(path='masked'), 2, projection='grouped')
  with pytest.raises(ValueError, match='projection must be one of .*grouped'):
    decode.layer_plan(lm(), 2, projection='ragged')
  model = lm('topk', k=1)
  assert decode.layer_plan(model, 2, projection='grouped') == [(1, 'grouped')] * 2
  assert decode.layer_plan(model, 1, active_heads=H, projection='grouped') == [(H, 'masked')] * 2
  for batch in (2, 3, 16, 64):    # measured slower on the CPU (docs/benchmarks.md)
    assert {p for _, p in decode.layer_plan(model, batch)} <= {'weights', 'activations'}
  assert decode.layer_plan(model, 1) == [(1, 'grouped')] * 2     # measured faster there
  monkeypatch.setattr(decode, 'GROUPED_TILES', frozenset())     # a GPU: never measured
  assert decode.layer_plan(model, 1) == [(1, 'weights')] * 2


# -- grouped-query attention and Llama/Qwen-style blocks -----------------------------------

LLAMA_LIKE = dict(num_kv_heads=2, norm='rms', mlp='swiglu', mlp_bias=False, use_bias=False,
                  positions='rotary', tie_embeddings=False, qk_norm=True,
                  rotary_scaling={'rope_type': 'llama3', 'factor': 4.0, 'low_freq_factor': 1.0,
                                  'high_freq_factor': 4.0,
                                  'original_max_position_embeddings': 8})


@pytest.mark.parametrize('unit,k,path,projection', [
    ('kv_group', 2, 'gathered', 'weights'), ('kv_group', 2, 'gathered', 'activations'),
    ('query_head', 1, 'gathered', 'weights'), ('query_head', 3, 'gathered', 'activations'),
    ('kv_group', 2, 'masked', 'auto'),
])
def test_cached_decoding_of_a_grouped_query_model_equals_the_full_forward(unit, k, path,
                                                                           projection):
  """GQA (G = 2 of H = 4), QK norm, Llama 3 RoPE scaling, RMSNorm and SwiGLU, with MLP
  channel groups: prefill plus one-token steps give the full forward's logits."""
  model = lm('topk', k=k, path=path, unit=unit, mlp_groups=4, active_groups=2,
             **LLAMA_LIKE)
  x = tokens()
  np.testing.assert_allclose(teacher_forced(model, x, 6, projection), full_forward(model, x),
                             atol=3e-5, rtol=3e-5)


def test_the_kv_group_cache_holds_k_over_h_of_dense():
  """Under unit='kv_group' a gathered layer caches only its chosen groups: K/H of the
  dense GQA cache exactly; unit='query_head' caches every group."""
  dense = lm('dense', path='masked', **LLAMA_LIKE)
  _, dense_state = jit_prefill(dense, tokens(b=3, length=8), cache_length=12)
  assert dense_state.layers[0].k_BxNxSxDh.shape == (3, 2, 12, D // H)   # the G = 2 heads
  for unit, k, want in (('kv_group', 2, 2 / 4), ('query_head', 1, 1.0)):
    _, state = jit_prefill(lm('topk', k=k, unit=unit, **LLAMA_LIKE), tokens(b=3, length=8),
                           cache_length=12)
    assert state.kv_bytes == dense_state.kv_bytes * want


def test_grouped_projection_decodes_swiglu_channel_groups():
  kw = {**LLAMA_LIKE, 'num_kv_heads': H}   # 'grouped' refuses GQA weights
  model = lm('topk', k=2, path='gathered', mlp_groups=4, active_groups=2, **kw)
  x = tokens()
  np.testing.assert_allclose(teacher_forced(model, x, 6, 'grouped'), full_forward(model, x),
                             atol=3e-5, rtol=3e-5)
