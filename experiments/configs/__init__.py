"""Named presets: each module's `config()` returns a TrainConfig. The default, `sums`, is
the headline benchmark at a five-minute budget; `synthetic` is the first study's
permutation benchmark (the preset every synthetic sweep builds on)."""

from gating.training.config import TrainConfig

from experiments.configs import shakespeare, sums, synthetic, text

DEFAULT = 'sums'
PRESETS = {'sums': sums.config, 'synthetic': synthetic.config, 'text': text.config,
           'shakespeare': shakespeare.config}


def get(name: str) -> TrainConfig:
  if name not in PRESETS:
    raise ValueError(f'unknown preset {name!r}; known presets: {sorted(PRESETS)}')
  return PRESETS[name]()
