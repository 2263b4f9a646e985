"""Hugging Face checkpoints as GatedLM models: tiny Llama-, Qwen2- and Qwen3-style
checkpoints, written by the tests in the HF naming, load and match an independent numpy
forward written from the published equations (tests/hf_reference.py)."""

import json
import os
import struct

import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

import gating
from tests import hf_reference

TOKENS = np.array([3, 17, 42, 5, 9, 60, 1, 33, 21, 8], np.int32)


def checkpoint(tmp_path, family, shards=1, **config_kw):
  config = hf_reference.tiny_config(family, **config_kw)
  weights = hf_reference.tiny_weights(config)
  folder = hf_reference.write(tmp_path / family, config, weights, shards)
  return folder, config, weights


@pytest.mark.parametrize('family,kw', [
    ('llama', {}), ('llama', dict(tie=True, kv_heads=4)),
    ('llama', dict(rope_scaling={'rope_type': 'llama3', 'factor': 8.0, 'low_freq_factor': 1.0,
                                 'high_freq_factor': 4.0, 'original_max_position_embeddings': 8})),
    ('qwen2', {}), ('qwen3', dict(head_dim=16)),
    ('llama', dict(attention_bias=True)), ('qwen3', dict(head_dim=16, attention_bias=True)),
])
def test_a_tiny_checkpoint_loads_and_equals_the_reference(tmp_path, family, kw):
  folder, config, weights = checkpoint(tmp_path, family, shards=2 if family == 'qwen2' else 1,
                                       **kw)
  model = gating.load_pretrained(folder)
  got = np.asarray(model(jnp.asarray(TOKENS)[None]).logits_BxLxV[0])
  want = hf_reference.forward(config, weights, TOKENS)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_a_bfloat16_checkpoint_loads_as_published_checkpoints_are_stored(tmp_path):
  """Released checkpoints hold bfloat16 tensors (safetensors 'BF16', read by numpy as
  ml_dtypes.bfloat16): they load into float32 parameters exactly."""
  import ml_dtypes  # pylint: disable=import-outside-toplevel
  config = hf_reference.tiny_config('qwen2')
  weights = {n: w.astype(ml_dtypes.bfloat16)
             for n, w in hf_reference.tiny_weights(config).items()}
  folder = hf_reference.write(tmp_path / 'bf16', config, weights)
  model = gating.load_pretrained(folder)
  assert model.trunk.token_embed.embedding[...].dtype == jnp.float32
  got = np.asarray(model(jnp.asarray(TOKENS)[None]).logits_BxLxV[0])
  want = hf_reference.forward(config, {n: w.astype(np.float32) for n, w in weights.items()},
                              TOKENS)
  np.testing.assert_allclose(got, want, atol=2e-4, rtol=2e-4)


def test_the_rope_convention_is_the_half_split_one(tmp_path):
  """Swapping to the interleaved convention (pairs (x_0, x_1), (x_2, x_3), ...) must move
  the reference away from the model: the test can tell the two apart."""
  folder, config, weights = checkpoint(tmp_path, 'llama')
  model = gating.load_pretrained(folder)
  got = np.asarray(model(jnp.asarray(TOKENS)[None]).logits_BxLxV[0])
  half = hf_reference.rope

  def interleaved(x, inv):
    L, _, Dh = x.shape
    angle = np.arange(L)[:, None] * inv[None, :]
    cos, sin = np.repeat(np.cos(angle), 2, -1)[:, None], np.repeat(np.sin(angle), 2, -1)[:, None]
    rot = np.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)
    return x * cos + rot * sin
  try:
    hf_reference.rope = interleaved
    other = hf_reference.forward(config, weights, TOKENS)
  finally:
    hf_reference.rope = half
  assert np.abs(got - other).max() > 1e-2


def test_a_gated_load_keeps_the_weights_and_adds_fresh_routers(tmp_path):
  folder, config, weights = checkpoint(tmp_path, 'qwen3', head_dim=16)
  model = gating.load_pretrained(folder, gate='topk', active_heads=2, prefix_len=4,
                                 path='gathered')
  attn = model.blocks[0].attention
  assert attn.unit == 'kv_group' and attn.router.logits.out_features == 2
  np.testing.assert_array_equal(
      attn.query.kernel[...],
      weights['model.layers.0.self_attn.q_proj.weight'].T.reshape(32, 4, 16))
  out = model(jnp.asarray(TOKENS)[None])
  assert out.logits_BxLxV.shape == (1, len(TOKENS), config['vocab_size'])
  assert (np.asarray(out.gate_weights_BxNxH) != 0).sum(axis=-1).tolist() == [[2, 2]]


