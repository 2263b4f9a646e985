"""Named sweeps: lists of overrides over a preset, run by `python -m experiments.sweep NAME`.

Each point is a list of 'key=value' overrides (exactly what `--set` takes); every point
runs once per seed in `seeds`, into the folder f'{point}_s{seed}'. Edit the lists freely:
a sweep folder records the definition it was started with and refuses to continue under
another one.

The study (issue 5), H = 8 heads per layer, each point evaluated on the test split on the
gathered path at its own K:
  synthetic   dense; static hard-concrete (the Voita baseline) at K = 1, 2, 4; dynamic
              top-k and dynamic hard-concrete at K = 1, 2, 4; 3 seeds.
  text        the same rules at K = 2, 4 on the multi-domain corpus; 3 seeds.
  tiny        two points, a few steps, a tiny model: for the tests.

The hard-concrete rules (static and dynamic) train with the budget K (the top-K open
heads run) and the target Lagrangian at t = K / H, so their own gate ends near K open
heads; top-k trains with Gumbel exploration noise and no sparsity term (its budget is K).
"""

from gating.sweep import Sweep

H = 8


def dense(h=H):
  # Overrides apply (and are validated) one by one: K = H first, which both the preset's
  # top-k gate and the dense gate accept.
  return [f'model.active_heads={h}', 'model.gate=dense', 'model.noise=none']


def static(k, warmup=300):
  return ['model.gate=static', f'model.active_heads={k}', 'model.noise=none',
          f'loss.target_fraction={k / H}', f'loss.target_warmup_steps={warmup}']


def topk(k):
  return ['model.gate=topk', f'model.active_heads={k}', 'model.noise=gumbel']


def hard_concrete(k, warmup=300):
  return ['model.gate=hard_concrete', f'model.active_heads={k}', 'model.noise=none',
          f'loss.target_fraction={k / H}', f'loss.target_warmup_steps={warmup}']


def grid(ks):
  """dense, then static, topk and hard_concrete at each K: {point name: overrides}."""
  points = {'dense': dense()}
  points.update({f'static_k{k}': static(k) for k in ks})
  points.update({f'topk_k{k}': topk(k) for k in ks})
  points.update({f'hard_concrete_k{k}': hard_concrete(k) for k in ks})
  return points


SWEEPS = {
    'synthetic': Sweep(
        name='synthetic', preset='synthetic', points=grid((1, 2, 4)), seeds=(0, 1, 2),
        common=(f'model.num_heads={H}',),
        description='synthetic multi-task benchmark: dense vs static vs dynamic, K = 1, 2, 4'),
    'text': Sweep(
        name='text', preset='text', points=grid((2, 4)), seeds=(0, 1, 2),
        common=(f'model.num_heads={H}',),
        description='multi-domain byte LM: dense vs static vs dynamic, K = 2, 4'),
    'tiny': Sweep(
        name='tiny', preset='synthetic',
        points={'dense': dense(4), 'topk_k2': ['model.gate=topk', 'model.active_heads=2']},
        seeds=(0,),
        common=('steps=6', 'eval_every=6', 'checkpoint_every=2', 'batch_size=16',
                'eval_batches=1', 'model.num_layers=1', 'model.features=32',
                'model.num_heads=4', 'optim.warmup_steps=2',
                'data.num_tasks=4', 'data.input_len=6', 'data.num_digits=6',
                'data.num_recall_tasks=1', 'data.num_induction_tasks=1',
                'data.num_train=256', 'data.num_validation=32', 'data.num_test=32'),
        description='two tiny points, a few steps (the tests)'),
}


def get(name: str) -> Sweep:
  if name not in SWEEPS:
    raise ValueError(f'unknown sweep {name!r}; known sweeps: {sorted(SWEEPS)}')
  return SWEEPS[name]
