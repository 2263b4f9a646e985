"""A byte-level gated LM on tinyshakespeare alone (../shared/data/tinyshakespeare.txt)."""

from gating.training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig(num_layers=4, features=128, num_heads=8, prefix_len=32, gate='topk',
                        active_heads=4),
      data=DataConfig(kind='text', sources=('shakespeare',), seq_len=128),
      optim=OptimConfig(learning_rate=2e-3, warmup_steps=100),
      steps=1000, batch_size=32)
