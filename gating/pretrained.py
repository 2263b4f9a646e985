"""Pretrained checkpoints in the Hugging Face format as GatedLM models.

`load_pretrained(folder, **gate_kwargs)` reads a checkpoint folder (config.json plus
model.safetensors, or shards named by model.safetensors.index.json) with the safetensors
package (numpy; no torch) and returns a GatedLM carrying its weights, gated as asked:
with gate='dense' (the default) its logits are the original model's.

Supported families and their blocks (pre-norm residual; RMSNorm; SwiGLU MLP without
biases; RoPE in Hugging Face's rotate_half convention; grouped-query attention):
  Llama (2, 3, 3.1, 3.2)   LlamaForCausalLM; rope_scaling None or 'llama3';
                           attention_bias and mlp_bias as configured
  Qwen2, Qwen2.5           Qwen2ForCausalLM; biases on q, k and v (not o)
  Qwen3                    Qwen3ForCausalLM; RMSNorm over each head of q and k (QK norm);
                           attention_bias (q, k, v and o) as configured
Gemma 3 is not supported: its blocks norm both before and after each sublayer, its RMSNorm
scales by (1 + w), it multiplies the embeddings by sqrt(D), uses GeGLU, and mixes
sliding-window layers with global ones at two RoPE bases; GatedLM has none of these.
Anything else (another architecture, a rope scaling other than 'llama3', an activation
other than silu, a sliding window, a quantization_config or a tensor stored in another
dtype than float32, float16, bfloat16 or float64, a tensor of another shape than the
config implies, a missing or truncated shard) is a ValueError naming it.

Weight layout: Hugging Face's linear weights are [out, in]; ours are [in, out], split into
heads: q_proj [H Dh, D] -> query/kernel [D, H, Dh], k_proj and v_proj [G Dh, D] -> [D, G,
Dh], o_proj [D, H Dh] -> out/kernel [H, Dh, D], gate_proj / up_proj [F, D] -> mlp_in /
mlp_up [D, F], down_proj [D, F] -> mlp_out [F, D], lm_head [V, D] -> unembed [D, V].
"""

from __future__ import annotations

import json
import os
from typing import Any

import numpy as np
from flax import nnx

ARCHITECTURES = {'LlamaForCausalLM': 'llama', 'Qwen2ForCausalLM': 'qwen2',
                 'Qwen3ForCausalLM': 'qwen3'}
INDEX = 'model.safetensors.index.json'
FLOAT_DTYPES = ('F32', 'F16', 'BF16', 'F64')   # safetensors' names of the dtypes read


def read_config(folder: str) -> dict[str, Any]:
  """config.json of a checkpoint folder, checked (`check_config`): a ValueError names a
  missing or unreadable file too."""
  path = os.path.join(folder, 'config.json')
  if not os.path.isfile(path):
    raise ValueError(f'{folder} is not a Hugging Face checkpoint folder: no config.json')
  with open(path) as f:
    try:
      config = json.load(f)
    except json.JSONDecodeError as e:
      raise ValueError(f'{path} is not valid JSON: {e}') from None
  return check_config(config, path)


def check_config(config: dict[str, Any], path: str = 'config') -> dict[str, Any]:
  """A Hugging Face config dict, checked, plus its 'family': a ValueError (prefixed by
  `path`) names an unsupported architecture, rope scaling, activation or sliding window,
  or a size field that is not a positive int."""
  archs = config.get('architectures') or []
  family = next((ARCHITECTURES[a] for a in archs if a in ARCHITECTURES), None)
  if family is None:
    raise ValueError(f'{path}: architectures {archs} are not supported; supported: '
                     f'{sorted(ARCHITECTURES)} (Gemma 3: see gating/pretrained.py)')
  for field in ('hidden_size', 'num_attention_heads', 'num_hidden_layers',
                'intermediate_size', 'vocab_size'):
    if not isinstance(config.get(field), int) or config[field] < 1:
      raise ValueError(f'{path}: field {field!r} must be a positive int, got '
                       f'{config.get(field)!r}')
  act = config.get('hidden_act', 'silu')
  if act != 'silu':
    raise ValueError(f"{path}: field 'hidden_act' is {act!r}; only 'silu' (SwiGLU) is "
                     'supported')
  scaling = config.get('rope_scaling')
  if scaling is not None and scaling.get('rope_type', scaling.get('type')) != 'llama3':
    raise ValueError(f"{path}: field 'rope_scaling' of type "
                     f"{scaling.get('rope_type', scaling.get('type'))!r} is not supported "
                     "(supported: none, 'llama3')")
  if config.get('use_sliding_window'):
    raise ValueError(f"{path}: field 'use_sliding_window' is true; sliding-window "
                     'attention is not supported')
  if config.get('pretraining_tp', 1) != 1:
    raise ValueError(f"{path}: field 'pretraining_tp' must be 1")
  quantization = config.get('quantization_config')
  if quantization:
    method = quantization.get('quant_method', '?') if isinstance(quantization, dict) else '?'
    raise ValueError(f"{path}: field 'quantization_config' (quant_method {method!r}): "
                     'quantized checkpoints are not supported; load the unquantized one')
  return {**config, 'family': family}


