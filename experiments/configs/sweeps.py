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
  tiny        two points and a warm start, a few steps, a tiny model: for the tests.

The recipes (issue 11), tuned on the validation split before the study is frozen:
  recipes_tune  text, K = 2 of 8, seeds 0 and 1: one elastic model per seed (dense gate,
                sub-models at K = 2 and 4 distilled from the full pass, 400 steps), then
                routers fitted to it, the model frozen, for 150 steps each: the three
                importance labels with BCE on the top-K, grad x activation with the
                listwise loss, and a static router fitted to the same labels.
  mlp_router    (issue 12) text, validation, seeds 0 and 1, heads and MLP groups at 2 of 8
                after a 300-step dense warm start, as the `text` sweep's top-k: the groups
                routed by each MLP's own router, or by the attention's (mlp_router=shared).
  width_tune    (issue 12) the same point after a 300-step elastic warm start over heads
                and groups (sub-models at K = Kf = 1, 2, 4) instead of a dense one.
  width         (issue 12) the study, test split, seeds 0, 1, 2, 600 steps each: dense;
                at about 0.52x of dense forward FLOPs (XLA's count, eval forward) a thin
                dense model from scratch (4 heads of 16, F = 256), static pruning of heads
                and groups (K = 4, Kf = 4 of 8), groups routed (Kf = 1, all heads) and
                both routed (K = 4, Kf = 4), plus heads alone at K = 1 (0.64x, their
                floor); at about 0.35x thin (2 heads, F = 192), static (K = 2, Kf = 3)
                and both routed (K = 2, Kf = 3). Routed points train 300 steps from the
                warm start WIDTH_WARM, as in the `text` sweep; static and thin train from
                scratch.
  capacity_tune, capacity_lr, capacity_12k
                (issue 11, item 6) synthetic, validation, seeds 0 and 1: looking for a
                benchmark on which dense converges and beats static pruning at K <= 2
                (64 permutation tasks; a higher learning rate; 12000 steps). Every result
                is in docs/tuning.md; no variant has been frozen yet.
  capacity_terms  answers that each sum 3 input digits (data.num_terms = 3), dense
                against static K = 2 and 4, 12000 steps.
  capacity_round5 two terms per answer, or the 32 permutation tasks with heads of width 2,
                dense against static K = 2, 12000 steps.
  capacity_round6 digits drawn from 64 symbols instead of 10 (data.num_digits = 64: a
                copy carries 6 bits through heads of width 4), dense against static
                K = 1, 2; and two terms per answer over 8 tasks instead of 32, dense
                against static K = 1, 2; 12000 steps.
  capacity_round7 round 6's two variants, dense only, 24000 steps: does dense converge?
  capacity_round8 two terms per answer over 8 tasks with a residual stream twice as wide
                (model.features = 128, heads still of width 4), 12000 steps: dense, and
                static K = 1, 2; and dense at D = 64 with twice the learning rate.
  capacity_round9 two terms per answer over 8 tasks (D = 64), 24000 steps: static K = 1, 2
                at round 7's budget, and a first look at the recipes there: an elastic
                model (sub-models at K = 1, 2, 4) for 6000 steps, which costs about as
                many FLOPs as dense's 24000, then routers fitted to its output-norm labels
                (per sequence, static, one shared head) at K = 1, 2.
  capacity_round10 the same tasks, top-k at K = 2 routed end to end for 24000 steps: after
                a 12000-step dense warm start (the old study's rule), or from scratch with
                a router that reads the task token alone (model.prefix_len = 1) and a load
                balance of 0.01.
  recipes       the study, frozen after recipes_tune (docs/tuning.md): text, test split,
                seeds 0, 1, 2, K = 2 and 4. One elastic model per seed (sub-models at
                K = 1, 2, 4; 1500 steps), then, the model frozen, routers fitted to
                output-norm labels (BCE, 150 steps): per-sequence, static (one subset
                for all, fitted to the same labels), and per-sequence with one shared
                head; and a dense model trained for the same FLOPs as the elastic model
                and one fit (XLA's count: 1500 x 9.58e10 + 150 x 2.3e11 = 1.79e14, a
                dense step 2.40e10: 7450 steps).
  synthetic_sums  the synthetic study re-run on the benchmark frozen after
                capacity_round10 (docs/tuning.md): answers that each sum two digits,
                over 8 tasks (data.num_terms = 2, data.num_tasks = 8), 24000 steps per
                point, test split, seeds 0, 1, 2. Dense; static hard-concrete at K = 1,
                2, 4; and top-k routed end to end at K = 1, 2, 4 after a 12000-step
                dense warm start (the old study's rule, which won round 10).
  synthetic_recipes the recipes on the same benchmark, test split, seeds 0, 1, 2: one
                elastic model per seed (sub-models at K = 1, 2, 4) for 6000 steps, the
                same training FLOPs as dense's 24000 (XLA's count: 2.187e13 against
                2.189e13), then the text study's fits at K = 1, 2, 4 (per sequence,
                static, one shared head at K = 2, 4). Dense at equal FLOPs is the dense
                row of synthetic_sums.

Specialization built by the data (c-BTM, SmallTalk; gate='slices'):
  slices_pilot  text, validation, seeds 0 and 1, 300 steps from scratch, the same
                training tokens per row: wide dense (8 heads, F = 512), thin dense
                (4 heads of width 16, F = 256), and slices of 2 shared + 2 routed heads
                and MLP groups of 8 (E = 3, the thin model's active width) assigned by
                domain label and by balanced k-means (routed by the first 32 bytes at
                validation). A first look at one small budget, before the study.
  slices_pilot_b  the same settings, two more rows (built after the first half ran):
                slices by prefix loss (SmallTalk, two rounds) and per-token MoH
                (token_topk, 2 shared + 2 routed heads per token, MoH's weights, the thin
                model's MLP; masked path, every head computed).

  slices_pilot_c  the same settings, the plan's last two rows: static hard-concrete at
                K = Kf = 4 of 8, and top-k routed end to end from scratch with 2 shared +
                2 routed heads and MLP groups and load balance 0.01 (the thin model's
                active width).
  slices_tune   the pilot's settings (validation, seeds 0 and 1, 300 steps), the balance
                of the learned assigners (option balance: a slice takes at most
                ceil(b N / E) training rows): balanced k-means with b = 1.5 and b = 3
                (plain k-means), and prefix-loss slices with b = 1.5.

  slices_tune_b  the same settings, a knob left after the freeze: prefix-loss slices
                started from the cluster assigner's k-means (start=cluster) at b = 3
                (the cluster row's balance): do SmallTalk's rounds improve c-BTM's
                clusters?

  slices_study_250, slices_study_800, slices_study_2500  the study, frozen after
                slices_tune: text, test split, eight rows at 250, 800 and 2500 steps of
                4096 tokens (seeds 0, 1, 2; 0, 1, 2; 0, 1): thin dense (the row to beat),
                wide dense, static hard-concrete K = Kf = 4, top-k end to end with 2
                shared heads and groups, slices by label, by k-means (balance 3, routed
                by the prefix) and by prefix loss, and per-token MoH.

The default job (`python -m experiments.train`, preset `sums`: the same benchmark at
10000 steps, top-k at K = 2 after 2500 steps with all 8 heads open, in one run):
  default_tune  validation, seeds 0 and 1: how long the all-heads phase of that run
                should be (half of the steps, a quarter, none; a quarter won, frozen).
  default_job   the frozen rows the default job prints its result beside, test split,
                seeds 0, 1, 2, 10000 steps each: dense, static hard-concrete K = 2 and
                the default job itself (top-k K = 2; seed 0 is the run a fresh machine
                makes).

Every point has the same budget of training steps, STEPS. Dense and static train from
scratch. The dynamic rules start from a dense warm start of WARM steps (one per seed,
shared by all dynamic points of that seed; its steps count toward their budget) and train
STEPS - WARM more with their budget K. Why (from the tuning runs listed in
docs/tuning.md): a per-sequence gate from scratch trains each head on about K/H of the
data and fell behind; after a dense warm start it keeps the heads' general training.
Static pruning from the same warm start did worse than from scratch, so it trains from
scratch.
All rules train without exploration noise (Gumbel noise made the selected heads vary at
random and cost 30-50 accuracy points in tuning) and without a sparsity penalty: the
budget K sets the sparsity.
"""

from gating.study.sweep import WARM, Sweep

H = 8


def dense():
  return ['model.gate=dense', 'model.active_heads=none']


def static(k):
  return ['model.gate=static', f'model.active_heads={k}']


def dynamic(rule, k, steps):
  return [f'model.gate={rule}', f'model.active_heads={k}', f'init_from={WARM}',
          f'steps={steps}']


def grid(ks, steps, warm):
  """dense, then static, topk and hard_concrete at each K: {point name: overrides}."""
  points = {'dense': [*dense(), f'steps={steps}']}
  points.update({f'static_k{k}': [*static(k), f'steps={steps}'] for k in ks})
  points.update({f'topk_k{k}': dynamic('topk', k, steps - warm) for k in ks})
  points.update({f'hard_concrete_k{k}': dynamic('hard_concrete', k, steps - warm)
                 for k in ks})
  return points


def elastic(ks, steps):
  return [*dense(), 'model.eval_path=masked', f"loss.elastic_ks={','.join(map(str, ks))}",
          f'steps={steps}']


def fit(k, labels, loss='bce', steps=150, *extra):
  """A router fit on the warm start (the elastic run), as experiments.fit_router makes it."""
  return ['model.gate=topk', f'model.active_heads={k}', f'init_from={WARM}',
          f'loss.router_labels={labels}', f'loss.router_loss={loss}', f'steps={steps}',
          'optim.learning_rate=3e-3', 'optim.warmup_steps=20', *extra]


def recipe_fits(ks, shared_ks, prefix=''):
  """The recipes' fits on the (elastic) warm start, each to output-norm labels with BCE for
  150 steps: a per-sequence router and a static subset at every K in ks, and a router with
  one shared head at every K in shared_ks."""
  return {**{f'{prefix}router_k{k}': fit(k, 'output_norm') for k in ks},
          **{f'{prefix}static_k{k}': fit(k, 'output_norm', 'bce', 150, 'model.router=static')
             for k in ks},
          **{f'{prefix}router_shared1_k{k}': fit(k, 'output_norm', 'bce', 150,
                                                 'model.shared_heads=1') for k in shared_ks}}


def width(k, kf, steps, *extra):
  """Heads (K of 8) and MLP groups (Kf of 8) routed by top-k from the warm start."""
  return [*dynamic('topk', k, steps), f'model.active_groups={kf}', *extra]


def thin(heads, mlp):
  """A dense model with fewer heads of the same width Dh = 16 and a narrower MLP."""
  return [*dense(), f'model.num_heads={heads}', 'model.head_dim=16',
          f'model.mlp_features={mlp}', 'model.mlp_groups=none', 'model.active_groups=none']


def slices(assigner, *options):
  """gate='slices' (by `assigner`, with the rule's other `options`, e.g. 'balance=1.5'): 2
  shared + 2 routed of 8 heads and of 8 MLP groups, E = 3 slices, on the gathered path from
  scratch (the same active width as thin(4, 256))."""
  return ['model.gate=slices', 'model.active_heads=4', 'model.shared_heads=2',
          'model.mlp_groups=8', 'model.active_groups=4', 'model.shared_groups=2',
          'model.path=gathered', 'model.noise=none',
          'model.gate_options=' + ','.join([f'assigner={assigner}', *options])]


# The slices study's rows, frozen after slices_tune (docs/tuning.md): every row at the thin
# model's active width (2 shared + 2 routed of 8 heads and of 8 MLP groups) but wide dense.
SLICES_ROWS = {
    'thin_dense': thin(4, 256),
    'wide_dense': [*dense(), 'model.mlp_groups=none', 'model.active_groups=none'],
    'static_k4_kf4': [*static(4), 'model.mlp_groups=8', 'model.active_groups=4'],
    'topk_shared2': ['model.gate=topk', 'model.active_heads=4', 'model.shared_heads=2',
                     'model.mlp_groups=8', 'model.active_groups=4', 'model.shared_groups=2',
                     'model.noise=none', 'loss.load_balance_weight=0.01'],
    'slices_label': slices('label'),
    'slices_cluster': slices('cluster', 'balance=3'),
    'slices_prefix_loss': slices('prefix_loss'),
    'token_topk': ['model.gate=token_topk', 'model.active_heads=4', 'model.shared_heads=2',
                   'model.path=masked', 'model.noise=none', 'model.scaled_weights=true',
                   'model.mlp_features=256', 'model.mlp_groups=none',
                   'model.active_groups=none'],
}


def slices_study(steps: int, seeds: tuple[int, ...]) -> Sweep:
  """The slices study at one token budget (`steps` of batch 32 x 128 bytes), test split."""
  return Sweep(
      name=f'slices_study_{steps}', preset='text', seeds=seeds,
      common=(f'model.num_heads={H}', f'steps={steps}'), points=SLICES_ROWS,
      description=f'specialization built by the data at {steps} steps '
                  f'({steps * 4096 / 1e6:.1f} M tokens a row): slices by label, cluster and '
                  'prefix loss against thin and wide dense, static, top-k end to end and '
                  'per-token MoH (test)')


# The synthetic benchmark frozen after capacity_round10 (docs/tuning.md): two-digit sums.
SUMS = (f'model.num_heads={H}', 'data.num_terms=2', 'data.num_tasks=8')

# The width study's warm start, frozen after width_tune (docs/tuning.md).
WIDTH_WARM = (*dense(), 'model.active_groups=none', 'steps=300')

SWEEPS = {
    'slices_pilot': Sweep(
        name='slices_pilot', preset='text', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'steps=300'),
        points={'wide_dense': [*dense(), 'model.mlp_groups=none', 'model.active_groups=none'],
                'thin_dense': thin(4, 256),
                'slices_label': slices('label'),
                'slices_cluster': slices('cluster')},
        description='a first look at slices against thin dense at one small budget '
                    '(300 steps), validation'),
    'slices_pilot_b': Sweep(
        name='slices_pilot_b', preset='text', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'steps=300'),
        points={'slices_prefix_loss': slices('prefix_loss'),
                'token_topk': ['model.gate=token_topk', 'model.active_heads=4',
                               'model.shared_heads=2', 'model.path=masked',
                               'model.noise=none', 'model.scaled_weights=true',
                               'model.mlp_features=256', 'model.mlp_groups=none',
                               'model.active_groups=none']},
        description="the pilot's other two rows: slices by prefix loss, per-token MoH"),
    'slices_pilot_c': Sweep(
        name='slices_pilot_c', preset='text', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'steps=300'),
        points={'static_k4_kf4': [*static(4), 'model.mlp_groups=8', 'model.active_groups=4'],
                'topk_shared2': ['model.gate=topk', 'model.active_heads=4',
                                 'model.shared_heads=2', 'model.mlp_groups=8',
                                 'model.active_groups=4', 'model.shared_groups=2',
                                 'model.noise=none', 'loss.load_balance_weight=0.01']},
        description="the plan's last two rows at the pilot's settings: static hard-concrete "
                    'and top-k end to end from scratch (2 shared + 2 routed, load balance)'),
    **{f'slices_study_{steps}': slices_study(steps, seeds)
       for steps, seeds in ((250, (0, 1, 2)), (800, (0, 1, 2)), (2500, (0, 1)))},
    'slices_tune': Sweep(
        name='slices_tune', preset='text', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'steps=300'),
        points={'slices_cluster_b1.5': slices('cluster', 'balance=1.5'),
                'slices_cluster_b3': slices('cluster', 'balance=3'),
                'slices_prefix_loss_b1.5': slices('prefix_loss', 'balance=1.5')},
        description="the pilot's settings, the assigners' balance: k-means and prefix-loss "
                    'slices that may be unequal (validation)'),
    'slices_tune_b': Sweep(
        name='slices_tune_b', preset='text', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'steps=300'),
        points={'slices_prefix_loss_from_cluster_b3': slices('prefix_loss', 'start=cluster',
                                                            'balance=3')},
        description="the pilot's settings, prefix-loss slices started from the k-means "
                    'clusters (b = 3) instead of random slices (validation)'),
    'synthetic': Sweep(
        name='synthetic', preset='synthetic', points=grid((1, 2, 4), steps=6000, warm=3000),
        seeds=(0, 1, 2), common=(f'model.num_heads={H}',),
        warm_start=(*dense(), 'steps=3000'),
        description='synthetic multi-task benchmark: dense vs static vs dynamic, K = 1, 2, 4'),
    'text': Sweep(
        name='text', preset='text', points=grid((2, 4), steps=600, warm=300),
        seeds=(0, 1, 2), common=(f'model.num_heads={H}',),
        warm_start=(*dense(), 'steps=300'),
        description='multi-domain byte LM: dense vs static vs dynamic, K = 2, 4'),
    'tiny': Sweep(
        name='tiny', preset='synthetic',
        points={'dense': [*dense(), 'steps=6'],
                'topk_k2': ['model.gate=topk', 'model.active_heads=2', f'init_from={WARM}',
                            'steps=6']},
        seeds=(0,),
        common=('eval_every=6', 'checkpoint_every=2', 'batch_size=16',
                'eval_batches=1', 'model.num_layers=1', 'model.features=32',
                'model.num_heads=4', 'model.head_dim=none', 'optim.warmup_steps=1',
                'data.num_tasks=4', 'data.input_len=6', 'data.num_digits=6',
                'data.num_recall_tasks=1', 'data.num_induction_tasks=1',
                'data.num_train=256', 'data.num_validation=32', 'data.num_test=32'),
        warm_start=(*dense(), 'steps=2'),
        description='two tiny points and a warm start, a few steps (the tests)'),
    'recipes_tune': Sweep(
        name='recipes_tune', preset='text', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}',),
        warm_start=tuple(elastic((2, 4), steps=400)),
        points={'fit_grad_x_act_k2': fit(2, 'grad_x_act'),
                'fit_output_norm_k2': fit(2, 'output_norm'),
                'fit_ablation_k2': fit(2, 'ablation'),
                'fit_grad_x_act_listwise_k2': fit(2, 'grad_x_act', 'listwise'),
                'static_grad_x_act_k2': fit(2, 'grad_x_act', 'bce', 150, 'model.router=static')},
        description='tuning the recipes on validation: elastic text model, routers fitted '
                    'to three importance labels, K = 2'),
    'mlp_router': Sweep(
        name='mlp_router', preset='text', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'model.mlp_groups=8'),
        warm_start=(*dense(), 'model.active_groups=none', 'steps=300'),
        points={'own_k2_kf2': [*dynamic('topk', 2, 300), 'model.active_groups=2'],
                'shared_k2_kf2': [*dynamic('topk', 2, 300), 'model.active_groups=2',
                                  'model.mlp_router=shared']},
        description="which router trains the MLP groups better: each MLP's own, or the "
                    "attention's shared; K = 2 heads and Kf = 2 groups of 8"),
    'width_tune': Sweep(
        name='width_tune', preset='text', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'model.mlp_groups=8'),
        warm_start=(*elastic((1, 2, 4), steps=300), 'model.active_groups=none'),
        points={'elastic_own_k2_kf2': [*dynamic('topk', 2, 300), 'model.active_groups=2']},
        description='heads and MLP groups at 2 of 8 routed end to end after an elastic warm '
                    'start over heads and groups (against the dense warm start of mlp_router)'),
    'width': Sweep(
        name='width', preset='text', seeds=(0, 1, 2),
        common=(f'model.num_heads={H}', 'model.mlp_groups=8'),
        warm_start=WIDTH_WARM,
        points={'dense': [*dense(), 'model.mlp_groups=none', 'steps=600'],
                # about 0.52x of dense forward FLOPs
                'thin_h4_f256': [*thin(4, 256), 'steps=600'],
                'static_k4_kf4': [*static(4), 'model.active_groups=4', 'steps=600'],
                'groups_kf1': width(8, 1, 300),
                'both_k4_kf4': width(4, 4, 300),
                'heads_k1': width(1, 8, 300),      # 0.64x: heads alone go no lower
                # about 0.35x
                'thin_h2_f192': [*thin(2, 192), 'steps=600'],
                'static_k2_kf3': [*static(2), 'model.active_groups=3', 'steps=600'],
                'both_k2_kf3': width(2, 3, 300)},
        description='dynamic width at about 0.52x and 0.35x of dense forward FLOPs: heads, '
                    'MLP groups or both routed, against dense, thin dense models trained '
                    'from scratch and static pruning of heads and groups'),
    'capacity_tune': Sweep(
        name='capacity_tune', preset='synthetic', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}',),
        points={'dense_t64': [*dense(), 'data.num_tasks=64', 'steps=6000'],
                'static_k2_t64': [*static(2), 'data.num_tasks=64', 'steps=6000'],
                'static_k1_t64': [*static(1), 'data.num_tasks=64', 'steps=6000'],
                'dense_t64_12k': [*dense(), 'data.num_tasks=64', 'steps=12000']},
        description='(issue 11, item 6) a synthetic benchmark that measures capacity: 64 '
                    'permutation tasks instead of 32, dense against static K = 1, 2'),
    'capacity_lr': Sweep(
        name='capacity_lr', preset='synthetic', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'data.num_tasks=64', 'steps=6000'),
        points={'dense_lr6e-3': [*dense(), 'optim.learning_rate=6e-3'],
                'dense_lr1e-2': [*dense(), 'optim.learning_rate=1e-2'],
                'static_k2_lr1e-2': [*static(2), 'optim.learning_rate=1e-2'],
                'static_k1_lr1e-2': [*static(1), 'optim.learning_rate=1e-2']},
        description='(issue 11, item 6) 64 tasks: does a higher learning rate make dense '
                    'converge in 6000 steps, and does static K = 1, 2 stay below it?'),
    'capacity_12k': Sweep(
        name='capacity_12k', preset='synthetic', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'data.num_tasks=64', 'steps=12000'),
        points={'static_k2': static(2), 'static_k1': static(1)},
        description='(issue 11, item 6) 64 tasks, 12000 steps (dense in capacity_tune: '
                    '0.997 and 0.981): do static K = 1, 2 stay below dense?'),
    'capacity_terms': Sweep(
        name='capacity_terms', preset='synthetic', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'steps=12000'),
        points={'dense_terms3': [*dense(), 'data.num_terms=3'],
                'static_k2_terms3': [*static(2), 'data.num_terms=3'],
                'static_k4_terms3': [*static(4), 'data.num_terms=3']},
        description='(issue 11, item 6) answers that sum 3 digits at task-specific '
                    'positions (data.num_terms=3): do static K = 2, 4 fall behind dense?'),
    'capacity_round5': Sweep(
        name='capacity_round5', preset='synthetic', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'steps=12000'),
        points={'dense_terms2': [*dense(), 'data.num_terms=2'],
                'static_k2_terms2': [*static(2), 'data.num_terms=2'],
                'dense_dh2': [*dense(), 'model.head_dim=2'],
                'static_k2_dh2': [*static(2), 'model.head_dim=2']},
        description='(issue 11, item 6) two terms per answer, or heads of width 2: does '
                    'static K = 2 fall behind dense?'),
    'capacity_round6': Sweep(
        name='capacity_round6', preset='synthetic', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'steps=12000'),
        points={'dense_v64': [*dense(), 'data.num_digits=64'],
                'static_k1_v64': [*static(1), 'data.num_digits=64'],
                'static_k2_v64': [*static(2), 'data.num_digits=64'],
                # two terms: an answer needs the task and two digits, three lookups, and
                # static K = 1 has one head in each of two layers: it must squeeze two
                # lookups into one attention pattern, while a router that picks a head per
                # task makes the task lookup needless
                'dense_terms2_t8': [*dense(), 'data.num_terms=2', 'data.num_tasks=8'],
                'static_k1_terms2_t8': [*static(1), 'data.num_terms=2', 'data.num_tasks=8'],
                'static_k2_terms2_t8': [*static(2), 'data.num_terms=2', 'data.num_tasks=8']},
        description='(issue 11, item 6) digits from an alphabet of 64 (each copy carries '
                    '6 bits through heads of width 4), or two terms per answer over 8 '
                    'tasks only: does static K <= 2 fall behind a converged dense?'),
    'capacity_round7': Sweep(
        name='capacity_round7', preset='synthetic', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'steps=24000'),
        points={'dense_v64': [*dense(), 'data.num_digits=64'],
                'dense_terms2_t8': [*dense(), 'data.num_terms=2', 'data.num_tasks=8']},
        description='(issue 11, item 6) round 6 at twice the steps, dense only: does '
                    'dense converge at all on the two variants where it had not?'),
    'capacity_round8': Sweep(
        name='capacity_round8', preset='synthetic', seeds=(0, 1), split='validation',
        common=(f'model.num_heads={H}', 'steps=12000', 'data.num_terms=2',
                'data.num_tasks=8'),
        # (dense first: the points that decide the round)
        points={'dense_d128': [*dense(), 'model.features=128'],
                'dense_lr6e-3': [*dense(), 'optim.learning_rate=6e-3'],
                'static_k1_d128': [*static(1), 'model.features=128'],
                'static_k2_d128': [*static(2), 'model.features=128']},
        description='(issue 11, item 6) two terms per answer over 8 tasks: does a wider '
                    'residual stream (D = 128, heads of width 4) or a higher learning rate '
                    'make dense converge in 12000 steps, with static K <= 2 still behind?'),
    'capacity_round9': Sweep(
        name='capacity_round9', preset='synthetic', seeds=(0, 1), split='validation',
        common=SUMS,
        warm_start=tuple(elastic((1, 2, 4), steps=6000)),
        points={**{f'static_k{k}': [*static(k), 'steps=24000'] for k in (1, 2)},
                **recipe_fits((1, 2), (2,), prefix='fit_')},
        description='(issue 11, item 6) two terms per answer over 8 tasks: static K = 1, 2 '
                    'at 24000 steps, and the recipes (elastic model, 6000 steps; routers '
                    'fitted to it) at K = 1, 2'),
    'capacity_round10': Sweep(
        name='capacity_round10', preset='synthetic', seeds=(0, 1), split='validation',
        common=SUMS,
        warm_start=(*dense(), 'steps=12000'),
        points={'topk_k2': dynamic('topk', 2, 12000),
                'topk_k2_task_token': ['model.gate=topk', 'model.active_heads=2',
                                       'model.prefix_len=1', 'loss.load_balance_weight=0.01',
                                       'steps=24000']},
        description='(issue 11) two terms per answer over 8 tasks: top-k at K = 2 routed end '
                    'to end, after a dense warm start or from scratch reading the task token'),
    'synthetic_sums': Sweep(
        name='synthetic_sums', preset='synthetic', seeds=(0, 1, 2),
        common=SUMS,
        warm_start=(*dense(), 'steps=12000'),
        points={'dense': [*dense(), 'steps=24000'],
                **{f'static_k{k}': [*static(k), 'steps=24000'] for k in (1, 2, 4)},
                **{f'topk_k{k}': dynamic('topk', k, 12000) for k in (1, 2, 4)}},
        description='two-digit sums over 8 tasks: dense vs static vs top-k routed end to '
                    'end after a dense warm start, K = 1, 2, 4'),
    'synthetic_recipes': Sweep(
        name='synthetic_recipes', preset='synthetic', seeds=(0, 1, 2),
        common=SUMS,
        warm_start=tuple(elastic((1, 2, 4), steps=6000)),
        points=recipe_fits((1, 2, 4), (2, 4)),
        description='the recipes on two-digit sums over 8 tasks: an elastic model at '
                    "dense's training FLOPs, routers fitted to its head importance (per "
                    'sequence, static, one shared head) at K = 1, 2, 4'),
    'default_tune': Sweep(
        name='default_tune', preset='sums', seeds=(0, 1), split='validation',
        points={'topk_k2_dense_half': ['k_schedule=8:5000'],
                'topk_k2_dense_quarter': ['k_schedule=8:2500'],
                'topk_k2_scratch': ['k_schedule=']},
        description="the default job's all-heads phase: half of its 10000 steps, a "
                    'quarter, or none (top-k K = 2 from the first step)'),
    'default_job': Sweep(
        name='default_job', preset='sums', seeds=(0, 1, 2),
        points={'dense': [*dense(), 'k_schedule='],
                'static_k2': [*static(2), 'k_schedule='],
                'topk_k2': []},
        description='the default job (top-k K = 2 after 2500 all-heads steps) beside dense '
                    'and static hard-concrete K = 2, each 10000 steps'),
    'recipes': Sweep(
        name='recipes', preset='text', seeds=(0, 1, 2),
        common=(f'model.num_heads={H}',),
        warm_start=tuple(elastic((1, 2, 4), steps=1500)),
        # (the fits first: each starts once its seed's elastic model is trained, and the
        # long dense runs fill the slots after them)
        points={**recipe_fits((2, 4), (2, 4)),
                'dense_equal_flops': [*dense(), 'steps=7450']},
        description='the recipes: elastic model, routers fitted to its head importance '
                    '(per sequence, static, one shared head) at K = 2, 4, and dense at '
                    'equal training FLOPs'),
}


def get(name: str) -> Sweep:
  if name not in SWEEPS:
    raise ValueError(f'unknown sweep {name!r}; known sweeps: {sorted(SWEEPS)}')
  return SWEEPS[name]
