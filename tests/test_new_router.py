"""A new router kind is one pooling function and one registry entry: it then works in the
layer, the causal models, the config and `--set`, a training run, eval and Linen, with no
other file touched (as a new selection rule does: test_new_rule.py). Also: the four
meanings that "router" once had now have four names, and the old spellings still work
with a one-line notice."""

import dataclasses
import json
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import gating
from experiments import eval as eval_script
from gating.layers import router
from gating.training import config
from gating.training import loop as train


def last_of_prefix(x_BxLxD, valid_BxL, *, prefix_len, **_):
  """A toy kind: the token at position P - 1 (the last token of the prefix)."""
  del valid_BxL
  return x_BxLxD[:, prefix_len - 1, :]


@pytest.fixture
def new_router():
  kind = router.register_router(router.RouterKind(
      'last_of_prefix', last_of_prefix, causal=True, needs_prefix=True,
      meaning='the token at position P - 1'))
  yield kind
  del router.ROUTERS['last_of_prefix']


@pytest.mark.slow
def test_a_registered_router_works_everywhere(new_router, tmp_path, capsys):  # pylint: disable=redefined-outer-name,unused-argument
  x = jax.random.normal(jax.random.key(0), (3, 8, 16))
  attn = gating.GatedMultiHeadAttention(4, 16, gate='topk', active_heads=2,
                                        router='last_of_prefix', prefix_len=3,
                                        rngs=nnx.Rngs(0))
  np.testing.assert_allclose(attn(x, path='masked'), attn(x, path='gathered'), atol=1e-5)
  # It reads token P - 1 = 2 only: other tokens never move the gate, token 2 does.
  moved = x.at[:, 5].set(9.0).at[:, 0].set(-9.0)
  assert (attn.gate(moved).idx_BxK == attn.gate(x).idx_BxK).all()
  np.testing.assert_allclose(attn.router_logits(x), attn.router_logits(moved))
  assert not np.allclose(attn.router_logits(x), attn.router_logits(x.at[:, 2].set(9.0)))
  assert attn.causal_safe
  attn(x, is_causal=True)                       # causal-safe: allowed with is_causal
  with pytest.raises(ValueError, match="'last_of_prefix' needs prefix_len"):
    gating.GatedMultiHeadAttention(4, 16, active_heads=2, router='last_of_prefix',
                                   rngs=nnx.Rngs(0))
  # The causal models and the retrofit read `causal`, not the name.
  lm = gating.GatedLM(vocab_size=16, num_layers=1, features=16, num_heads=4, max_length=8,
                      prefix_len=3, active_heads=2, router='last_of_prefix', rngs=nnx.Rngs(0))
  assert lm(jnp.zeros((2, 8), jnp.int32)).logits_BxLxV.shape == (2, 8, 16)
  with pytest.raises(ValueError, match='GatedEncoder has no prefix length'):
    gating.GatedEncoder(vocab_size=16, num_layers=1, features=16, num_heads=4, max_length=8,
                        num_classes=2, active_heads=2, router='last_of_prefix',
                        rngs=nnx.Rngs(0))

  # The config takes it by name, and a run trains, resumes its config and evaluates.
  cfg = config.override(config.TrainConfig(), [
      'model.router=last_of_prefix', 'model.num_layers=1', 'model.features=16',
      'model.num_heads=4', 'steps=2', 'batch_size=8', 'eval_batches=1',
      'data.num_tasks=2', 'data.input_len=4', 'data.num_digits=4',
      'data.num_recall_tasks=0', 'data.num_induction_tasks=0', 'data.num_train=64',
      'data.num_validation=16', 'data.num_test=16'])
  assert cfg.model.router == 'last_of_prefix'
  assert config.from_dict(json.loads(cfg.to_json())) == cfg
  train.train(cfg, str(tmp_path), progress=False)
  eval_script.main(['--workdir', str(tmp_path), '--k', '1,2', '--paths', 'gathered'])
  report = json.load(open(tmp_path / 'eval.json'))
  assert [r['K'] for r in report['results']] == [1, 2]

  layer = gating.linen.gated_attention(4, 16, active_heads=2, router='last_of_prefix',
                                       prefix_len=3)
  variables = layer.init({'params': jax.random.key(0)}, x)
  y = layer.apply(variables, x, path='gathered', mutable=['gate_stats'])[0]
  assert y.shape == x.shape and np.isfinite(np.asarray(y)).all()


