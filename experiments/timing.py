"""Timing helpers for the benchmarks: interleaved trials, medians and spreads.

Candidates are timed round-robin in a shuffled order on every trial, so a slow moment of
the machine hits all of them alike; each trial repeats a call enough times to last at
least `min_seconds`. Reported: median seconds per call and the interquartile range.
"""

from __future__ import annotations

import random
import time
from typing import Callable

import jax
import numpy as np


def time_interleaved(candidates: dict[str, Callable[[], object]], trials: int,
                     min_seconds: float = 0.05, seed: int = 0) -> dict[str, list[float]]:
  """Seconds per call of each candidate (a zero-argument function), `trials` samples each.

  Every candidate is called once first (compilation), untimed.
  """
  repeats = {}
  for name, fn in candidates.items():
    jax.block_until_ready(fn())
    start = time.perf_counter()
    jax.block_until_ready(fn())
    once = time.perf_counter() - start
    repeats[name] = max(1, int(np.ceil(min_seconds / max(once, 1e-6))))
  samples: dict[str, list[float]] = {name: [] for name in candidates}
  order = list(candidates)
  rng = random.Random(seed)
  for _ in range(trials):
    rng.shuffle(order)
    for name in order:
      fn, n = candidates[name], repeats[name]
      start = time.perf_counter()
      for _ in range(n):
        out = fn()
      jax.block_until_ready(out)
      samples[name].append((time.perf_counter() - start) / n)
  return samples


def summarize(seconds: list[float]) -> dict[str, float]:
  q25, q50, q75 = np.percentile(seconds, [25, 50, 75])
  return {'median_s': float(q50), 'q25_s': float(q25), 'q75_s': float(q75),
          'trials': len(seconds)}
