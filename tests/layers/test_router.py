import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from gating.layers.router import HeadRouter, StaticRouter, pool_valid

D, H = 32, 4


def test_mean_pool_ignores_padding_even_if_it_holds_nan():
  x = jax.random.normal(jax.random.key(0), (2, 6, D))
  valid = jnp.array([[1, 1, 1, 0, 0, 0], [1] * 6], bool)
  poisoned = x.at[0, 3:].set(jnp.nan)
  s = pool_valid(poisoned, valid, 'mean')
  np.testing.assert_allclose(s[0], x[0, :3].mean(0), rtol=1e-6)
  np.testing.assert_allclose(s[1], x[1].mean(0), rtol=1e-6)


def test_prefix_pool_reads_only_the_first_p_tokens():
  x = jax.random.normal(jax.random.key(0), (2, 8, D))
  s = pool_valid(x, None, 'prefix', prefix_len=3)
  np.testing.assert_allclose(s, x[:, :3].mean(1), rtol=1e-6)
  router = HeadRouter(D, H, pool='prefix', prefix_len=3, rngs=nnx.Rngs(0))
  changed = x.at[:, 3:].set(100.0)
  np.testing.assert_array_equal(router(x), router(changed))


def test_first_pool_takes_the_first_valid_token():
  x = jax.random.normal(jax.random.key(0), (2, 5, D))
  valid = jnp.array([[0, 0, 1, 1, 1], [1, 1, 1, 1, 1]], bool)  # left padding in row 0
  s = pool_valid(x, valid, 'first')
  np.testing.assert_array_equal(s, jnp.stack([x[0, 2], x[1, 0]]))


def test_router_shapes_and_bad_arguments():
  router = HeadRouter(D, H, rngs=nnx.Rngs(0))
  assert router(jnp.ones((3, 7, D))).shape == (3, H)
  with pytest.raises(ValueError, match='pool must be one of'):
    HeadRouter(D, H, pool='max', rngs=nnx.Rngs(0))
  with pytest.raises(ValueError, match='prefix_len'):
    HeadRouter(D, H, pool='prefix', rngs=nnx.Rngs(0))


def test_static_router_ignores_the_input():
  router = StaticRouter(H, init_logit=0.5)
  a = router(jax.random.normal(jax.random.key(0), (3, 5, D)))
  b = router(jnp.zeros((3, 5, D)))
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a, np.full((3, H), 0.5))