def model_kwargs(config: dict[str, Any]) -> dict[str, Any]:
  """GatedLM's constructor arguments of a checked config (`read_config`)."""
  D, H = config['hidden_size'], config['num_attention_heads']
  family = config['family']
  qkv_bias = family == 'qwen2' or bool(config.get('attention_bias', False))
  return dict(
      vocab_size=config['vocab_size'], num_layers=config['num_hidden_layers'], features=D,
      num_heads=H, num_kv_heads=config.get('num_key_value_heads') or H,
      head_dim=config.get('head_dim') or D // H, mlp_features=config['intermediate_size'],
      max_length=config.get('max_position_embeddings', 4096), positions='rotary',
      rotary_base=float(config.get('rope_theta', 10000.0)),
      rotary_scaling=config.get('rope_scaling'),
      tie_embeddings=bool(config.get('tie_word_embeddings', False)), norm='rms',
      norm_eps=float(config.get('rms_norm_eps', 1e-6)), mlp='swiglu',
      mlp_bias=bool(config.get('mlp_bias', False)), use_bias=qkv_bias,
      # o_proj follows attention_bias in Llama and Qwen3 (Qwen2's q, k, v always carry a
      # bias and its o_proj never does)
      out_bias=bool(config.get('attention_bias', False)) and family != 'qwen2',
      qk_norm=family == 'qwen3')


def read_weights(folder: str) -> dict[str, np.ndarray]:
  """Every tensor of the checkpoint, by its Hugging Face name: model.safetensors, or the
  shards that model.safetensors.index.json names (a missing or unreadable shard is a
  ValueError naming it, and so is a tensor stored in a dtype other than FLOAT_DTYPES,
  such as a quantized checkpoint's float8 or int8, read from the file's header before
  any tensor is)."""
  from safetensors import SafetensorError, safe_open  # pylint: disable=import-outside-toplevel
  from safetensors.numpy import load_file  # pylint: disable=import-outside-toplevel
  index = os.path.join(folder, INDEX)
  if os.path.isfile(index):
    with open(index) as f:
      files = sorted(set(json.load(f)['weight_map'].values()))
  elif os.path.isfile(os.path.join(folder, 'model.safetensors')):
    files = ['model.safetensors']
  else:
    raise ValueError(f'{folder} holds no model.safetensors nor {INDEX}')
  weights = {}
  for name in files:
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
      raise ValueError(f'{path}, a shard named by {INDEX}, is missing')
    try:
      with safe_open(path, framework='np') as f:
        dtypes = {key: f.get_slice(key).get_dtype() for key in f.keys()}
      other = sorted(key for key, dtype in dtypes.items() if dtype not in FLOAT_DTYPES)
      if not other:
        weights.update(load_file(path))
    except (SafetensorError, OSError, ValueError) as e:
      raise ValueError(f'{path} cannot be read (truncated or damaged?): {e}') from None
    if other:
      raise ValueError(f'{path}: {len(other)} tensor(s) stored as '
                       f'{sorted({dtypes[key] for key in other})}, e.g. {other[0]}; only '
                       f'{list(FLOAT_DTYPES)} are read (a quantized checkpoint? load the '
                       'unquantized one)')
  return weights


