"""What a pretrained-sized model costs here: a checkpoint of a real model's shape (its
published config.json; random bfloat16 weights, as released checkpoints store them) is
written, loaded with gating.load_pretrained, and run.

Reported: the load time and the process's peak memory after loading; a forward pass of
B sequences of L tokens, dense (masked, all heads) and gated on the gathered path at K
query heads (unit='kv_group': whole KV groups), median seconds and the ratio to dense in
the same run; and how many forward passes the headroom oracle makes per layer.

    python -m experiments.bench_pretrained --model qwen2.5-0.5b --length 512 --k 7
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import tempfile
import time

import jax
import ml_dtypes
import numpy as np
from flax import nnx

from experiments import timing
from gating.training.folders import check_output_file, write_json

# The published config.json fields that decide the shapes (Hugging Face model cards).
MODELS = {
    'qwen2.5-0.5b': {
        'architectures': ['Qwen2ForCausalLM'], 'hidden_size': 896, 'intermediate_size': 4864,
        'num_attention_heads': 14, 'num_key_value_heads': 2, 'num_hidden_layers': 24,
        'vocab_size': 151936, 'max_position_embeddings': 32768, 'rope_theta': 1000000.0,
        'rms_norm_eps': 1e-06, 'tie_word_embeddings': True, 'hidden_act': 'silu',
        'use_sliding_window': False},
    'llama-3.2-1b': {
        'architectures': ['LlamaForCausalLM'], 'hidden_size': 2048, 'intermediate_size': 8192,
        'num_attention_heads': 32, 'num_key_value_heads': 8, 'num_hidden_layers': 16,
        'head_dim': 64, 'vocab_size': 128256, 'max_position_embeddings': 131072,
        'rope_theta': 500000.0, 'rms_norm_eps': 1e-05, 'tie_word_embeddings': True,
        'hidden_act': 'silu', 'attention_bias': False, 'mlp_bias': False,
        'rope_scaling': {'factor': 32.0, 'high_freq_factor': 4.0, 'low_freq_factor': 1.0,
                         'original_max_position_embeddings': 8192, 'rope_type': 'llama3'}},
}


def write_checkpoint(folder: str, config: dict, seed: int = 0) -> int:
  """config.json and random bfloat16 weights of every tensor the config implies (one
  model.safetensors); -> the parameter count."""
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  from gating import pretrained  # pylint: disable=import-outside-toplevel
  checked = pretrained.check_config(config)
  rng = np.random.default_rng(seed)
  weights = {}
  for name, (_, shape, _) in pretrained.layout(checked, pretrained.model_kwargs(checked)).items():
    scale = 1.0 if name.endswith('norm.weight') else 0.02
    w = rng.standard_normal(shape, np.float32) * scale
    weights[name] = (1.0 + w if name.endswith('norm.weight') else w).astype(ml_dtypes.bfloat16)
  with open(os.path.join(folder, 'config.json'), 'w') as f:
    json.dump(config, f)
  save_file(weights, os.path.join(folder, 'model.safetensors'))
  return sum(int(np.prod(w.shape)) for w in weights.values())


def peak_rss_gib() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2 ** 20   # KiB on Linux


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.split('\n\n')[0])
  parser.add_argument('--model', default='qwen2.5-0.5b', choices=sorted(MODELS))
  parser.add_argument('--batch', type=int, default=1)
  parser.add_argument('--length', type=int, default=512)
  parser.add_argument('--k', type=int, default=None,
                      help='query heads that run (default: one KV group)')
  parser.add_argument('--trials', type=int, default=5)
  parser.add_argument('--out', default=None, help='also write the results as JSON here')
  args = parser.parse_args(argv)
  if args.out is not None:
    try:
      check_output_file(args.out, '--out')   # before the model is built and timed
    except ValueError as e:
      sys.exit(f'error: {e}')
  return args


def main(argv=None):
  args = parse_args(argv)
  import gating  # pylint: disable=import-outside-toplevel
  config = MODELS[args.model]
  H, G = config['num_attention_heads'], config['num_key_value_heads']
  k = args.k if args.k is not None else H // G
  with tempfile.TemporaryDirectory() as folder:
    params = write_checkpoint(folder, config)
    before = peak_rss_gib()
    start = time.perf_counter()
    model = gating.load_pretrained(folder, gate='topk', active_heads=k, prefix_len=32,
                                   path='gathered')
    load_s = time.perf_counter() - start
  after = peak_rss_gib()
  tokens = jax.random.randint(jax.random.key(0), (args.batch, args.length), 0,
                              config['vocab_size'])
  graphdef, state = nnx.split(model)

  def forward(path, active):
    @jax.jit
    def run(state, tokens):
      return nnx.merge(graphdef, state)(tokens, path=path, active_heads=active).logits_BxLxV
    return lambda: run(state, tokens)
  samples = timing.time_interleaved(
      {'dense': forward('masked', H), f'gathered K={k}': forward('gathered', k)},
      trials=args.trials, min_seconds=0.0)
  rows = {name: timing.summarize(s) for name, s in samples.items()}
  dense_s = rows['dense']['median_s']
  result = {
      'model': args.model, 'parameters': params, 'device': str(jax.devices()[0]),
      'load_s': load_s, 'peak_rss_gib_before_load': before, 'peak_rss_gib_after_load': after,
      'batch': args.batch, 'length': args.length, 'k': k, 'num_heads': H, 'num_kv_groups': G,
      'forward': {name: {**r, 'ratio_to_dense': r['median_s'] / dense_s}
                  for name, r in rows.items()},
      'headroom_subsets_per_layer': math.comb(G, k // (H // G)),
  }
  print(f"{args.model}: {params / 1e6:.0f} M parameters on {result['device']}; "
        f'load {load_s:.1f} s; peak memory {after:.2f} GiB (before loading {before:.2f})')
  for name, r in result['forward'].items():
    print(f"  forward B={args.batch} L={args.length} {name:>14}: {r['median_s']:.3f} s "
          f"(IQR {r['q25_s']:.3f}-{r['q75_s']:.3f}), {r['ratio_to_dense']:.2f}x dense")
  print(f"  headroom oracle: {result['headroom_subsets_per_layer']} subsets of KV groups "
        f'per layer at K={k}, one forward pass each')
  if args.out:
    write_json(args.out, result)
  return result


if __name__ == '__main__':
  try:
    main()
  except ValueError as e:
    print(f'error: {e}', file=sys.stderr)
    sys.exit(2)
