"""The default run: a small gated LM on the built-in synthetic multi-task benchmark.

Two layers of 8 heads with a top-2 gate that reads the task token and the input (the
prompt) and picks each layer's heads per sequence. Finishes in a few minutes on a laptop
CPU; no download.
"""

from gating.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig(num_layers=2, features=64, num_heads=8, gate='topk', active_heads=2,
                        noise='gumbel'),
      data=DataConfig(kind='synthetic'),
      optim=OptimConfig(learning_rate=3e-3, warmup_steps=100),
      steps=1500, batch_size=64)
