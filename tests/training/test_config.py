import dataclasses

import pytest

from gating.training import config
from gating.training.config import DataConfig, LossConfig, ModelConfig, OptimConfig, TrainConfig


def test_defaults_are_valid_and_round_trip_through_dicts():
  cfg = TrainConfig(k_schedule=((8, 10), (4, 20)), model=ModelConfig(active_heads=(1, 2)))
  assert config.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize('make,message', [
    (lambda: ModelConfig(active_heads=9), r'model.active_heads: K=9 must be in \[1, num_heads=8\]'),
    (lambda: ModelConfig(active_heads=(1, 2, 3)), 'has 3 entries for num_layers=2'),
    (lambda: ModelConfig(gate='topk', active_heads=None), "gate='topk' needs K"),
    (lambda: ModelConfig(gate='hard_concrete', active_heads=None), 'the gathered path'),
    (lambda: ModelConfig(gate='random'), 'model.gate: must be one of'),
    (lambda: ModelConfig(features=30), 'model.features: 30 is not divisible by num_heads=8'),
    (lambda: ModelConfig(dtype='float16'), 'model.dtype'),
    (lambda: OptimConfig(learning_rate=-1.0), 'optim.learning_rate: must be > 0'),
    (lambda: LossConfig(target_fraction=1.5), 'loss.target_fraction'),
    (lambda: DataConfig(kind='images'), 'data.kind'),
    (lambda: DataConfig(num_terms=0), 'data.num_terms: must be >= 1'),
    (lambda: DataConfig(input_len=4, num_terms=5), 'data.num_terms: must be <= data.input_len=4'),
    (lambda: TrainConfig(batch_size=10, grad_accum=3), 'batch_size: 10 is not divisible'),
    (lambda: TrainConfig(k_schedule=((9, 10), (2, 20))),
     r'k_schedule: K=9 must be in \[1, num_heads=8\] \(k_schedule=9:10,2:20, the preset'),
    (lambda: TrainConfig(k_schedule=((4, 10), (2, 5))), 'steps must increase'),
    (lambda: TrainConfig(temperature_start=1.0), 'set both'),
    (lambda: TrainConfig(temperature_start=1.0, temperature_end=0.1, temperature_steps=-100),
     'temperature_steps: must be >= 0, got -100'),
    (lambda: TrainConfig(temperature_steps=100), 'temperature_steps: anneals from '),
    (lambda: TrainConfig(seed=-1), 'seed: must be >= 0, got -1'),
    (lambda: LossConfig(target_warmup_steps=10), 'loss.target_warmup_steps: ramps '),
    (lambda: TrainConfig(model=ModelConfig(gate='slices', active_heads=2), k_schedule=((8, 10),)),
     "k_schedule: the 'slices' gate assigns each sequence one of"),
    (lambda: TrainConfig(model=ModelConfig(active_heads=3, shared_heads=2), k_schedule=((2, 10),)),
     r'k_schedule: K=2 does not fit this model: model.shared_heads=2 must be < active_heads=2'),
    # an encoder's label is its target: slices by label would hand it the answer (test
    # accuracy 1.0 against 0.45 dense), and prefix_loss reads an LM's logits
    (lambda: ModelConfig(kind='encoder', gate='slices', active_heads=2),
     "model.gate_options: assigner='label' with an encoder: an encoder's label is the class"),
    (lambda: ModelConfig(kind='encoder', gate='slices', active_heads=2,
                         gate_options=(('assigner', 'prefix_loss'),)),
     "assigner='prefix_loss' with an encoder"),
    (lambda: TrainConfig(model=ModelConfig(gate='slices', active_heads=2),
                         loss=LossConfig(elastic_ks=(2, 4))),
     "loss.elastic_ks: elastic training draws random heads; the 'slices' gate's are"),
])
def test_bad_values_name_the_field(make, message):
  with pytest.raises(ValueError, match=message):
    make()