def test_bad_checkpoints_are_refused_naming_the_problem(tmp_path):
  with pytest.raises(ValueError, match='not a Hugging Face checkpoint folder: no config.json'):
    gating.load_pretrained(str(tmp_path))
  folder, config, weights = checkpoint(tmp_path, 'llama', shards=2)
  os.remove(os.path.join(folder, 'model-00002-of-00002.safetensors'))
  with pytest.raises(ValueError, match='model-00002-of-00002.safetensors, a shard named by '
                                       'model.safetensors.index.json, is missing'):
    gating.load_pretrained(folder)
  one = hf_reference.write(tmp_path / 'one', config, weights)
  path = os.path.join(one, 'model.safetensors')
  os.truncate(path, os.path.getsize(path) // 2)
  with pytest.raises(ValueError, match=r'model.safetensors cannot be read \(truncated'):
    gating.load_pretrained(one)
  for field, value, match in (
      ('architectures', ['GemmaForCausalLM'], r"architectures \['GemmaForCausalLM'\] are not "
                                              'supported'),
      ('rope_scaling', {'rope_type': 'yarn', 'factor': 4.0}, "'rope_scaling' of type 'yarn'"),
      ('hidden_act', 'gelu', "'hidden_act' is 'gelu'"),
      ('use_sliding_window', True, "'use_sliding_window' is true")):
    bad = hf_reference.write(tmp_path / field, {**config, field: value}, weights)
    with pytest.raises(ValueError, match=match):
      gating.load_pretrained(bad)
  wrong = dict(weights)
  wrong['model.layers.1.mlp.up_proj.weight'] = np.zeros((40, 32), np.float32)
  with pytest.raises(ValueError, match=r'tensor model.layers.1.mlp.up_proj.weight has shape '
                                       r'\[40, 32\]; config.json implies \[48, 32\]'):
    gating.load_pretrained(hf_reference.write(tmp_path / 'shape', config, wrong))
  with pytest.raises(ValueError, match='lacks 1 tensor'):
    gating.load_pretrained(hf_reference.write(
        tmp_path / 'lacks', config, {k: v for k, v in weights.items() if 'norm' not in k
                                     or 'layers.0.input' not in k}))
  # A tensor the config gives no place (here o_proj's bias under attention_bias false)
  # would be dropped: refused.
  extra = {**weights, 'model.layers.0.self_attn.o_proj.bias': np.ones(32, np.float32)}
  with pytest.raises(ValueError, match='holds 1 tensor.s. its config gives no place in the '
                                       'model, e.g. model.layers.0.self_attn.o_proj.bias'):
    gating.load_pretrained(hf_reference.write(tmp_path / 'extra', config, extra))
  # A quantized checkpoint: int8 and float8 tensors refused from the header, before numpy
  # reads them (numpy has no float8: safetensors raised an AttributeError naming nothing).
  int8 = {**weights, 'model.layers.0.mlp.up_proj.weight': np.zeros((48, 32), np.int8)}
  with pytest.raises(ValueError, match=r"1 tensor.s. stored as \['I8'\], e.g. "
                                       r'model.layers.0.mlp.up_proj.weight; only'):
    gating.load_pretrained(hf_reference.write(tmp_path / 'int8', config, int8))
  fp8 = hf_reference.write(tmp_path / 'fp8', config, weights)
  write_as_float8(os.path.join(fp8, 'model.safetensors'), weights)
  with pytest.raises(ValueError, match=r"stored as \['F8_E4M3'\].*a quantized checkpoint"):
    gating.load_pretrained(fp8)
  quantized = {**config, 'quantization_config': {'quant_method': 'fp8'}}
  with pytest.raises(ValueError, match="'quantization_config' .quant_method 'fp8'.: quantized"):
    gating.load_pretrained(hf_reference.write(tmp_path / 'quantized', quantized, weights))
  tied = hf_reference.tiny_config('llama', tie=True)   # a stored lm_head beside tied ones
  hf_reference.write(tmp_path / 'tied', tied, {**hf_reference.tiny_weights(tied),
                                               'lm_head.weight': np.ones((64, 32), np.float32)})
  gating.load_pretrained(str(tmp_path / 'tied'))
  with pytest.raises(ValueError, match=r"\['num_heads'\] come from"):
    gating.load_pretrained(folder.replace('llama', 'llama'), num_heads=8)


def write_as_float8(path, weights):
  """A safetensors file of `weights` stored as float8 (E4M3), as quantized checkpoints
  are: written by hand (8-byte header length, JSON header, the bytes), since safetensors'
  numpy writer has no float8."""
  header, blobs, offset = {}, [], 0
  for name in sorted(weights):
    data = weights[name].astype(ml_dtypes.float8_e4m3fn).tobytes()
    header[name] = {'dtype': 'F8_E4M3', 'shape': list(weights[name].shape),
                    'data_offsets': [offset, offset + len(data)]}
    blobs.append(data)
    offset += len(data)
  text = json.dumps(header).encode()
  text += b' ' * (-len(text) % 8)
  with open(path, 'wb') as f:
    f.write(struct.pack('<Q', len(text)) + text + b''.join(blobs))


def tokenizer_folder(tmp_path, corpus, vocab=64):
  """A tiny byte-level BPE tokenizer (the `tokenizers` package) trained on `corpus`,
  saved as tokenizer.json; its last id is the end-of-document token."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers  # pylint: disable=import-outside-toplevel
  tok = Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  tok.train([str(corpus)], trainers.BpeTrainer(vocab_size=vocab - 1,
                                               special_tokens=['<|end|>'],
                                               initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
  return tok


@pytest.mark.slow
def test_a_checkpoint_becomes_a_run_folder_that_headroom_and_fit_router_use(tmp_path, capsys):
  from experiments import eval as eval_script  # pylint: disable=import-outside-toplevel
  from experiments import fit_router as fit_script  # pylint: disable=import-outside-toplevel
  from experiments import headroom as headroom_script  # pylint: disable=import-outside-toplevel
  from experiments import train as train_script  # pylint: disable=import-outside-toplevel
  from gating.study import evaluation  # pylint: disable=import-outside-toplevel
  corpus = tmp_path / 'corpus.txt'
  corpus.write_text(''.join(f'the {w} sat on the {v} mat.\n' for w in ('cat', 'dog', 'owl')
                            for v in ('red', 'blue', 'green', 'old')) * 40)
  tok = tokenizer_folder(tmp_path, corpus)
  vocab = tok.get_vocab_size() + 1
  config = hf_reference.tiny_config('llama', vocab=vocab)
  config['eos_token_id'] = tok.token_to_id('<|end|>')
  weights = hf_reference.tiny_weights(config)
  folder = hf_reference.write(tmp_path / 'ckpt', config, weights)
  tok.save(os.path.join(folder, 'tokenizer.json'))
  run = tmp_path / 'run'
  common = ['--preset', 'text', '--no-progress', '--no-plots', '--set',
            f'model.pretrained={folder}', '--set', f'data.sources={corpus}', '--set',
            'data.seq_len=24', '--set', 'batch_size=8', '--set', 'eval_batches=1',
            '--set', 'model.prefix_len=4']
  train_script.main([*common, '--workdir', str(run), '--steps', '0', '--set',
                     'model.gate=dense', '--set', 'model.active_heads=none', '--set',
                     'model.eval_path=masked'])
  saved = json.load(open(run / 'config.json'))['model']
  assert (saved['num_kv_heads'], saved['norm'], saved['mlp']) == (2, 'rms', 'swiglu')
  loaded = evaluation.load_run(str(run))
  assert loaded.step == 0
  learner, _ = __import__('flax').nnx.merge(loaded.graphdef, loaded.state)
  row = np.asarray(loaded.splits.test['tokens'][0])
  np.testing.assert_allclose(np.asarray(learner.model(jnp.asarray(row)[None]).logits_BxLxV[0]),
                             hf_reference.forward(config, weights, row), atol=2e-4, rtol=2e-4)
  # the headroom oracle over KV groups: 2 groups of 2 query heads, one group open
  headroom_script.main(['--workdir', str(run), '--k', '2', '--max-sequences', '8',
                        '--split', 'test'])
  layers = json.load(open(run / 'headroom.json'))['layers']
  assert [(l['unit'], l['units'], l['num_subsets']) for l in layers] == [('kv_group', 2, 2)] * 2
  fit = tmp_path / 'fit'
  fit_script.main(['--from', str(run), '--workdir', str(fit), '--k', '2', '--steps', '3',
                   '--no-progress', '--no-plots'])
  eval_script.main(['--workdir', str(fit), '--k', '2,4', '--paths', 'gathered',
                    '--max-batches', '1'])
  report = json.load(open(fit / 'eval.json'))
  assert [r['K'] for r in report['results']] == [2, 4]
  assert report['results'][0]['active_fraction'] == 0.5
