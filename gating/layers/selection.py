"""Selection rules: head logits_BxH -> Gate(weights_BxH, idx_BxK | None, probs_BxH).

`weights_BxH` multiply each head's output (0 for a closed head). `idx_BxK` are the K heads
that the gathered path computes, when a static budget K is given. `probs_BxH` is the rule's
open probability of each head, for the regularizers and the load balance (DESIGN 4).

Rules (t is the temperature, a traced input):
  dense          every head open, weight 1.
  topk           idx = top_k(logits, K) without gradient; p = softmax(logits / t).
  hard_concrete  Louizos et al. (2018). Training: u ~ U(0,1),
                   s = sigmoid((log u - log(1-u) + log_alpha) / beta),
                 eval: s = sigmoid(log_alpha); then z = clip(s (zeta - gamma) + gamma, 0, 1),
                 open iff z > 0; p = P(z > 0) = sigmoid(log_alpha - beta log(-gamma/zeta)),
                 the expected L0 of the head. beta = t (default 2/3), (gamma, zeta) = (-0.1, 1.1).
  sigmoid        p = sigmoid(logits / t); open iff p > threshold.
  static         hard_concrete on a static router's logits (Voita et al. 2019): the same
                 math; the attention layer pairs this name with `StaticRouter`.

Weights of open heads are exactly 1 in value by default, with the gradient of p
(straight-through):  w = open + (p - stop_gradient(p))  for every head, so a closed head
weighs 0 but, on the masked path, still learns whether opening it would help. For
hard_concrete p is the sample z (closed heads are clipped, so they get no gradient there;
the L0 term trains them). `scaled_weights=True` uses the values instead: topk
w = K softmax(logits / t) over the selected heads (MoH), sigmoid w = p (SwitchHead),
hard_concrete w = z (Louizos; Voita), each times `open`.

A budget K (any rule) keeps the K heads of highest score, the rule's deterministic
propensity to open a head (the logits; for hard_concrete log_alpha, not its noisy sample),
and gives zero weight to those of them that are closed. Ranking by the sample instead
would pick a random set in training while the log_alphas are close (the logistic noise
has a standard deviation of 1.8), and the heads would never specialize. In eval mode,
and for sigmoid, "highest score" and "open first" pick the same heads.

Exploration noise on the logits in training (off when deterministic): 'gumbel' adds
scale * Gumbel(0, 1); 'jitter' adds scale * N(0, 1) (noisy top-k, Shazeer et al. 2017).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

RULES = ('dense', 'topk', 'hard_concrete', 'sigmoid', 'static')
NOISES = (None, 'gumbel', 'jitter')
HARD_CONCRETE_STRETCH = (-0.1, 1.1)  # (gamma, zeta), Louizos et al. 2018
DEFAULT_TEMPERATURE = {'dense': 1.0, 'topk': 1.0, 'sigmoid': 1.0,
                       'hard_concrete': 2 / 3, 'static': 2 / 3}


class Gate(NamedTuple):
  weights_BxH: jax.Array        # multiplies each head's output; 0 for a closed head
  idx_BxK: jax.Array | None     # heads computed on the gathered path (int32); None without K
  probs_BxH: jax.Array          # open probability of each head (regularizers, load balance)


def straight_through(open_BxH: jax.Array, p_BxH: jax.Array) -> jax.Array:
  """open in value (exactly: p - stop_gradient(p) is exactly 0), gradient of p."""
  return open_BxH.astype(p_BxH.dtype) + (p_BxH - jax.lax.stop_gradient(p_BxH))


def one_hot_sum(idx_BxK: jax.Array, num_heads: int) -> jax.Array:
  """Boolean membership mask_BxH of the indices idx_BxK."""
  return jax.nn.one_hot(idx_BxK, num_heads, dtype=jnp.int32).sum(axis=1) > 0


def add_noise(logits_BxH: jax.Array, noise: str | None, scale: float, rng) -> jax.Array:
  if noise is None:
    return logits_BxH
  if noise == 'gumbel':
    return logits_BxH + scale * jax.random.gumbel(rng, logits_BxH.shape, logits_BxH.dtype)
  if noise == 'jitter':
    return logits_BxH + scale * jax.random.normal(rng, logits_BxH.shape, logits_BxH.dtype)
  raise ValueError(f'noise must be one of {NOISES}, got {noise!r}')


def dense(logits_BxH):
  ones_BxH = jnp.ones_like(logits_BxH)
  return ones_BxH > 0, ones_BxH, ones_BxH, ones_BxH


def topk(logits_BxH, *, k, temperature):
  """Returns (open, p, scaled weight, score); topk always needs k."""
  if k is None:
    raise ValueError("the 'topk' rule needs a budget: active_heads=K")
  H = logits_BxH.shape[-1]
  p_BxH = jax.nn.softmax(logits_BxH / temperature, axis=-1)
  _, idx_BxK = jax.lax.top_k(jax.lax.stop_gradient(logits_BxH), k)
  open_BxH = one_hot_sum(idx_BxK, H)
  selected_p_BxH = jax.nn.softmax(jnp.where(open_BxH, logits_BxH / temperature, -jnp.inf), -1)
  return open_BxH, p_BxH, k * selected_p_BxH, logits_BxH


def hard_concrete(log_alpha_BxH, *, temperature, deterministic, rng,
                  stretch=HARD_CONCRETE_STRETCH):
  gamma, zeta = stretch
  beta = temperature
  if deterministic:
    s_BxH = jax.nn.sigmoid(log_alpha_BxH)
  else:
    u_BxH = jax.random.uniform(rng, log_alpha_BxH.shape, log_alpha_BxH.dtype, 1e-6, 1 - 1e-6)
    s_BxH = jax.nn.sigmoid((jnp.log(u_BxH) - jnp.log1p(-u_BxH) + log_alpha_BxH) / beta)
  stretched_BxH = s_BxH * (zeta - gamma) + gamma
  z_BxH = jnp.clip(stretched_BxH, 0.0, 1.0)
  p_open_BxH = jax.nn.sigmoid(log_alpha_BxH - beta * jnp.log(-gamma / zeta))
  # The gradient of an open head's weight is that of its sample z (the reparameterization).
  # A budget ranks heads by log_alpha, not by the sample: see `select`.
  return z_BxH > 0, z_BxH, z_BxH, log_alpha_BxH, p_open_BxH


def sigmoid(logits_BxH, *, temperature, threshold):
  p_BxH = jax.nn.sigmoid(logits_BxH / temperature)
  return p_BxH > threshold, p_BxH, p_BxH, p_BxH


def select(rule: str, logits_BxH: jax.Array, *, k: int | None = None,
           temperature: float | jax.Array | None = None, deterministic: bool = True,
           rng: jax.Array | None = None, noise: str | None = None, noise_scale: float = 1.0,
           scaled_weights: bool = False, threshold: float = 0.5,
           stretch: tuple[float, float] = HARD_CONCRETE_STRETCH) -> Gate:
  """Applies `rule` to logits_BxH (float32) and returns its Gate.

  Args:
    rule: one of RULES.
    logits_BxH: router output (log_alpha for hard_concrete and static).
    k: static budget K (required for topk and for the gathered path), or None.
    temperature: softmax temperature (topk, sigmoid) or beta (hard_concrete, static);
      default DEFAULT_TEMPERATURE[rule]. May be traced.
    deterministic: eval mode: no noise and no hard-concrete sampling.
    rng: PRNG key, needed when not deterministic and the rule or noise is stochastic.
    noise, noise_scale: exploration noise on the logits in training (see module docstring).
    scaled_weights: weights carry the rule's values instead of exactly 1.
    threshold: sigmoid's open threshold on p.
    stretch: hard-concrete (gamma, zeta).
  """
  if rule not in RULES:
    raise ValueError(f'gate must be one of {RULES}, got {rule!r}')
  if temperature is None:
    temperature = DEFAULT_TEMPERATURE[rule]
  stochastic = not deterministic and (noise is not None or rule in ('hard_concrete', 'static'))
  if stochastic and rng is None:
    raise ValueError(f'the {rule!r} gate needs an rng when deterministic=False')
  noise_rng, sample_rng = jax.random.split(rng) if stochastic else (None, None)
  if not deterministic:
    logits_BxH = add_noise(logits_BxH, noise, noise_scale, noise_rng)

  if rule == 'dense':
    open_BxH, p_BxH, scaled_BxH, score_BxH = dense(logits_BxH)
    probs_BxH = p_BxH
  elif rule == 'topk':
    open_BxH, p_BxH, scaled_BxH, score_BxH = topk(logits_BxH, k=k, temperature=temperature)
    probs_BxH = p_BxH
  elif rule == 'sigmoid':
    open_BxH, p_BxH, scaled_BxH, score_BxH = sigmoid(
        logits_BxH, temperature=temperature, threshold=threshold)
    probs_BxH = p_BxH
  else:  # hard_concrete, static
    open_BxH, p_BxH, scaled_BxH, score_BxH, probs_BxH = hard_concrete(
        logits_BxH, temperature=temperature, deterministic=deterministic, rng=sample_rng,
        stretch=stretch)

  idx_BxK = None
  if k is not None:
    # Keep the K heads of highest score; those of them that are closed keep weight 0.
    _, idx_BxK = jax.lax.top_k(jax.lax.stop_gradient(score_BxH), k)
    open_BxH = open_BxH & one_hot_sum(idx_BxK, logits_BxH.shape[-1])

  if scaled_weights:
    weights_BxH = jnp.where(open_BxH, scaled_BxH, 0.0)
  else:
    weights_BxH = straight_through(open_BxH, p_BxH)
  return Gate(weights_BxH, idx_BxK, probs_BxH)
