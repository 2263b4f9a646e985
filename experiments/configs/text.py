"""A byte-level gated LM on the built-in multi-domain corpus: the running Python's standard
library source (code), its pydoc documentation text (prose) and tinyshakespeare (verse).
Each sequence stays within one domain, so the gate has something to route on: every
layer's top-2 gate reads the first P = 32 bytes of the window."""

from gating.training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig(num_layers=4, features=128, num_heads=8, prefix_len=32, gate='topk',
                        active_heads=2),
      data=DataConfig(kind='text', sources=('python', 'pydoc', 'shakespeare'), seq_len=128),
      optim=OptimConfig(learning_rate=2e-3, warmup_steps=100),
      steps=1000, batch_size=32)
