"""The default run: a small gated LM on the built-in synthetic multi-task benchmark.

The benchmark (frozen for the study; see docs/tuning.md and README "The study"): 32
tasks that each apply their own fixed permutation to 12 input digits, plus one key-value
recall task and one induction task. The model: 2 layers of 8 heads of width 4 (D = 64);
every layer's top-2 gate reads the prompt (task token, input digits and separator:
P = 14 tokens) and picks its heads per sequence. 6000 steps of 64 sequences: about 3
minutes on a 2-core laptop CPU; no download.
"""

from gating.training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig(num_layers=2, features=64, num_heads=8, head_dim=4, gate='topk',
                        active_heads=2),
      data=DataConfig(kind='synthetic', num_tasks=32, input_len=12, num_digits=10,
                      num_recall_tasks=1, num_induction_tasks=1),
      optim=OptimConfig(learning_rate=3e-3, warmup_steps=100),
      steps=6000, batch_size=64)
