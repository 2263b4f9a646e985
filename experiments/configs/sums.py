"""The default run: the headline benchmark (two-digit sums over 8 tasks), at a budget
that fits five minutes of a 2-core CPU.

The data (`gating/data/tasks.py`, frozen for the synthetic study in docs/tuning.md): each
row is a task token, 12 input digits, a separator and 12 answer digits; task t's answer
digit i is the sum mod 10 of two input digits at positions fixed per task and digit, over
8 tasks, plus one key-value recall and one induction task. Static pruning to 1 or 2 heads
per layer stays 27-51 points below dense here: heads are the bottleneck, so routing has
something to win. The model: 2 layers of 8 heads of width 4 (D = 64); every layer's top-2
gate reads the prompt (P = 14 tokens) and picks its heads per sequence. Training: 10000
steps of 64 sequences, the first 2500 with all 8 heads open (K = 8: a dense warm start in
the same run; a quarter of the steps beat half and none on validation, docs/tuning.md),
the rest at K = 2; under five minutes on a 2-core laptop CPU; no download. The frozen rows
it is compared with are the `default_job` sweep (experiments/configs/sweeps.py,
docs/results/default_job.csv).
"""

from gating.training.config import DataConfig, ModelConfig, OptimConfig, TrainConfig


def config() -> TrainConfig:
  return TrainConfig(
      model=ModelConfig(num_layers=2, features=64, num_heads=8, head_dim=4, gate='topk',
                        active_heads=2),
      data=DataConfig(kind='synthetic', num_tasks=8, num_terms=2, input_len=12,
                      num_digits=10, num_recall_tasks=1, num_induction_tasks=1),
      optim=OptimConfig(learning_rate=3e-3, warmup_steps=100),
      steps=10000, batch_size=64, k_schedule=((8, 2500),))