def test_a_router_kind_that_reads_later_tokens_is_refused_where_causality_matters():
  kind = router.register_router(router.RouterKind(
      'max_all', lambda x, valid, **_: jnp.where(valid[..., None], x, -jnp.inf).max(1),
      causal=False, meaning='the maximum over every valid token'))
  try:
    with pytest.raises(ValueError, match="GatedLM is causal.*'max_all' reads the maximum"):
      gating.GatedLM(vocab_size=16, num_layers=1, features=16, num_heads=4, max_length=8,
                     prefix_len=3, active_heads=2, router='max_all', rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="causal=True: router='max_all' reads the maximum"):
      gating.GatedMultiHeadAttention.from_dense(
          nnx.MultiHeadAttention(4, 16, decode=False, rngs=nnx.Rngs(0)), causal=True,
          router='max_all', active_heads=2, rngs=nnx.Rngs(1))
    attn = gating.GatedMultiHeadAttention(4, 16, active_heads=2, router=kind.name,
                                          rngs=nnx.Rngs(0))
    with pytest.raises(ValueError, match="is_causal=True with router='max_all'"):
      attn(jnp.ones((2, 8, 16)), is_causal=True)
  finally:
    del router.ROUTERS['max_all']
  with pytest.raises(ValueError, match="already registered"):
    router.register_router(router.RouterKind('mean', None, causal=True, meaning='x'))
  with pytest.raises(ValueError, match=r"router must be one of \('mean', 'prefix', 'first', "
                                       r"'token', 'input_free'\), got 'nope'"):
    gating.GatedMultiHeadAttention(4, 16, active_heads=2, router='nope', rngs=nnx.Rngs(0))


def _notices(fn):
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter('always')
    out = fn()
  return out, [str(w.message) for w in caught if w.category is FutureWarning]


def test_the_old_names_still_work_with_a_one_line_notice():
  x = jnp.ones((2, 6, 16))
  attn, said = _notices(lambda: gating.GatedMultiHeadAttention(
      4, 16, gate='topk', active_heads=2, router='static', rngs=nnx.Rngs(0)))
  assert said == ["router 'static' is now 'input_free' (the old name still works)"]
  assert isinstance(attn.router, gating.StaticRouter)

  def block(**kw):
    return gating.GatedTransformerBlock(16, 4, active_heads=2, mlp_groups=4,
                                        active_groups=2, rngs=nnx.Rngs(0), **kw)
  old, said = _notices(lambda: block(mlp_router='shared'))
  assert said == ["keyword 'mlp_router' is now 'group_router' (the old name still works)",
                  "group_router 'shared' is now 'attention' (the old name still works)"]
  new, said = _notices(lambda: block(group_router='attention'))
  assert not said and old.group_router == new.group_router == 'attention'
  np.testing.assert_allclose(old(x), new(x))
  with pytest.raises(ValueError, match='pass group_router= only'):
    block(group_router='own', mlp_router='own')

  cfg, said = _notices(lambda: config.override(config.TrainConfig(), [
      'model.mlp_router=shared', 'model.mlp_groups=8', 'model.active_groups=2']))
  assert cfg.model.group_router == 'attention' and len(said) == 2
  cfg, said = _notices(lambda: config.override(config.TrainConfig(), ['model.router=static']))
  assert cfg.model.router == 'input_free' and len(said) == 1
  # A config saved before the renames (format 2) reads under the new names.
  saved = config.TrainConfig().to_dict()
  saved['format'] = 2
  saved['model'].pop('group_router')
  saved['model'].update(mlp_router='own', router='static')
  cfg, said = _notices(lambda: config.from_dict(saved))
  assert (cfg.model.router, cfg.model.group_router) == ('input_free', 'own')
  assert said == ["config key 'model.mlp_router' is now 'model.group_router' (the old name "
                  "still works)", "router 'static' is now 'input_free' (the old name still "
                  'works)']
  assert config.compatibility(cfg) == config.compatibility(dataclasses.replace(
      config.TrainConfig(), model=dataclasses.replace(config.TrainConfig().model,
                                                      router='input_free')))