def layout(config, model_kw) -> dict[str, tuple[str, tuple[int, ...], Any]]:
  """{Hugging Face name: (our parameter path, the HF shape the config implies, how to
  turn it into our layout)} for every tensor the model reads."""
  D, H = model_kw['features'], model_kw['num_heads']
  G, Dh, F = model_kw['num_kv_heads'], model_kw['head_dim'], model_kw['mlp_features']
  V = model_kw['vocab_size']
  t = lambda w: w.T
  heads = lambda n: lambda w: w.T.reshape(D, n, Dh)
  out = {'model.embed_tokens.weight': ('trunk/token_embed/embedding', (V, D), None),
         'model.norm.weight': ('trunk/final_norm/scale', (D,), None)}
  if not model_kw['tie_embeddings']:
    out['lm_head.weight'] = ('unembed/kernel', (V, D), t)
  for i in range(model_kw['num_layers']):
    hf, ours = f'model.layers.{i}.', f'trunk/blocks/{i}/'
    a = ours + 'attention/'
    out.update({
        hf + 'input_layernorm.weight': (ours + 'attention_norm/scale', (D,), None),
        hf + 'post_attention_layernorm.weight': (ours + 'mlp_norm/scale', (D,), None),
        hf + 'self_attn.q_proj.weight': (a + 'query/kernel', (H * Dh, D), heads(H)),
        hf + 'self_attn.k_proj.weight': (a + 'key/kernel', (G * Dh, D), heads(G)),
        hf + 'self_attn.v_proj.weight': (a + 'value/kernel', (G * Dh, D), heads(G)),
        hf + 'self_attn.o_proj.weight': (a + 'out/kernel', (D, H * Dh),
                                         lambda w: w.T.reshape(H, Dh, D)),
        hf + 'mlp.gate_proj.weight': (ours + 'mlp_in/kernel', (F, D), t),
        hf + 'mlp.up_proj.weight': (ours + 'mlp_up/kernel', (F, D), t),
        hf + 'mlp.down_proj.weight': (ours + 'mlp_out/kernel', (D, F), t)})
    if model_kw['use_bias']:
      for name, n in (('q', H), ('k', G), ('v', G)):
        out[hf + f'self_attn.{name}_proj.bias'] = (
            a + {'q': 'query', 'k': 'key', 'v': 'value'}[name] + '/bias', (n * Dh,),
            lambda w, n=n: w.reshape(n, Dh))
    if model_kw['out_bias']:
      out[hf + 'self_attn.o_proj.bias'] = (a + 'out/bias', (D,), None)
    if model_kw['mlp_bias']:
      for name, ours_name, n in (('gate', 'mlp_in', F), ('up', 'mlp_up', F),
                                 ('down', 'mlp_out', D)):
        out[hf + f'mlp.{name}_proj.bias'] = (ours + f'{ours_name}/bias', (n,), None)
    if model_kw['qk_norm']:
      out[hf + 'self_attn.q_norm.weight'] = (a + 'query_norm/scale', (Dh,), None)
      out[hf + 'self_attn.k_norm.weight'] = (a + 'key_norm/scale', (Dh,), None)
  return out


def config_fields(folder: str) -> dict[str, Any]:
  """The model fields of a training config (gating.training.config.ModelConfig) that a
  checkpoint's config.json sets: its architecture, so that a run folder made from it
  says what it holds."""
  kw = model_kwargs(read_config(folder))
  scaling = kw['rotary_scaling']
  return dict(num_layers=kw['num_layers'], features=kw['features'], num_heads=kw['num_heads'],
              num_kv_heads=kw['num_kv_heads'], head_dim=kw['head_dim'],
              mlp_features=kw['mlp_features'], positions='rotary',
              rotary_base=kw['rotary_base'],
              rotary_scaling=None if scaling is None else json.dumps(scaling, sort_keys=True),
              tie_embeddings=kw['tie_embeddings'], norm='rms', norm_eps=kw['norm_eps'],
              mlp='swiglu', mlp_bias=kw['mlp_bias'], qkv_bias=kw['use_bias'],
              out_bias=kw['out_bias'], qk_norm=kw['qk_norm'])


def _unread_by_design(name: str, kw: dict) -> bool:
  """A checkpoint tensor the model has no use for: the rotary inverse frequencies some
  Llama checkpoints store (computed from rope_theta instead), and an lm_head kept beside
  tied embeddings."""
  return (name.endswith('rotary_emb.inv_freq')
          or (name == 'lm_head.weight' and kw['tie_embeddings']))


