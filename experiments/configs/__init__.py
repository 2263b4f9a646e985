"""Named presets: each module's `config()` returns a TrainConfig (the default: synthetic)."""

from gating.training.config import TrainConfig

from experiments.configs import shakespeare, synthetic, text

PRESETS = {'synthetic': synthetic.config, 'text': text.config, 'shakespeare': shakespeare.config}


def get(name: str) -> TrainConfig:
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; known presets: {sorted(PRESETS)}')
  return PRESETS[name]()