def test_override_parses_types():
  cfg = config.override(TrainConfig(), [
      'steps=50', 'model.active_heads=1,3', 'model.noise=gumbel', 'model.prefix_len=none',
      'optim.learning_rate=1e-3', 'k_schedule=8:10,4:20', 'model.tie_embeddings=false',
      'data.sources=python,pydoc'])
  assert cfg.steps == 50
  assert cfg.model.active_heads == (1, 3)
  assert cfg.model.noise == 'gumbel' and cfg.model.prefix_len is None
  assert cfg.optim.learning_rate == 1e-3
  assert cfg.k_schedule == ((8, 10), (4, 20))
  assert cfg.model.tie_embeddings is False
  assert cfg.data.sources == ('python', 'pydoc')
  assert config.override(cfg, ['model.active_heads=2']).model.active_heads == 2
  dense = config.override(TrainConfig(), ['model.gate=dense', 'model.active_heads=none'])
  assert dense.model.gate == 'dense' and dense.model.active_heads is None


@pytest.mark.parametrize('assignment,message', [
    ('model.heads=4', "unknown config key 'model.heads'"),
    ('modle.num_heads=4', "unknown config section 'modle'"),
    ('steps', 'not of the form key=value'),
    ('steps=many', "cannot parse steps='many'"),
    ('model.num_heads=0', 'model.num_heads: must be >= 1'),
])
def test_bad_overrides(assignment, message):
  with pytest.raises(ValueError, match=message):
    config.override(TrainConfig(), [assignment])


def test_unknown_keys_in_a_saved_config_are_refused():
  values = TrainConfig().to_dict()
  values['model']['colour'] = 'red'
  with pytest.raises(ValueError, match=r"unknown ModelConfig keys \['colour'\]"):
    config.from_dict(values)


def test_intervals_default_to_fractions_of_the_run():
  cfg = TrainConfig(steps=200)
  assert cfg.eval_interval == 40 and cfg.checkpoint_interval == 20
  assert dataclasses.replace(cfg, checkpoint_every=7).checkpoint_interval == 7


@pytest.mark.parametrize('fields,message', [
    (dict(mlp_groups=3), r'model.mlp_groups: G=3 must be >= 1 and divide the MLP width F=256'),
    (dict(mlp_groups=0), 'model.mlp_groups'),
    (dict(active_groups=2), 'model.active_groups: 2 needs model.mlp_groups'),
    (dict(mlp_groups=8, active_groups=9), r'model.active_groups: Kf=9 must be in \[1, mlp_groups=8\]'),
    (dict(mlp_groups=8, active_groups=0), 'model.active_groups: Kf=0'),
    (dict(mlp_groups=8, active_groups=(1, 2, 3)), 'model.active_groups: has 3 entries'),
    (dict(mlp_groups=8, active_groups=None), "model.active_groups: gate='topk' needs Kf"),
    (dict(group_router='both'), "model.group_router: must be 'own' or 'attention', got 'both'"),
    (dict(group_router='attention'), "model.group_router: 'attention' needs model.mlp_groups"),
    (dict(mlp_groups=8, active_groups=2, group_router='attention', gate='static',
          active_heads=2), "model.group_router: 'attention' needs an attention router"),
    (dict(mlp_groups=8, active_groups=2, group_router='attention', router='input_free'),
     "model.group_router: 'attention' needs an attention router"),
])
def test_bad_group_settings_name_the_field(fields, message):
  with pytest.raises(ValueError, match=message):
    ModelConfig(**fields)


def test_group_settings_round_trip_and_parse():
  cfg = config.override(TrainConfig(), ['model.mlp_groups=8', 'model.active_groups=2,4'])
  assert cfg.model.mlp_groups == 8 and cfg.model.active_groups == (2, 4)
  assert config.from_dict(cfg.to_dict()) == cfg
  old = TrainConfig().to_dict()
  del old['model']['mlp_groups'], old['model']['active_groups']   # a config from before
  del old['model']['group_router']
  assert config.from_dict(old).model.mlp_groups is None
  assert config.from_dict(old).model.group_router == 'own'
  shared = config.override(TrainConfig(), ['model.mlp_groups=8', 'model.active_groups=2',
                                           'model.group_router=attention'])
  assert config.from_dict(shared.to_dict()).model.group_router == 'attention'


def test_a_damaged_config_file_is_an_error_naming_it(tmp_path):
  path = tmp_path / 'config.json'
  path.write_text(TrainConfig(steps=7).to_json())
  assert config.read_config(str(path)).steps == 7
  for text, why in (('{"model": ', 'not JSON .*the file is damaged'),
                    ('[1]', r'not a config \(a JSON list, not an object\)'),
                    ('{"format": 99}', 'config format 99 is not one this version reads')):
    path.write_text(text)
    with pytest.raises(ValueError, match=f'^{path}: {why}'):
      config.read_config(str(path))