def load_weights(model, folder: str) -> None:
  """Copies the checkpoint's weights into `model` (a GatedLM of its architecture, built by
  `load_pretrained` or from `config_fields`), in place. Refused with a ValueError naming
  the problem: a tensor missing from the checkpoint or of another shape than its config
  implies, a tensor its config gives no place (it would be dropped), and a model whose
  parameters outside the routers do not all come from the checkpoint (another
  architecture)."""
  import jax.numpy as jnp  # pylint: disable=import-outside-toplevel
  config = read_config(folder)
  kw = model_kwargs(config)
  hf_to_ours = layout(config, kw)
  weights = read_weights(folder)
  missing = [name for name in hf_to_ours if name not in weights]
  if missing:
    raise ValueError(f'{folder}: the checkpoint lacks {len(missing)} tensor(s) its config '
                     f'implies, e.g. {missing[0]}')
  unread = sorted(n for n in weights if n not in hf_to_ours and not _unread_by_design(n, kw))
  if unread:
    raise ValueError(f'{folder}: the checkpoint holds {len(unread)} tensor(s) its config '
                     f'gives no place in the model, e.g. {unread[0]}: another architecture, '
                     'or a setting (a bias, tied embeddings) config.json does not state')
  for name, (_, shape, _) in hf_to_ours.items():
    if weights[name].shape != shape:
      raise ValueError(f'{folder}: tensor {name} has shape {list(weights[name].shape)}; '
                       'config.json implies ' f'{list(shape)}')
  params = {'/'.join(map(str, p)): v for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))}
  filled = set()
  for name, (path, _, to_ours) in hf_to_ours.items():
    if path not in params:   # a GatedMLP (mlp_groups): linear_in / linear_up / linear_out
      for old, new in (('mlp_in/', 'mlp/linear_in/'), ('mlp_up/', 'mlp/linear_up/'),
                       ('mlp_out/', 'mlp/linear_out/')):
        path = path.replace(old, new)
    if path not in params:
      raise ValueError(f'{folder}: the model has no parameter {path} for tensor {name}: '
                       'it is not the checkpoint\'s architecture')
    value = weights[name] if to_ours is None else to_ours(weights[name])
    var = params[path]
    if var[...].shape != value.shape:
      raise ValueError(f'{folder}: tensor {name} ({list(value.shape)} in our layout) does '
                       f'not fit the model\'s {path} {list(var[...].shape)}')
    var[...] = jnp.asarray(value, var[...].dtype)
    filled.add(path)
  left = sorted(p for p in params if p not in filled and '/router/' not in p)
  if left:
    raise ValueError(f'{folder}: {len(left)} parameters of the model outside the routers '
                     f'are not in the checkpoint, e.g. {left[0]}: it is not the '
                     "checkpoint's architecture")


def load_pretrained(folder: str, *, gate: str = 'dense', prefix_len: int = 1,
                    seed: int = 0, param_dtype=np.float32, **gate_kwargs):
  """A GatedLM carrying the weights of the checkpoint in `folder` (see the module
  docstring), gated by `gate` and `gate_kwargs` (active_heads=, unit=, path=, router=,
  mlp_groups=, active_groups=, shared_heads=, dtype=, ...; GatedLM's arguments). With
  gate='dense' its logits equal the original model's. The routers (which the checkpoint
  lacks) start fresh from `seed`. `prefix_len`: P, the tokens every gate reads (the
  positions before P - 1 are context, never scored).

  Refused with a ValueError naming the problem: an unsupported architecture, field or
  rope scaling (`read_config`), a missing or truncated shard (`read_weights`), a tensor
  missing from the checkpoint or of another shape than the config implies
  (`load_weights`), and gate_kwargs that set the architecture (those come from
  config.json)."""
  from gating.layers.models import GatedLM  # pylint: disable=import-outside-toplevel
  kw = model_kwargs(read_config(folder))
  clash = sorted(set(gate_kwargs) & set(kw))
  if clash:
    raise ValueError(f'{clash} come from {folder}/config.json; they are not gate arguments')
  model = GatedLM(**kw, gate=gate, prefix_len=prefix_len, param_dtype=param_dtype,
                  rngs=nnx.Rngs(seed), **gate_kwargs)
  load_weights(model, folder)
  return model
